// optim_avx2.cpp — AVX2 (+FMA, F16C) fused AdamW and Lion: 8 lanes of optim_simd.h's kernels (FMA is
// allowed by the flags but never used: the update rounds every operation, as the reference).
// Reference: optim_ref.cpp, bit for bit on finite data (fp16 NaN payloads may differ); tested by
// tests/cpp/test_optim.cpp.
#include "simd.h"

#include <cstdint>
#include <cstring>

#include "optim_simd.h"

namespace nf4lora::detail {
namespace {

struct Avx2 {
  using F = __m256;
  static constexpr int W = 8;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F div(F a, F b) { return _mm256_div_ps(a, b); }
  static F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  // +1, -1 or 0 (also for NaN), as lion_update's sign
  static F sign(F a, F one, F minus_one) {
    return _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(a, zero(), _CMP_GT_OQ), one),
                        _mm256_and_ps(_mm256_cmp_ps(a, zero(), _CMP_LT_OQ), minus_one));
  }
  static bool all_zero(F a) { return _mm256_movemask_ps(_mm256_cmp_ps(a, zero(), _CMP_EQ_OQ)) == 0xFF; }

  static F load_f32(const float* p) { return _mm256_loadu_ps(p); }
  static void store_f32(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F load_bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  // Eight int32 lanes holding 16-bit values -> eight uint16 in memory.
  static void store_u16(uint16_t* p, __m256i r) {
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  // format.h's float_to_bf16_bits: round to nearest even; NaN keeps its top bits, made quiet.
  static void store_bf16(uint16_t* p, F x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i top = _mm256_srli_epi32(u, 16);
    const __m256i lsb = _mm256_and_si256(top, _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    store_u16(p, _mm256_blendv_epi8(r, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan));
  }
  static F load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_f16(uint16_t* p, F x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  // An 8-bit map through gathers: the map itself for decoding; for encoding format.h's nearest
  // entry in two gathers (optim_kernels.h's 16-bit bucket table, then one midpoint).
  struct Codec {
    static constexpr int kGroup = W;
    const float* map;
    const float* mids;
    const uint8_t* lut;
    Codec(const float* map_, const float* mids_, const uint8_t* lut_) : map(map_), mids(mids_), lut(lut_) {}
    void decode(const uint8_t* q, F* out) const {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
      out[0] = _mm256_i32gather_ps(map, idx, 4);
    }
    void encode(const F* x, uint8_t* out) const {
      const F s = x[0];
      const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(s), 16);
      __m256i c = _mm256_and_si256(_mm256_i32gather_epi32(reinterpret_cast<const int*>(lut), h, 1),
                                   _mm256_set1_epi32(0xFF));
      const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(s, _mm256_i32gather_ps(mids, c, 4), _CMP_GT_OQ));
      c = _mm256_sub_epi32(c, up);  // up is -1 where the value lies above the bucket's midpoint
      c = _mm256_andnot_si256(_mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_UNORD_Q)), c);  // NaN -> 0
      // Low byte of each lane: bytes 0, 4, 8, 12 of each 128-bit half, then the halves' words.
      const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                            0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
      const __m256i bytes = _mm256_shuffle_epi8(c, pick);
      const uint32_t lo = static_cast<uint32_t>(_mm256_extract_epi32(bytes, 0));
      const uint32_t hi = static_cast<uint32_t>(_mm256_extract_epi32(bytes, 4));
      std::memcpy(out, &lo, 4);
      std::memcpy(out + 4, &hi, 4);
    }
  };
};

}  // namespace

constexpr OptimKernels kOptimAvx2Kernels = simd_optim::make_kernels<Avx2>();

}  // namespace nf4lora::detail
