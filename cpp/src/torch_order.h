// torch_order.h — fp32 reductions and RMSNorm rows computed in the order torch's CPU kernels use
// (internal), so that native code gives the same bits as the torch ops it replaces: the decode
// step (decode_llama.cpp) and the trainer's RMSNorm (norm.cpp). Tested through those against torch
// (tests/test_generate.py bit for bit; tests/test_fused_norm.py).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "nf4lora/format.h"

namespace nf4lora::detail {

// torch's utils::CeilLog2: 1 for x <= 2, else the bit length of x - 1.
inline int64_t torch_ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  int64_t bits = 0;
  for (uint64_t v = static_cast<uint64_t>(x - 1); v != 0; v >>= 1) ++bits;
  return bits;
}

// The sum of value(0) .. value(n - 1) (fp32) in the order of torch's CPU sum of a contiguous row
// (SumKernel.cpp: vectorized_inner_sum over vectors of L lanes, row_sum with 4 vector
// accumulators, multi_row_sum's 4-level cascade; then the scalar tail, then the lanes in order).
// torch registers that kernel without its AVX-512 build, so L is 8 on every x86 CPU. L <= 16.
// value(i) is computed where it is added (e.g. a square, rounded to fp32 as torch's tensor of
// squares holds it: these files build with -ffp-contract=off), so no row of it is stored.
template <class Value>
inline float torch_order_sum(const Value& value, int64_t n, int L) {
  constexpr int kIlp = 4, kLevels = 4;
  const int64_t nvec = n / L, rows = nvec / kIlp;
  const int64_t level_power = std::max<int64_t>(4, torch_ceil_log2(rows) / kLevels);
  const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
  float acc[kLevels][kIlp][16] = {};
  auto add_vec = [&](float* dst, int64_t vec) {
    for (int l = 0; l < L; ++l) dst[l] += value(vec * L + l);
  };
  int64_t i = 0;
  while (i + level_step <= rows) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < kIlp; ++k) add_vec(acc[0][k], i * kIlp + k);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k)
        for (int l = 0; l < L; ++l) acc[j][k][l] += acc[j - 1][k][l], acc[j - 1][k][l] = 0.0f;
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < rows; ++i)
    for (int k = 0; k < kIlp; ++k) add_vec(acc[0][k], i * kIlp + k);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < L; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t vec = rows * kIlp; vec < nvec; ++vec) add_vec(acc[0][0], vec);
  for (int k = 1; k < kIlp; ++k)
    for (int l = 0; l < L; ++l) acc[0][0][l] += acc[0][k][l];
  float total = 0.0f;
  for (int64_t e = nvec * L; e < n; ++e) total += value(e);
  for (int l = 0; l < L; ++l) total += acc[0][0][l];
  return total;
}

// One row of LlamaRMSNorm in bf16: out = bf16(w * bf16(x * rstd)), rstd = 1 / sqrt(mean(x^2) +
// eps) with the squares rounded to fp32 and summed in torch's order (the module computes
// x.pow(2).mean(-1): a tensor of squares, then the sum, then / n). Returns rstd.
inline float rms_norm_row_bf16(const uint16_t* x, const uint16_t* w, int64_t n, float eps, int lanes, uint16_t* out) {
  const auto square = [x](int64_t i) {
    const float v = bf16_bits_to_float(x[i]);
    return v * v;
  };
  const float var = torch_order_sum(square, n, lanes) / static_cast<float>(n);
  const float rstd = 1.0f / std::sqrt(var + eps);
  for (int64_t i = 0; i < n; ++i) {
    const float normed = bf16_bits_to_float(float_to_bf16_bits(bf16_bits_to_float(x[i]) * rstd));
    out[i] = float_to_bf16_bits(bf16_bits_to_float(w[i]) * normed);
  }
  return rstd;
}

}  // namespace nf4lora::detail
