// gemv_avx512.cpp — AVX-512 (F/BW/VL/DQ) fused 4-bit GEMV / small-M GEMM: W is dequantized
// 32 elements at a time into two zmm registers (16-entry per-block product table
// codebook * absmax, two vpermps) and used for every row of x before the next chunk is read.
// Reference: gemv_ref.cpp (same fp32 weights; fp32 FMA accumulation in another order, so not
// bit-exact). Tested by tests/cpp/test_matmul.cpp against Ref and a float64 product.

#include "simd.h"

#include <cstdint>

#include "gemv_kernels.h"

namespace nf4lora::detail {
namespace {

// Software prefetch this far ahead in each of the W rows streamed at once (a few % at M = 1 on
// a 2-vCPU Sapphire Rapids VM; the hardware streamers do most of the work).
constexpr int64_t kPrefetchBytes = 512;
constexpr int kTileRows = 4;  // rows of W kept hot in L1 while every group of x rows uses them

// Horizontal sum through memory, pairwise: GCC 12's _mm512_reduce_add_ps trips -Wuninitialized
// inside its own header, and this runs once per output, not per chunk.
inline float hsum(__m512 v) {
  alignas(64) float t[16];
  _mm512_store_ps(t, v);
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  return t[0];
}

// The absmax of `count` (<= 16) consecutive blocks from b into out. Double quantization is
// decoded 16 at a time (two gathers, then a multiply and a separate add: the same two fp32
// roundings as decode_nested_absmax, so the same values bit for bit): per-block scalar decoding
// was ~40% of an M = 1 GEMV at blocksize 64.
inline void absmax16(const AbsmaxReader& rd, int64_t b, int64_t count, float* out) {
  if (count < 16) {
    for (int64_t i = 0; i < count; ++i) out[i] = rd(b + i);
    return;
  }
  const AbsmaxSource& a = rd.a;
  if (!a.nested()) {
    _mm512_store_ps(out, _mm512_loadu_ps(a.absmax + b));
    return;
  }
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.qabsmax + b)));
  const __m512 code = _mm512_i32gather_ps(q, a.nested_code, 4);
  // Nested indices relative to the first one, so they fit in 32 bits for any tensor size.
  const int64_t nested0 = b >> rd.shift;
  const __m512i lane = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(b - (nested0 << rd.shift))),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __m512 nested = _mm512_i32gather_ps(_mm512_srl_epi32(lane, _mm_cvtsi32_si128(rd.shift)), a.nested_absmax + nested0, 4);
  _mm512_store_ps(out, _mm512_add_ps(_mm512_mul_ps(code, nested), _mm512_set1_ps(*a.offset)));
}

// R rows of W (n .. n+R) times MG rows of x (m0 .. m0+MG). Requires K % blocksize == 0, so a
// 32-element chunk never leaves its block and every row starts on a byte. With few
// accumulators (R * MG <= 4) even and odd halves get separate ones, to break the FMA chain.
template <int R, int MG>
void tile(const GemvArgs& a, __m512 codebook, int64_t n, int64_t m0) {
  constexpr int S = R * MG <= 4 ? 2 : 1;
  const int64_t K = a.K, bs = a.blocksize, blocks_per_row = K / bs;
  __m512 acc[R][MG][S];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MG; ++m)
      for (int s = 0; s < S; ++s) acc[r][m][s] = _mm512_setzero_ps();
  const uint8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = a.packed + (n + r) * K / 2;
  const float* xs = a.xf + m0 * K;
  const AbsmaxReader absmax(*a.absmax);

  for (int64_t j0 = 0; j0 < blocks_per_row; j0 += 16) {
    const int64_t jn = blocks_per_row - j0 < 16 ? blocks_per_row - j0 : 16;
    alignas(64) float amax[R][16];
    for (int r = 0; r < R; ++r) absmax16(absmax, (n + r) * blocks_per_row + j0, jn, amax[r]);
    for (int64_t j = j0; j < j0 + jn; ++j) {
      __m512 table[R];
      for (int r = 0; r < R; ++r) table[r] = _mm512_mul_ps(codebook, _mm512_set1_ps(amax[r][j - j0]));
      for (int64_t k = j * bs; k < (j + 1) * bs; k += 32) {
        __m512 we[R], wo[R];  // weights of elements k+2i and k+2i+1, i < 16
        for (int r = 0; r < R; ++r) {
          _mm_prefetch(reinterpret_cast<const char*>(row[r] + k / 2 + kPrefetchBytes), _MM_HINT_T0);
          const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + k / 2)));
          we[r] = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table[r]);
          wo[r] = _mm512_permutexvar_ps(d, table[r]);  // vpermps reads index bits 3:0 only
        }
        for (int m = 0; m < MG; ++m) {
          const __m512 xe = _mm512_loadu_ps(xs + m * K + k), xo = _mm512_loadu_ps(xs + m * K + k + 16);
          for (int r = 0; r < R; ++r) {
            acc[r][m][0] = _mm512_fmadd_ps(we[r], xe, acc[r][m][0]);
            acc[r][m][S - 1] = _mm512_fmadd_ps(wo[r], xo, acc[r][m][S - 1]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MG; ++m) {
      const __m512 v = S == 2 ? _mm512_add_ps(acc[r][m][0], acc[r][m][S - 1]) : acc[r][m][0];
      store_gemv_output(a, m0 + m, n + r, hsum(v));
    }
}

// Up to kTileRows rows of W starting at n, times x rows m0 .. m0+MG (MG <= 4): 4 x 4
// accumulators, 4 tables, 8 weights and 2 x vectors fill the 32 zmm. x rows come in groups of
// at most 4 because x, not W, is then the traffic that limits: M * K fp32 outgrows L1, and every
// W row tile re-reads it from L2. 4 W rows per x load halved the M = 8 time against 2 rows x 8
// x rows (measured, Sapphire Rapids VM); the W tile is re-decoded per group, from L1.
template <int MG>
void row_tile(const GemvArgs& a, __m512 codebook, int64_t n, int64_t rows, int64_t m0) {
  constexpr int R = 4;
  int64_t r = 0;
  for (; r + R <= rows; r += R) tile<R, MG>(a, codebook, n + r, m0);
  for (; r < rows; ++r) tile<1, MG>(a, codebook, n + r, m0);
}

void gemv_rows_avx512(const GemvArgs& a, int64_t n_begin, int64_t n_end) {
  const __m512 codebook = _mm512_loadu_ps(a.qt == QuantType::NF4 ? kNF4Codebook : kFP4Codebook);
  for (int64_t n = n_begin; n < n_end; n += kTileRows) {
    const int64_t rows = n_end - n < kTileRows ? n_end - n : kTileRows;
    // The tile's packed rows (kTileRows * K / 2 bytes) stay in L1/L2 across the groups of x.
    for (int64_t m0 = 0; m0 < a.M;) {
      const int64_t left = a.M - m0;
      if (left >= 4) row_tile<4>(a, codebook, n, rows, m0), m0 += 4;
      else if (left >= 2) row_tile<2>(a, codebook, n, rows, m0), m0 += 2;
      else row_tile<1>(a, codebook, n, rows, m0), m0 += 1;
    }
  }
}

}  // namespace

const GemvKernels kGemvAvx512Kernels = {16, gemv_rows_avx512};

}  // namespace nf4lora::detail
