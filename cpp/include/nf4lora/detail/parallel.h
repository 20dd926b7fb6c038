// nf4lora/detail/parallel.h — split a range over at most num_threads std::threads (no OpenMP: the
// extension must not bring a second OpenMP runtime next to torch's); the caller's thread takes a
// share, and work below `grain` items per thread runs on fewer threads. Internal, not API; used by
// cpp/src and bench/. Tested through the multi-threaded cases of tests/cpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace nf4lora::detail {

template <class Fn>  // fn(begin, end)
void parallel_for(int64_t count, int64_t grain, int num_threads, const Fn& fn) {
  if (count <= 0) return;
  int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, count / std::max<int64_t>(grain, 1)));
  if (threads <= 1) {
    fn(int64_t{0}, count);
    return;
  }
  const int64_t chunk = (count + threads - 1) / threads;
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t b = t * chunk, e = std::min(count, b + chunk);
    if (b < e) workers.emplace_back([&fn, b, e] { fn(b, e); });
  }
  fn(int64_t{0}, std::min(count, chunk));
  for (auto& w : workers) w.join();
}

}  // namespace nf4lora::detail
