// optim.cu — CUDA fused AdamW and Lion (fp32 and 8-bit blockwise state) and the managed-memory
// helpers behind paged optimizer state. One CTA of 256 threads per 256-element block, one element
// per thread: the block's gradient is checked for NaN/Inf first (the whole block is skipped if any),
// then optim.h's adamw_update / lion_update; 8-bit state is dequantized, updated, reduced to the new
// absmax and requantized in shared memory, as bitsandbytes' kOptimizerStatic8bit2StateBlockwise
// (AdamW) and kOptimizerStatic8bit1StateBlockwise (Lion) do.
// Reference: cpp/src/optim_ref.cpp, matched bit for bit (compiled with --fmad=false; IEEE div and
// sqrt). Tested by tests/cpp/test_optim_cuda.cu and tests/test_optim*.py -m cuda (CUDA vs CPU
// bits), run by bench/gpu_check.sh.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "nf4lora/detail/checks.h"
#include "nf4lora/optim.h"

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

// Whether the whole block's gradient is finite (every thread of the CTA gets the same answer); a
// block that is not is counted in *skipped (when given) and left alone by the caller.
__device__ __forceinline__ bool block_grad_finite(float g, int32_t* skipped) {
  if (!__syncthreads_or(!isfinite(g))) return true;
  if (threadIdx.x == 0 && skipped != nullptr) atomicAdd(skipped, 1);
  return false;
}

// A map and its midpoints (format.h's midpoint_8bit) into shared memory; every thread brings its
// entry (by value: taking a kernel parameter's address would copy it to local memory).
__device__ __forceinline__ void load_map(float entry, float* shared_map, float* shared_mids) {
  shared_map[threadIdx.x] = entry;
  __syncthreads();
  if (threadIdx.x < 255) shared_mids[threadIdx.x] = midpoint_8bit(shared_map, threadIdx.x);
  __syncthreads();
}

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
    if (!block_grad_finite(g, skipped) || !in) continue;
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
  load_map(maps.m[threadIdx.x], map_m, mids_m);
  load_map(maps.v[threadIdx.x], map_v, mids_v);
  const int64_t nblocks = optim_num_blocks(n);
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t i = b * kOptimBlock + threadIdx.x;
    const bool in = i < n;
    const float g = in ? load_elem<D>(grad, i) : 0.0f;
    if (!block_grad_finite(g, skipped)) continue;
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


template <DType D>
__global__ void __launch_bounds__(kThreads) lion_32bit_kernel(void* param, const void* grad, float* m, int64_t n,
                                                              LionScalars s, int32_t* skipped) {
  const int64_t nblocks = optim_num_blocks(n);
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t i = b * kOptimBlock + threadIdx.x;
    const bool in = i < n;
    const float g = in ? load_elem<D>(grad, i) : 0.0f;
    if (!block_grad_finite(g, skipped) || !in) continue;
    float p = load_elem<D>(param, i), mi = m[i];
    lion_update(p, mi, g, s);
    store_elem<D>(param, i, p);
    m[i] = mi;
  }
}

// As adamw_8bit_kernel with Lion's single momentum (signed map), optim_ref.cpp's lion_8bit_blocks_ref.
template <DType D>
__global__ void __launch_bounds__(kThreads) lion_8bit_kernel(void* param, const void* grad, uint8_t* qm,
                                                             float* absmax_m, int64_t n, LionScalars s,
                                                             Maps maps, int32_t* skipped) {
  __shared__ float map_m[256], mids_m[256], scratch[kThreads / 32];
  load_map(maps.m[threadIdx.x], map_m, mids_m);
  const int64_t nblocks = optim_num_blocks(n);
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t i = b * kOptimBlock + threadIdx.x;
    const bool in = i < n;
    const float g = in ? load_elem<D>(grad, i) : 0.0f;
    if (!block_grad_finite(g, skipped)) continue;
    float mi = 0.0f;
    if (in) {
      float p = load_elem<D>(param, i);
      mi = map_m[qm[i]] * absmax_m[b];
      lion_update(p, mi, g, s);
      store_elem<D>(param, i, p);
    }
    const float max_m = block_max(fabsf(mi), scratch);  // padding lanes hold 0
    if (in) qm[i] = encode_8bit_mids(mids_m, mi * block_scale(max_m));
    if (threadIdx.x == 0) absmax_m[b] = max_m;
  }
}

