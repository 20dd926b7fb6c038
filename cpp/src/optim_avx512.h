// optim_avx512.h — the AVX-512 (F/BW/VL/DQ) lane operations of optim_simd.h's interface V (16 fp32
// lanes: arithmetic, loads and stores per param dtype), shared by optim_avx512.cpp and
// optim_avx512_vbmi.cpp, which add their own 8-bit codecs. Include only from files compiled with
// the AVX-512 flags. Tested through those files by tests/cpp/test_optim.cpp.
#pragma once

#include "simd.h"

#include <cstdint>

namespace nf4lora::detail {
namespace {

struct Avx512Ops {
  using F = __m512;
  static constexpr int W = 16;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F div(F a, F b) { return _mm512_div_ps(a, b); }
  static F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F abs(F a) { return _mm512_abs_ps(a); }
  // +1, -1 or 0 (also for NaN), as lion_update's sign
  static F sign(F a, F one, F minus_one) {
    const __mmask16 pos = _mm512_cmp_ps_mask(a, zero(), _CMP_GT_OQ), neg = _mm512_cmp_ps_mask(a, zero(), _CMP_LT_OQ);
    return _mm512_mask_blend_ps(neg, _mm512_maskz_mov_ps(pos, one), minus_one);
  }
  static bool all_zero(F a) { return _mm512_cmp_ps_mask(a, zero(), _CMP_EQ_OQ) == 0xFFFF; }

  static F load_f32(const float* p) { return _mm512_loadu_ps(p); }
  static void store_f32(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F load_bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  // format.h's float_to_bf16_bits: round to nearest even; NaN keeps its top bits, made quiet.
  static void store_bf16(uint16_t* p, F x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i top = _mm512_srli_epi32(u, 16);
    const __m512i lsb = _mm512_and_si512(top, _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(top, _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static F load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store_f16(uint16_t* p, F x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

}  // namespace
}  // namespace nf4lora::detail
