// optim.cu — CUDA fused AdamW (fp32 and 8-bit blockwise state) and the managed-memory helpers
// behind paged optimizer state. One CTA of 256 threads per 256-element block, one element per
// thread: the block's gradient is checked for NaN/Inf first (the whole block is skipped if any),
// then optim.h's adamw_update; 8-bit state is dequantized, updated, reduced to the new absmax and
// requantized in shared memory, as bitsandbytes' kOptimizerStatic8bit2StateBlockwise does.
// Reference: cpp/src/optim_ref.cpp, matched bit for bit (compiled with --fmad=false; IEEE div and
// sqrt). Tested by tests/test_optim.py -m cuda (CUDA vs CPU bits), run by bench/gpu_check.sh.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "nf4lora/optim.h"
#include "../cpp/src/checks.h"

namespace nf4lora {
namespace {

using namespace detail;

constexpr int kThreads = static_cast<int>(kOptimBlock);  // one thread per element of a block
static_assert(kThreads % 32 == 0, "whole warps");
using cuda_common::check_cuda;
// Enough CTAs to fill the GPU (grid-stride over blocks beyond that), cached per device.
template <auto Kernel>
int grid_for(int64_t nblocks, const char* what) {
  return cuda_common::resident_grid<Kernel, kThreads>(nblocks, what);
}

// Param elements through format.h's converters (the same roundings and NaN patterns as the CPU).
template <DType D> __device__ __forceinline__ float load_elem(const void* p, int64_t i) {
  if constexpr (D == DType::F32) return static_cast<const float*>(p)[i];
  else if constexpr (D == DType::BF16) return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]);
  else return half_bits_to_float(static_cast<const uint16_t*>(p)[i]);
}
template <DType D> __device__ __forceinline__ void store_elem(void* p, int64_t i, float x) {
  if constexpr (D == DType::F32) static_cast<float*>(p)[i] = x;
  else if constexpr (D == DType::BF16) static_cast<uint16_t*>(p)[i] = float_to_bf16_bits(x);
  else static_cast<uint16_t*>(p)[i] = float_to_half_bits(x);
}

struct Maps {  // format.h's 8-bit maps, passed by value (2 KiB of kernel parameters)
  float m[256], v[256];
};

__device__ __forceinline__ float block_max(float x, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read from the previous block
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < kThreads / 32; ++w) r = fmaxf(r, scratch[w]);
  return r;
}

template <DType D>
__global__ void __launch_bounds__(kThreads) adamw_32bit_kernel(void* param, const void* grad, float* m,
                                                               float* v, int64_t n, AdamWScalars s,
                                                               int32_t* skipped) {
  const int64_t nblocks = optim_num_blocks(n);
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t i = b * kOptimBlock + threadIdx.x;
    const bool in = i < n;
    const float g = in ? load_elem<D>(grad, i) : 0.0f;
    if (__syncthreads_or(!isfinite(g))) {
      if (threadIdx.x == 0 && skipped != nullptr) atomicAdd(skipped, 1);
      continue;
    }
    if (!in) continue;
    float p = load_elem<D>(param, i), mi = m[i], vi = v[i];
    adamw_update(p, mi, vi, g, s);
    store_elem<D>(param, i, p);
    m[i] = mi;
    v[i] = vi;
  }
}

template <DType D>
__global__ void __launch_bounds__(kThreads) adamw_8bit_kernel(void* param, const void* grad, uint8_t* qm,
                                                              uint8_t* qv, float* absmax_m,
                                                              float* absmax_v, int64_t n,
                                                              AdamWScalars s, Maps maps,
                                                              int32_t* skipped) {
  __shared__ float map_m[256], map_v[256], mids_m[256], mids_v[256], scratch[kThreads / 32];
  map_m[threadIdx.x] = maps.m[threadIdx.x];
  map_v[threadIdx.x] = maps.v[threadIdx.x];
  __syncthreads();
  if (threadIdx.x < 255) {
    mids_m[threadIdx.x] = midpoint_8bit(map_m, threadIdx.x);
    mids_v[threadIdx.x] = midpoint_8bit(map_v, threadIdx.x);
  }
  __syncthreads();
  const int64_t nblocks = optim_num_blocks(n);
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t i = b * kOptimBlock + threadIdx.x;
    const bool in = i < n;
    const float g = in ? load_elem<D>(grad, i) : 0.0f;
    if (__syncthreads_or(!isfinite(g))) {
      if (threadIdx.x == 0 && skipped != nullptr) atomicAdd(skipped, 1);
      continue;
    }
    float mi = 0.0f, vi = 0.0f;
    if (in) {
      float p = load_elem<D>(param, i);
      mi = map_m[qm[i]] * absmax_m[b];
      vi = map_v[qv[i]] * absmax_v[b];
      adamw_update(p, mi, vi, g, s);
      store_elem<D>(param, i, p);
    }
    // Padding lanes hold 0, which never raises a max of |m| or of v (v >= 0).
    const float max_m = block_max(fabsf(mi), scratch);
    const float max_v = block_max(vi, scratch);
    if (in) {
      qm[i] = encode_8bit_mids(mids_m, mi * block_scale(max_m));
      qv[i] = encode_8bit_mids(mids_v, vi * block_scale(max_v));
    }
    if (threadIdx.x == 0) {
      absmax_m[b] = max_m;
      absmax_v[b] = max_v;
    }
  }
}


}  // namespace

