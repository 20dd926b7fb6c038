// quant_avx2.cpp — AVX2 + FMA + F16C kernels for blockwise 4-bit quantize/dequantize.
// Reference: quant_ref.cpp, matched bit for bit (packed codes, absmax, non-finite count, output
// values); non-finite and partial blocks are handed to the reference helpers.
// Tested by tests/cpp/test_core.cpp, which forces this variant and compares it with Ref.

#include "simd.h"

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace nf4lora::detail {
namespace {

// Streaming stores pay off only once the output no longer fits in the caches (see avx512).
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;

// The 4-step binary search over format.h's 15 sorted thresholds, 8 lanes at a time. After the
// first k steps the rank is a multiple of 16 >> k, so each later step's candidate thresholds
// fit one 8-entry permute table indexed by rank >> (4 - k).
struct RankSearch {
  __m256 t7, t3, t11;
  __m256 step2;         // lane j: threshold[4j + 1], j = 0..3
  __m256 step1;         // lane j: threshold[2j], j = 0..7
  __m256i code_bytes;   // FP4 rank -> code (kFP4Ascending) as a pshufb table in both lanes

  explicit RankSearch(QuantType qt) {
    float t[15];
    for (int i = 0; i < 15; ++i) t[i] = threshold(qt, i);
    t7 = _mm256_set1_ps(t[7]);
    t3 = _mm256_set1_ps(t[3]);
    t11 = _mm256_set1_ps(t[11]);
    step2 = _mm256_setr_ps(t[1], t[5], t[9], t[13], t[13], t[13], t[13], t[13]);
    step1 = _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]);
    alignas(16) uint8_t asc[16];
    for (int i = 0; i < 16; ++i) asc[i] = static_cast<uint8_t>(kFP4Ascending[i]);
    code_bytes = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(asc)));
  }

  // Rank = number of thresholds strictly below x, for finite x (blocks with NaN/Inf go to the
  // reference); a tie fails the strict compare and keeps the lower rank, as encode_rank does.
  template <bool kFP4>
  __m256i code(__m256 x) const {
    const __m256 m8 = _mm256_cmp_ps(x, t7, _CMP_GT_OQ);
    __m256i idx = _mm256_and_si256(_mm256_castps_si256(m8), _mm256_set1_epi32(8));
    const __m256 m4 = _mm256_cmp_ps(x, _mm256_blendv_ps(t3, t11, m8), _CMP_GT_OQ);
    idx = _mm256_or_si256(idx, _mm256_and_si256(_mm256_castps_si256(m4), _mm256_set1_epi32(4)));
    const __m256 m2 = _mm256_cmp_ps(x, _mm256_permutevar8x32_ps(step2, _mm256_srli_epi32(idx, 2)), _CMP_GT_OQ);
    idx = _mm256_or_si256(idx, _mm256_and_si256(_mm256_castps_si256(m2), _mm256_set1_epi32(2)));
    const __m256 m1 = _mm256_cmp_ps(x, _mm256_permutevar8x32_ps(step1, _mm256_srli_epi32(idx, 1)), _CMP_GT_OQ);
    idx = _mm256_or_si256(idx, _mm256_and_si256(_mm256_castps_si256(m1), _mm256_set1_epi32(1)));
    if (!kFP4) return idx;
    // pshufb zeroes bytes whose index has the top bit set: only byte 0 of each dword looks up.
    return _mm256_shuffle_epi8(code_bytes, _mm256_or_si256(idx, _mm256_set1_epi32(int(0x80808000u))));
  }
};

