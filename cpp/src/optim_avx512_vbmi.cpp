// optim_avx512_vbmi.cpp — the AVX-512 fused AdamW kernels of optim_simd.h with an 8-bit codec for
// CPUs with AVX512-VBMI and GFNI, 64 codes per call (optim_avx512.cpp's codec does 16 codes with
// float permutes: 15 shuffle-port ops per decode and ~40 per encode of 16 lanes).
//  - Decode: the 256 map values as 4 byte planes; each plane is one 256-byte table lookup for 64
//    codes (2 vpermi2b + a blend on bit 7), then the planes are interleaved into floats by
//    vpunpck{l,h}{bw,wd}. Those work within 128-bit lanes, so the codes are first permuted
//    (4x4 transpose of 4-byte groups) such that the floats come out in element order.
//  - Encode: format.h's 8-step binary search, run on 16-bit keys, 32 lanes per op: the top 16 bits
//    of each value and of each midpoint as order-preserving integers (negative floats get their
//    magnitude bits flipped). Consecutive midpoints differ in those bits (optim_dispatch.cpp checks
//    it), so the search finds c with code = c + (x > mids[c]), and that last exact fp32 compare
//    reads mids[c] with the byte-plane lookup. NaN is mapped to -inf first (code 0, as the
//    reference). The search index is kept bit-reversed (level k sets bit k: one masked OR; the
//    level tables are stored in that order) and GFNI reverses it back.
// Reference: optim_ref.cpp, bit for bit on finite data; tested by tests/cpp/test_optim.cpp.
#include <cstdint>

#include "optim_avx512.h"
#include "optim_simd.h"

