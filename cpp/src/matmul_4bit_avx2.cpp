// matmul_4bit_avx2.cpp — AVX2 + FMA kernels of matmul_4bit (y = x W^T, small M) and matmul_4bit_t
// (y = g W). Reference: matmul_4bit_ref.cpp (same fp32 weights; fp32 FMA accumulation in another
// order, so not bit-exact). Tested by tests/cpp/test_matmul.cpp against Ref and a float64 product.

// Each 16 packed bytes of W become four ymm of fp32 weights (16-entry per-block product table
// codebook * absmax, looked up as two 8-entry vpermps picked by bit 3), used for every row of x
// (or g) before the next chunk is read.
#include "simd.h"

#include <cstdint>

#include "matmul_4bit_kernels.h"

namespace nf4lora::detail {
namespace {

constexpr int64_t kPrefetchBytes = 2048;  // as in matmul_4bit_avx512.cpp
constexpr int kTileRows = 4;

struct Table16 {
  __m256 lo, hi;  // product table entries 0..7 and 8..15
};

// 16-entry lookup on bits 3:0 of idx (higher bits are ignored): vpermps reads bits 2:0, and
// bit 3, shifted into the sign bit, picks the half for blendv.
inline __m256 lookup16(const Table16& t, __m256i idx) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.lo, idx), _mm256_permutevar8x32_ps(t.hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// As matmul_4bit_avx512.cpp's tile, with 8 lanes: a 32-element chunk is two halves of 8 bytes; the
// grouped x (x_group 8) holds each half's 8 even elements, then its 8 odd ones. 16 ymm only,
// so at most 8 accumulators.
template <int R, int MG>
void tile(const MatmulArgs& a, const float* codebook, int64_t n, int64_t m0) {
  constexpr int S = R * MG <= 4 ? 2 : 1;
  const int64_t K = a.K, bs = a.blocksize, blocks_per_row = K / bs;
  const __m256 cb_lo = _mm256_loadu_ps(codebook), cb_hi = _mm256_loadu_ps(codebook + 8);
  __m256 acc[R][MG][S];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MG; ++m)
      for (int s = 0; s < S; ++s) acc[r][m][s] = _mm256_setzero_ps();
  const uint8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = a.packed + (n + r) * K / 2;
  const float* xs = a.xf + m0 * K;
  const AbsmaxReader absmax(*a.absmax);

  for (int64_t j = 0; j < blocks_per_row; ++j) {
    Table16 table[R];
    for (int r = 0; r < R; ++r) {
      const __m256 amax = _mm256_set1_ps(absmax((n + r) * blocks_per_row + j));
      table[r] = {_mm256_mul_ps(cb_lo, amax), _mm256_mul_ps(cb_hi, amax)};
    }
    for (int64_t k = j * bs; k < (j + 1) * bs; k += 32) {
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(row[r] + k / 2 + kPrefetchBytes), _MM_HINT_T0);
      for (int h = 0; h < 2; ++h) {
        __m256 we[R], wo[R];
        for (int r = 0; r < R; ++r) {
          const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row[r] + k / 2 + 8 * h)));
          we[r] = lookup16(table[r], _mm256_srli_epi32(d, 4));
          wo[r] = lookup16(table[r], d);  // the high nibble falls outside bits 3:0 (see lookup16)
        }
        for (int m = 0; m < MG; ++m) {
          const float* xp = xs + m * K + k + 16 * h;
          const __m256 xe = _mm256_loadu_ps(xp), xo = _mm256_loadu_ps(xp + 8);
          for (int r = 0; r < R; ++r) {
            acc[r][m][0] = _mm256_fmadd_ps(we[r], xe, acc[r][m][0]);
            acc[r][m][S - 1] = _mm256_fmadd_ps(wo[r], xo, acc[r][m][S - 1]);
          }
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MG; ++m) {
      const __m256 v = S == 2 ? _mm256_add_ps(acc[r][m][0], acc[r][m][S - 1]) : acc[r][m][0];
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_movehdup_ps(s));
      store_matmul_output(a, m0 + m, n + r, _mm_cvtss_f32(s));
    }
}