// Launches K::kernel<D> for the param dtype D on a resident grid over n elements' blocks, then
// checks the launch. K names one of the kernel templates below (a function template cannot be a
// template argument itself).
template <class K, class... Args>
void launch(DType dtype, int64_t n, const char* what, cudaStream_t stream, Args... args) {
  const auto go = [&](auto tag) {
    constexpr auto kernel = K::template kernel<decltype(tag)::value>();
    kernel<<<grid_for<kernel>(optim_num_blocks(n), what), kThreads, 0, stream>>>(args...);
  };
  switch (dtype) {
    case DType::F32: go(std::integral_constant<DType, DType::F32>{}); break;
    case DType::BF16: go(std::integral_constant<DType, DType::BF16>{}); break;
    default: go(std::integral_constant<DType, DType::F16>{});
  }
  check_cuda(cudaGetLastError(), what);
}
struct Adamw32 { template <DType D> static constexpr auto kernel() { return &adamw_32bit_kernel<D>; } };
struct Adamw8 { template <DType D> static constexpr auto kernel() { return &adamw_8bit_kernel<D>; } };
struct Lion32 { template <DType D> static constexpr auto kernel() { return &lion_32bit_kernel<D>; } };
struct Lion8 { template <DType D> static constexpr auto kernel() { return &lion_8bit_kernel<D>; } };

Maps host_maps() {
  Maps maps;
  for (int j = 0; j < 256; ++j) {
    maps.m[j] = kDynamicSigned[j];
    maps.v[j] = kDynamicUnsigned[j];
  }
  return maps;
}

}  // namespace

void adamw_32bit_cuda(void* param, DType dtype, const void* grad, float* m, float* v, int64_t n,
                      const AdamWHyper& h, int32_t* skipped, void* stream) {
  const AdamWScalars s = adamw_scalars(h);
  if (!check_optim_step_args(n, dtype, {{param, "param"}, {grad, "grad"}, {m, "exp_avg"}, {v, "exp_avg_sq"}}))
    return;
  launch<Adamw32>(dtype, n, "adamw_32bit_cuda", static_cast<cudaStream_t>(stream), param, grad, m, v, n, s,
                  skipped);
}

void adamw_8bit_cuda(void* param, DType dtype, const void* grad, uint8_t* qm, uint8_t* qv,
                     float* absmax_m, float* absmax_v, int64_t n, const AdamWHyper& h,
                     int32_t* skipped, void* stream) {
  const AdamWScalars s = adamw_scalars(h);
  if (!check_optim_step_args(n, dtype, {{param, "param"}, {grad, "grad"}, {qm, "state1"}, {qv, "state2"},
                                        {absmax_m, "absmax1"}, {absmax_v, "absmax2"}}))
    return;
  launch<Adamw8>(dtype, n, "adamw_8bit_cuda", static_cast<cudaStream_t>(stream), param, grad, qm, qv, absmax_m,
                 absmax_v, n, s, host_maps(), skipped);
}

void lion_32bit_cuda(void* param, DType dtype, const void* grad, float* m, int64_t n, const LionHyper& h,
                     int32_t* skipped, void* stream) {
  const LionScalars s = lion_scalars(h);
  if (!check_optim_step_args(n, dtype, {{param, "param"}, {grad, "grad"}, {m, "exp_avg"}})) return;
  launch<Lion32>(dtype, n, "lion_32bit_cuda", static_cast<cudaStream_t>(stream), param, grad, m, n, s, skipped);
}

void lion_8bit_cuda(void* param, DType dtype, const void* grad, uint8_t* qm, float* absmax_m, int64_t n,
                    const LionHyper& h, int32_t* skipped, void* stream) {
  const LionScalars s = lion_scalars(h);
  if (!check_optim_step_args(n, dtype, {{param, "param"}, {grad, "grad"}, {qm, "state1"}, {absmax_m, "absmax1"}}))
    return;
  launch<Lion8>(dtype, n, "lion_8bit_cuda", static_cast<cudaStream_t>(stream), param, grad, qm, absmax_m, n, s,
                host_maps(), skipped);
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
