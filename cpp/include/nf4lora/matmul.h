// nf4lora/matmul.h — products with a 4-bit weight W [N, K] (packed row-major over the flat
// index, blocks of `blocksize` elements, as quantize_4bit writes it), dequantized in registers
// and never materialized. fp32 accumulation. Tested by tests/cpp/test_matmul.cpp and
// tests/test_matmul.py against a float64 reference.
#pragma once

#include <cstdint>

#include "nf4lora/quantize.h"

namespace nf4lora {

// y[M, N] = x[M, K] @ W^T (+ bias[N]). x, bias and y share one dtype (fp32, fp16 or bf16); rows of
// x and y are contiguous with leading dimensions K and N. Meant for small M (decode, M <= ~16);
// larger M works but the caller should prefer dequantize + a dense GEMM.
void gemm_4bit_cpu(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed,
                   const AbsmaxSource& absmax, int64_t N, int64_t blocksize, QuantType qt,
                   const void* bias, void* y, int num_threads);

}  // namespace nf4lora
