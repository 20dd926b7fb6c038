// quant_avx512.cpp — AVX-512 (F/BW/VL/DQ) kernels for blockwise 4-bit quantize/dequantize.
// Reference: quant_ref.cpp, matched bit for bit (packed codes, absmax, non-finite count, output
// values); non-finite and partial blocks are handed to the reference helpers.
// Tested by tests/cpp/test_core.cpp, which forces this variant and compares it with Ref.

#include "simd.h"

#include <algorithm>
#include <cstdint>

#include "kernels.h"

namespace nf4lora::detail {
namespace {

// Streaming stores pay off only once the output no longer fits in the caches (measured on a
// 2-core Sapphire Rapids VM, bf16 out: ~40% faster at 8 MB and up, ~30% slower at 4 MB); below
// this the next consumer (a matmul) would rather find the dequantized weight in cache anyway.
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;

// The compare thresholds of the 4-step binary search over format.h's 15 thresholds, plus the
// rank -> code permutation. Built per call from format.h (no table is written here).
struct RankSearch {
  __m512 t7, t3, t11;  // steps 8 and 4: broadcast thresholds (step 4 picks by blend)
  __m512 t_plus1;      // step 2: lane idx holds threshold[idx + 1] (idx a multiple of 4)
  __m512 t_plus0;      // step 1: lane idx holds threshold[idx] (idx even)
  __m512i to_code;     // FP4: rank -> code (kFP4Ascending)

  explicit RankSearch(QuantType qt) {
    alignas(64) float t[17];
    for (int i = 0; i < 15; ++i) t[i] = threshold(qt, i);
    t[15] = t[16] = t[14];  // never selected; keeps the loads in bounds
    t7 = _mm512_set1_ps(t[7]);
    t3 = _mm512_set1_ps(t[3]);
    t11 = _mm512_set1_ps(t[11]);
    t_plus1 = _mm512_loadu_ps(t + 1);
    t_plus0 = _mm512_loadu_ps(t);
    to_code = _mm512_loadu_si512(kFP4Ascending);
  }

  // Rank = number of thresholds strictly below x, for finite x (the caller routes blocks with
  // NaN/Inf to the reference). Thresholds are sorted, so 4 halving steps find it; ties (x equal
  // to a threshold) fail the strict compare and keep the lower rank, as encode_rank does.
  template <bool kFP4>
  __m512i code(__m512 x) const {
    const __mmask16 m8 = _mm512_cmp_ps_mask(x, t7, _CMP_GT_OQ);
    __m512i idx = _mm512_maskz_mov_epi32(m8, _mm512_set1_epi32(8));
    const __mmask16 m4 = _mm512_cmp_ps_mask(x, _mm512_mask_blend_ps(m8, t3, t11), _CMP_GT_OQ);
    idx = _mm512_mask_or_epi32(idx, m4, idx, _mm512_set1_epi32(4));
    const __mmask16 m2 = _mm512_cmp_ps_mask(x, _mm512_permutexvar_ps(idx, t_plus1), _CMP_GT_OQ);
    idx = _mm512_mask_or_epi32(idx, m2, idx, _mm512_set1_epi32(2));
    const __mmask16 m1 = _mm512_cmp_ps_mask(x, _mm512_permutexvar_ps(idx, t_plus0), _CMP_GT_OQ);
    idx = _mm512_mask_or_epi32(idx, m1, idx, _mm512_set1_epi32(1));
    return kFP4 ? _mm512_permutexvar_epi32(idx, to_code) : idx;
  }
};

// Largest |x| of a full block as raw bits of the input format: for non-negative floats the
// integer order is the value order, and a result at or above the format's infinity means the
// block holds NaN or Inf.
template <DType DT>
uint32_t block_max_abs_bits(const void* x, int64_t begin, int64_t count) {
  if constexpr (DT == DType::F32) {
    const float* p = static_cast<const float*>(x) + begin;
    const __m512i mask = _mm512_set1_epi32(0x7fffffff);
    __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
    for (int64_t i = 0; i < count; i += 32) {
      m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(p + i), mask));
      m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(p + i + 16), mask));
    }
    return _mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1));
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(x) + begin;
    const __m512i mask = _mm512_set1_epi16(0x7fff);
    __m512i m = _mm512_setzero_si512();
    for (int64_t i = 0; i < count; i += 32)
      m = _mm512_max_epu16(m, _mm512_and_si512(_mm512_loadu_si512(p + i), mask));
    m = _mm512_max_epu32(_mm512_and_si512(m, _mm512_set1_epi32(0xffff)), _mm512_srli_epi32(m, 16));
    return _mm512_reduce_max_epu32(m);
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

