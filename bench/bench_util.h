// bench_util.h — shared pieces of the C++ benchmarks: median timing after a warm-up, random bf16
// data, and NF4 + double quantization as nf4lora.quantize_4bit(double_quant=True) does it.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <random>
#include <vector>

#include "double_quant.h"  // nf4lora_testsupport (tests/cpp/support/)
#include "nf4lora/quantize.h"

namespace nf4lora::bench {

template <class F>
double median_ms(int iters, F&& f) {
  f();  // warm-up: page faults, caches
  std::vector<double> t;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

inline std::vector<uint16_t> random_bf16(int64_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<uint16_t> v(n);
  for (auto& b : v) b = float_to_bf16_bits(d(rng));
  return v;
}

// NF4, block 64, plus double quantization of a bf16 tensor, as nf4lora.quantize_4bit does it.
struct Quantized {
  std::vector<uint8_t> packed;
  std::vector<float> absmax;
  test::DoubleQuant dq;

  AbsmaxSource source() const { return dq.source(); }
};

// Sizes the buffers on first use only, so that timing it in a loop measures quantization.
inline void quantize_dq(const std::vector<uint16_t>& w, int64_t n, int threads, Quantized& q) {
  const int64_t nb = num_blocks(n, 64);
  q.packed.resize(packed_bytes(n));
  q.absmax.resize(nb);
  quantize_4bit_cpu(w.data(), DType::BF16, n, 64, QuantType::NF4, q.packed.data(), q.absmax.data(), threads);
  q.dq.build(q.absmax.data(), nb, threads);
}

}  // namespace nf4lora::bench
