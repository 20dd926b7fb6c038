// nf4lora/matmul.h — products with a 4-bit weight W [N, K], one name per operation on every
// device: matmul_4bit (y = x W^T, forward) and matmul_4bit_t (y = g W, the input gradient), W
// dequantized in registers, never materialized; fp32 accumulation. Reference:
// cpp/src/matmul_4bit_ref.cpp. Tested by tests/cpp/test_matmul.cpp, tests/test_matmul.py and
// tests/test_cuda_matmul.py against a float64 product.
#pragma once

#include <cstdint>

#include "nf4lora/quantize.h"

namespace nf4lora {

// W is packed row-major over the flat index in blocks of `blocksize` elements, as quantize_4bit
// writes it.

// y[M, N] = x[M, K] @ W^T (+ bias[N]). x, bias and y share one dtype (fp32, fp16 or bf16); rows of
// x and y are contiguous with leading dimensions K and N. Meant for small M (decode, M <= ~16);
// larger M works but the caller should prefer dequantize + a dense GEMM.
void matmul_4bit_cpu(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed,
                     const AbsmaxSource& absmax, int64_t N, int64_t blocksize, QuantType qt,
                     const void* bias, void* y, int num_threads);

// grad_x[M, K] = grad_y[M, N] @ W (the input gradient of y = x @ W^T), W as above, never
// materialized. grad_y and grad_x share one dtype, rows contiguous (leading dimensions N and K).
// Each thread owns a strip of columns of W and streams it once for all M rows; meant for small M
// (the caller should prefer dequantize + a dense GEMM for large M). N == 0 gives zeros.
void matmul_4bit_t_cpu(const void* grad_y, DType dtype, int64_t M, int64_t N,
                       const uint8_t* packed, const AbsmaxSource& absmax, int64_t K,
                       int64_t blocksize, QuantType qt, void* grad_x, int num_threads);

// Machine-dependent choices of the two CPU products, set by the caller's calibration (the Python
// layer measures them on the running machine, nf4lora/ops/calibrate.py). Both are process-wide.
// The kernel variant the products use when no variant is forced (force_cpu_variant wins): by
// default best_cpu_variant(); e.g. AVX512_BF16, which is faster than AVX512 on some CPUs and
// slower on others. Throws if `v` is not supported here.
void set_matmul_cpu_variant(CpuVariant v);
void reset_matmul_cpu_variant();
CpuVariant active_matmul_cpu_variant();
// The least packed-weight bytes a thread is given before another one is woken (default 256 KiB):
// below twice this a product runs on one thread. Throws unless 1 KiB <= bytes <= 1 GiB.
void set_matmul_grain_bytes(int64_t bytes);
int64_t matmul_grain_bytes();
constexpr int64_t kMatmulDefaultGrainBytes = int64_t{1} << 18;

// ---- CUDA (builds with NF4LORA_WITH_CUDA; device pointers; kernels run on `stream`, a
// cudaStream_t passed as void*). Implemented in cuda/matmul.cu. ------------------------------

constexpr int kMatmulCudaMaxM = 8;  // rows of x matmul_4bit_cuda and matmul_4bit_t_cuda take

// y[M, N] = x[M, K] @ W^T (+ bias[N]) for M <= kMatmulCudaMaxM; K % 8 == 0, x 16-byte aligned.
void matmul_4bit_cuda(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed,
                      const AbsmaxSource& absmax, int64_t N, int64_t blocksize, QuantType qt,
                      const void* bias, void* y, void* stream);
// out[M, K] += g[M, N] @ W in fp32 (out zeroed by the caller) for M <= kMatmulCudaMaxM; K % 8 == 0.
void matmul_4bit_t_cuda(const void* g, DType dtype, int64_t M, int64_t N, const uint8_t* packed,
                        const AbsmaxSource& absmax, int64_t K, int64_t blocksize, QuantType qt,
                        float* out, void* stream);

}  // namespace nf4lora
