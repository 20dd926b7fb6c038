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
#include <utility>

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

// The threads of one parallel_team call: `tid` of `size`; barrier() must be reached by every
// thread of the team (all or none).
struct Team {
  int tid = 0, size = 1;

  void barrier() const {
#if defined(NF4LORA_WITH_OPENMP)
    if (size > 1) {
#pragma omp barrier
    }
#endif
  }
  // This thread's contiguous share [begin, end) of `count` items.
  std::pair<int64_t, int64_t> share(int64_t count) const {
    const int64_t chunk = (count + size - 1) / size;
    const int64_t b = std::min<int64_t>(count, tid * chunk);
    return {b, std::min(count, b + chunk)};
  }
};

// fn(const Team&) on every thread of one team of at most num_threads threads, for work whose
// phases must wait for each other (Team::barrier) without a new parallel region per phase (the
// decode step, cpp/src/decode_llama.cpp). OpenMP only: without it, one thread (a barrier among
// std::threads per call would cost more than the phases it separates). fn must not throw.
template <class Fn>
void parallel_team(int num_threads, const Fn& fn) {
#if defined(NF4LORA_WITH_OPENMP)
  if (num_threads > 1) {
#pragma omp parallel num_threads(num_threads)
    {
      Team t;
      t.tid = omp_get_thread_num();
      t.size = omp_get_num_threads();  // the runtime may grant fewer than asked
      fn(static_cast<const Team&>(t));
    }
    return;
  }
#endif
  (void)num_threads;
  fn(Team{});
}

}  // namespace nf4lora::detail