// Elements begin+2k go to *even, begin+2k+1 to *odd (k = 0..15), as fp32: the split matches the
// nibble pairs of the 16 packed bytes they become.
template <DType DT>
void load_pairs(const void* x, int64_t begin, __m512* even, __m512* odd) {
  if constexpr (DT == DType::BF16) {
    // Each dword holds (odd << 16) | even, and a bf16 is the top half of its fp32.
    const __m512i d = _mm512_loadu_si512(static_cast<const uint16_t*>(x) + begin);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(d, _mm512_set1_epi32(int(0xffff0000u))));
  } else {
    __m512 a, b;
    if constexpr (DT == DType::F32) {
      const float* p = static_cast<const float*>(x) + begin;
      a = _mm512_loadu_ps(p);
      b = _mm512_loadu_ps(p + 16);
    } else {
      const uint16_t* p = static_cast<const uint16_t*>(x) + begin;
      a = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      b = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
    }
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_add_epi32(ie, _mm512_set1_epi32(1));
    *even = _mm512_permutex2var_ps(a, ie, b);
    *odd = _mm512_permutex2var_ps(a, io, b);
  }
}

template <DType DT, bool kFP4>
int64_t quantize_blocks(const void* x, int64_t n, int64_t blocksize, QuantType qt,
                        int64_t block_begin, int64_t block_end, uint8_t* packed, float* absmax) {
  const RankSearch rs(qt);
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
      const __m512 s = _mm512_set1_ps(scale[j]);
      for (int64_t i = begin; i < begin + blocksize; i += 32) {
        __m512 even, odd;
        load_pairs<DT>(x, i, &even, &odd);
        const __m512i ce = rs.code<kFP4>(_mm512_mul_ps(even, s));
        const __m512i co = rs.code<kFP4>(_mm512_mul_ps(odd, s));
        const __m512i bytes = _mm512_or_si512(_mm512_slli_epi32(ce, 4), co);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(packed + i / 2), _mm512_cvtepi32_epi8(bytes));
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

int64_t quantize_4bit_avx512(const void* x, DType x_dtype, int64_t n, int64_t blocksize,
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

// fp32 -> bf16 bits (in the low half of each dword), round to nearest even; NaN never reaches
// here (blocks with a non-finite absmax go to the reference, and |codebook| <= 1).
inline __m512i round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
}

// Streaming (non-temporal) stores need aligned addresses: whole 64-byte lines when the output
// allows, else 16-byte pieces (as fast: the write-combining buffers still fill whole lines).
enum class Store { Plain, Stream16, Stream64 };

template <Store kStore>
inline void store64(void* p, __m512i v) {
  if constexpr (kStore == Store::Stream64) {
    _mm512_stream_si512(static_cast<__m512i*>(p), v);
  } else if constexpr (kStore == Store::Stream16) {
    __m128i* q = static_cast<__m128i*>(p);
    _mm_stream_si128(q, _mm512_castsi512_si128(v));
    _mm_stream_si128(q + 1, _mm512_extracti32x4_epi32(v, 1));
    _mm_stream_si128(q + 2, _mm512_extracti32x4_epi32(v, 2));
    _mm_stream_si128(q + 3, _mm512_extracti32x4_epi32(v, 3));
  } else {
    _mm512_storeu_si512(p, v);
  }
}

// The 16 products codebook[c] * absmax are formed once per block (the same fp32 products the
// reference forms per element) and, for 16-bit outputs, rounded once, so the inner loop is two
// table permutes per 32 elements.
template <DType OT, Store kStore>
void dequantize_full_block(const uint8_t* packed, __m512 codebook, float amax, int64_t begin,
                           int64_t count, void* out) {
  const __m512 values = _mm512_mul_ps(codebook, _mm512_set1_ps(amax));
  const __m512i low_nibbles = _mm512_set1_epi32(0x0f);
  if constexpr (OT == DType::F32) {
    // Byte order chosen so that unpacklo/hi of (high-nibble values, low-nibble values) lands
    // elements 0..15 and 16..31 in order.
    const __m128i order = _mm_setr_epi8(0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15);
    float* o = static_cast<float*>(out);
    for (int64_t i = begin; i < begin + count; i += 32) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2));
      const __m512i d = _mm512_cvtepu8_epi32(_mm_shuffle_epi8(raw, order));
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), values);
      const __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(d, low_nibbles), values);
      store64<kStore>(o + i, _mm512_castps_si512(_mm512_unpacklo_ps(hi, lo)));
      store64<kStore>(o + i + 16, _mm512_castps_si512(_mm512_unpackhi_ps(hi, lo)));
    }
  } else {
    __m512i even_tab;
    if constexpr (OT == DType::F16)
      even_tab = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    else
      even_tab = round_bf16(values);
    const __m512i odd_tab = _mm512_slli_epi32(even_tab, 16);
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t i = begin; i < begin + count; i += 32) {
      // Dword k of the output holds elements 2k (high nibble of byte k) and 2k+1 (low nibble).
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + i / 2)));
      const __m512i e = _mm512_permutexvar_epi32(_mm512_srli_epi32(d, 4), even_tab);
      const __m512i od = _mm512_permutexvar_epi32(_mm512_and_si512(d, low_nibbles), odd_tab);
      store64<kStore>(o + i, _mm512_or_si512(e, od));
    }
  }
}

