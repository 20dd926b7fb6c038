// matmul.cu — CUDA kernels of matmul_4bit (y = x W^T) and matmul_4bit_t (y = g W) with a packed
// 4-bit weight whose scales (double-quantized or plain) are decoded inside the kernels: small-M
// (GEMV) kernels in both directions, and matmul_4bit_tc (tensor cores, WMMA) for training shapes.
// Reference: cpp/src/matmul_4bit_ref.cpp and a float64 product of the dequantized weight. Tested
// by tests/test_cuda_matmul.py, run by bench/gpu_check.sh.
#include <mma.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

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

// ---- matmul_4bit_tc (tensor cores): C[M, P] = A[M, R] @ B (+ bias), B from W on the fly ------
// Forward:  A = x [M, K], B[r, p] = W[p, r] (R = K, P = N); bias added.
// Backward: A = g [M, N], B[r, p] = W[r, p] (R = N, P = K).
// CTA tile 64 x 64, reduction step 32, 4 warps of 32 x 32 (2 x 2 WMMA 16x16x16 fragments, fp32
// accumulators). Each step stages A's tile and the dequantized B tile (in A's dtype, rounded as
// dequantize_4bit rounds) in shared memory. R % 32 == 0 and 16-byte-aligned rows of A (checked by
// the host), so only M and P need bounds. Single-buffered: simple first version, see the
// benchmark for how it compares with dequantize + cuBLAS.

constexpr int kTcThreads = 128;
constexpr int kTcM = 64, kTcP = 64, kTcR = 32;
constexpr int kTcPad = 8;  // 16 bytes of padding per shared row: fewer bank conflicts, ldm % 8 == 0

template <DType D> struct TcType;
template <> struct TcType<DType::F16> { using T = __half; };
template <> struct TcType<DType::BF16> { using T = __nv_bfloat16; };

