// matmul.cu — CUDA kernels of matmul_4bit (y = x W^T) and matmul_4bit_t (y = g W) with a packed
// 4-bit weight whose scales (double-quantized or plain) are decoded inside the kernels: small-M
// (GEMV) kernels in both directions. Larger M is dequantize + cuBLAS, run by the Python op layer.
// Reference: cpp/src/matmul_4bit_ref.cpp and a float64 product of the dequantized weight. Tested
// by tests/test_cuda_matmul.py, run by bench/gpu_check.sh.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "nf4lora/detail/checks.h"
#include "nf4lora/matmul.h"

namespace nf4lora {
namespace {

using namespace detail;
using namespace cuda_common;

// ---- shared pieces ---------------------------------------------------------------------------

// Tables every kernel keeps in shared memory: the 16 codebook values and, for double
// quantization, the 256-entry nested map; plus the per-tensor offset in a register.
template <bool kNested>
struct ScaleTables {
  float value[16];
  float map[kNested ? 256 : 1];
};

template <bool kNested>
__device__ __forceinline__ void load_tables(ScaleTables<kNested>& t, const Codebook4& cb,
                                            const AbsmaxArgs& a) {
  for (int i = threadIdx.x; i < 16; i += blockDim.x) t.value[i] = cb.value[i];
  if constexpr (kNested)
    for (int i = threadIdx.x; i < 256; i += blockDim.x) t.map[i] = __ldg(a.nested_code + i);
}

// The absmax of block b: stored fp32, or map[q] * nested + offset (format.h's decode, so the
// scale equals what dequantize_4bit uses, bit for bit).
template <bool kNested>
__device__ __forceinline__ float scale_of(const AbsmaxArgs& a, const ScaleTables<kNested>& t,
                                          float offset, int64_t b) {
  if constexpr (kNested)
    return decode_nested_absmax(t.map[__ldg(a.qabsmax + b)], __ldg(a.nested_absmax + (b >> a.lg_nested)), offset);
  else
    return __ldg(a.absmax + b);
}

template <bool kNested>
__device__ __forceinline__ float offset_of(const AbsmaxArgs& a) {
  if constexpr (kNested) return __ldg(a.offset);
  else return 0.0f;
}

// The 8 codebook values of one 32-bit word of codes (8 elements; the lowest address in the low
// byte, the even element in the high nibble of each byte).
__device__ __forceinline__ void decode_word(uint32_t w, const float* value, float* v) {
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const uint32_t byte = (w >> (8 * p)) & 0xffu;
    v[2 * p] = value[byte >> 4];
    v[2 * p + 1] = value[byte & 15u];
  }
}

template <DType D>
__device__ __forceinline__ void load8(const void* x, int64_t e, float* v) {  // e % 8 == 0
  if constexpr (D == DType::F32) {
    load_vector<D>(x, e, v);
    load_vector<D>(x, e + 4, v + 4);
  } else {
    load_vector<D>(x, e, v);
  }
}

template <DType D>
__device__ __forceinline__ void store_one(void* y, int64_t i, float v) {
  if constexpr (D == DType::F32) static_cast<float*>(y)[i] = v;
  else if constexpr (D == DType::F16) static_cast<__half*>(y)[i] = __float2half_rn(v);
  else static_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16_rn(v);
}

// ---- matmul_4bit, small M (GEMV): y[M, N] = x[M, K] @ W^T (+ bias) ---------------------------
// One warp per output feature n: its lanes stream row n of W as 32-bit words (a warp reads 128
// contiguous bytes per load), kGemvUnroll words in flight per lane, and reuse each decoded word
// for all M rows of x (x is tiny and stays in L1/L2). K % 8 == 0, so a word never straddles rows
// and, blocks being >= 32 elements, never straddles blocks: the scale is applied once per word.

constexpr int kGemvThreads = 256;
constexpr int kGemvUnroll = 8;

template <DType D, bool kNested, int kMaxM>  // kMaxM: 1 (decode: fewer registers) or kMatmulCudaMaxM
__global__ void __launch_bounds__(kGemvThreads)
matmul_4bit_kernel(const void* __restrict__ x, int M, int64_t K, const uint8_t* __restrict__ packed,
                   AbsmaxArgs a, int lg_bs, Codebook4 cb, int64_t N, const void* __restrict__ bias,
                   void* __restrict__ y) {
  __shared__ ScaleTables<kNested> t;
  load_tables<kNested>(t, cb, a);
  __syncthreads();
  const float offset = offset_of<kNested>(a);
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (kGemvThreads / 32) + (threadIdx.x >> 5);
  if (n >= N) return;  // whole warps only, after the block's only barrier

  float acc[kMaxM];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) acc[m] = 0.0f;
  const int64_t words = K >> 3;
  const uint32_t* row = reinterpret_cast<const uint32_t*>(packed) + n * words;
  for (int64_t w0 = lane; w0 < words; w0 += 32 * kGemvUnroll) {
    uint32_t q[kGemvUnroll];
    float scale[kGemvUnroll];
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {  // every load of the trip first, then the math
      const int64_t w = w0 + 32 * u;
      q[u] = w < words ? __ldg(row + w) : 0u;
      scale[u] = w < words ? scale_of<kNested>(a, t, offset, (n * K + 8 * w) >> lg_bs) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kGemvUnroll; ++u) {
      const int64_t w = w0 + 32 * u;
      if (w >= words) break;
      const float am = scale[u];
      float wv[8];
      decode_word(q[u], t.value, wv);
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m >= M) break;
        float xv[8];
        load8<D>(x, m * K + 8 * w, xv);
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) s = fmaf(xv[i], wv[i], s);
        acc[m] = fmaf(s, am, acc[m]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m >= M) break;
    float v = acc[m];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0) {
      if (bias != nullptr) v += load_scalar<D>(bias, n);
      store_one<D>(y, m * N + n, v);
    }
  }
}

