// matmul_4bit_avx512.cpp — AVX-512 (F/BW/VL/DQ) kernels of matmul_4bit (y = x W^T, small M) and
// matmul_4bit_t (y = g W). Reference: matmul_4bit_ref.cpp (same fp32 weights; fp32 FMA
// accumulation in another order, so not bit-exact). Tested by tests/cpp/test_matmul.cpp against
// Ref and a float64 product.

// W is dequantized 32 elements at a time into two zmm registers (16-entry per-block product table
// codebook * absmax, two vpermps) and used for every row of x (or g) before the next chunk is read.

#include "simd.h"

#include <cstdint>

#include "matmul_4bit_avx512.h"

namespace nf4lora::detail {
namespace {

// Software prefetch this far ahead in each of the W rows streamed at once. At M = 1 with W out
// of cache (a 2-vCPU Sapphire Rapids VM, 1536 x 576 rotating over 53 MB of copies) 2048 bytes
// took 42-45 us against 50-57 at 512 and 69-77 without; with W in cache it costs nothing.
constexpr int64_t kPrefetchBytes = 2048;
constexpr int kTileRows = 4;  // rows of W kept hot in L1 while every group of x rows uses them

// R rows of W (n .. n+R) times MG rows of x (m0 .. m0+MG). Requires K % blocksize == 0, so a
// 32-element chunk never leaves its block and every row starts on a byte. With few
// accumulators (R * MG <= 4) even and odd halves get separate ones, to break the FMA chain.
// BS: the blocksize when known at compile time (64, the default: the block's chunks unrolled,
// ~8% of an M = 1 product), else 0 (a.blocksize). Same operations in the same order either way.
template <int R, int MG, int BS>
void tile(const MatmulArgs& a, __m512 codebook, int64_t n, int64_t m0) {
  constexpr int S = R * MG <= 4 ? 2 : 1;
  const int64_t K = a.K, bs = BS > 0 ? BS : a.blocksize, blocks_per_row = K / bs;
  __m512 acc[R][MG][S];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MG; ++m)
      for (int s = 0; s < S; ++s) acc[r][m][s] = _mm512_setzero_ps();
  const uint8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = a.packed + (n + r) * K / 2;
  const float* xs = a.xf + m0 * K;
  const AbsmaxReader absmax(*a.absmax);