inline uint32_t hmax_epu32(__m256i m) {
  __m128i r = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  r = _mm_max_epu32(r, _mm_shuffle_epi32(r, _MM_SHUFFLE(1, 0, 3, 2)));
  r = _mm_max_epu32(r, _mm_shuffle_epi32(r, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(r));
}

// Largest |x| of a full block as raw bits of the input format: for non-negative floats the
// integer order is the value order, and a result at or above the format's infinity means the
// block holds NaN or Inf.
template <DType DT>
uint32_t block_max_abs_bits(const void* x, int64_t begin, int64_t count) {
  if constexpr (DT == DType::F32) {
    const __m256i* p = reinterpret_cast<const __m256i*>(static_cast<const float*>(x) + begin);
    const __m256i mask = _mm256_set1_epi32(0x7fffffff);
    __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
    for (int64_t i = 0; i < count / 8; i += 2) {
      m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_loadu_si256(p + i), mask));
      m1 = _mm256_max_epu32(m1, _mm256_and_si256(_mm256_loadu_si256(p + i + 1), mask));
    }
    return hmax_epu32(_mm256_max_epu32(m0, m1));
  } else {
    const __m256i* p = reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + begin);
    const __m256i mask = _mm256_set1_epi16(0x7fff);
    __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
    for (int64_t i = 0; i < count / 16; i += 2) {
      m0 = _mm256_max_epu16(m0, _mm256_and_si256(_mm256_loadu_si256(p + i), mask));
      m1 = _mm256_max_epu16(m1, _mm256_and_si256(_mm256_loadu_si256(p + i + 1), mask));
    }
    const __m256i m = _mm256_max_epu16(m0, m1);
    return hmax_epu32(_mm256_max_epu32(_mm256_and_si256(m, _mm256_set1_epi32(0xffff)),
                                       _mm256_srli_epi32(m, 16)));
  }
}

template <DType DT>
constexpr uint32_t inf_bits() {
  return DT == DType::F32 ? 0x7f800000u : DT == DType::F16 ? 0x7c00u : 0x7f80u;
}

// Smallest normal fp32 in the input format's bits (a half's subnormals are normal in fp32).
template <DType DT>
constexpr uint32_t min_normal_bits() {
  return DT == DType::F32 ? 0x00800000u : DT == DType::F16 ? 0u : 0x0080u;
}

// Blocks the reference must encode: NaN/Inf inside, or an fp32-subnormal absmax, which the
// reference's float max ignores when the caller runs with denormals-are-zero (MXCSR.DAZ, e.g.
// torch.set_flush_denormal(True)) while the integer max here would not.
template <DType DT>
constexpr bool needs_reference(uint32_t max_bits) {
  return max_bits >= inf_bits<DT>() || (max_bits != 0 && max_bits < min_normal_bits<DT>());
}

template <DType DT>
float bits_to_value(uint32_t bits) {
  if constexpr (DT == DType::F32) return bits_float(bits);
  else if constexpr (DT == DType::F16) return half_bits_to_float(static_cast<uint16_t>(bits));
  else return bf16_bits_to_float(static_cast<uint16_t>(bits));
}

// Codes of elements begin..begin+15 as 8 dwords, dword k = (code[2k] << 4) | code[2k+1]: the
// packed byte k.
template <DType DT, bool kFP4>
__m256i packed_pairs16(const void* x, int64_t begin, __m256 scale, const RankSearch& rs) {
  __m256 even, odd;
  if constexpr (DT == DType::BF16) {
    // Each dword holds (odd << 16) | even, and a bf16 is the top half of its fp32.
    const __m256i d = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + begin));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(d, _mm256_set1_epi32(int(0xffff0000u))));
  } else {
    __m256 a, b;
    if constexpr (DT == DType::F32) {
      const float* p = static_cast<const float*>(x) + begin;
      a = _mm256_loadu_ps(p);
      b = _mm256_loadu_ps(p + 8);
    } else {
      const __m128i* p = reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + begin);
      a = _mm256_cvtph_ps(_mm_loadu_si128(p));
      b = _mm256_cvtph_ps(_mm_loadu_si128(p + 1));
    }
    // In-lane shuffles leave the pairs in order 0,1,4,5 | 2,3,6,7; fixed on the bytes below.
    even = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
    odd = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
  }
  const __m256i ce = rs.code<kFP4>(_mm256_mul_ps(even, scale));
  const __m256i co = rs.code<kFP4>(_mm256_mul_ps(odd, scale));
  const __m256i bytes = _mm256_or_si256(_mm256_slli_epi32(ce, 4), co);
  if constexpr (DT == DType::BF16) return bytes;
  else return _mm256_permute4x64_epi64(bytes, _MM_SHUFFLE(3, 1, 2, 0));
}

