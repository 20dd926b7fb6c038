// nf4lora/quantize.h — blockwise 4-bit (NF4/FP4) and 8-bit quantize/dequantize entry points.
// Kernels take raw pointers and sizes, never allocate, and never see torch or pybind11 types.
// CPU functions validate their arguments and throw std::invalid_argument naming the bad one.
// Reference semantics: nf4lora/format.h; tests: tests/test_quantize.py, tests/cpp/test_core.cpp.
#pragma once

#include <cstdint>

#include "nf4lora/format.h"

namespace nf4lora {

// Where a 4-bit dequantization takes each block's absmax from.
struct AbsmaxSource {
  const float* absmax = nullptr;         // fp32 [nblocks]; used when qabsmax is null
  const uint8_t* qabsmax = nullptr;      // double quantization: 8-bit codes [nblocks]
  const float* nested_absmax = nullptr;  // fp32 [ceil(nblocks / nested_blocksize)]
  const float* nested_code = nullptr;    // fp32 [256], sorted (bitsandbytes' dynamic map)
  const float* offset = nullptr;         // one fp32 (on CUDA: a device pointer)
  int64_t nested_blocksize = kNestedBlocksize;

  bool nested() const { return qabsmax != nullptr; }
};

// ---- CPU (threads: at most num_threads, the caller passes torch.get_num_threads()) ----------

// Quantizes n elements of x (dtype x_dtype) into packed[(n + 1) / 2] and absmax[nblocks].
// Returns the number of blocks holding NaN or +-Inf; those blocks get absmax = NaN and all codes
// set to the code of 0.0 (so they dequantize to NaN). An odd n pads the last low nibble with the code of 0.
int64_t quantize_4bit_cpu(const void* x, DType x_dtype, int64_t n, int64_t blocksize,
                          QuantType qt, uint8_t* packed, float* absmax, int num_threads);

// Dequantizes n elements into out (dtype out_dtype): codebook[code] * absmax in fp32, then
// rounded to out_dtype (nearest-even).
void dequantize_4bit_cpu(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                         int64_t blocksize, QuantType qt, void* out, DType out_dtype,
                         int num_threads);

// 8-bit blockwise quantization against a sorted 256-entry code (double quantization uses
// kDynamicSigned with blocksize 256). Returns the number of non-finite blocks (absmax NaN).
int64_t quantize_8bit_blockwise_cpu(const float* x, int64_t n, int64_t blocksize,
                                    const float* code, uint8_t* q, float* absmax,
                                    int num_threads);
void dequantize_8bit_blockwise_cpu(const uint8_t* q, const float* absmax, const float* code,
                                   int64_t n, int64_t blocksize, float* out, int num_threads);

// ---- CPU variant dispatch --------------------------------------------------------------------

// AVX512_BF16 is AVX512 plus the bf16 dot products (vdpbf16ps) in the fused matmul of bf16
// activations; quantize/dequantize run the AVX512 kernels under it.
enum class CpuVariant : int32_t { Ref = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };
constexpr int kNumCpuVariants = 4;

const char* cpu_variant_name(CpuVariant v);
bool cpu_variant_compiled(CpuVariant v);   // built into this library
bool cpu_variant_supported(CpuVariant v);  // built in, and this CPU + OS can run it
CpuVariant best_cpu_variant();
// Throws std::invalid_argument unless `v` is a variant this build and this CPU run.
void check_cpu_variant_supported(CpuVariant v);
// Forces a variant for every later call (tests use this); throws if it is not supported.
void force_cpu_variant(CpuVariant v);
void reset_cpu_variant();
bool cpu_variant_forced();  // force_cpu_variant is in effect
CpuVariant active_cpu_variant();

// ---- CUDA (defined only in builds with NF4LORA_WITH_CUDA; all pointers are device pointers;
// kernels run on `stream`, a cudaStream_t passed as void*) ---------------------------------------

bool cuda_compiled();
// nonfinite: a device int32 that receives the count of non-finite blocks (added to; may be null).
void quantize_4bit_cuda(const void* x, DType x_dtype, int64_t n, int64_t blocksize, QuantType qt,
                        uint8_t* packed, float* absmax, int32_t* nonfinite, void* stream);
void dequantize_4bit_cuda(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                          int64_t blocksize, QuantType qt, void* out, DType out_dtype,
                          void* stream);
void quantize_8bit_blockwise_cuda(const float* x, int64_t n, int64_t blocksize, const float* code,
                                  uint8_t* q, float* absmax, int32_t* nonfinite, void* stream);
void dequantize_8bit_blockwise_cuda(const uint8_t* q, const float* absmax, const float* code,
                                    int64_t n, int64_t blocksize, float* out, void* stream);

}  // namespace nf4lora
