// optim_ref.cpp — the scalar reference AdamW and Lion block kernels (fp32 and 8-bit blockwise state): the
// executable spec for the SIMD variants and cuda/optim.cu. Straight loops over optim.h's
// adamw_update and format.h's 8-bit maps and encoder; no intrinsics.
// Tested against torch.optim.AdamW and bitsandbytes (tests/test_optim.py).
#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "optim_kernels.h"

namespace nf4lora::detail {

bool grad_finite_ref(const void* grad, DType dtype, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i)
    if (!std::isfinite(load_as_float(grad, dtype, i))) return false;
  return true;
}

void adamw_32bit_range_ref(const AdamWArgs& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float p = load_as_float(a.param, a.dtype, i);
    adamw_update(p, a.m[i], a.v[i], load_as_float(a.grad, a.dtype, i), a.s);
    store_from_float(a.param, a.dtype, i, p);
  }
}

void adamw_8bit_update_range_ref(const AdamWArgs& a, int64_t b, int64_t begin, int64_t end,
                                 float* mb, float* vb, float& max_m, float& max_v) {
  const float am = a.absmax_m[b], av = a.absmax_v[b];
  const int64_t base = b * kOptimBlock;
  for (int64_t i = begin; i < end; ++i) {
    float p = load_as_float(a.param, a.dtype, i);
    float m = kDynamicSigned[a.qm[i]] * am;
    float v = kDynamicUnsigned[a.qv[i]] * av;
    adamw_update(p, m, v, load_as_float(a.grad, a.dtype, i), a.s);
    store_from_float(a.param, a.dtype, i, p);
    mb[i - base] = m;
    vb[i - base] = v;
    max_m = std::max(max_m, std::fabs(m));
    max_v = std::max(max_v, v);
  }
}

void lion_32bit_range_ref(const AdamWArgs& a, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float p = load_as_float(a.param, a.dtype, i);
    lion_update(p, a.m[i], load_as_float(a.grad, a.dtype, i), a.ls);
    store_from_float(a.param, a.dtype, i, p);
  }
}

void lion_8bit_update_range_ref(const AdamWArgs& a, int64_t b, int64_t begin, int64_t end, float* mb,
                                float& max_m) {
  const float am = a.absmax_m[b];
  const int64_t base = b * kOptimBlock;
  for (int64_t i = begin; i < end; ++i) {
    float p = load_as_float(a.param, a.dtype, i);
    float m = kDynamicSigned[a.qm[i]] * am;
    lion_update(p, m, load_as_float(a.grad, a.dtype, i), a.ls);
    store_from_float(a.param, a.dtype, i, p);
    mb[i - base] = m;
    max_m = std::max(max_m, std::fabs(m));
  }
}

namespace {

auto finite_ref(const AdamWArgs& a) {
  return [&a](int64_t begin, int64_t end) { return grad_finite_ref(a.grad, a.dtype, begin, end); };
}

int64_t lion_32bit_blocks_ref(const AdamWArgs& a, int64_t b0, int64_t b1) {
  return for_finite_blocks(a, b0, b1, finite_ref(a), [&](int64_t, int64_t begin, int64_t end) {
    lion_32bit_range_ref(a, begin, end);
  });
}

int64_t lion_8bit_blocks_ref(const AdamWArgs& a, int64_t b0, int64_t b1) {
  float mb[kOptimBlock];
  return for_finite_blocks(a, b0, b1, finite_ref(a), [&](int64_t b, int64_t begin, int64_t end) {
    float max_m = 0.0f;
    lion_8bit_update_range_ref(a, b, begin, end, mb, max_m);
    const float sm = block_scale(max_m);
    for (int64_t i = begin; i < end; ++i) a.qm[i] = encode_8bit_mids(a.tables->mids_m, mb[i - begin] * sm);
    a.absmax_m[b] = max_m;
  });
}

int64_t adamw_32bit_blocks_ref(const AdamWArgs& a, int64_t b0, int64_t b1) {
  return for_finite_blocks(a, b0, b1, finite_ref(a), [&](int64_t, int64_t begin, int64_t end) {
    adamw_32bit_range_ref(a, begin, end);
  });
}

int64_t adamw_8bit_blocks_ref(const AdamWArgs& a, int64_t b0, int64_t b1) {
  float mb[kOptimBlock], vb[kOptimBlock];
  return for_finite_blocks(a, b0, b1, finite_ref(a), [&](int64_t b, int64_t begin, int64_t end) {
    float max_m = 0.0f, max_v = 0.0f;
    adamw_8bit_update_range_ref(a, b, begin, end, mb, vb, max_m, max_v);
    const float sm = block_scale(max_m), sv = block_scale(max_v);
    for (int64_t i = begin; i < end; ++i) {
      a.qm[i] = encode_8bit_mids(a.tables->mids_m, mb[i - begin] * sm);
      a.qv[i] = encode_8bit_mids(a.tables->mids_v, vb[i - begin] * sv);
    }
    a.absmax_m[b] = max_m;
    a.absmax_v[b] = max_v;
  });
}

void encode_8bit_ref(bool signed_map, const float* x, int64_t n, uint8_t* out) {
  const Optim8bitTables& t = optim_8bit_tables();
  for (int64_t i = 0; i < n; ++i) out[i] = encode_8bit_mids(signed_map ? t.mids_m : t.mids_v, x[i]);
}

void decode_8bit_ref(bool signed_map, const uint8_t* q, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = (signed_map ? kDynamicSigned : kDynamicUnsigned)[q[i]];
}

}  // namespace

const OptimKernels kOptimRefKernels = {adamw_32bit_blocks_ref, adamw_8bit_blocks_ref, encode_8bit_ref,
                                       decode_8bit_ref, lion_32bit_blocks_ref, lion_8bit_blocks_ref};

}  // namespace nf4lora::detail
