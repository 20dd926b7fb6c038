// matmul_4bit_avx512.h — AVX-512 helpers shared by matmul_4bit_avx512.cpp and
// matmul_4bit_avx512_bf16.cpp (internal; include only from translation units compiled with the
// AVX-512 F/BW/VL/DQ flags): the horizontal sum and the absmax decode (16 blocks, a tile's). Tested through
// those kernels by tests/cpp/test_matmul.cpp.
#pragma once

#include "simd.h"

#include <cstdint>

#include "matmul_4bit_kernels.h"

namespace nf4lora::detail {
namespace {

// Horizontal sum, pairwise: lane i + lane i + 8, then + 4, + 2, + 1 (the order every variant and
// its tests fix), in registers: through memory (a store, 15 scalar loads and adds) it was a visible
// share of an M = 1 product with short rows. (GCC 12's _mm512_reduce_add_ps trips
// -Wuninitialized inside its own header.)
inline float hsum(__m512 v) {
  // (masked extracts with an explicit source: GCC 12's unmasked ones, _mm512_castps512_ps256
  // included, read an undefined value and warn)
  const __m256 zero = _mm256_setzero_ps();
  const __m256 s8 = _mm256_add_ps(_mm512_mask_extractf32x8_ps(zero, 0xFF, v, 0),
                                  _mm512_mask_extractf32x8_ps(zero, 0xFF, v, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
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

// Blocks of absmax a tile decodes per row at a time (a multiple of 16).
constexpr int64_t kAbsmaxRun = 64;

// The absmax of blocks [j0, j0 + jn) (jn <= kAbsmaxRun) of rows n .. n + R - 1 (bpr blocks per
// row) into amax, row r's block j at amax[r * stride + j - j0]; returns stride. Rows of at most
// kAbsmaxRun blocks come whole (j0 = 0, jn = bpr), and then the R rows' blocks are consecutive:
// decoded as one run, 16 at a time (for SmolLM2's 9-block rows instead of one by one, ~7% of a
// 1536 x 576 product).
template <int R>
inline int64_t tile_absmax(const AbsmaxReader& rd, int64_t n, int64_t bpr, int64_t j0, int64_t jn, float* amax) {
  if (bpr <= kAbsmaxRun) {
    for (int64_t b = 0; b < R * jn; b += 16) absmax16(rd, n * bpr + b, R * jn - b < 16 ? R * jn - b : 16, amax + b);
    return bpr;
  }
  for (int r = 0; r < R; ++r)
    for (int64_t b = 0; b < jn; b += 16)
      absmax16(rd, (n + r) * bpr + j0 + b, jn - b < 16 ? jn - b : 16, amax + r * kAbsmaxRun + b);
  return kAbsmaxRun;
}

}  // namespace
}  // namespace nf4lora::detail