template <DType DT, bool kFP4>
int64_t quantize_blocks(const void* x, int64_t n, int64_t blocksize, QuantType qt,
                        int64_t block_begin, int64_t block_end, uint8_t* packed, float* absmax) {
  const RankSearch rs(qt);
  // packus leaves dwords (a0-3, b0-3 | a4-7, b4-7); this puts a before b.
  const __m256i pack_order = _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5);
  // Small blocks go in groups: all maxima first, then all scales, then all codes, so that
  // each block's reduce -> divide -> encode latency chain overlaps with its neighbours'. A group
  // stays within 16 KB of input so the encode pass reads it from L1.
  constexpr int64_t kMaxGroup = 16;
  constexpr int64_t elem_bytes = DT == DType::F32 ? 4 : 2;
  const int64_t group = std::clamp<int64_t>((int64_t{16} << 10) / (blocksize * elem_bytes), 1, kMaxGroup);
  int64_t nonfinite = 0;
  for (int64_t g = block_begin; g < block_end; g += group) {
    const int64_t count = std::min(group, block_end - g);
    uint32_t max_bits[kMaxGroup];
    float scale[kMaxGroup];
    for (int64_t j = 0; j < count; ++j) {
      const int64_t begin = (g + j) * blocksize;
      max_bits[j] = n - begin < blocksize ? ~0u : block_max_abs_bits<DT>(x, begin, blocksize);
    }
    for (int64_t j = 0; j < count; ++j)
      scale[j] = needs_reference<DT>(max_bits[j]) ? 0.0f : block_scale(bits_to_value<DT>(max_bits[j]));
    for (int64_t j = 0; j < count; ++j) {
      const int64_t b = g + j, begin = b * blocksize;
      if (needs_reference<DT>(max_bits[j])) {
        // Partial last block (marked ~0, with the odd-n padding nibble), NaN/Inf or an all-
        // subnormal block: rare, and the reference defines those codes.
        const int64_t end = std::min(n, begin + blocksize);
        nonfinite += quantize_4bit_block_ref(x, DT, begin, end, n, qt, packed, absmax + b);
        continue;
      }
      const __m256 s = _mm256_set1_ps(scale[j]);
      for (int64_t i = begin; i < begin + blocksize; i += 32) {
        const __m256i a = packed_pairs16<DT, kFP4>(x, i, s, rs);
        const __m256i c = packed_pairs16<DT, kFP4>(x, i + 16, s, rs);
        const __m256i words = _mm256_packus_epi32(a, c);
        const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words, words), pack_order);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2), _mm256_castsi256_si128(bytes));
      }
      absmax[b] = bits_to_value<DT>(max_bits[j]);
    }
  }
  return nonfinite;
}

template <DType DT>
int64_t quantize_dtype(const void* x, int64_t n, int64_t blocksize, QuantType qt, int64_t b0,
                       int64_t b1, uint8_t* packed, float* absmax) {
  return qt == QuantType::FP4
             ? quantize_blocks<DT, true>(x, n, blocksize, qt, b0, b1, packed, absmax)
             : quantize_blocks<DT, false>(x, n, blocksize, qt, b0, b1, packed, absmax);
}

int64_t quantize_4bit_avx2(const void* x, DType x_dtype, int64_t n, int64_t blocksize,
                           QuantType qt, int64_t block_begin, int64_t block_end,
                           uint8_t* packed, float* absmax) {
  switch (x_dtype) {
    case DType::F32:
      return quantize_dtype<DType::F32>(x, n, blocksize, qt, block_begin, block_end, packed, absmax);
    case DType::F16:
      return quantize_dtype<DType::F16>(x, n, blocksize, qt, block_begin, block_end, packed, absmax);
    default:
      return quantize_dtype<DType::BF16>(x, n, blocksize, qt, block_begin, block_end, packed, absmax);
  }
}

