// optim_avx512_vbmi.cpp — the AVX-512 fused AdamW and Lion kernels of optim_simd.h with an 8-bit
// codec for CPUs with AVX512-VBMI and GFNI, 64 codes per call (optim_avx512.cpp's codec does 16).
//  - Decode: the 256 map values as 4 byte planes; each plane is one 256-byte table lookup for 64
//    codes (2 vpermi2b + a blend on bit 7), then the planes are interleaved into floats by
//    vpunpck{l,h}{bw,wd}. Those work within 128-bit lanes, so the codes are first permuted
//    (4x4 transpose of 4-byte groups) such that the floats come out in element order. ~5 ops per
//    16 codes instead of 8 vpermi2ps + 7 blends.
//  - Encode: format.h's 8-step binary search over the fp32 midpoints, as optim_avx512.cpp, but the
//    index is built bit-reversed (step k sets bit k: one masked OR instead of a shift and an OR;
//    the level tables are stored in that order), the register pair of levels 6 and 7 is picked
//    by the compare masks of levels 5 and 6 (no bit tests), and GFNI reverses the 64 codes back.
//    Tried and dropped: the search on 16-bit keys, 32 lanes per op, plus one exact fp32 compare
//    against a byte-plane lookup of mids[c]: ~1.4x slower than this (vpermw/vpermi2w cost more
//    than their fp32 counterparts here); level 7 as a byte-plane lookup of 64 lanes (no gain);
//    levels 1-2 compared by subtract + sign bit to move work off the shuffle port (no gain).
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
    BytePlanes values;
    __m512i transpose;    // byte permutation: element order <-> transposed order (its own inverse)
    __m512i dword_bytes;  // byte permutation: byte 0 of each dword of two vectors
    F root;               // search level 0: mids[127], broadcast
    F level[7][8];        // level k >= 1: its 2^k midpoints in bit-reversed order, 16 per register

    Codec(const float* map, const float* mids, const uint8_t*) : values(map) {
      alignas(64) uint8_t tr[64], db[64];
      for (int i = 0; i < 64; ++i) {
        tr[i] = static_cast<uint8_t>(transposed(i));
        db[i] = static_cast<uint8_t>(4 * (i % 32));  // i < 16: a's dwords; 16..31: b's (index bit 6)
      }
      transpose = _mm512_load_si512(tr);
      dword_bytes = _mm512_load_si512(db);
      root = _mm512_set1_ps(mids[127]);
      for (int k = 1; k < 8; ++k) {
        alignas(64) float t[128] = {};
        for (int j = 0; j < (1 << k); ++j) t[bit_reverse(j, k)] = mids[((2 * j + 1) << (7 - k)) - 1];
        for (int r = 0; r < 8; ++r) level[k - 1][r] = _mm512_load_ps(t + 16 * r);
      }
    }

    void decode(const uint8_t* q, F* out) const {
      values.lookup(_mm512_permutexvar_epi8(transpose, _mm512_loadu_si512(q)), out);
    }

    // encode_8bit_mids' 8 steps on 16 lanes; returns the code bit-reversed (bit k = step k's outcome).
    // Levels 6 and 7 span 4 and 8 registers: vpermi2ps reads index bits 0-4, and bits 5 and 6
    // are the outcomes of levels 5 and 6, still in mask registers, which pick the register pair.
    __m512i search(F s) const {
      __mmask16 gt = _mm512_cmp_ps_mask(s, root, _CMP_GT_OQ);  // NaN compares false: code 0
      __m512i idx = _mm512_maskz_mov_epi32(gt, _mm512_set1_epi32(1));
      for (int k = 1; k <= 4; ++k) {
        gt = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(idx, level[k - 1][0]), _CMP_GT_OQ);
        idx = _mm512_mask_or_epi32(idx, gt, idx, _mm512_set1_epi32(1 << k));
      }
      gt = _mm512_cmp_ps_mask(s, _mm512_permutex2var_ps(level[4][0], idx, level[4][1]), _CMP_GT_OQ);
      idx = _mm512_mask_or_epi32(idx, gt, idx, _mm512_set1_epi32(1 << 5));
      const __mmask16 g5 = gt;
      const F m6 = _mm512_mask_blend_ps(g5, _mm512_permutex2var_ps(level[5][0], idx, level[5][1]),
                                        _mm512_permutex2var_ps(level[5][2], idx, level[5][3]));
      gt = _mm512_cmp_ps_mask(s, m6, _CMP_GT_OQ);
      idx = _mm512_mask_or_epi32(idx, gt, idx, _mm512_set1_epi32(1 << 6));
      const F lo = _mm512_mask_blend_ps(g5, _mm512_permutex2var_ps(level[6][0], idx, level[6][1]),
                                        _mm512_permutex2var_ps(level[6][2], idx, level[6][3]));
      const F hi = _mm512_mask_blend_ps(g5, _mm512_permutex2var_ps(level[6][4], idx, level[6][5]),
                                        _mm512_permutex2var_ps(level[6][6], idx, level[6][7]));
      gt = _mm512_cmp_ps_mask(s, _mm512_mask_blend_ps(gt, lo, hi), _CMP_GT_OQ);
      return _mm512_mask_or_epi32(idx, gt, idx, _mm512_set1_epi32(1 << 7));
    }

    void encode(const F* x, uint8_t* out) const {
      __m512i c[4];
      for (int r = 0; r < 4; ++r) c[r] = search(x[r]);
      const __m512i c01 = _mm512_permutex2var_epi8(c[0], dword_bytes, c[1]);  // 32 codes in bytes 0-31
      const __m512i c23 = _mm512_permutex2var_epi8(c[2], dword_bytes, c[3]);
      const __m512i all = _mm512_inserti64x4(c01, _mm512_castsi512_si256(c23), 1);
      // Bit-reverse each byte: GF(2) affine map with the anti-diagonal matrix.
      _mm512_storeu_si512(out, _mm512_gf2p8affine_epi64_epi8(
                                   all, _mm512_set1_epi64(static_cast<long long>(0x8040201008040201ULL)), 0));
    }
  };
};

}  // namespace

constexpr OptimKernels kOptimAvx512VbmiKernels = simd_optim::make_kernels<Avx512Vbmi>();

}  // namespace nf4lora::detail