template <int MG>
void row_tile(const MatmulArgs& a, const float* codebook, int64_t n, int64_t rows, int64_t m0) {
  constexpr int R = MG == 1 ? 4 : MG <= 4 ? 2 : 1;
  int64_t r = 0;
  for (; r + R <= rows; r += R) tile<R, MG>(a, codebook, n + r, m0);
  for (; r < rows; ++r) tile<1, MG>(a, codebook, n + r, m0);
}

void matmul_4bit_avx2(const MatmulArgs& a, int64_t n_begin, int64_t n_end) {
  const float* codebook = a.qt == QuantType::NF4 ? kNF4Codebook : kFP4Codebook;
  for_each_row_tile<8, kTileRows>(a, n_begin, n_end, [&](auto mg, int64_t n, int64_t rows, int64_t m0) {
    row_tile<decltype(mg)::value>(a, codebook, n, rows, m0);
  });
}

// Transposed product as matmul_4bit_avx512.cpp's tile_t (two-level summation over n, same kRun), with
// 8 lanes: C chunks of 32 columns, each two halves of 8 bytes = 8 even + 8 odd columns (x_group
// 8 order in `total`). 16 ymm: C = 2 chunks of one g row is 8 accumulators.
constexpr int64_t kRun = 64;
constexpr int64_t kAheadRows = 8;

template <int C>
void tile_t(const MatmulTArgs& a, const float* codebook, int64_t k0, int64_t m) {
  const int64_t K = a.K, N = a.N, bs = a.blocksize, bpr = K / bs;
  const __m256 cb_lo = _mm256_loadu_ps(codebook), cb_hi = _mm256_loadu_ps(codebook + 8);
  const AbsmaxReader absmax(*a.absmax);
  alignas(32) float total[C][32] = {};
  const float* g = a.gf + m * N;
  // Which chunks start a block, and its index within the row: the same for every row, so computed
  // once here instead of a division per chunk and row.
  bool starts_block[C];
  int64_t block[C];
  for (int c = 0; c < C; ++c) {
    starts_block[c] = c == 0 || (k0 + 32 * c) % bs == 0;
    block[c] = (k0 + 32 * c) / bs;
  }
  for (int64_t n0 = 0; n0 < N; n0 += kRun) {
    const int64_t n1 = N - n0 < kRun ? N : n0 + kRun;
    __m256 acc[C][4];
    for (int c = 0; c < C; ++c)
      for (int s = 0; s < 4; ++s) acc[c][s] = _mm256_setzero_ps();
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = a.packed + (n * K + k0) / 2;
      _mm_prefetch(reinterpret_cast<const char*>(row + kAheadRows * K / 2), _MM_HINT_T0);
      const __m256 gm = _mm256_set1_ps(g[n]);
      Table16 table{};
      for (int c = 0; c < C; ++c) {
        if (starts_block[c]) {
          const __m256 amax = _mm256_set1_ps(absmax(n * bpr + block[c]));
          table = {_mm256_mul_ps(cb_lo, amax), _mm256_mul_ps(cb_hi, amax)};
        }
        for (int h = 0; h < 2; ++h) {
          const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 16 * c + 8 * h)));
          acc[c][2 * h] = _mm256_fmadd_ps(gm, lookup16(table, _mm256_srli_epi32(d, 4)), acc[c][2 * h]);
          acc[c][2 * h + 1] = _mm256_fmadd_ps(gm, lookup16(table, d), acc[c][2 * h + 1]);
        }
      }
    }
    for (int c = 0; c < C; ++c)
      for (int s = 0; s < 4; ++s) {
        float* t = total[c] + 8 * s;
        _mm256_store_ps(t, _mm256_add_ps(_mm256_load_ps(t), acc[c][s]));
      }
  }
  store_grouped(total[0], 8, 32 * C, a.out, a.dtype, m * K + k0);
}

void matmul_4bit_t_avx2(const MatmulTArgs& a, int64_t k_begin, int64_t k_end) {
  const float* codebook = a.qt == QuantType::NF4 ? kNF4Codebook : kFP4Codebook;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += 64)
    for (int64_t m = 0; m < a.M; ++m) {
      if (k_end - k0 >= 64) tile_t<2>(a, codebook, k0, m);
      else tile_t<1>(a, codebook, k0, m);
    }
}

}  // namespace

const MatmulKernels kMatmulAvx2Kernels = {8, matmul_4bit_avx2, matmul_4bit_t_avx2, true};

}  // namespace nf4lora::detail