namespace nf4lora::detail {
namespace {

// The position in a 64-byte vector that code i must take so that vpunpck{l,h}bw then
// vpunpck{l,h}wd put element i's float in element order (4x4 transpose of 4-byte groups; it is its
// own inverse).
constexpr int transposed(int i) { return (i / 16) * 4 + ((i / 4) % 4) * 16 + i % 4; }

// Order-preserving 16-bit key of an fp32 value's top 16 bits (its sign flips the magnitude bits).
inline int16_t key16(float x) {
  const uint32_t u = float_bits(x) >> 16;
  return static_cast<int16_t>(u & 0x8000u ? u ^ 0x7fffu : u);
}

inline int bit_reverse(int x, int bits) {
  int r = 0;
  for (int i = 0; i < bits; ++i) r |= ((x >> i) & 1) << (bits - 1 - i);
  return r;
}

struct Avx512Vbmi : Avx512Ops {
  // 256 fp32 values as 4 byte planes x 4 quarters of 64 entries.
  struct BytePlanes {
    __m512i t[4][4];
    explicit BytePlanes(const float* values) {
      alignas(64) uint8_t b[4][256];
      for (int j = 0; j < 256; ++j) {
        const uint32_t u = float_bits(values[j]);
        for (int p = 0; p < 4; ++p) b[p][j] = static_cast<uint8_t>(u >> (8 * p));
      }
      for (int p = 0; p < 4; ++p)
        for (int q = 0; q < 4; ++q) t[p][q] = _mm512_load_si512(b[p] + 64 * q);
    }
    // 64 codes in transposed order -> the 64 table values in element order.
    void lookup(__m512i codes_t, F* out) const {
      const __mmask64 upper = _mm512_movepi8_mask(codes_t);  // bit 7: entries 128..255
      __m512i p[4];
      for (int k = 0; k < 4; ++k)
        p[k] = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(t[k][0], codes_t, t[k][1]),
                                      _mm512_permutex2var_epi8(t[k][2], codes_t, t[k][3]));
      const __m512i lo01 = _mm512_unpacklo_epi8(p[0], p[1]), hi01 = _mm512_unpackhi_epi8(p[0], p[1]);
      const __m512i lo23 = _mm512_unpacklo_epi8(p[2], p[3]), hi23 = _mm512_unpackhi_epi8(p[2], p[3]);
      out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(lo01, lo23));
      out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(lo01, lo23));
      out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(hi01, hi23));
      out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(hi01, hi23));
    }
  };

  struct Codec {
    static constexpr int kGroup = 64;
    BytePlanes values, mids;
    __m512i transpose;     // byte permutation: element order <-> transposed order
    __m512i hi_words;      // word permutation: the top halves of two fp32 vectors
    __m512i low_bytes;     // byte permutation: the low bytes of two 16-bit vectors
    __m512i level[7][4];   // search level k >= 1: 2^k keys in bit-reversed order (<= 4 registers)
    __m512i root;          // level 0: the key of mids[127], broadcast

    Codec(const float* map, const float* mids_, const uint8_t*) : values(map), mids(mids_) {
      alignas(64) uint8_t tr[64], lb[64];
      alignas(64) uint16_t hw[32];
      for (int i = 0; i < 64; ++i) tr[i] = static_cast<uint8_t>(transposed(i)), lb[i] = static_cast<uint8_t>(2 * i);
      for (int i = 0; i < 32; ++i) hw[i] = static_cast<uint16_t>(2 * i + 1);
      transpose = _mm512_load_si512(tr);
      low_bytes = _mm512_load_si512(lb);
      hi_words = _mm512_load_si512(hw);
      root = _mm512_set1_epi16(key16(mids_[127]));
      for (int k = 1; k < 8; ++k) {
        alignas(64) int16_t t[128] = {};
        for (int j = 0; j < (1 << k); ++j) t[bit_reverse(j, k)] = key16(mids_[((2 * j + 1) << (7 - k)) - 1]);
        for (int r = 0; r < 4; ++r) level[k - 1][r] = _mm512_load_si512(t + 32 * r);
      }
    }

    void decode(const uint8_t* q, F* out) const {
      values.lookup(_mm512_permutexvar_epi8(transpose, _mm512_loadu_si512(q)), out);
    }

    // 32 order-preserving keys -> the search result c (bit-reversed, in the low byte of each word).
    __m512i search(__m512i w) const {
      __mmask32 gt = _mm512_cmpgt_epi16_mask(w, root);
      __m512i idx = _mm512_maskz_mov_epi16(gt, _mm512_set1_epi16(1));
      for (int k = 1; k <= 5; ++k) {
        gt = _mm512_cmpgt_epi16_mask(w, _mm512_permutexvar_epi16(idx, level[k - 1][0]));
        idx = _mm512_mask_add_epi16(idx, gt, idx, _mm512_set1_epi16(static_cast<int16_t>(1 << k)));  // bit k is clear
      }
      gt = _mm512_cmpgt_epi16_mask(w, _mm512_permutex2var_epi16(level[5][0], idx, level[5][1]));
      idx = _mm512_mask_add_epi16(idx, gt, idx, _mm512_set1_epi16(1 << 6));
      // Level 7 has 128 keys: vpermi2w reads index bits 0-5; bit 6 is level 6's outcome.
      const __m512i t7 = _mm512_mask_blend_epi16(gt, _mm512_permutex2var_epi16(level[6][0], idx, level[6][1]),
                                                 _mm512_permutex2var_epi16(level[6][2], idx, level[6][3]));
      gt = _mm512_cmpgt_epi16_mask(w, t7);
      return _mm512_mask_add_epi16(idx, gt, idx, _mm512_set1_epi16(1 << 7));
    }

    __m512i keys(F a, F b) const {
      const __m512i w = _mm512_permutex2var_epi16(_mm512_castps_si512(a), hi_words, _mm512_castps_si512(b));
      // w ^ (sign ? 0x7fff : 0)
      return _mm512_ternarylogic_epi32(w, _mm512_srai_epi16(w, 15), _mm512_set1_epi16(0x7fff), 0x78);
    }

    void encode(const F* x, uint8_t* out) const {
      const F neg_inf = _mm512_set1_ps(-__builtin_inff());
      F s[4];
      for (int r = 0; r < 4; ++r) s[r] = _mm512_max_ps(x[r], neg_inf);  // NaN -> -inf (vmaxps returns its 2nd operand)
      const __m512i c01 = search(keys(s[0], s[1])), c23 = search(keys(s[2], s[3]));
      // Bit-reverse each byte (GF(2) affine map with the anti-diagonal matrix).
      const __m512i c = _mm512_gf2p8affine_epi64_epi8(_mm512_permutex2var_epi8(c01, low_bytes, c23),
                                                      _mm512_set1_epi64(static_cast<long long>(0x8040201008040201ULL)), 0);
      F mid[4];
      mids.lookup(_mm512_permutexvar_epi8(transpose, c), mid);
      __mmask16 gt[4];
      for (int r = 0; r < 4; ++r) gt[r] = _mm512_cmp_ps_mask(s[r], mid[r], _CMP_GT_OQ);
      const __mmask64 up = _mm512_kunpackd(_mm512_kunpackw(gt[3], gt[2]), _mm512_kunpackw(gt[1], gt[0]));
      _mm512_storeu_si512(out, _mm512_mask_add_epi8(c, up, c, _mm512_set1_epi8(1)));
    }
  };
};

}  // namespace

constexpr OptimKernels kOptimAvx512VbmiKernels = simd_optim::make_kernels<Avx512Vbmi>();

}  // namespace nf4lora::detail
