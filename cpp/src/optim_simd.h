// optim_simd.h — the fused AdamW and Lion block kernels written once over a small vector-ISA interface V
// (F: a vector of V::W floats; arithmetic, loads/stores per param dtype; V::Codec, built once per
// call from one 8-bit map, decodes kGroup codes into kGroup / W vectors and encodes as many scaled
// values). Included only by optim_avx2.cpp and optim_avx512.cpp, each compiled with its own ISA
// flags, which define V. Same operations in the same order as optim_ref.cpp (no FMA), so equal to
// it bit for bit on finite data; tested by tests/cpp/test_optim.cpp.
#pragma once

#include <algorithm>
#include <cstdint>

#include "optim_kernels.h"

namespace nf4lora::detail {
namespace simd_optim {

template <class V, DType D>
typename V::F load_elems(const void* p, int64_t i) {
  if constexpr (D == DType::F32) return V::load_f32(static_cast<const float*>(p) + i);
  else if constexpr (D == DType::BF16) return V::load_bf16(static_cast<const uint16_t*>(p) + i);
  else return V::load_f16(static_cast<const uint16_t*>(p) + i);
}
template <class V, DType D>
void store_elems(void* p, int64_t i, typename V::F x) {
  if constexpr (D == DType::F32) V::store_f32(static_cast<float*>(p) + i, x);
  else if constexpr (D == DType::BF16) V::store_bf16(static_cast<uint16_t*>(p) + i, x);
  else V::store_f16(static_cast<uint16_t*>(p) + i, x);
}

// The largest lane of a (its lanes are never NaN: |m| and v of finite updates).
template <class V>
float hmax(typename V::F a) {
  alignas(64) float t[V::W];
  V::store_f32(t, a);
  float r = t[0];
  for (int i = 1; i < V::W; ++i) r = r < t[i] ? t[i] : r;
  return r;
}

template <class V>
struct Scalars {
  typename V::F decay, omb1, beta2, omb2, eps, step_size, inv_bc2_sqrt;
  explicit Scalars(const AdamWScalars& s)
      : decay(V::set1(s.decay)), omb1(V::set1(s.one_minus_beta1)), beta2(V::set1(s.beta2)),
        omb2(V::set1(s.one_minus_beta2)), eps(V::set1(s.eps)), step_size(V::set1(s.step_size)),
        inv_bc2_sqrt(V::set1(s.inv_bc2_sqrt)) {}
};

// optim.h's adamw_update, lane-wise, the same operations in the same order.
template <class V>
inline void update(typename V::F& p, typename V::F& m, typename V::F& v, typename V::F g,
                   const Scalars<V>& s) {
  p = V::mul(p, s.decay);
  m = V::add(m, V::mul(s.omb1, V::sub(g, m)));
  v = V::add(V::mul(v, s.beta2), V::mul(V::mul(s.omb2, g), g));
  const typename V::F denom = V::add(V::mul(V::sqrt(v), s.inv_bc2_sqrt), s.eps);
  p = V::sub(p, V::div(V::mul(s.step_size, m), denom));
}

// g * 0 is +-0 for finite g and NaN otherwise; the sum stays zero only if every g was finite.
template <class V, DType D>
bool grad_finite(const void* grad, int64_t begin, int64_t end) {
  typename V::F acc = V::zero();
  int64_t i = begin;
  for (; i + V::W <= end; i += V::W) acc = V::add(acc, V::mul(load_elems<V, D>(grad, i), V::zero()));
  return V::all_zero(acc) && grad_finite_ref(grad, D, i, end);
}

template <class V, DType D>
auto finite_simd(const AdamWArgs& a) {
  return [&a](int64_t begin, int64_t end) { return grad_finite<V, D>(a.grad, begin, end); };
}

template <class V, DType D>
int64_t adamw_32bit_blocks(const AdamWArgs& a, int64_t b0, int64_t b1) {
  const Scalars<V> s(a.s);
  return for_finite_blocks(a, b0, b1, finite_simd<V, D>(a), [&](int64_t, int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + V::W <= end; i += V::W) {
      typename V::F p = load_elems<V, D>(a.param, i), m = V::load_f32(a.m + i),
                    v = V::load_f32(a.v + i);
      update<V>(p, m, v, load_elems<V, D>(a.grad, i), s);
      store_elems<V, D>(a.param, i, p);
      V::store_f32(a.m + i, m);
      V::store_f32(a.v + i, v);
    }
    adamw_32bit_range_ref(a, i, end);
  });
}

// codes[i] = the code of x[i] * scale (format.h's nearest map entry) for i < n: kGroup values per
// codec call, the rest one at a time with encode_8bit_mids.
template <class V>
void encode_scaled(const typename V::Codec& codec, const float* mids, const float* x, float scale, int64_t n,
                   uint8_t* codes) {
  constexpr int G = V::Codec::kGroup;
  const typename V::F vs = V::set1(scale);
  int64_t i = 0;
  for (; i + G <= n; i += G) {
    typename V::F s[G / V::W];
    for (int r = 0; r < G / V::W; ++r) s[r] = V::mul(V::load_f32(x + i + r * V::W), vs);
    codec.encode(s, codes + i);
  }
  for (; i < n; ++i) codes[i] = encode_8bit_mids(mids, x[i] * scale);
}

template <class V, DType D>
int64_t adamw_8bit_blocks(const AdamWArgs& a, int64_t b0, int64_t b1) {
  const Scalars<V> s(a.s);
  const Optim8bitTables& t = *a.tables;
  const typename V::Codec codec_m(kDynamicSigned, t.mids_m, t.lut_m);
  const typename V::Codec codec_v(kDynamicUnsigned, t.mids_v, t.lut_v);
  constexpr int G = V::Codec::kGroup;  // codes per decode/encode call, a multiple of V::W
  alignas(64) float mb[kOptimBlock], vb[kOptimBlock];
  return for_finite_blocks(a, b0, b1, finite_simd<V, D>(a), [&](int64_t b, int64_t begin, int64_t end) {
    // Dequantize with the old absmax, update, keep the new fp32 moments for the requantization.
    const typename V::F am = V::set1(a.absmax_m[b]), av = V::set1(a.absmax_v[b]);
    typename V::F max_m = V::zero(), max_v = V::zero();
    int64_t i = begin;
    for (; i + G <= end; i += G) {
      typename V::F dm[G / V::W], dv[G / V::W];
      codec_m.decode(a.qm + i, dm);
      codec_v.decode(a.qv + i, dv);
      for (int r = 0; r < G / V::W; ++r) {
        const int64_t k = i + r * V::W;
        typename V::F p = load_elems<V, D>(a.param, k);
        typename V::F m = V::mul(dm[r], am), v = V::mul(dv[r], av);
        update<V>(p, m, v, load_elems<V, D>(a.grad, k), s);
        store_elems<V, D>(a.param, k, p);
        V::store_f32(mb + (k - begin), m);
        V::store_f32(vb + (k - begin), v);
        max_m = V::max(max_m, V::abs(m));
        max_v = V::max(max_v, v);
      }
    }
    float mm = hmax<V>(max_m), mv = hmax<V>(max_v);
    adamw_8bit_update_range_ref(a, b, i, end, mb, vb, mm, mv);
    // Requantize against the new absmax (nearest map entry; format.h's encoder via the tables).
    // m and v in one loop, not two encode_scaled calls: their searches overlap (two calls measured
    // 5-9% slower for the AVX2 / AVX-512 codecs, `./build-dev/bench_optim 50 2 5`).
    const float sm = block_scale(mm), sv = block_scale(mv);
    const typename V::F vsm = V::set1(sm), vsv = V::set1(sv);
    int64_t j = begin;
    for (; j + G <= end; j += G) {
      typename V::F xm[G / V::W], xv[G / V::W];
      for (int r = 0; r < G / V::W; ++r) {
        xm[r] = V::mul(V::load_f32(mb + (j - begin) + r * V::W), vsm);
        xv[r] = V::mul(V::load_f32(vb + (j - begin) + r * V::W), vsv);
      }
      codec_m.encode(xm, a.qm + j);
      codec_v.encode(xv, a.qv + j);
    }
    for (; j < end; ++j) {
      a.qm[j] = encode_8bit_mids(t.mids_m, mb[j - begin] * sm);
      a.qv[j] = encode_8bit_mids(t.mids_v, vb[j - begin] * sv);
    }
    a.absmax_m[b] = mm;
    a.absmax_v[b] = mv;
  });
}

template <class V>
struct LionVec {
  typename V::F decay, lr, beta1, omb1, beta2, omb2, one, minus_one;
  explicit LionVec(const LionScalars& s)
      : decay(V::set1(s.decay)), lr(V::set1(s.lr)), beta1(V::set1(s.beta1)), omb1(V::set1(s.one_minus_beta1)),
        beta2(V::set1(s.beta2)), omb2(V::set1(s.one_minus_beta2)), one(V::set1(1.0f)), minus_one(V::set1(-1.0f)) {}
};

// optim.h's lion_update, lane-wise, the same operations in the same order.
template <class V>
inline void lion(typename V::F& p, typename V::F& m, typename V::F g, const LionVec<V>& s) {
  p = V::mul(p, s.decay);
  const typename V::F c = V::add(V::mul(m, s.beta1), V::mul(s.omb1, g));
  p = V::sub(p, V::mul(s.lr, V::sign(c, s.one, s.minus_one)));
  m = V::add(V::mul(m, s.beta2), V::mul(s.omb2, g));
}

template <class V, DType D>
int64_t lion_32bit_blocks(const AdamWArgs& a, int64_t b0, int64_t b1) {
  const LionVec<V> s(a.ls);
  return for_finite_blocks(a, b0, b1, finite_simd<V, D>(a), [&](int64_t, int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + V::W <= end; i += V::W) {
      typename V::F p = load_elems<V, D>(a.param, i), m = V::load_f32(a.m + i);
      lion<V>(p, m, load_elems<V, D>(a.grad, i), s);
      store_elems<V, D>(a.param, i, p);
      V::store_f32(a.m + i, m);
    }
    lion_32bit_range_ref(a, i, end);
  });
}

