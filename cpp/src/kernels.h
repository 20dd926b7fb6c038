// kernels.h — the per-ISA CPU kernel table (internal). Each variant (quant_ref.cpp,
// quant_avx2.cpp, quant_avx512.cpp) fills one QuantKernels; dispatch.cpp picks one at run time
// and splits the blocks over threads. Every variant must equal the reference bit for bit
// (tests/cpp/test_core.cpp and tests/test_quantize.py force each one).
#pragma once

#include <cstdint>

#include "nf4lora/quantize.h"

namespace nf4lora::detail {

// A block holding NaN or +-Inf is written in one canonical form by every variant: absmax NaN
// and all its codes the code of 0.0 (so it dequantizes to NaN), counted in the return value.
// Both work on whole blocks [block_begin, block_end) of an n-element tensor; the last block
// may be partial. Blocks are at least 32 elements, so every block owns whole packed bytes.
using Quantize4bitFn = int64_t (*)(const void* x, DType x_dtype, int64_t n, int64_t blocksize,
                                   QuantType qt, int64_t block_begin, int64_t block_end,
                                   uint8_t* packed, float* absmax);
using Dequantize4bitFn = void (*)(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                                  int64_t blocksize, QuantType qt, int64_t block_begin,
                                  int64_t block_end, void* out, DType out_dtype);

struct QuantKernels {
  Quantize4bitFn quantize_4bit;
  Dequantize4bitFn dequantize_4bit;
};

extern const QuantKernels kRefKernels;
#if defined(NF4LORA_HAVE_AVX2)
extern const QuantKernels kAvx2Kernels;
#endif
#if defined(NF4LORA_HAVE_AVX512)
extern const QuantKernels kAvx512Kernels;
#endif

// CPUID (dispatch.cpp): AVX-512 with VBMI and GFNI, for the optimizer's byte-permute codec.
bool cpu_has_avx512_vbmi_gfni();

// Absmax of block b for dequantization (plain or double-quantized), computed as bitsandbytes does.
inline float block_absmax(const AbsmaxSource& a, int64_t b) {
  if (!a.nested()) return a.absmax[b];
  return decode_nested_absmax(a.nested_code[a.qabsmax[b]], a.nested_absmax[b / a.nested_blocksize],
                              *a.offset);
}

// Scalar element loaders/storers shared by the reference and the SIMD tails.
inline float load_as_float(const void* x, DType dt, int64_t i) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(x)[i];
    case DType::F16: return half_bits_to_float(static_cast<const uint16_t*>(x)[i]);
    default: return bf16_bits_to_float(static_cast<const uint16_t*>(x)[i]);
  }
}
inline void store_from_float(void* out, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(out)[i] = v; break;
    case DType::F16: static_cast<uint16_t*>(out)[i] = float_to_half_bits(v); break;
    default: static_cast<uint16_t*>(out)[i] = float_to_bf16_bits(v); break;
  }
}

// Scalar reference bodies, also used by SIMD variants for partial blocks.
int64_t quantize_4bit_block_ref(const void* x, DType x_dtype, int64_t begin, int64_t end,
                                int64_t n, QuantType qt, uint8_t* packed, float* absmax_out);
void dequantize_4bit_range_ref(const uint8_t* packed, float absmax, int64_t begin, int64_t end,
                               QuantType qt, void* out, DType out_dtype);

}  // namespace nf4lora::detail