// ---- matmul_4bit_t, small M: out[M, K] += g[M, N] @ W (fp32, atomics) ------------------------
// Thread = one word (8 columns of W); a CTA covers 8 * kGemvTThreads columns and kGemvTRows rows
// of W, reading each row's span as one contiguous 1 KiB run. The partial sums of the CTAs that
// share columns meet with fp32 atomics in a zeroed workspace (the caller rounds it afterwards).

constexpr int kGemvTThreads = 128;
constexpr int kGemvTRows = 32;
constexpr int kGemvTUnroll = 8;  // rows of W whose loads are in flight together

template <DType D, bool kNested, int kMaxM>
__global__ void __launch_bounds__(kGemvTThreads)
matmul_4bit_t_kernel(const void* __restrict__ g, int M, int64_t N, const uint8_t* __restrict__ packed,
                     AbsmaxArgs a, int lg_bs, Codebook4 cb, int64_t K, float* __restrict__ out) {
  __shared__ ScaleTables<kNested> t;
  load_tables<kNested>(t, cb, a);
  __syncthreads();
  const float offset = offset_of<kNested>(a);
  const int64_t words = K >> 3;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kGemvTThreads + threadIdx.x;
  if (w >= words) return;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kGemvTRows;
  const int64_t n1 = min(N, n0 + kGemvTRows);
  float acc[kMaxM][8];
#pragma unroll
  for (int m = 0; m < kMaxM; ++m)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[m][i] = 0.0f;
  const uint32_t* words_of = reinterpret_cast<const uint32_t*>(packed);
  for (int64_t nb = n0; nb < n1; nb += kGemvTUnroll) {
    uint32_t q[kGemvTUnroll];
    float scale[kGemvTUnroll];
#pragma unroll
    for (int u = 0; u < kGemvTUnroll; ++u) {  // every load of the trip first, then the math
      const int64_t n = nb + u;
      q[u] = n < n1 ? __ldg(words_of + n * words + w) : 0u;
      scale[u] = n < n1 ? scale_of<kNested>(a, t, offset, (n * K + 8 * w) >> lg_bs) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < kGemvTUnroll; ++u) {
      const int64_t n = nb + u;
      if (n >= n1) break;
      float wv[8];
      decode_word(q[u], t.value, wv);
#pragma unroll
      for (int i = 0; i < 8; ++i) wv[i] *= scale[u];
#pragma unroll
      for (int m = 0; m < kMaxM; ++m) {
        if (m >= M) break;
        const float gm = load_scalar<D>(g, m * N + n);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[m][i] = fmaf(gm, wv[i], acc[m][i]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxM; ++m) {
    if (m >= M) break;
#pragma unroll
    for (int i = 0; i < 8; ++i) atomicAdd(out + m * K + 8 * w + i, acc[m][i]);
  }
}

// ---- host side -------------------------------------------------------------------------------

template <template <DType, bool> class Launch, class... Args>
void by_dtype_nested(DType dtype, bool nested, Args&&... args) {
  switch (dtype) {
    case DType::F32:
      nested ? Launch<DType::F32, true>::run(args...) : Launch<DType::F32, false>::run(args...);
      break;
    case DType::F16:
      nested ? Launch<DType::F16, true>::run(args...) : Launch<DType::F16, false>::run(args...);
      break;
    case DType::BF16:
      nested ? Launch<DType::BF16, true>::run(args...) : Launch<DType::BF16, false>::run(args...);
      break;
  }
}

void check_small_m(int64_t M, const char* what) {
  if (M > kMatmulCudaMaxM)
    throw std::invalid_argument(std::string(what) + ": M must be <= " + std::to_string(kMatmulCudaMaxM) +
                                " (use dequantize + GEMM), got " + std::to_string(M));
}
void check_k8(int64_t K, const char* what) {
  if (K % 8 != 0)
    throw std::invalid_argument(std::string(what) + ": K (the weight's row length) must be a multiple of 8, got " +
                                std::to_string(K));
}
void check_aligned(const void* p, uintptr_t bytes, const char* name, const char* what) {
  if (p != nullptr && !aligned_to(p, bytes))
    throw std::invalid_argument(std::string(what) + ": " + name + " must be " + std::to_string(bytes) +
                                "-byte aligned");
}

template <DType D, bool kNested>
struct LaunchMatmul {
  static void run(const void* x, int64_t M, int64_t K, const uint8_t* packed, const AbsmaxArgs& a,
                  int lg_bs, const Codebook4& cb, int64_t N, const void* bias, void* y, cudaStream_t s) {
    const int64_t grid = (N + kGemvThreads / 32 - 1) / (kGemvThreads / 32);
    const auto kernel = M == 1 ? matmul_4bit_kernel<D, kNested, 1> : matmul_4bit_kernel<D, kNested, kMatmulCudaMaxM>;
    kernel<<<static_cast<unsigned>(grid), kGemvThreads, 0, s>>>(x, static_cast<int>(M), K, packed, a, lg_bs,
                                                                cb, N, bias, y);
  }
};

template <DType D, bool kNested>
struct LaunchMatmulT {
  static void run(const void* g, int64_t M, int64_t N, const uint8_t* packed, const AbsmaxArgs& a,
                  int lg_bs, const Codebook4& cb, int64_t K, float* out, cudaStream_t s) {
    const dim3 grid(static_cast<unsigned>(((K >> 3) + kGemvTThreads - 1) / kGemvTThreads),
                    static_cast<unsigned>((N + kGemvTRows - 1) / kGemvTRows));
    const auto kernel = M == 1 ? matmul_4bit_t_kernel<D, kNested, 1> : matmul_4bit_t_kernel<D, kNested, kMatmulCudaMaxM>;
    kernel<<<grid, kGemvTThreads, 0, s>>>(g, static_cast<int>(M), N, packed, a, lg_bs, cb, K, out);
  }
};

}  // namespace

void matmul_4bit_cuda(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed,
                      const AbsmaxSource& absmax, int64_t N, int64_t blocksize, QuantType qt,
                      const void* bias, void* y, void* stream) {
  const char* what = "matmul_4bit_cuda";
  if (!check_matmul_4bit_args(x, dtype, M, K, packed, absmax, N, blocksize, qt, y)) return;
  check_small_m(M, what);
  check_k8(K, what);
  check_aligned(x, 16, "x", what);
  check_aligned(packed, 4, "packed", what);
  by_dtype_nested<LaunchMatmul>(dtype, absmax.nested(), x, M, K, packed, make_absmax_args(absmax),
                                log2_exact(blocksize), make_codebook(qt), N, bias, y,
                                static_cast<cudaStream_t>(stream));
  check_launch(what);
}

void matmul_4bit_t_cuda(const void* g, DType dtype, int64_t M, int64_t N, const uint8_t* packed,
                        const AbsmaxSource& absmax, int64_t K, int64_t blocksize, QuantType qt,
                        float* out, void* stream) {
  const char* what = "matmul_4bit_t_cuda";
  // Same checks as the forward product with the roles of N and K swapped for g's shape.
  if (!check_matmul_4bit_args(g, dtype, M, N, packed, absmax, K, blocksize, qt, out)) return;
  check_small_m(M, what);
  check_k8(K, what);
  if (N == 0) return;  // out stays zero
  check_aligned(packed, 4, "packed", what);
  if ((N + kGemvTRows - 1) / kGemvTRows > 65535)
    throw std::invalid_argument("matmul_4bit_t_cuda: N too large for one launch");
  by_dtype_nested<LaunchMatmulT>(dtype, absmax.nested(), g, M, N, packed, make_absmax_args(absmax),
                                 log2_exact(blocksize), make_codebook(qt), K, out,
                                 static_cast<cudaStream_t>(stream));
  check_launch(what);
}

}  // namespace nf4lora