template <class V, DType D>
int64_t lion_8bit_blocks(const AdamWArgs& a, int64_t b0, int64_t b1) {
  const LionVec<V> s(a.ls);
  const Optim8bitTables& t = *a.tables;
  const typename V::Codec codec_m(kDynamicSigned, t.mids_m, t.lut_m);
  constexpr int G = V::Codec::kGroup;
  alignas(64) float mb[kOptimBlock];
  return for_finite_blocks(a, b0, b1, finite_simd<V, D>(a), [&](int64_t b, int64_t begin, int64_t end) {
    const typename V::F am = V::set1(a.absmax_m[b]);
    typename V::F max_m = V::zero();
    int64_t i = begin;
    for (; i + G <= end; i += G) {
      typename V::F dm[G / V::W];
      codec_m.decode(a.qm + i, dm);
      for (int r = 0; r < G / V::W; ++r) {
        const int64_t k = i + r * V::W;
        typename V::F p = load_elems<V, D>(a.param, k), m = V::mul(dm[r], am);
        lion<V>(p, m, load_elems<V, D>(a.grad, k), s);
        store_elems<V, D>(a.param, k, p);
        V::store_f32(mb + (k - begin), m);
        max_m = V::max(max_m, V::abs(m));
      }
    }
    float mm = hmax<V>(max_m);
    lion_8bit_update_range_ref(a, b, i, end, mb, mm);
    encode_scaled<V>(codec_m, t.mids_m, mb, block_scale(mm), end - begin, a.qm + begin);
    a.absmax_m[b] = mm;
  });
}