// ---- dequantize ------------------------------------------------------------------------------

// fp32 -> bf16 bits (low half of each dword), round to nearest even; NaN never reaches here
// (blocks with a non-finite absmax go to the reference, and |codebook| <= 1).
inline __m256i round_bf16(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
}

// Streaming (non-temporal) stores need aligned addresses: 32-byte pieces when the output
// allows, else 16-byte ones (as fast: the write-combining buffers still fill whole lines).
enum class Store { Plain, Stream16, Stream32 };

template <Store kStore>
inline void store32(void* p, __m256i v) {
  if constexpr (kStore == Store::Stream32) {
    _mm256_stream_si256(static_cast<__m256i*>(p), v);
  } else if constexpr (kStore == Store::Stream16) {
    __m128i* q = static_cast<__m128i*>(p);
    _mm_stream_si128(q, _mm256_castsi256_si128(v));
    _mm_stream_si128(q + 1, _mm256_extracti128_si256(v, 1));
  } else {
    _mm256_storeu_si256(static_cast<__m256i*>(p), v);
  }
}

// 16-entry lookup: two 8-entry permutes, picked by bit 3 of the index (moved to the sign bit).
inline __m256 lookup16(__m256i idx, __m256 lo, __m256 hi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// The products codebook[c] * absmax are formed once per block (the same fp32 products the
// reference forms per element); 16-bit outputs round them once into a byte-plane pshufb table.
template <DType OT, Store kStore>
void dequantize_full_block(const uint8_t* packed, __m256 cb_lo, __m256 cb_hi, float amax,
                           int64_t begin, int64_t count, void* out) {
  const __m256 amax_v = _mm256_set1_ps(amax);
  const __m256 v_lo = _mm256_mul_ps(cb_lo, amax_v), v_hi = _mm256_mul_ps(cb_hi, amax_v);
  if constexpr (OT == DType::F32) {
    // Byte order chosen so that unpacklo/hi of (high-nibble values, low-nibble values) lands
    // elements 0..7 and 8..15 in order.
    const __m128i order = _mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
    const __m256i low_nibbles = _mm256_set1_epi32(0x0f);
    float* o = static_cast<float*>(out);
    for (int64_t i = begin; i < begin + count; i += 32) {
      const __m128i raw = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2)), order);
      for (int h = 0; h < 2; ++h) {
        const __m256i d = _mm256_cvtepu8_epi32(h == 0 ? raw : _mm_unpackhi_epi64(raw, raw));
        const __m256 hi = lookup16(_mm256_srli_epi32(d, 4), v_lo, v_hi);
        const __m256 lo = lookup16(_mm256_and_si256(d, low_nibbles), v_lo, v_hi);
        store32<kStore>(o + i + 16 * h, _mm256_castps_si256(_mm256_unpacklo_ps(hi, lo)));
        store32<kStore>(o + i + 16 * h + 8, _mm256_castps_si256(_mm256_unpackhi_ps(hi, lo)));
      }
    }
  } else {
    __m256i words;  // the 16 rounded outputs, in code order
    if constexpr (OT == DType::F16) {
      constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
      words = _mm256_set_m128i(_mm256_cvtps_ph(v_hi, kRne), _mm256_cvtps_ph(v_lo, kRne));
    } else {
      words = _mm256_permute4x64_epi64(_mm256_packus_epi32(round_bf16(v_lo), round_bf16(v_hi)),
                                       _MM_SHUFFLE(3, 1, 2, 0));
    }
    // Split into low-byte and high-byte planes: lane 0 = low bytes, lane 1 = high bytes.
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i planes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(words, split), _MM_SHUFFLE(3, 1, 2, 0));
    const __m256i tab_lo = _mm256_permute2x128_si256(planes, planes, 0x00);
    const __m256i tab_hi = _mm256_permute2x128_si256(planes, planes, 0x11);
    // Lane 0 takes packed bytes 0-3 and 8-11 (elements 0-7, 16-23), lane 1 bytes 4-7 and
    // 12-15 (elements 8-15, 24-31): the final unpacklo/hi then emit elements in order.
    const __m256i spread = _mm256_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 0, 1, 2, 3, 8, 9, 10, 11,
                                            4, 5, 6, 7, 12, 13, 14, 15, 4, 5, 6, 7, 12, 13, 14, 15);
    const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t i = begin; i < begin + count; i += 32) {
      const __m256i x = _mm256_shuffle_epi8(
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2))), spread);
      const __m256i codes = _mm256_unpacklo_epi8(
          _mm256_and_si256(_mm256_srli_epi16(x, 4), low_nibbles), _mm256_and_si256(x, low_nibbles));
      const __m256i lb = _mm256_shuffle_epi8(tab_lo, codes), hb = _mm256_shuffle_epi8(tab_hi, codes);
      store32<kStore>(o + i, _mm256_unpacklo_epi8(lb, hb));
      store32<kStore>(o + i + 16, _mm256_unpackhi_epi8(lb, hb));
    }
  }
}

