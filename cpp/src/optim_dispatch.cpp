// optim_dispatch.cpp — the public CPU entry points of optim.h (AdamW and Lion): hyperparameter and argument checks,
// the 8-bit encoder tables (built once from format.h's maps and verified), the choice of the
// kernel variant by active_cpu_variant() (the switch quantize.h's kernels use) and the split of
// the blocks over threads. Tested by tests/cpp/test_optim.cpp and tests/test_optim.py.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "nf4lora/detail/checks.h"
#include "nf4lora/detail/parallel.h"
#include "nf4lora/optim.h"
#include "nf4lora/quantize.h"
#include "optim_kernels.h"

namespace nf4lora {
namespace {

using namespace detail;

constexpr int64_t kGrainBlocks = (int64_t{1} << 16) / kOptimBlock;  // ~64K elements per thread

std::atomic<bool> g_vbmi_enabled{true};

const OptimKernels& optim_kernels() {
  switch (active_cpu_variant()) {
#if defined(NF4LORA_HAVE_AVX512)
    case CpuVariant::AVX512:
    case CpuVariant::AVX512_BF16:  // the bf16 variant only changes the fused matmul
#if defined(NF4LORA_HAVE_AVX512VBMI)
      if (g_vbmi_enabled.load() && optim_vbmi_supported()) return kOptimAvx512VbmiKernels;
#endif
      return kOptimAvx512Kernels;
#endif
#if defined(NF4LORA_HAVE_AVX2)
    case CpuVariant::AVX2: return kOptimAvx2Kernels;
#endif
    default: return kOptimRefKernels;
  }
}

void check_finite_param(double x, const char* name) {
  if (!std::isfinite(x))
    throw std::invalid_argument(std::string(name) + " must be finite, got " + std::to_string(x));
}

void build_tables(const float* map, float* mids, uint8_t* lut, const char* which) {
  for (int j = 0; j < 255; ++j) {
    mids[j] = midpoint_8bit(map, j);
    if (j > 0 && !(mids[j] > mids[j - 1]))
      throw std::logic_error(std::string("8-bit map '") + which + "' is not strictly increasing");
  }
  mids[255] = std::numeric_limits<float>::infinity();
  for (uint32_t h = 0; h < 65536; ++h) {
    const float ends[2] = {bits_float(h << 16), bits_float((h << 16) | 0xFFFFu)};
    int lo = 256, hi = -1;
    for (float x : ends) {
      if (std::isnan(x)) continue;
      const int c = encode_8bit_mids(mids, x);
      lo = std::min(lo, c);
      hi = std::max(hi, c);
    }
    if (hi < 0) lo = hi = 0;  // an all-NaN bucket; NaN is patched by the kernels
    // encode is monotone, so the bucket's codes run from lo to hi; the kernels assume <= 2 of them.
    if (hi - lo > 1)
      throw std::logic_error(std::string("8-bit map '") + which +
                             "': a 16-bit float bucket spans more than two codes");
    lut[h] = static_cast<uint8_t>(lo);
  }
  for (int k = 0; k < 4; ++k) lut[65536 + k] = 0;
}

int64_t run_blocks(AdamWBlocksFn fn, const AdamWArgs& a, int num_threads) {
  std::atomic<int64_t> skipped{0};
  parallel_for(optim_num_blocks(a.n), kGrainBlocks, std::max(1, num_threads),
               [&](int64_t b0, int64_t b1) { skipped += fn(a, b0, b1); });
  return skipped.load();
}

}  // namespace

bool optim_vbmi_supported() {
#if defined(NF4LORA_HAVE_AVX512VBMI)
  return cpu_variant_supported(CpuVariant::AVX512) && cpu_has_avx512_vbmi_gfni();
#else
  return false;
#endif
}

void set_optim_vbmi(bool enabled) { g_vbmi_enabled.store(enabled); }

void encode_8bit_state_cpu(bool signed_map, const float* scaled, int64_t n, uint8_t* codes) {
  check_n(n);
  if (n == 0) return;
  check_ptr(scaled, "scaled");
  check_ptr(codes, "codes");
  optim_kernels().encode_8bit(signed_map, scaled, n, codes);
}

void decode_8bit_state_cpu(bool signed_map, const uint8_t* codes, int64_t n, float* values) {
  check_n(n);
  if (n == 0) return;
  check_ptr(codes, "codes");
  check_ptr(values, "values");
  optim_kernels().decode_8bit(signed_map, codes, n, values);
}

const Optim8bitTables& detail::optim_8bit_tables() {
  static const std::unique_ptr<Optim8bitTables> t = [] {
    auto p = std::make_unique<Optim8bitTables>();
    build_tables(kDynamicSigned, p->mids_m, p->lut_m, "signed");
    build_tables(kDynamicUnsigned, p->mids_v, p->lut_v, "unsigned");
    return p;
  }();
  return *t;
}

namespace {

// The hyperparameters AdamW and Lion share: finite, lr >= 0, betas in [0, 1), weight_decay >= 0.
void check_common_hyper(double lr, double beta1, double beta2, double weight_decay) {
  check_finite_param(lr, "lr");
  check_finite_param(beta1, "beta1");
  check_finite_param(beta2, "beta2");
  check_finite_param(weight_decay, "weight_decay");
  if (lr < 0) throw std::invalid_argument("lr must be >= 0, got " + std::to_string(lr));
  if (beta1 < 0 || beta1 >= 1)
    throw std::invalid_argument("beta1 must be in [0, 1), got " + std::to_string(beta1));
  if (beta2 < 0 || beta2 >= 1)
    throw std::invalid_argument("beta2 must be in [0, 1), got " + std::to_string(beta2));
  if (weight_decay < 0)
    throw std::invalid_argument("weight_decay must be >= 0, got " + std::to_string(weight_decay));
}

}  // namespace

AdamWScalars adamw_scalars(const AdamWHyper& h) {
  check_common_hyper(h.lr, h.beta1, h.beta2, h.weight_decay);
  check_finite_param(h.eps, "eps");
  if (!(h.eps > 0)) throw std::invalid_argument("eps must be > 0, got " + std::to_string(h.eps));
  if (h.step < 1) throw std::invalid_argument("step must be >= 1, got " + std::to_string(h.step));
  const double bc1 = 1.0 - std::pow(h.beta1, static_cast<double>(h.step));
  const double bc2 = 1.0 - std::pow(h.beta2, static_cast<double>(h.step));
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  s.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  s.eps = static_cast<float>(h.eps);
  s.step_size = static_cast<float>(h.lr / bc1);
  s.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(bc2));
  return s;
}

