// matmul_4bit_kernels.h — the per-ISA kernel table of matmul_4bit (y = x W^T, small M) and of
// its transposed product matmul_4bit_t (y = g W) (internal). matmul_4bit_ref.cpp is the spec;
// matmul_4bit_{avx2,avx512,avx512_bf16}.cpp fill the same table, and matmul_4bit_dispatch.cpp
// picks one by active_cpu_variant() and splits rows (forward) or columns (transposed) of W over
// threads. Tested by tests/cpp/test_matmul.cpp (every supported variant against Ref and float64).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace nf4lora::detail {

struct MatmulArgs {
  const void* x;       // [M, K] in dtype (what the reference reads)
  const float* xf;     // x in fp32, grouped as MatmulKernels::x_group says (null for the reference)
  const uint16_t* xb;  // or x's bf16 bits, grouped the same way (kernels with x_bf16 set)
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
using MatmulRowsFn = void (*)(const MatmulArgs& a, int64_t n_begin, int64_t n_end);

// The transposed product out[M, K] = g[M, N] @ W[N, K] (the input gradient of y = x W^T).
struct MatmulTArgs {
  const void* g;       // [M, N] in dtype (what the reference reads)
  const float* gf;     // g in fp32, same layout (null for the reference)
  DType dtype;         // of g and out
  int64_t M, K, N;
  const uint8_t* packed;
  const AbsmaxSource* absmax;
  int64_t blocksize;
  QuantType qt;
  void* out;           // [M, K]
};

// Computes out[m, k] for all m < M and k in [k_begin, k_end). For the SIMD kernels k_begin and
// k_end are multiples of kTColUnit (or k_end == K), and K % blocksize == 0.
using MatmulColsFn = void (*)(const MatmulTArgs& a, int64_t k_begin, int64_t k_end);
constexpr int64_t kTColUnit = 128;  // 64 packed bytes: one cache line of each W row per tile

struct MatmulKernels {
  // 0: the kernel reads x itself. G > 0: the kernel wants xf (xb if x_bf16), where every run of 2G elements of
  // a row of x holds its G even-index elements, then its G odd-index ones. That is the order in
  // which one vector of packed bytes splits into high nibbles (even elements) and low nibbles
  // (odd elements), so the kernels never interleave dequantized weights. SIMD kernels require
  // K % blocksize == 0 (then K % 32 == 0 too); the dispatcher routes other shapes to the reference.
  int x_group;
  MatmulRowsFn rows;
  MatmulColsFn cols;  // the transposed product
  bool cols_read_gf;  // cols wants g in fp32 (gf); the reference reads g itself
  // Set for a variant whose `rows` handles bf16 x with blocksize >= 64 only (the AVX512-BF16 dot
  // products read xb): other dtypes (they would lose their precision) and blocksize 32 go to
  // this table instead.
  bool x_bf16 = false;
  const MatmulKernels* other_dtypes = nullptr;
};

extern const MatmulKernels kMatmulRefKernels;
#if defined(NF4LORA_HAVE_AVX2)
extern const MatmulKernels kMatmulAvx2Kernels;
#endif
#if defined(NF4LORA_HAVE_AVX512)
extern const MatmulKernels kMatmulAvx512Kernels;
void matmul_4bit_t_avx512(const MatmulTArgs& a, int64_t k_begin, int64_t k_end);  // shared with BF16
#endif
#if defined(NF4LORA_HAVE_AVX512BF16)
extern const MatmulKernels kMatmulAvx512Bf16Kernels;
#endif

// The forward kernels matmul_4bit_cpu runs for this dtype and shape: the active variant's
// (active_matmul_cpu_variant()), its other_dtypes table where that applies, the reference where
// K is not a whole number of blocks. Defined in matmul_4bit_dispatch.cpp; also used by the decode
// step (decode_llama.cpp), which splits the rows over its own threads.
const MatmulKernels& forward_kernels(DType dtype, int64_t K, int64_t blocksize);

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

// As group_x_f32, keeping bf16 x as its bits (dt must be BF16).
inline void group_x_bf16(const void* x, int64_t K, int64_t M, int group, uint16_t* xb) {
  const uint16_t* xs = static_cast<const uint16_t*>(x);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k0 = 0; k0 < K; k0 += 2 * group)
      for (int i = 0; i < group; ++i) {
        xb[m * K + k0 + i] = xs[m * K + k0 + 2 * i];
        xb[m * K + k0 + group + i] = xs[m * K + k0 + 2 * i + 1];
      }
}

// Inverse of group_x_f32 for one run of `count` (a multiple of 2G) outputs: `grouped` holds
// each 2G-run's G even-index values, then its G odd-index ones; they are rounded to dtype and
// stored at out[offset ...] in natural order.
inline void store_grouped(const float* grouped, int group, int64_t count, void* out, DType dt,
                          int64_t offset) {
  for (int64_t k0 = 0; k0 < count; k0 += 2 * group)
    for (int i = 0; i < group; ++i) {
      store_from_float(out, dt, offset + k0 + 2 * i, grouped[k0 + i]);
      store_from_float(out, dt, offset + k0 + 2 * i + 1, grouped[k0 + group + i]);
    }
}

// The forward loop every SIMD variant shares: W in tiles of TileRows rows (kept hot in L1/L2 while
// every group of x rows uses them), x in groups of 8 (if MaxGroup allows), 4, 2 and 1 rows, largest
// first. row_tile(std::integral_constant<int, MG>, n, rows, m0) is the variant's tile of MG x rows
// times `rows` rows of W from n.
template <int MaxGroup, int TileRows, class RowTile>
inline void for_each_row_tile(const MatmulArgs& a, int64_t n_begin, int64_t n_end, RowTile&& row_tile) {
  for (int64_t n = n_begin; n < n_end; n += TileRows) {
    const int64_t rows = n_end - n < TileRows ? n_end - n : TileRows;
    for (int64_t m0 = 0; m0 < a.M;) {
      const int64_t left = a.M - m0;
      if constexpr (MaxGroup >= 8) {
        if (left >= 8) {
          row_tile(std::integral_constant<int, 8>{}, n, rows, m0), m0 += 8;
          continue;
        }
      }
      if (left >= 4) row_tile(std::integral_constant<int, 4>{}, n, rows, m0), m0 += 4;
      else if (left >= 2) row_tile(std::integral_constant<int, 2>{}, n, rows, m0), m0 += 2;
      else row_tile(std::integral_constant<int, 1>{}, n, rows, m0), m0 += 1;
    }
  }
}

// The epilogue every variant shares: one fp32 addition of the bias, one rounding to dtype.
inline void store_matmul_output(const MatmulArgs& a, int64_t m, int64_t n, float acc) {
  if (a.bias != nullptr) acc += load_as_float(a.bias, a.dtype, n);
  store_from_float(a.y, a.dtype, m * a.N + n, acc);
}

}  // namespace nf4lora::detail