template <DType D>
__device__ __forceinline__ typename TcType<D>::T to_tc(float v) {
  if constexpr (D == DType::F16) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

template <DType D, bool kTrans, bool kNested>
__global__ void __launch_bounds__(kTcThreads)
matmul_4bit_tc_kernel(const void* __restrict__ A, int64_t M, int64_t R, const uint8_t* __restrict__ packed,
                      AbsmaxArgs a, int lg_bs, Codebook4 cb, int64_t P, const void* __restrict__ bias,
                      void* __restrict__ C) {
  using namespace nvcuda;
  using T = typename TcType<D>::T;
  // B tile layout: forward keeps W's rows (p) as shared rows, i.e. B column-major; backward keeps
  // W's rows (r) as shared rows, i.e. B row-major. Both have 64 x 32 = 2048 elements.
  constexpr int kBRows = kTrans ? kTcR : kTcP;
  constexpr int kBCols = kTrans ? kTcP : kTcR;
  __shared__ ScaleTables<kNested> t;
  __shared__ __align__(32) T As[kTcM][kTcR + kTcPad];
  __shared__ __align__(32) T Bs[kBRows][kBCols + kTcPad];
  __shared__ __align__(32) float Cs[kTcM][kTcP + 4];
  load_tables<kNested>(t, cb, a);
  __syncthreads();
  const float offset = offset_of<kNested>(a);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTcM;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTcP;
  const int warp = threadIdx.x >> 5;
  const int wm = (warp >> 1) * 32, wp = (warp & 1) * 32;
  // K of W (its row length) and the flat index of W's element (row, col).
  const int64_t Kw = kTrans ? P : R;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  const uint32_t* words_of = reinterpret_cast<const uint32_t*>(packed);
  for (int64_t r0 = 0; r0 < R; r0 += kTcR) {
    // A tile: 64 rows x 32 elements = 256 16-byte vectors, two per thread.
#pragma unroll
    for (int v = 0; v < 2; ++v) {
      const int idx = threadIdx.x + v * kTcThreads;
      const int row = idx >> 2, col = (idx & 3) * 8;
      uint4 q = make_uint4(0, 0, 0, 0);
      if (m0 + row < M)
        q = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(A) + (m0 + row) * R + r0 + col));
      *reinterpret_cast<uint4*>(&As[row][col]) = q;
    }
    // B tile: 2048 codes = 256 words, two adjacent words (16 elements) per thread.
    {
      const int row = threadIdx.x / (kBCols / 16);
      const int col = (threadIdx.x % (kBCols / 16)) * 16;
      // W coordinates of this thread's 16 elements: forward W[p0 + row, r0 + col ..],
      // backward W[r0 + row, p0 + col ..].
      const int64_t wrow = kTrans ? r0 + row : p0 + row;
      const int64_t wcol = kTrans ? p0 + col : r0 + col;
      const bool inside = kTrans ? wcol < P : wrow < P;  // R is a multiple of 32: never out
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const int64_t e = wrow * Kw + wcol + 8 * h;  // flat index, a multiple of 8
        if (inside && (!kTrans || wcol + 8 * h < P)) {
          const float am = scale_of<kNested>(a, t, offset, e >> lg_bs);
          decode_word(__ldg(words_of + (e >> 3)), t.value, v);
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = __fmul_rn(v[i], am);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) Bs[row][col + 8 * h + i] = to_tc<D>(v[i]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTcR; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      using BLayout = typename std::conditional<kTrans, wmma::row_major, wmma::col_major>::type;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[wm + 16 * i][k], kTcR + kTcPad);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        if constexpr (kTrans) wmma::load_matrix_sync(fb[j], &Bs[k][wp + 16 * j], kBCols + kTcPad);
        else wmma::load_matrix_sync(fb[j], &Bs[wp + 16 * j][k], kBCols + kTcPad);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[wm + 16 * i][wp + 16 * j], acc[i][j], kTcP + 4, wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTcM * kTcP; idx += kTcThreads) {
    const int row = idx / kTcP, col = idx % kTcP;
    const int64_t m = m0 + row, p = p0 + col;
    if (m < M && p < P) {
      float v = Cs[row][col];
      if (bias != nullptr) v += load_scalar<D>(bias, p);
      store_one<D>(C, m * P + p, v);
    }
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
                                " (use matmul_4bit_tc_cuda or dequantize + GEMM), got " + std::to_string(M));
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

template <DType D, bool kNested>
struct LaunchTc {
  static void run(bool transposed, const void* A, int64_t M, int64_t R, const uint8_t* packed,
                  const AbsmaxArgs& a, int lg_bs, const Codebook4& cb, int64_t P, const void* bias,
                  void* C, cudaStream_t s) {
    if constexpr (D == DType::F32) {
      throw std::invalid_argument("matmul_4bit_tc_cuda: dtype must be float16 or bfloat16");
    } else {
      const dim3 grid(static_cast<unsigned>((P + kTcP - 1) / kTcP), static_cast<unsigned>((M + kTcM - 1) / kTcM));
      if (transposed)
        matmul_4bit_tc_kernel<D, true, kNested><<<grid, kTcThreads, 0, s>>>(A, M, R, packed, a, lg_bs, cb, P, bias, C);
      else
        matmul_4bit_tc_kernel<D, false, kNested><<<grid, kTcThreads, 0, s>>>(A, M, R, packed, a, lg_bs, cb, P, bias, C);
    }
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

void matmul_4bit_tc_cuda(const void* A, DType dtype, int64_t M, int64_t R, const uint8_t* packed,
                         const AbsmaxSource& absmax, int64_t P, int64_t blocksize, QuantType qt,
                         bool transposed, const void* bias, void* C, void* stream) {
  const char* what = "matmul_4bit_tc_cuda";
  if (!check_matmul_4bit_args(A, dtype, M, R, packed, absmax, P, blocksize, qt, C)) return;
  if (dtype == DType::F32) throw std::invalid_argument("matmul_4bit_tc_cuda: dtype must be float16 or bfloat16");
  if (R % kTcR != 0)
    throw std::invalid_argument("matmul_4bit_tc_cuda: the reduction length must be a multiple of 32, got " +
                                std::to_string(R));
  if (transposed) check_k8(P, what);
  if (transposed && bias != nullptr) throw std::invalid_argument("matmul_4bit_tc_cuda: no bias in the transposed product");
  check_aligned(A, 16, "A", what);
  check_aligned(packed, 4, "packed", what);
  if ((M + kTcM - 1) / kTcM > 65535) throw std::invalid_argument("matmul_4bit_tc_cuda: M too large for one launch");
  by_dtype_nested<LaunchTc>(dtype, absmax.nested(), transposed, A, M, R, packed, make_absmax_args(absmax),
                            log2_exact(blocksize), make_codebook(qt), P, bias, C,
                            static_cast<cudaStream_t>(stream));
  check_launch(what);
}

}  // namespace nf4lora
