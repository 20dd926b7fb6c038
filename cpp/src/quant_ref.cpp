// quant_ref.cpp — the scalar reference CPU kernels: the executable spec for every faster
// variant. Straight loops over format.h's encode/decode; no intrinsics.
// Tested against a pure-PyTorch reference (tests/test_quantize.py) and bitsandbytes.
#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace nf4lora::detail {

int64_t quantize_4bit_block_ref(const void* x, DType x_dtype, int64_t begin, int64_t end,
                                int64_t n, QuantType qt, uint8_t* packed, float* absmax_out) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t i = begin; i < end; ++i) {
    const float v = load_as_float(x, x_dtype, i);
    finite = finite && std::isfinite(v);
    amax = std::max(amax, std::fabs(v));
  }
  if (!finite) {  // canonical form of a NaN/Inf block: absmax NaN, every code the zero code
    const uint8_t zero = encode_4bit(qt, 0.0f);
    for (int64_t i = begin; i < end; i += 2) packed[i / 2] = pack_nibbles(zero, zero);
    *absmax_out = NAN;
    return 1;
  }
  const float scale = block_scale(amax);
  for (int64_t i = begin; i < end; i += 2) {  // begin is even (blocks hold >= 32 elements)
    const uint8_t hi = encode_4bit(qt, load_as_float(x, x_dtype, i) * scale);
    const uint8_t lo = encode_4bit(qt, i + 1 < n ? load_as_float(x, x_dtype, i + 1) * scale : 0.0f);
    packed[i / 2] = pack_nibbles(hi, lo);
  }
  *absmax_out = amax;
  return 0;
}

void dequantize_4bit_range_ref(const uint8_t* packed, float absmax, int64_t begin, int64_t end,
                               QuantType qt, void* out, DType out_dtype) {
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t byte = packed[i / 2];
    const int code = (i & 1) ? low_nibble(byte) : high_nibble(byte);
    store_from_float(out, out_dtype, i, decode_4bit(qt, code, absmax));
  }
}

namespace {

int64_t quantize_4bit_ref(const void* x, DType x_dtype, int64_t n, int64_t blocksize,
                          QuantType qt, int64_t block_begin, int64_t block_end, uint8_t* packed,
                          float* absmax) {
  int64_t nonfinite = 0;
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
    nonfinite += quantize_4bit_block_ref(x, x_dtype, begin, end, n, qt, packed, absmax + b);
  }
  return nonfinite;
}

void dequantize_4bit_ref(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                         int64_t blocksize, QuantType qt, int64_t block_begin, int64_t block_end,
                         void* out, DType out_dtype) {
  for (int64_t b = block_begin; b < block_end; ++b) {
    const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
    dequantize_4bit_range_ref(packed, block_absmax(absmax, b), begin, end, qt, out, out_dtype);
  }
}

}  // namespace

const QuantKernels kRefKernels = {quantize_4bit_ref, dequantize_4bit_ref};

}  // namespace nf4lora::detail