template <DType OT, Store kStore>
void dequantize_blocks(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                       int64_t blocksize, QuantType qt, int64_t block_begin, int64_t block_end,
                       void* out) {
  const float* codebook = qt == QuantType::NF4 ? kNF4Codebook : kFP4Codebook;
  const __m256 cb_lo = _mm256_loadu_ps(codebook), cb_hi = _mm256_loadu_ps(codebook + 8);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
    const float amax = block_absmax(absmax, b);
    // Non-finite absmax: NaN outputs whose payload rules (and 0 * Inf) the reference owns.
    if (end - begin < blocksize || (float_bits(amax) & 0x7fffffffu) >= 0x7f800000u) {
      dequantize_4bit_range_ref(packed, amax, begin, end, qt, out, OT);
      continue;
    }
    dequantize_full_block<OT, kStore>(packed, cb_lo, cb_hi, amax, begin, blocksize, out);
  }
  if constexpr (kStore != Store::Plain) _mm_sfence();  // streaming stores are weakly ordered
}

template <DType OT>
void dequantize_dtype(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                      int64_t blocksize, QuantType qt, int64_t b0, int64_t b1, void* out) {
  constexpr int64_t elem_bytes = OT == DType::F32 ? 4 : 2;
  // Every store sits a multiple of 32 bytes after the output's start, so all share its alignment.
  const uintptr_t align = reinterpret_cast<uintptr_t>(out) & 31;
  if (n * elem_bytes < kStreamMinBytes || align % 16 != 0)
    dequantize_blocks<OT, Store::Plain>(packed, absmax, n, blocksize, qt, b0, b1, out);
  else if (align == 0)
    dequantize_blocks<OT, Store::Stream32>(packed, absmax, n, blocksize, qt, b0, b1, out);
  else
    dequantize_blocks<OT, Store::Stream16>(packed, absmax, n, blocksize, qt, b0, b1, out);
}

void dequantize_4bit_avx2(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                          int64_t blocksize, QuantType qt, int64_t block_begin, int64_t block_end,
                          void* out, DType out_dtype) {
  switch (out_dtype) {
    case DType::F32:
      return dequantize_dtype<DType::F32>(packed, absmax, n, blocksize, qt, block_begin, block_end, out);
    case DType::F16:
      return dequantize_dtype<DType::F16>(packed, absmax, n, blocksize, qt, block_begin, block_end, out);
    default:
      return dequantize_dtype<DType::BF16>(packed, absmax, n, blocksize, qt, block_begin, block_end, out);
  }
}

}  // namespace

const QuantKernels kAvx2Kernels = {quantize_4bit_avx2, dequantize_4bit_avx2};

}  // namespace nf4lora::detail
