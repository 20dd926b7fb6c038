// gemv_bf16.cpp — AVX512-BF16 fused 4-bit GEMV / small-M GEMM for bf16 activations: W is
// dequantized 32 elements at a time straight into bf16 pairs (per-block product table
// codebook * absmax rounded to bf16, one vpermw) and multiplied with x as it is in memory by
// vdpbf16ps (two bf16 products per fp32 lane; exact products, fp32 sums). The weights are thus
// rounded to bf16 first, exactly as "dequantize to bf16 + dense bf16 matmul" does.
// Reference: gemv_ref.cpp. fp32/fp16 activations and the transposed product use the AVX-512
// kernels. Tested by tests/cpp/test_matmul.cpp against Ref and a float64 product.
#include "gemv_avx512.h"

#include <cstdint>

namespace nf4lora::detail {
namespace {

constexpr int64_t kPrefetchBytes = 512;  // as in gemv_avx512.cpp
constexpr int kTileRows = 4;

// R rows of W (n .. n+R) times MG rows of x (m0 .. m0+MG), K % blocksize == 0. One accumulator
// per pair: vdpbf16ps already sums two products per lane, and R * MG >= 4 chains hide latency.
template <int R, int MG>
void tile(const GemvArgs& a, __m512 codebook, int64_t n, int64_t m0) {
  const int64_t K = a.K, bs = a.blocksize, blocks_per_row = K / bs;
  __m512 acc[R][MG];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MG; ++m) acc[r][m] = _mm512_setzero_ps();
  const uint8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = a.packed + (n + r) * K / 2;
  const uint16_t* xs = static_cast<const uint16_t*>(a.x) + m0 * K;
  const AbsmaxReader absmax(*a.absmax);
  const __m512i low_nibble = _mm512_set1_epi32(0xF);

  for (int64_t j0 = 0; j0 < blocks_per_row; j0 += 16) {
    const int64_t jn = blocks_per_row - j0 < 16 ? blocks_per_row - j0 : 16;
    alignas(64) float amax[R][16];
    for (int r = 0; r < R; ++r) absmax16(absmax, (n + r) * blocks_per_row + j0, jn, amax[r]);
    for (int64_t j = j0; j < j0 + jn; ++j) {
      __m512i table[R];  // 16 bf16 products in the low 256 bits; vpermw indices stay below 16
      for (int r = 0; r < R; ++r) {
        const __m256bh t = _mm512_cvtneps_pbh(_mm512_mul_ps(codebook, _mm512_set1_ps(amax[r][j - j0])));
        table[r] = _mm512_castsi256_si512(reinterpret_cast<const __m256i&>(t));
      }
      for (int64_t k = j * bs; k < (j + 1) * bs; k += 32) {
        __m512i w[R];  // bf16 weights of elements k .. k+31 in natural order
        for (int r = 0; r < R; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(row[r] + k / 2 + kPrefetchBytes), _MM_HINT_T0);
          // Byte i holds element 2i (high nibble) and 2i+1 (low nibble): as 16-bit lanes of
          // dword i, index 2i gets the high nibble and 2i+1 the low one.
          const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + k / 2)));
          const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(_mm512_and_si512(d, low_nibble), 16));
          w[r] = _mm512_permutexvar_epi16(idx, table[r]);
        }
        for (int m = 0; m < MG; ++m) {
          const __m512i xv = _mm512_loadu_si512(xs + m * K + k);
          for (int r = 0; r < R; ++r)
            acc[r][m] = _mm512_dpbf16_ps(acc[r][m], reinterpret_cast<const __m512bh&>(w[r]),
                                         reinterpret_cast<const __m512bh&>(xv));
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MG; ++m) store_gemv_output(a, m0 + m, n + r, hsum(acc[r][m]));
}

template <int MG>
void row_tile(const GemvArgs& a, __m512 codebook, int64_t n, int64_t rows, int64_t m0) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) tile<4, MG>(a, codebook, n + r, m0);
  for (; r < rows; ++r) tile<1, MG>(a, codebook, n + r, m0);
}

// As gemv_avx512.cpp: a tile of 4 W rows stays in L1 while groups of up to 4 x rows use it
// (16 accumulators, 4 tables and 4 weight vectors: more rows would spill).
void gemv_rows_bf16(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  const __m512 codebook = _mm512_loadu_ps(a.qt == QuantType::NF4 ? kNF4Codebook : kFP4Codebook);
  for (int64_t n = n_begin; n < n_end; n += kTileRows) {
    const int64_t rows = n_end - n < kTileRows ? n_end - n : kTileRows;
    for (int64_t m0 = 0; m0 < a.M;) {
      const int64_t left = a.M - m0;
      if (left >= 4) row_tile<4>(a, codebook, n, rows, m0), m0 += 4;
      else if (left >= 2) row_tile<2>(a, codebook, n, rows, m0), m0 += 2;
      else row_tile<1>(a, codebook, n, rows, m0), m0 += 1;
    }
  }
}

}  // namespace

const GemvKernels kGemvBf16Kernels = {0, gemv_rows_bf16, gemv_cols_avx512, true, &kGemvAvx512Kernels};

}  // namespace nf4lora::detail
