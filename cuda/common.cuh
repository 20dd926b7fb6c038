// common.cuh — what the CUDA kernel files share: error checks, launch sizing, the 4-bit codebook
// passed by value, element loads of fp32/fp16/bf16 tensors and the block-scale (absmax) source.
// Internal to cuda/ (no torch, no pybind11); the formats themselves come from nf4lora/format.h.
// Tested through the kernels that use it (tests/test_cuda.py, run by bench/gpu_check.sh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "nf4lora/format.h"
#include "nf4lora/quantize.h"

namespace nf4lora::cuda_common {

constexpr int kMaxDevices = 64;

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}
// Launch errors (bad configuration, no kernel image for this GPU) surface here; errors inside
// the kernel surface at the caller's next synchronization, as for any asynchronous CUDA op.
inline void check_launch(const char* what) { check_cuda(cudaGetLastError(), what); }

inline int log2_exact(int64_t pow2) {
  int lg = 0;
  while ((int64_t{1} << lg) < pow2) ++lg;
  return lg;
}
inline bool aligned_to(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Grid size of the grid-stride kernels: exactly as many CTAs as fit on the GPU at once (so work
// is spread evenly with no second partial wave), or fewer when there is less work. Both numbers
// are cached per device: this runs on every call, and a layer's dequantize can take ~10 us.
template <auto Kernel, int kThreads>
int resident_grid(int64_t work_items, const char* what) {
  static std::atomic<int> cached[kMaxDevices];  // zero-initialized: 0 = not known yet
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), what);
  int ctas = dev >= 0 && dev < kMaxDevices ? cached[dev].load(std::memory_order_relaxed) : 0;
  if (ctas == 0) {
    int sms = 0, per_sm = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), what);
    check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kThreads, 0), what);
    ctas = std::max(1, sms * std::max(1, per_sm));
    if (dev >= 0 && dev < kMaxDevices) cached[dev].store(ctas, std::memory_order_relaxed);
  }
  return static_cast<int>(std::min<int64_t>(work_items, ctas));
}

// ---- the 4-bit codebook, taken from format.h on the host and passed by value -----------------

struct Codebook4 {
  float threshold[16];    // ascending decision thresholds, [0..14] (threshold(qt, i)); [15] unused
  float value[16];        // codebook_value(qt, code)
  uint64_t rank_to_code;  // rank_to_code(qt, r) in bits [4r, 4r + 4)
  uint32_t zero_code;     // encode_4bit(qt, 0.0f): the odd-n pad nibble and non-finite blocks
};

inline Codebook4 make_codebook(QuantType qt) {
  Codebook4 cb{};
  for (int i = 0; i < 15; ++i) cb.threshold[i] = threshold(qt, i);
  cb.threshold[15] = cb.threshold[14];
  for (int c = 0; c < 16; ++c) cb.value[c] = codebook_value(qt, c);
  for (int r = 0; r < 16; ++r) cb.rank_to_code |= uint64_t{rank_to_code(qt, r)} << (4 * r);
  cb.zero_code = encode_4bit(qt, 0.0f);
  return cb;
}

// ---- element access --------------------------------------------------------------------------

template <DType D> struct Elem;
template <> struct Elem<DType::F32> { static constexpr int kBytes = 4; };
template <> struct Elem<DType::F16> { static constexpr int kBytes = 2; };
template <> struct Elem<DType::BF16> { static constexpr int kBytes = 2; };

// Widening loads are exact (fp16 subnormals included), as format.h's half/bf16 decoders.
__device__ __forceinline__ float f16_bits_to_float(uint32_t h) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}
__device__ __forceinline__ float bf16_bits_to_float(uint32_t h) { return __uint_as_float(h << 16); }

template <DType D>
__device__ __forceinline__ float load_scalar(const void* x, int64_t i) {
  if constexpr (D == DType::F32) {
    return __ldg(static_cast<const float*>(x) + i);
  } else {
    const uint32_t h = __ldg(static_cast<const unsigned short*>(x) + i);
    return D == DType::F16 ? f16_bits_to_float(h) : bf16_bits_to_float(h);
  }
}

// 16 bytes at element e (a multiple of 16 / kBytes) of a 16-byte-aligned x.
template <DType D>
__device__ __forceinline__ void load_vector(const void* x, int64_t e, float* v) {
  const uint4 q = __ldg(reinterpret_cast<const uint4*>(static_cast<const char*>(x) + e * Elem<D>::kBytes));
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
  if constexpr (D == DType::F32) {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(w[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // little endian: the lower address is the low half
      v[2 * i] = D == DType::F16 ? f16_bits_to_float(w[i] & 0xffffu) : bf16_bits_to_float(w[i] & 0xffffu);
      v[2 * i + 1] = D == DType::F16 ? f16_bits_to_float(w[i] >> 16) : bf16_bits_to_float(w[i] >> 16);
    }
  }
}

// ---- block scales ----------------------------------------------------------------------------

struct AbsmaxArgs {
  const float* absmax;
  const uint8_t* qabsmax;
  const float* nested_absmax;
  const float* nested_code;
  const float* offset;
  int lg_nested;
};

inline AbsmaxArgs make_absmax_args(const AbsmaxSource& s) {
  AbsmaxArgs a{s.absmax, s.qabsmax, s.nested_absmax, s.nested_code, s.offset, 0};
  if (s.nested()) a.lg_nested = log2_exact(s.nested_blocksize);
  return a;
}

}  // namespace nf4lora::cuda_common