LionScalars lion_scalars(const LionHyper& h) {
  check_common_hyper(h.lr, h.beta1, h.beta2, h.weight_decay);
  LionScalars s;
  s.decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  s.lr = static_cast<float>(h.lr);
  s.beta1 = static_cast<float>(h.beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - h.beta1);
  s.beta2 = static_cast<float>(h.beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - h.beta2);
  return s;
}

int64_t lion_32bit_cpu(void* param, DType dtype, const void* grad, float* m, int64_t n,
                       const LionHyper& h, int num_threads) {
  const AdamWArgs a{param, dtype, grad, m, nullptr, nullptr, nullptr, nullptr, nullptr, n, {}, nullptr,
                    lion_scalars(h)};
  if (!check_optim_step_args(n, dtype, {{param, "param"}, {grad, "grad"}, {m, "exp_avg"}})) return 0;
  return run_blocks(optim_kernels().lion_32bit, a, num_threads);
}

int64_t lion_8bit_cpu(void* param, DType dtype, const void* grad, uint8_t* qm, float* absmax_m,
                      int64_t n, const LionHyper& h, int num_threads) {
  const AdamWArgs a{param, dtype, grad, nullptr, nullptr, qm, nullptr, absmax_m, nullptr, n, {},
                    &optim_8bit_tables(), lion_scalars(h)};
  if (!check_optim_step_args(n, dtype, {{param, "param"}, {grad, "grad"}, {qm, "state1"}, {absmax_m, "absmax1"}}))
    return 0;
  return run_blocks(optim_kernels().lion_8bit, a, num_threads);
}

int64_t adamw_32bit_cpu(void* param, DType dtype, const void* grad, float* m, float* v, int64_t n,
                        const AdamWHyper& h, int num_threads) {
  const AdamWScalars s = adamw_scalars(h);
  if (!check_optim_step_args(n, dtype, {{param, "param"}, {grad, "grad"}, {m, "exp_avg"}, {v, "exp_avg_sq"}}))
    return 0;
  const AdamWArgs a{param, dtype, grad, m, v, nullptr, nullptr, nullptr, nullptr, n, s, nullptr, {}};
  return run_blocks(optim_kernels().adamw_32bit, a, num_threads);
}

int64_t adamw_8bit_cpu(void* param, DType dtype, const void* grad, uint8_t* qm, uint8_t* qv,
                       float* absmax_m, float* absmax_v, int64_t n, const AdamWHyper& h,
                       int num_threads) {
  const AdamWScalars s = adamw_scalars(h);
  if (!check_optim_step_args(n, dtype, {{param, "param"}, {grad, "grad"}, {qm, "state1"}, {qv, "state2"},
                                        {absmax_m, "absmax1"}, {absmax_v, "absmax2"}}))
    return 0;
  const AdamWArgs a{param, dtype, grad, nullptr, nullptr, qm, qv, absmax_m, absmax_v, n, s,
                    &optim_8bit_tables(), {}};
  return run_blocks(optim_kernels().adamw_8bit, a, num_threads);
}

#if !defined(NF4LORA_WITH_CUDA)
namespace {
[[noreturn]] void no_cuda(const char* what) {
  throw std::runtime_error(std::string(what) + ": nf4lora was built without CUDA");
}
}  // namespace
void adamw_32bit_cuda(void*, DType, const void*, float*, float*, int64_t, const AdamWHyper&,
                      int32_t*, void*) { no_cuda("adamw_32bit_cuda"); }
void adamw_8bit_cuda(void*, DType, const void*, uint8_t*, uint8_t*, float*, float*, int64_t,
                     const AdamWHyper&, int32_t*, void*) { no_cuda("adamw_8bit_cuda"); }
void* managed_alloc(int64_t) { no_cuda("managed_alloc"); }
void managed_free(void* ptr) {
  if (ptr != nullptr) no_cuda("managed_free");
}
bool managed_prefetch_supported(int) { return false; }
void managed_prefetch(const void*, int64_t, int, void*) { no_cuda("managed_prefetch"); }
#endif

}  // namespace nf4lora