template <DType OT, Store kStore>
void dequantize_blocks(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                       int64_t blocksize, QuantType qt, int64_t block_begin, int64_t block_end,
                       void* out) {
  const __m512 codebook = _mm512_loadu_ps(qt == QuantType::NF4 ? kNF4Codebook : kFP4Codebook);
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
    const float amax = block_absmax(absmax, b);
    // Non-finite absmax: NaN outputs whose payload rules (and 0 * Inf) the reference owns.
    if (end - begin < blocksize || (float_bits(amax) & 0x7fffffffu) >= 0x7f800000u) {
      dequantize_4bit_range_ref(packed, amax, begin, end, qt, out, OT);
      continue;
    }
    dequantize_full_block<OT, kStore>(packed, codebook, amax, begin, blocksize, out);
  }
  if constexpr (kStore != Store::Plain) _mm_sfence();  // streaming stores are weakly ordered
}

template <DType OT>
void dequantize_dtype(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                      int64_t blocksize, QuantType qt, int64_t b0, int64_t b1, void* out) {
  constexpr int64_t elem_bytes = OT == DType::F32 ? 4 : 2;
  // Every 32-element step starts 64 bytes (or 128) after the previous one, so all stores share
  // the output's alignment.
  const uintptr_t align = reinterpret_cast<uintptr_t>(out) & 63;
  if (n * elem_bytes < kStreamMinBytes || align % 16 != 0)
    dequantize_blocks<OT, Store::Plain>(packed, absmax, n, blocksize, qt, b0, b1, out);
  else if (align == 0)
    dequantize_blocks<OT, Store::Stream64>(packed, absmax, n, blocksize, qt, b0, b1, out);
  else
    dequantize_blocks<OT, Store::Stream16>(packed, absmax, n, blocksize, qt, b0, b1, out);
}

void dequantize_4bit_avx512(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                            int64_t blocksize, QuantType qt, int64_t block_begin,
                            int64_t block_end, void* out, DType out_dtype) {
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

const QuantKernels kAvx512Kernels = {quantize_4bit_avx512, dequantize_4bit_avx512};

}  // namespace nf4lora::detail
