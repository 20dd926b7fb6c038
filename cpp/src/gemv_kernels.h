// gemv_kernels.h — the per-ISA kernel table of the fused 4-bit GEMV / small-M GEMM (internal).
// gemv_ref.cpp is the spec; gemv_avx2.cpp and gemv_avx512.cpp fill the same table and
// gemv_dispatch.cpp picks one by active_cpu_variant() and splits the rows of W over threads.
// Tested by tests/cpp/test_matmul.cpp (every supported variant against Ref and a float64 product).
#pragma once

#include <cstdint>

#include "kernels.h"

namespace nf4lora::detail {

struct GemvArgs {
  const void* x;       // [M, K] in dtype (what the reference reads)
  const float* xf;     // x in fp32, grouped as GemvKernels::x_group says (null for the reference)
  DType dtype;         // of x, bias and y
  int64_t M, K, N;
  const uint8_t* packed;
  const AbsmaxSource* absmax;
  int64_t blocksize;
  QuantType qt;
  const void* bias;    // [N] or null
  void* y;             // [M, N]
};

// Computes y[m, n] for all m < M and n in [n_begin, n_end).
using GemvRowsFn = void (*)(const GemvArgs& a, int64_t n_begin, int64_t n_end);

struct GemvKernels {
  // 0: the kernel reads x itself. G > 0: the kernel wants xf, where every run of 2G elements of
  // a row of x holds its G even-index elements, then its G odd-index ones. That is the order in
  // which one vector of packed bytes splits into high nibbles (even elements) and low nibbles
  // (odd elements), so the kernels never interleave dequantized weights. SIMD kernels require
  // K % blocksize == 0 (then K % 32 == 0 too); the dispatcher routes other shapes to the reference.
  int x_group;
  GemvRowsFn rows;
};

extern const GemvKernels kGemvRefKernels;
#if defined(NF4LORA_HAVE_AVX2)
extern const GemvKernels kGemvAvx2Kernels;
#endif
#if defined(NF4LORA_HAVE_AVX512)
extern const GemvKernels kGemvAvx512Kernels;
#endif

// block_absmax() with the nested block index taken by a shift (nested_blocksize is a validated
// power of two): the 64-bit division there cost ~30% of an M = 1 GEMV with blocksize 64.
// Same decode_nested_absmax, so the same fp32 values bit for bit.
struct AbsmaxReader {
  const AbsmaxSource& a;
  int shift = 0;
  explicit AbsmaxReader(const AbsmaxSource& src) : a(src) {
    if (a.nested())
      while ((int64_t{1} << shift) < a.nested_blocksize) ++shift;
  }
  float operator()(int64_t b) const {
    if (!a.nested()) return a.absmax[b];
    return decode_nested_absmax(a.nested_code[a.qabsmax[b]], a.nested_absmax[b >> shift], *a.offset);
  }
};

// Rows [m_begin, m_end) of x to fp32 in the grouped order above (K a multiple of 2G).
inline void group_x_f32(const void* x, DType dt, int64_t K, int64_t m_begin, int64_t m_end,
                        int group, float* xf) {
  for (int64_t m = m_begin; m < m_end; ++m)
    for (int64_t k0 = 0; k0 < K; k0 += 2 * group)
      for (int i = 0; i < group; ++i) {
        xf[m * K + k0 + i] = load_as_float(x, dt, m * K + k0 + 2 * i);
        xf[m * K + k0 + group + i] = load_as_float(x, dt, m * K + k0 + 2 * i + 1);
      }
}

// The epilogue every variant shares: one fp32 addition of the bias, one rounding to dtype.
inline void store_gemv_output(const GemvArgs& a, int64_t m, int64_t n, float acc) {
  if (a.bias != nullptr) acc += load_as_float(a.bias, a.dtype, n);
  store_from_float(a.y, a.dtype, m * a.N + n, acc);
}

}  // namespace nf4lora::detail
