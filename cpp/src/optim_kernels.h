// optim_kernels.h — the per-ISA table of fused AdamW and Lion block kernels (internal).
// optim_ref.cpp, optim_avx2.cpp, optim_avx512.cpp and optim_avx512_vbmi.cpp each fill one
// OptimKernels; optim_dispatch.cpp picks one with active_cpu_variant() (and the VBMI check) and
// splits the blocks over threads. Every variant equals the reference bit for bit on finite data
// (tests/cpp/test_optim.cpp forces each one).
#pragma once

#include <algorithm>
#include <cstdint>

#include "nf4lora/optim.h"

namespace nf4lora::detail {

// The 8-bit encoders' tables, built once from format.h's maps (optim_dispatch.cpp).
// mids[j] = midpoint_8bit(map, j) for j < 255 and +inf at 255. lut[u >> 16] for the fp32 bits u of
// a scaled value is the code of the smallest non-NaN value with those top 16 bits; every such
// bucket spans at most two adjacent codes (checked when the table is built), so the code of x is
// lut + (x > mids[lut]), and NaN (code 0 in encode_8bit_mids) is patched separately.
struct Optim8bitTables {
  float mids_m[256], mids_v[256];
  uint8_t lut_m[65536 + 4], lut_v[65536 + 4];  // +4: SIMD variants gather 32-bit words
};
const Optim8bitTables& optim_8bit_tables();

struct AdamWArgs {
  void* param;
  DType dtype;
  const void* grad;
  float* m;  // fp32 state (32-bit kernels)
  float* v;
  uint8_t* qm;  // 8-bit state (8-bit kernels)
  uint8_t* qv;
  float* absmax_m;
  float* absmax_v;
  int64_t n;
  AdamWScalars s;
  const Optim8bitTables* tables;
  LionScalars ls;  // Lion kernels: m / qm + absmax_m hold the single momentum
};

// Updates blocks [block_begin, block_end) of kOptimBlock elements; returns the skipped ones.
using AdamWBlocksFn = int64_t (*)(const AdamWArgs& a, int64_t block_begin, int64_t block_end);

// The 8-bit state codec alone (tests): n scaled values -> codes of the signed (m) or unsigned (v)
// map as encode_8bit_mids gives them, and codes -> map values.
using Encode8bitFn = void (*)(bool signed_map, const float* x, int64_t n, uint8_t* out);
using Decode8bitFn = void (*)(bool signed_map, const uint8_t* q, int64_t n, float* out);

struct OptimKernels {
  AdamWBlocksFn adamw_32bit;
  AdamWBlocksFn adamw_8bit;
  Encode8bitFn encode_8bit;
  Decode8bitFn decode_8bit;
  AdamWBlocksFn lion_32bit;
  AdamWBlocksFn lion_8bit;
};

extern const OptimKernels kOptimRefKernels;
#if defined(NF4LORA_HAVE_AVX2)
extern const OptimKernels kOptimAvx2Kernels;
#endif
#if defined(NF4LORA_HAVE_AVX512)
extern const OptimKernels kOptimAvx512Kernels;
#endif
#if defined(NF4LORA_HAVE_AVX512VBMI)
extern const OptimKernels kOptimAvx512VbmiKernels;  // AVX-512 + VBMI + GFNI codec
#endif

// The block loop every kernel shares: body(b, begin, end) for each block b in [b0, b1) whose
// gradient finite(begin, end) finds all finite; the others are skipped, their params and state
// left as they were, and counted (the return value).
template <class Finite, class Body>
int64_t for_finite_blocks(const AdamWArgs& a, int64_t b0, int64_t b1, const Finite& finite, const Body& body) {
  int64_t skipped = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * kOptimBlock, end = std::min(a.n, begin + kOptimBlock);
    if (finite(begin, end)) body(b, begin, end);
    else ++skipped;
  }
  return skipped;
}

// Scalar bodies, also used by the SIMD variants for the elements after their last full vector.
bool grad_finite_ref(const void* grad, DType dtype, int64_t begin, int64_t end);
void adamw_32bit_range_ref(const AdamWArgs& a, int64_t begin, int64_t end);
// Dequantizes + updates [begin, end) of block b, writing the new fp32 m, v to mb, vb (indexed from
// the block start) and folding |m|, v into the running maxima.
void lion_32bit_range_ref(const AdamWArgs& a, int64_t begin, int64_t end);
// As adamw_8bit_update_range_ref, for Lion's single momentum.
void lion_8bit_update_range_ref(const AdamWArgs& a, int64_t b, int64_t begin, int64_t end, float* mb,
                                float& max_m);
void adamw_8bit_update_range_ref(const AdamWArgs& a, int64_t b, int64_t begin, int64_t end,
                                 float* mb, float* vb, float& max_m, float& max_v);

}  // namespace nf4lora::detail