// Dispatch on the param dtype once per call, so the inner loops have no dtype switch.
template <class V, template <class, DType> class Body>
int64_t by_dtype(const AdamWArgs& a, int64_t b0, int64_t b1) {
  switch (a.dtype) {
    case DType::F32: return Body<V, DType::F32>::run(a, b0, b1);
    case DType::BF16: return Body<V, DType::BF16>::run(a, b0, b1);
    default: return Body<V, DType::F16>::run(a, b0, b1);
  }
}
template <class V, DType D> struct Adamw32 {
  static int64_t run(const AdamWArgs& a, int64_t b0, int64_t b1) { return adamw_32bit_blocks<V, D>(a, b0, b1); }
};
template <class V, DType D> struct Adamw8 {
  static int64_t run(const AdamWArgs& a, int64_t b0, int64_t b1) { return adamw_8bit_blocks<V, D>(a, b0, b1); }
};

template <class V, DType D> struct Lion32 {
  static int64_t run(const AdamWArgs& a, int64_t b0, int64_t b1) { return lion_32bit_blocks<V, D>(a, b0, b1); }
};
template <class V, DType D> struct Lion8 {
  static int64_t run(const AdamWArgs& a, int64_t b0, int64_t b1) { return lion_8bit_blocks<V, D>(a, b0, b1); }
};

template <class V>
void encode_8bit(bool signed_map, const float* x, int64_t n, uint8_t* out) {
  const Optim8bitTables& t = optim_8bit_tables();
  const float* mids = signed_map ? t.mids_m : t.mids_v;
  const typename V::Codec codec(signed_map ? kDynamicSigned : kDynamicUnsigned, mids,
                                signed_map ? t.lut_m : t.lut_v);
  encode_scaled<V>(codec, mids, x, 1.0f, n, out);  // x * 1.0f is x, NaN and -0 included
}

template <class V>
void decode_8bit(bool signed_map, const uint8_t* q, int64_t n, float* out) {
  const Optim8bitTables& t = optim_8bit_tables();
  const float* map = signed_map ? kDynamicSigned : kDynamicUnsigned;
  const typename V::Codec codec(map, signed_map ? t.mids_m : t.mids_v, signed_map ? t.lut_m : t.lut_v);
  constexpr int G = V::Codec::kGroup;
  int64_t i = 0;
  for (; i + G <= n; i += G) {
    typename V::F d[G / V::W];
    codec.decode(q + i, d);
    for (int r = 0; r < G / V::W; ++r) V::store_f32(out + i + r * V::W, d[r]);
  }
  for (; i < n; ++i) out[i] = map[q[i]];
}

template <class V>
constexpr OptimKernels make_kernels() {
  return {by_dtype<V, Adamw32>, by_dtype<V, Adamw8>, encode_8bit<V>, decode_8bit<V>,
          by_dtype<V, Lion32>, by_dtype<V, Lion8>};
}

}  // namespace simd_optim
}  // namespace nf4lora::detail