  alignas(64) float amax[R * kAbsmaxRun];
  for (int64_t j0 = 0; j0 < blocks_per_row; j0 += kAbsmaxRun) {
    const int64_t jn = blocks_per_row - j0 < kAbsmaxRun ? blocks_per_row - j0 : kAbsmaxRun;
    const int64_t stride = tile_absmax<R>(absmax, n, blocks_per_row, j0, jn, amax);
    for (int64_t j = j0; j < j0 + jn; ++j) {
      __m512 table[R];
      for (int r = 0; r < R; ++r) table[r] = _mm512_mul_ps(codebook, _mm512_set1_ps(amax[r * stride + j - j0]));
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
      store_matmul_output(a, m0 + m, n + r, hsum(v));
    }
}

// Up to kTileRows rows of W starting at n, times x rows m0 .. m0+MG (MG <= 4): 4 x 4
// accumulators, 4 tables, 8 weights and 2 x vectors fill the 32 zmm. x rows come in groups of
// at most 4 because x, not W, is then the traffic that limits: M * K fp32 outgrows L1, and every
// W row tile re-reads it from L2. 4 W rows per x load halved the M = 8 time against 2 rows x 8
// x rows (measured, Sapphire Rapids VM); the W tile is re-decoded per group, from L1.
template <int MG>
void row_tile(const MatmulArgs& a, __m512 codebook, int64_t n, int64_t rows, int64_t m0) {
  constexpr int R = 4;
  int64_t r = 0;
  if (a.blocksize == 64) {
    for (; r + R <= rows; r += R) tile<R, MG, 64>(a, codebook, n + r, m0);
    for (; r < rows; ++r) tile<1, MG, 64>(a, codebook, n + r, m0);
    return;
  }
  for (; r + R <= rows; r += R) tile<R, MG, 0>(a, codebook, n + r, m0);
  for (; r < rows; ++r) tile<1, MG, 0>(a, codebook, n + r, m0);
}

void matmul_4bit_avx512(const MatmulArgs& a, int64_t n_begin, int64_t n_end) {
  const __m512 codebook = _mm512_loadu_ps(a.qt == QuantType::NF4 ? kNF4Codebook : kFP4Codebook);
  // The tile's packed rows (kTileRows * K / 2 bytes) stay in L1/L2 across the groups of x.
  for_each_row_tile<4, kTileRows>(a, n_begin, n_end, [&](auto mg, int64_t n, int64_t rows, int64_t m0) {
    row_tile<decltype(mg)::value>(a, codebook, n, rows, m0);
  });
}

// Transposed product, C chunks of 32 columns (k0 .. k0+32C, 64 bytes of each W row at C = 4)
// times MG rows of g: for every row n of W the chunks are dequantized once and multiplied by the
// broadcast g[m, n]. The sum over n runs in registers for kRun rows, then is added into an fp32
// total: two-level summation, error ~(kRun + N / kRun) u instead of N u for one running sum,
// which keeps the "within 2x of dense torch" rule at N in the thousands.
constexpr int64_t kRun = 64;
constexpr int64_t kAheadRows = 8;  // software prefetch of the W row this far ahead (strided walk)

template <int C, int MG>
void tile_t(const MatmulTArgs& a, __m512 codebook, int64_t k0, int64_t m0) {
  const int64_t K = a.K, N = a.N, bs = a.blocksize, bpr = K / bs;
  const AbsmaxReader absmax(*a.absmax);
  alignas(64) float total[MG][C][32] = {};
  const float* g = a.gf + m0 * N;
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
    __m512 acc[MG][C][2];
    for (int m = 0; m < MG; ++m)
      for (int c = 0; c < C; ++c) acc[m][c][0] = acc[m][c][1] = _mm512_setzero_ps();
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = a.packed + (n * K + k0) / 2;
      _mm_prefetch(reinterpret_cast<const char*>(row + kAheadRows * K / 2), _MM_HINT_T0);
      __m512 gm[MG];
      for (int m = 0; m < MG; ++m) gm[m] = _mm512_set1_ps(g[m * N + n]);
      __m512 table = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) {
        if (starts_block[c])  // a new block (chunks never straddle one)
          table = _mm512_mul_ps(codebook, _mm512_set1_ps(absmax(n * bpr + block[c])));
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * c)));
        const __m512 we = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), table);
        const __m512 wo = _mm512_permutexvar_ps(d, table);
        for (int m = 0; m < MG; ++m) {
          acc[m][c][0] = _mm512_fmadd_ps(gm[m], we, acc[m][c][0]);
          acc[m][c][1] = _mm512_fmadd_ps(gm[m], wo, acc[m][c][1]);
        }
      }
    }
    for (int m = 0; m < MG; ++m)
      for (int c = 0; c < C; ++c)
        for (int s = 0; s < 2; ++s) {
          float* t = total[m][c] + 16 * s;
          _mm512_store_ps(t, _mm512_add_ps(_mm512_load_ps(t), acc[m][c][s]));
        }
  }
  for (int m = 0; m < MG; ++m)
    store_grouped(total[m][0], 16, 32 * C, a.out, a.dtype, (m0 + m) * K + k0);
}

template <int MG>
void cols_tile(const MatmulTArgs& a, __m512 codebook, int64_t k0, int64_t chunks, int64_t m0) {
  switch (chunks) {
    case 4: tile_t<4, MG>(a, codebook, k0, m0); break;
    case 3: tile_t<3, MG>(a, codebook, k0, m0); break;
    case 2: tile_t<2, MG>(a, codebook, k0, m0); break;
    default: tile_t<1, MG>(a, codebook, k0, m0); break;
  }
}

}  // namespace

// Rows of g in pairs (16 accumulators): more rows would spill, and the 128-column strip of W
// (N * 64 bytes) stays in L2 for the next pair.
void matmul_4bit_t_avx512(const MatmulTArgs& a, int64_t k_begin, int64_t k_end) {
  const __m512 codebook = _mm512_loadu_ps(a.qt == QuantType::NF4 ? kNF4Codebook : kFP4Codebook);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTColUnit) {
    const int64_t chunks = (k_end - k0 < kTColUnit ? k_end - k0 : kTColUnit) / 32;
    for (int64_t m0 = 0; m0 < a.M; m0 += 2) {
      if (a.M - m0 >= 2) cols_tile<2>(a, codebook, k0, chunks, m0);
      else cols_tile<1>(a, codebook, k0, chunks, m0);
    }
  }
}

const MatmulKernels kMatmulAvx512Kernels = {16, matmul_4bit_avx512, matmul_4bit_t_avx512, true};

}  // namespace nf4lora::detail
