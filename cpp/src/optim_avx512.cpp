// optim_avx512.cpp — AVX-512 (F/BW/VL/DQ) fused AdamW and Lion: 16 lanes of optim_simd.h's kernels. The
// 8-bit maps live in registers and are read with vpermi2ps/vpermps rather than gathers (slowed by
// microcode mitigations on many Intel CPUs; the gather version of this file was ~1.4x slower here):
// decoding is a 256-entry table lookup, encoding format.h's 8-step binary search over the
// midpoints, one tree level at a time. Reference: optim_ref.cpp, bit for bit on finite data (fp16
// NaN payloads may differ); tested by tests/cpp/test_optim.cpp.
#include <cstdint>

#include "optim_avx512.h"
#include "optim_simd.h"

namespace nf4lora::detail {
namespace {

struct Avx512 : Avx512Ops {
  // A lookup in a table of 16 * N floats (N a power of two <= 16), unrolled at compile time:
  // vpermps (16 entries) or vpermi2ps (32 entries, index bits 0-4), then blends on the next bits.
  template <int N>
  static F lookup(const F* t, __m512i idx) {
    if constexpr (N == 1) {
      return _mm512_permutexvar_ps(idx, t[0]);
    } else if constexpr (N == 2) {
      return _mm512_permutex2var_ps(t[0], idx, t[1]);
    } else {  // halves of 8 * N entries, chosen by index bit 8 * N
      const __mmask16 upper = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(8 * N));
      return _mm512_mask_blend_ps(upper, lookup<N / 2>(t, idx), lookup<N / 2>(t + N / 2, idx));
    }
  }

  // One 8-bit map: its 256 values, and its 255 midpoints as the levels of the implicit search
  // tree of encode_8bit_mids (level k holds mids[(2j + 1) * 2^(7 - k) - 1], j < 2^k), so that
  // each of the 8 steps is one lookup by the index found so far. Same compares, same result.
  struct Codec {
    static constexpr int kGroup = W;
    static constexpr int kLevelReg[8] = {0, 1, 2, 3, 4, 5, 7, 11};  // first register of level k
    F values[16];
    F tree[19];
    Codec(const float* map, const float* mids, const uint8_t*) {
      for (int r = 0; r < 16; ++r) values[r] = _mm512_loadu_ps(map + 16 * r);
      alignas(64) float t[19 * 16] = {};
      for (int k = 0; k < 8; ++k)
        for (int j = 0; j < (1 << k); ++j) t[16 * kLevelReg[k] + j] = mids[((2 * j + 1) << (7 - k)) - 1];
      for (int r = 0; r < 19; ++r) tree[r] = _mm512_load_ps(t + 16 * r);
    }
    void decode(const uint8_t* q, F* out) const {
      out[0] = lookup<16>(values, _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
    }
    // Step k of the search: is s above the midpoint that the index found so far points to?
    template <int K>
    void step(F s, __m512i& idx) const {
      constexpr int regs = K <= 4 ? 1 : 1 << (K - 4);
      const __mmask16 gt = _mm512_cmp_ps_mask(s, lookup<regs>(tree + kLevelReg[K], idx), _CMP_GT_OQ);
      const __m512i twice = _mm512_slli_epi32(idx, 1);
      idx = _mm512_mask_or_epi32(twice, gt, twice, _mm512_set1_epi32(1));
    }
    void encode(const F* x, uint8_t* out) const {
      const F s = x[0];  // NaN compares false at every step: code 0, as the reference
      __m512i idx = _mm512_setzero_si512();
      step<0>(s, idx), step<1>(s, idx), step<2>(s, idx), step<3>(s, idx);
      step<4>(s, idx), step<5>(s, idx), step<6>(s, idx), step<7>(s, idx);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(idx));
    }
  };
};

}  // namespace

constexpr OptimKernels kOptimAvx512Kernels = simd_optim::make_kernels<Avx512>();

}  // namespace nf4lora::detail
