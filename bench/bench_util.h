// bench_util.h — shared pieces of the C++ benchmarks: median timing after a warm-up, random bf16
// data, and NF4 + double quantization exactly as nf4lora.quantize_4bit(double_quant=True) does it.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <random>
#include <vector>

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

struct Quantized {
  std::vector<uint8_t> packed, qabsmax;
  std::vector<float> absmax, nested_absmax;
  float offset = 0.0f;

  AbsmaxSource source() const {
    AbsmaxSource a;
    a.qabsmax = qabsmax.data();
    a.nested_absmax = nested_absmax.data();
    a.nested_code = kDynamicSigned;
    a.offset = &offset;
    return a;
  }
};

// NF4, block 64, + double quantization of a bf16 tensor. Sizes the buffers on first use only, so
// that timing it in a loop measures the quantization, not allocation.
inline void quantize_dq(const std::vector<uint16_t>& w, int64_t n, int threads, Quantized& q) {
  const int64_t nb = num_blocks(n, 64);
  q.packed.resize(packed_bytes(n));
  q.absmax.resize(nb);
  q.qabsmax.resize(nb);
  q.nested_absmax.resize(num_blocks(nb, 256));
  quantize_4bit_cpu(w.data(), DType::BF16, n, 64, QuantType::NF4, q.packed.data(), q.absmax.data(), threads);
  double sum = 0.0;
  for (float a : q.absmax) sum += a;
  q.offset = float(sum / nb);
  std::vector<float> centered(nb);
  for (int64_t i = 0; i < nb; ++i) centered[i] = q.absmax[i] - q.offset;
  quantize_8bit_blockwise_cpu(centered.data(), nb, 256, kDynamicSigned, q.qabsmax.data(),
                              q.nested_absmax.data(), threads);
}

}  // namespace nf4lora::bench
