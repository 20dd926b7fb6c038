// nf4lora/detail/parallel.h — split a range over at most num_threads threads; the caller's thread
// takes a share, and work below `grain` items per thread runs on fewer threads (one: no parallel
// region at all). With OpenMP (NF4LORA_WITH_OPENMP, set by CMake when it finds OpenMP) the threads
// are OpenMP's: the extension links libgomp.so.1, the soname the torch wheel ships its libgomp
// under, so it shares torch's one runtime and pool instead of waking threads that compete with
// torch's spinning workers. Without OpenMP, std::threads started per call. Internal, not API; used
// by cpp/src and bench/. Tested through the multi-threaded cases of tests/cpp and
// tests/test_threads.py (one runtime in the process, same bits at 1 and 2 threads).
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(NF4LORA_WITH_OPENMP)
#if !defined(_OPENMP)
#error "nf4lora was configured with OpenMP but this file is compiled without it (link OpenMP::OpenMP_CXX)"
#endif
#include <omp.h>
#else
#include <thread>
#include <vector>
#endif

namespace nf4lora::detail {

// True when parallel_for runs on OpenMP's threads (what the build info reports).
constexpr bool kParallelOpenMP =
#if defined(NF4LORA_WITH_OPENMP)
    true;
#else
    false;
#endif

template <class Fn>  // fn(begin, end); must not throw on a worker
void parallel_for(int64_t count, int64_t grain, int num_threads, const Fn& fn) {
  if (count <= 0) return;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, count / std::max<int64_t>(grain, 1)));
  if (threads <= 1) {
    fn(int64_t{0}, count);
    return;
  }
#if defined(NF4LORA_WITH_OPENMP)
  // Only a plain parallel region (GOMP_parallel, omp_get_num_threads/thread_num): symbols every
  // libgomp since GCC 4.9 exports, so the older copy in the torch wheel satisfies this build. The
  // runtime may grant fewer threads than asked (nested region, OMP_THREAD_LIMIT): split by what
  // it granted.
#pragma omp parallel num_threads(static_cast<int>(threads))
  {
    const int64_t granted = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t chunk = (count + granted - 1) / granted;
    const int64_t b = t * chunk, e = std::min(count, b + chunk);
    if (b < e) fn(b, e);
  }
#else
  const int64_t chunk = (count + threads - 1) / threads;
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t b = t * chunk, e = std::min(count, b + chunk);
    if (b < e) workers.emplace_back([&fn, b, e] { fn(b, e); });
  }
  fn(int64_t{0}, std::min(count, chunk));
  for (auto& w : workers) w.join();
#endif
}

}  // namespace nf4lora::detail