void adamw_32bit_cuda(void* param, DType dtype, const void* grad, float* m, float* v, int64_t n,
                      const AdamWHyper& h, int32_t* skipped, void* stream) {
  check_n(n);
  check_dtype(dtype, "dtype");
  const AdamWScalars s = adamw_scalars(h);
  if (n == 0) return;
  check_ptr(param, "param");
  check_ptr(grad, "grad");
  check_ptr(m, "exp_avg");
  check_ptr(v, "exp_avg_sq");
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t nblocks = optim_num_blocks(n);
  switch (dtype) {
    case DType::F32:
      adamw_32bit_kernel<DType::F32><<<grid_for<adamw_32bit_kernel<DType::F32>>(nblocks, "adamw_32bit_cuda"), kThreads, 0, st>>>(param, grad, m, v, n, s, skipped);
      break;
    case DType::BF16:
      adamw_32bit_kernel<DType::BF16><<<grid_for<adamw_32bit_kernel<DType::BF16>>(nblocks, "adamw_32bit_cuda"), kThreads, 0, st>>>(param, grad, m, v, n, s, skipped);
      break;
    default:
      adamw_32bit_kernel<DType::F16><<<grid_for<adamw_32bit_kernel<DType::F16>>(nblocks, "adamw_32bit_cuda"), kThreads, 0, st>>>(param, grad, m, v, n, s, skipped);
  }
  check_cuda(cudaGetLastError(), "adamw_32bit_cuda");
}

void adamw_8bit_cuda(void* param, DType dtype, const void* grad, uint8_t* qm, uint8_t* qv,
                     float* absmax_m, float* absmax_v, int64_t n, const AdamWHyper& h,
                     int32_t* skipped, void* stream) {
  check_n(n);
  check_dtype(dtype, "dtype");
  const AdamWScalars s = adamw_scalars(h);
  if (n == 0) return;
  check_ptr(param, "param");
  check_ptr(grad, "grad");
  check_ptr(qm, "state1");
  check_ptr(qv, "state2");
  check_ptr(absmax_m, "absmax1");
  check_ptr(absmax_v, "absmax2");
  Maps maps;
  for (int j = 0; j < 256; ++j) {
    maps.m[j] = kDynamicSigned[j];
    maps.v[j] = kDynamicUnsigned[j];
  }
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t nblocks = optim_num_blocks(n);
  switch (dtype) {
    case DType::F32:
      adamw_8bit_kernel<DType::F32><<<grid_for<adamw_8bit_kernel<DType::F32>>(nblocks, "adamw_8bit_cuda"), kThreads, 0, st>>>(param, grad, qm, qv, absmax_m, absmax_v, n, s, maps, skipped);
      break;
    case DType::BF16:
      adamw_8bit_kernel<DType::BF16><<<grid_for<adamw_8bit_kernel<DType::BF16>>(nblocks, "adamw_8bit_cuda"), kThreads, 0, st>>>(param, grad, qm, qv, absmax_m, absmax_v, n, s, maps, skipped);
      break;
    default:
      adamw_8bit_kernel<DType::F16><<<grid_for<adamw_8bit_kernel<DType::F16>>(nblocks, "adamw_8bit_cuda"), kThreads, 0, st>>>(param, grad, qm, qv, absmax_m, absmax_v, n, s, maps, skipped);
  }
  check_cuda(cudaGetLastError(), "adamw_8bit_cuda");
}

void* managed_alloc(int64_t nbytes) {
  if (nbytes <= 0) throw std::invalid_argument("managed_alloc: nbytes must be > 0, got " + std::to_string(nbytes));
  void* p = nullptr;
  check_cuda(cudaMallocManaged(&p, static_cast<size_t>(nbytes), cudaMemAttachGlobal), "cudaMallocManaged");
  const cudaError_t err = cudaMemset(p, 0, static_cast<size_t>(nbytes));  // fresh state is zeros
  if (err != cudaSuccess) {
    cudaFree(p);
    check_cuda(err, "cudaMemset (managed state)");
  }
  check_cuda(cudaDeviceSynchronize(), "cudaMemset (managed state)");
  return p;
}

void managed_free(void* ptr) {
  if (ptr != nullptr) cudaFree(ptr);  // at interpreter exit the context may be gone: ignore errors
}

bool managed_prefetch_supported(int device) {
  int value = 0;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error state
    return false;
  }
  return value != 0;
}

void managed_prefetch(const void* ptr, int64_t nbytes, int device, void* stream) {
  if (ptr == nullptr || nbytes <= 0 || !managed_prefetch_supported(device)) return;
#if CUDART_VERSION >= 13000
  cudaMemLocation loc{};
  loc.type = cudaMemLocationTypeDevice;
  loc.id = device;
  check_cuda(cudaMemPrefetchAsync(ptr, static_cast<size_t>(nbytes), loc, 0,
                                  static_cast<cudaStream_t>(stream)), "cudaMemPrefetchAsync");
#else
  check_cuda(cudaMemPrefetchAsync(ptr, static_cast<size_t>(nbytes), device,
                                  static_cast<cudaStream_t>(stream)), "cudaMemPrefetchAsync");
#endif
}

}  // namespace nf4lora
