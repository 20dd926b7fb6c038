// nf4lora/norm.h — RMSNorm over rows of bf16 activations on the CPU, forward and backward: the
// trainer's LlamaRMSNorm (python/nf4lora/train/fused_norm.py) in one pass over each row instead of
// ~6 forward and ~12 backward torch ops with their fp32 copies. Implemented in cpp/src/norm.cpp;
// tested by tests/test_fused_norm.py (against transformers' module, float64, and the torch-ops
// version of the same function).
#pragma once

#include <cstdint>

namespace nf4lora {

// y = bf16(w * bf16(x * rstd)) row by row, rstd[r] = 1 / sqrt(mean(x[r]^2) + eps) in fp32, the
// mean summed in torch's order with `sum_lanes` lanes (8 on x86: the same bits as LlamaRMSNorm's
// forward run by torch). x, y: bf16 [rows, n]; w: bf16 [n]; rstd: fp32 [rows].
void rms_norm_bf16_cpu(const uint16_t* x, const uint16_t* w, int64_t rows, int64_t n, float eps, int sum_lanes,
                       uint16_t* y, float* rstd, int num_threads);

// The backward of that formula in fp32 (the bf16 rounding of x * rstd taken as identity), with
// x_hat = x * rstd and g_hat = g * w:
//   grad_x = bf16(rstd * (g_hat - x_hat * mean(g_hat * x_hat)))     bf16 [rows, n]
//   grad_w = sum over rows of g * x_hat                              fp32 [n]
// grad_w sums blocks of 64 rows, then the blocks in order: the same bits for any thread count.
void rms_norm_backward_bf16_cpu(const uint16_t* x, const uint16_t* w, const float* rstd, const uint16_t* grad_y,
                                int64_t rows, int64_t n, int sum_lanes, uint16_t* grad_x, float* grad_w,
                                int num_threads);

}  // namespace nf4lora
