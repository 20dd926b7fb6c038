// matmul_4bit_avx512_bf16.cpp — AVX512-BF16 kernel of matmul_4bit (y = x W^T, small M) for bf16
// activations and blocksize >= 64; fp32/fp16 activations and matmul_4bit_t use the AVX-512
// kernels. Reference: matmul_4bit_ref.cpp. Tested by tests/cpp/test_matmul.cpp against Ref and a
// float64 product.

// W is dequantized 64 elements at a time straight into two zmm of bf16 (32 even-index and 32
// odd-index elements; per-block product table codebook * absmax rounded to bf16, looked up by
// vpermw) and multiplied with x (grouped the same way, x_group 32) by vdpbf16ps (two bf16
// products per fp32 lane; exact products, fp32 sums). The weights are thus rounded to bf16 first,
// exactly as "dequantize to bf16 + dense bf16 matmul" does; a 64-element chunk lies in one block.
#include "matmul_4bit_avx512.h"

#include <cstdint>
#include <cstring>

namespace nf4lora::detail {
namespace {

constexpr int64_t kPrefetchBytes = 2048;  // as in matmul_4bit_avx512.cpp
constexpr int kTileRows = 4;

inline __m512bh as_bh(__m512i v) {
  __m512bh b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

// R rows of W (n .. n+R) times MG rows of x (m0 .. m0+MG), K % blocksize == 0, blocksize >= 64.
// One accumulator per pair: vdpbf16ps already sums two products per lane.
template <int R, int MG>
void tile(const MatmulArgs& a, __m512 codebook, int64_t n, int64_t m0) {
  const int64_t K = a.K, bs = a.blocksize, blocks_per_row = K / bs;
  __m512 acc[R][MG];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MG; ++m) acc[r][m] = _mm512_setzero_ps();
  const uint8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = a.packed + (n + r) * K / 2;
  const uint16_t* xs = a.xb + m0 * K;
  const AbsmaxReader absmax(*a.absmax);

  alignas(64) float amax[R * kAbsmaxRun];
  for (int64_t j0 = 0; j0 < blocks_per_row; j0 += kAbsmaxRun) {
    const int64_t jn = blocks_per_row - j0 < kAbsmaxRun ? blocks_per_row - j0 : kAbsmaxRun;
    const int64_t stride = tile_absmax<R>(absmax, n, blocks_per_row, j0, jn, amax);
    for (int64_t j = j0; j < j0 + jn; ++j) {
      // The 16 bf16 products twice (words 0-15 and 16-31): vpermw reads index bits 4:0, so a
      // whole byte can serve as the index of its low nibble (bit 4 picks the same copy).
      __m512i table[R];
      for (int r = 0; r < R; ++r) {
        const __m256bh t = _mm512_cvtneps_pbh(_mm512_mul_ps(codebook, _mm512_set1_ps(amax[r * stride + j - j0])));
        __m256i bits;
        std::memcpy(&bits, &t, sizeof bits);
        table[r] = _mm512_broadcast_i64x4(bits);
      }
      for (int64_t k = j * bs; k < (j + 1) * bs; k += 64) {
        __m512i we[R], wo[R];  // bf16 weights of elements k+2i and k+2i+1, i < 32
        for (int r = 0; r < R; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(row[r] + k / 2 + kPrefetchBytes), _MM_HINT_T0);
          const __m512i d = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + k / 2)));
          we[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(d, 4), table[r]);
          wo[r] = _mm512_permutexvar_epi16(d, table[r]);
        }
        for (int m = 0; m < MG; ++m) {
          const __m512i xe = _mm512_loadu_si512(xs + m * K + k), xo = _mm512_loadu_si512(xs + m * K + k + 32);
          for (int r = 0; r < R; ++r) {
            acc[r][m] = _mm512_dpbf16_ps(acc[r][m], as_bh(we[r]), as_bh(xe));
            acc[r][m] = _mm512_dpbf16_ps(acc[r][m], as_bh(wo[r]), as_bh(xo));
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MG; ++m) store_matmul_output(a, m0 + m, n + r, hsum(acc[r][m]));
}

template <int MG>
void row_tile(const MatmulArgs& a, __m512 codebook, int64_t n, int64_t rows, int64_t m0) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) tile<4, MG>(a, codebook, n + r, m0);
  for (; r < rows; ++r) tile<1, MG>(a, codebook, n + r, m0);
}

// As matmul_4bit_avx512.cpp: a tile of 4 W rows stays in L1 while groups of up to 4 x rows use it
// (16 accumulators, 4 tables and 4 weight vectors: more rows would spill).
void matmul_4bit_avx512_bf16(const MatmulArgs& a, int64_t n_begin, int64_t n_end) {
  const __m512 codebook = _mm512_loadu_ps(a.qt == QuantType::NF4 ? kNF4Codebook : kFP4Codebook);
  for_each_row_tile<4, kTileRows>(a, n_begin, n_end, [&](auto mg, int64_t n, int64_t rows, int64_t m0) {
    row_tile<decltype(mg)::value>(a, codebook, n, rows, m0);
  });
}

}  // namespace

const MatmulKernels kMatmulAvx512Bf16Kernels = {32, matmul_4bit_avx512_bf16, matmul_4bit_t_avx512, true, true, &kMatmulAvx512Kernels};

}  // namespace nf4lora::detail
