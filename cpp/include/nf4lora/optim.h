// nf4lora/optim.h — fused AdamW updates (decoupled weight decay, bias correction) with fp32 or
// 8-bit blockwise state, and the managed-memory helpers behind paged optimizer state.
// Reference: torch.optim.AdamW (the 32-bit math) and bitsandbytes' AdamW8bit (8-bit state: blocks
// of 256, signed dynamic map for m, unsigned map for v, fp32 absmax per block; format.h's maps).
// Tested by tests/cpp/test_optim.cpp (every CPU variant vs the reference, bit for bit) and
// tests/test_optim.py (vs torch.optim.AdamW and bitsandbytes); CUDA by tests/cpp/test_optim_cuda.cu
// and tests/test_optim*.py -m cuda.
#pragma once

#include <cmath>
#include <cstdint>

#include "nf4lora/format.h"

namespace nf4lora {

// Gradients are checked per block of this many elements (and 8-bit state is quantized per block
// of the same size, as in bitsandbytes >= 0.44).
constexpr int64_t kOptimBlock = 256;
// bitsandbytes' min_8bit_size: smaller tensors keep fp32 state even in an 8-bit optimizer.
constexpr int64_t kMin8bitElements = 4096;
// bitsandbytes pages a state buffer only from this many elements on.
constexpr int64_t kMinPagedElements = 100000;

// One step's hyperparameters as the user gives them (step counts from 1).
struct AdamWHyper {
  double lr = 1e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 1e-2;
  int64_t step = 1;
};

// The fp32 scalars the element update uses, computed once per step in double as torch does with
// Python floats, then rounded to fp32.
struct AdamWScalars {
  float decay;            // 1 - lr * weight_decay
  float one_minus_beta1;  // lerp weight of the first moment
  float beta2, one_minus_beta2;
  float eps;
  float step_size;  // lr / (1 - beta1^step)
  float inv_bc2_sqrt;  // 1 / sqrt(1 - beta2^step): torch divides by this Python float as a multiply by its reciprocal too
};

// Throws std::invalid_argument naming the hyperparameter: lr < 0, betas outside [0, 1), eps <= 0,
// weight_decay < 0, step < 1, or any of them not finite.
AdamWScalars adamw_scalars(const AdamWHyper& h);

// The AdamW element update, torch.optim.AdamW's order of operations (dividing by the bias
// correction as a multiply by its reciprocal, as torch's CPU kernels do), every operation rounded to
// fp32 (no FMA contraction: the CPU core is built with -ffp-contract=off and cuda/optim.cu with
// --fmad=false), so the reference, the SIMD variants and the CUDA kernel agree bit for bit.
NF4LORA_HD void adamw_update(float& p, float& m, float& v, float g, const AdamWScalars& s) {
  p = p * s.decay;
  m = m + s.one_minus_beta1 * (g - m);
  v = v * s.beta2 + (s.one_minus_beta2 * g) * g;
  const float denom = sqrtf(v) * s.inv_bc2_sqrt + s.eps;
  p = p - (s.step_size * m) / denom;
}

constexpr int64_t optim_num_blocks(int64_t n) { return (n + kOptimBlock - 1) / kOptimBlock; }

// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), as bitsandbytes' Lion /
// Lion8bit and lion-pytorch: one momentum, a sign update, decoupled weight decay.
struct LionHyper {
  double lr = 1e-4, beta1 = 0.9, beta2 = 0.99, weight_decay = 0.0;
};
struct LionScalars {
  float decay;  // 1 - lr * weight_decay
  float lr;
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
};
// Throws std::invalid_argument naming the hyperparameter: lr < 0, betas outside [0, 1),
// weight_decay < 0, or any of them not finite.
LionScalars lion_scalars(const LionHyper& h);

// The Lion element update, every operation rounded to fp32 (no FMA, as adamw_update):
// c = beta1 * m + (1 - beta1) * g; p = p * decay - lr * sign(c) (sign(0) = 0);
// m = beta2 * m + (1 - beta2) * g.
NF4LORA_HD void lion_update(float& p, float& m, float g, const LionScalars& s) {
  p = p * s.decay;
  const float c = m * s.beta1 + s.one_minus_beta1 * g;
  const float sgn = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
  p = p - s.lr * sgn;
  m = m * s.beta2 + s.one_minus_beta2 * g;
}

// ---- CPU (threads: at most num_threads; the caller passes torch.get_num_threads()) -----------
//
// param and grad have dtype `dtype` (fp32, fp16 or bf16; the update runs in fp32 and the param is
// rounded back to nearest-even). State is fp32 for every param dtype. A block of 256 elements whose
// gradient holds NaN or +-Inf is skipped: its params and state are left exactly as they were.
// Both return the number of skipped blocks.

// fp32 state: m, v hold n floats each.
int64_t adamw_32bit_cpu(void* param, DType dtype, const void* grad, float* m, float* v, int64_t n,
                        const AdamWHyper& h, int num_threads);

// 8-bit blockwise state: qm, qv hold n codes (kDynamicSigned / kDynamicUnsigned indices), absmax_m,
// absmax_v hold optim_num_blocks(n) floats. Fresh state is all zeros (codes 0, absmax 0). Each block
// is dequantized, updated and requantized (nearest map entry of value / new absmax, as
// quantize_8bit_blockwise_cpu) in one pass.
int64_t adamw_8bit_cpu(void* param, DType dtype, const void* grad, uint8_t* qm, uint8_t* qv,
                       float* absmax_m, float* absmax_v, int64_t n, const AdamWHyper& h,
                       int num_threads);

// The AVX-512 8-bit kernels have a second codec for CPUs with AVX512-VBMI and GFNI (byte
// permutes for the 8-bit map lookups); it is used whenever the CPU has them and the AVX-512
// variant is active. set_optim_vbmi(false) makes the AVX-512 variant use its plain codec (the
// tests force both); optim_vbmi_supported() says whether this build and CPU can run the VBMI one.
bool optim_vbmi_supported();
void set_optim_vbmi(bool enabled);

// The active kernel's 8-bit state codec on its own, one thread (for tests: its encoder must equal
// encode_8bit_mids on every input, NaN -> 0, and its decoder the map): `signed_map` picks
// kDynamicSigned (first moment) or kDynamicUnsigned (second moment).
void encode_8bit_state_cpu(bool signed_map, const float* scaled, int64_t n, uint8_t* codes);
void decode_8bit_state_cpu(bool signed_map, const uint8_t* codes, int64_t n, float* values);

// Lion with fp32 state (m: n floats) or 8-bit blockwise state (qm: n codes of kDynamicSigned,
// absmax_m: optim_num_blocks(n) floats), same rules as the AdamW entry points above (blocks with
// non-finite gradients skipped and counted); CUDA versions below.
int64_t lion_32bit_cpu(void* param, DType dtype, const void* grad, float* m, int64_t n,
                       const LionHyper& h, int num_threads);
int64_t lion_8bit_cpu(void* param, DType dtype, const void* grad, uint8_t* qm, float* absmax_m,
                      int64_t n, const LionHyper& h, int num_threads);

// ---- CUDA (builds with NF4LORA_WITH_CUDA only; device or managed pointers; `stream` is a
// cudaStream_t as void*; `skipped` is a device int32 that the kernels add skipped blocks to) ---

void adamw_32bit_cuda(void* param, DType dtype, const void* grad, float* m, float* v, int64_t n,
                      const AdamWHyper& h, int32_t* skipped, void* stream);
void adamw_8bit_cuda(void* param, DType dtype, const void* grad, uint8_t* qm, uint8_t* qv,
                     float* absmax_m, float* absmax_v, int64_t n, const AdamWHyper& h,
                     int32_t* skipped, void* stream);
void lion_32bit_cuda(void* param, DType dtype, const void* grad, float* m, int64_t n, const LionHyper& h,
                     int32_t* skipped, void* stream);
void lion_8bit_cuda(void* param, DType dtype, const void* grad, uint8_t* qm, float* absmax_m, int64_t n,
                    const LionHyper& h, int32_t* skipped, void* stream);

// Managed (unified) memory for paged state: zero-filled cudaMallocManaged memory, and a prefetch to
// `device` on `stream` that is a no-op on devices without concurrent managed access (there the
// driver migrates pages on demand). managed_free accepts null.
void* managed_alloc(int64_t nbytes);
void managed_free(void* ptr);
bool managed_prefetch_supported(int device);
void managed_prefetch(const void* ptr, int64_t nbytes, int device, void* stream);

}  // namespace nf4lora
