// quantize.cu — CUDA kernels for blockwise 4-bit (NF4/FP4) and 8-bit quantize/dequantize.
// Reference: cpp/src/quant_ref.cpp and dispatch.cpp, matched bit for bit (codes, absmax,
// canonical non-finite blocks, outputs incl. NaN patterns); every format rule comes from format.h.
// Tested by tests/test_cuda.py (CUDA vs CPU bit patterns, bitsandbytes), run by bench/gpu_check.sh.
// Must not be compiled with --use_fast_math / -ftz=true: the encodings rely on IEEE fp32 ops.
#include <cstdint>
#include <cstring>

#include "common.cuh"
#include "nf4lora/detail/checks.h"
#include "nf4lora/quantize.h"

namespace nf4lora {
namespace {

using namespace detail;  // the argument checks of checks.h, shared with the CPU entry points
using namespace cuda_common;

constexpr int kThreads = 256;  // threads per CTA, every kernel
constexpr int kWarps = kThreads / 32;
// 4-bit quantize: each thread owns 16 elements of a tile, so a CTA tile of 4096 elements holds
// whole blocks at every blocksize and a block of 4096 still fits in registers (no shared staging).
constexpr int kQuantPerThread = 16;
constexpr int kLgTile = 12;
static_assert(kThreads * kQuantPerThread == (1 << kLgTile) && (1 << kLgTile) == kMaxBlocksize,
              "a quantize tile must hold exactly the largest block");
// Dequantize: a unit is 8 elements = one 32-bit word of packed codes; each thread keeps this many
// units' loads in flight per loop trip.
constexpr int kDequantUnroll = 4;
constexpr uint32_t kCpuNaN = 0x7fc00000u;      // NAN as the CPU reference writes absmax
constexpr uint32_t kX86DefaultNaN = 0xffc00000u;  // x86 result of an invalid op (0 * Inf)
constexpr uint32_t kAbsInfBits = 0x7f800000u;

// Rank (# thresholds strictly below s) by binary search over the sorted thresholds in shared
// memory: 4 compares instead of format.h's 15, same result (thresholds strictly increase; a
// value on a threshold is not above it, so ties take the lower code; NaN compares false -> 0).
// The 16 floats sit in 16 different banks, so any access pattern is conflict-free.
__device__ __forceinline__ uint32_t encode_4bit_smem(float s, const float* thr, uint64_t rank_code) {
  int r = s > thr[7] ? 8 : 0;
  r += s > thr[r + 3] ? 4 : 0;
  r += s > thr[r + 1] ? 2 : 0;
  r += s > thr[r] ? 1 : 0;
  return static_cast<uint32_t>(rank_code >> (4 * r)) & 15u;
}

// ---- NaN patterns of the CPU reference ------------------------------------------------------
// The reference runs on x86, where an SSE op with one NaN operand returns that NaN quieted and
// an invalid op (0 * Inf) returns 0xFFC00000; a GPU returns 0x7FFFFFFF for both. Only NaN/Inf
// scales reach these (cold) paths. With two NaN operands x86 returns its first source operand,
// whose choice is the CPU compiler's; that case takes the first in source order and may differ.
__device__ __forceinline__ bool is_nan(float v) { return (__float_as_uint(v) & 0x7fffffffu) > kAbsInfBits; }
__device__ float x86_nan(float a, float b) {
  if (is_nan(a)) return __uint_as_float(__float_as_uint(a) | 0x00400000u);
  if (is_nan(b)) return __uint_as_float(__float_as_uint(b) | 0x00400000u);
  return __uint_as_float(kX86DefaultNaN);
}
__device__ __forceinline__ float mul_like_cpu(float a, float b) {
  const float r = __fmul_rn(a, b);
  return is_nan(r) ? x86_nan(a, b) : r;
}
__device__ __forceinline__ float add_like_cpu(float a, float b) {
  const float r = __fadd_rn(a, b);
  return is_nan(r) ? x86_nan(a, b) : r;
}

// ---- output stores ---------------------------------------------------------------------------
// Finite values: the hardware's round-to-nearest-even conversion (two per instruction), which is
// what format.h's float_to_half_bits / float_to_bf16_bits compute for finite inputs. A NaN/Inf
// scale (cpu_nan == true, cold) takes format.h's functions, whose NaN rules are the CPU's.

template <DType D>
__device__ __forceinline__ uint32_t pack2(float a, float b) {  // a at the lower address
  uint32_t u;
  if constexpr (D == DType::F16) {
    const __half2 h = __floats2half2_rn(a, b);
    memcpy(&u, &h, 4);
  } else {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    memcpy(&u, &h, 4);
  }
  return u;
}

template <DType D>
__device__ __forceinline__ uint32_t pack2_like_cpu(float a, float b) {
  if constexpr (D == DType::F16) return uint32_t{float_to_half_bits(a)} | uint32_t{float_to_half_bits(b)} << 16;
  else return uint32_t{float_to_bf16_bits(a)} | uint32_t{float_to_bf16_bits(b)} << 16;
}

// 8 values of unit u (elements 8u .. 8u + 7) into a 16-byte-aligned out.
template <DType D>
__device__ __forceinline__ void store_unit(void* out, int64_t u, const float* v, bool cpu_nan) {
  if constexpr (D == DType::F32) {
    float4* o = static_cast<float4*>(out) + 2 * u;
    o[0] = make_float4(v[0], v[1], v[2], v[3]);
    o[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else if (!cpu_nan) {
    static_cast<uint4*>(out)[u] =
        make_uint4(pack2<D>(v[0], v[1]), pack2<D>(v[2], v[3]), pack2<D>(v[4], v[5]), pack2<D>(v[6], v[7]));
  } else {
    static_cast<uint4*>(out)[u] = make_uint4(pack2_like_cpu<D>(v[0], v[1]), pack2_like_cpu<D>(v[2], v[3]),
                                             pack2_like_cpu<D>(v[4], v[5]), pack2_like_cpu<D>(v[6], v[7]));
  }
}

template <DType D>
__device__ __forceinline__ void store_scalar(void* out, int64_t i, float v, bool cpu_nan) {
  if constexpr (D == DType::F32) {
    static_cast<float*>(out)[i] = v;
  } else if constexpr (D == DType::F16) {
    static_cast<unsigned short*>(out)[i] =
        cpu_nan ? float_to_half_bits(v) : __half_as_ushort(__float2half_rn(v));
  } else {
    static_cast<unsigned short*>(out)[i] =
        cpu_nan ? float_to_bf16_bits(v) : __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
}

// ---- 4-bit quantize ------------------------------------------------------------------------
// Grid-stride over tiles of 4096 elements. A block of bs elements is owned by a group of
// bs / 16 consecutive threads (2 .. 256): thread t of the group loads the group's 16-byte
// vectors t, t + group, t + 2 * group, ..., so each load instruction of a group is contiguous.
// The group's max |x| is a shuffle reduction (groups of <= 32 lanes) or shuffle + shared memory
// (blocks of >= 1024 elements span warps). The max is taken over |x| bit patterns: for
// non-negative floats they order like the values, and any NaN/Inf makes it >= 0x7f800000, which
// is exactly the "non-finite block" test (such a block is written in the canonical form, so the
// max of its other elements does not matter).

template <DType D>
__global__ void __launch_bounds__(kThreads)
quantize_4bit_kernel(const void* __restrict__ x, int64_t n, int lg_bs, Codebook4 cb,
                     uint8_t* __restrict__ packed, float* __restrict__ absmax,
                     int32_t* __restrict__ nonfinite, bool vector_ok) {
  constexpr int V = 16 / Elem<D>::kBytes;  // elements per 16-byte vector: 4 or 8
  constexpr int NV = kQuantPerThread / V;  // vectors per thread per tile: 4 or 2
  __shared__ float s_thr[16];
  __shared__ uint32_t s_max[2][kWarps];  // double-buffered by trip parity: one barrier per trip
  if (threadIdx.x < 16) s_thr[threadIdx.x] = cb.threshold[threadIdx.x];
  __syncthreads();

  const int lg_group = lg_bs - 4;  // log2(threads per block), 1..8
  const int group = 1 << lg_group;
  const int t = threadIdx.x & (group - 1);
  const int g = threadIdx.x >> lg_group;  // block within the tile
  const int lg_blocks_per_tile = kLgTile - lg_bs;
  const int64_t nblocks = ((n - 1) >> lg_bs) + 1;
  const int64_t ntiles = ((nblocks - 1) >> lg_blocks_per_tile) + 1;
  const uint32_t zero_byte = cb.zero_code * 0x11u;
  int parity = 0;

  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {  // uniform over the CTA
    const int64_t b = (tile << lg_blocks_per_tile) + g;
    const int64_t base = b << lg_bs;
    float v[NV][V];
    uint32_t m = 0;  // max |x| bits; elements past n count as +0.0
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int64_t e = base + static_cast<int64_t>((j << lg_group) + t) * V;
      if (vector_ok && e + V <= n) {
        load_vector<D>(x, e, v[j]);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v[j][i] = e + i < n ? load_scalar<D>(x, e + i) : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < V; ++i) m = max(m, __float_as_uint(v[j][i]) & 0x7fffffffu);
    }
    if (lg_group <= 5) {  // xor offsets below the group size stay inside the group
      for (int off = group >> 1; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
    } else {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
      if ((threadIdx.x & 31) == 0) s_max[parity][threadIdx.x >> 5] = m;
      __syncthreads();
      const int first_warp = (g << lg_group) >> 5;
      for (int w = 0; w < (group >> 5); ++w) m = max(m, s_max[parity][first_warp + w]);
      parity ^= 1;
    }
    if (b >= nblocks) continue;  // past the end in the last tile (after the barrier above)

    const bool bad = m >= kAbsInfBits;
    const float amax = __uint_as_float(m);
    const float scale = block_scale(amax);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int64_t e = base + static_cast<int64_t>((j << lg_group) + t) * V;
      if (e >= n) continue;
      uint32_t bytes = 0;  // V / 2 packed bytes, the lowest address in the low byte
#pragma unroll
      for (int p = 0; p < V / 2; ++p) {
        // A missing odd element was loaded as +0.0, whose code (+0 * scale = +0) is the pad.
        const uint32_t hi = encode_4bit_smem(__fmul_rn(v[j][2 * p], scale), s_thr, cb.rank_to_code);
        const uint32_t lo = encode_4bit_smem(__fmul_rn(v[j][2 * p + 1], scale), s_thr, cb.rank_to_code);
        bytes |= (bad ? zero_byte : (hi << 4) | lo) << (8 * p);
      }
      uint8_t* dst = packed + (e >> 1);
      if (vector_ok && e + V <= n) {
        if constexpr (V == 8) *reinterpret_cast<uint32_t*>(dst) = bytes;
        else *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(bytes);
      } else {
#pragma unroll
        for (int p = 0; p < V / 2; ++p)
          if (e + 2 * p < n) dst[p] = static_cast<uint8_t>(bytes >> (8 * p));
      }
    }
    if (t == 0) {
      absmax[b] = bad ? __uint_as_float(kCpuNaN) : amax;
      if (bad && nonfinite != nullptr) atomicAdd(nonfinite, 1);
    }
  }
}

// ---- 4-bit dequantize ------------------------------------------------------------------------
// Grid-stride over units of 8 elements: a lane loads one 32-bit word of codes (a warp reads 128
// contiguous bytes) and writes 8 outputs with 16-byte stores (a warp writes 512 or 1024
// contiguous bytes). Blocks hold >= 32 elements, so a unit never straddles two blocks. Units
// past n / 8 (the partial last one) and unaligned pointers take the scalar path.

template <bool kNested>
__device__ __forceinline__ float block_absmax(const AbsmaxArgs& a, int64_t b, const float* s_map,
                                              float offset) {
  if constexpr (kNested) {
    const float map_value = s_map[__ldg(a.qabsmax + b)];
    const float nested = __ldg(a.nested_absmax + (b >> a.lg_nested));
    const float am = decode_nested_absmax(map_value, nested, offset);
    return is_nan(am) ? add_like_cpu(mul_like_cpu(map_value, nested), offset) : am;
  } else {
    return __ldg(a.absmax + b);
  }
}

template <DType D, bool kNested>
__global__ void __launch_bounds__(kThreads)
dequantize_4bit_kernel(const uint8_t* __restrict__ packed, AbsmaxArgs a, int64_t n, int lg_bs,
                       Codebook4 cb, void* __restrict__ out, bool vector_ok) {
  __shared__ float s_value[16];
  __shared__ float s_map[kNested ? 256 : 1];
  if (threadIdx.x < 16) s_value[threadIdx.x] = cb.value[threadIdx.x];
  if constexpr (kNested)
    for (int i = threadIdx.x; i < 256; i += kThreads) s_map[i] = __ldg(a.nested_code + i);
  __syncthreads();
  float offset = 0.0f;
  if constexpr (kNested) offset = __ldg(a.offset);

  const int64_t nunits = (n + 7) >> 3, nfull = n >> 3;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const uint32_t* words = reinterpret_cast<const uint32_t*>(packed);
  for (int64_t u0 = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u0 < nunits;
       u0 += kDequantUnroll * stride) {
    uint32_t w[kDequantUnroll];
#pragma unroll
    for (int k = 0; k < kDequantUnroll; ++k) {  // all loads first: 4 in flight per thread
      const int64_t u = u0 + k * stride;
      w[k] = vector_ok && u < nfull ? __ldg(words + u) : 0u;
    }
#pragma unroll
    for (int k = 0; k < kDequantUnroll; ++k) {
      const int64_t u = u0 + k * stride;
      if (u >= nunits) break;
      const float am = block_absmax<kNested>(a, (u << 3) >> lg_bs, s_map, offset);
      // |codebook| <= 1, so a finite scale gives finite products; a NaN/Inf scale (a non-finite
      // block, rare and uniform over the unit) takes the CPU's NaN patterns instead.
      const bool cpu_nan = (__float_as_uint(am) & 0x7fffffffu) >= kAbsInfBits;
      if (vector_ok && u < nfull) {
        float v[8];
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          const uint32_t byte = (w[k] >> (8 * p)) & 0xffu;
          v[2 * p] = __fmul_rn(s_value[byte >> 4], am);
          v[2 * p + 1] = __fmul_rn(s_value[byte & 15u], am);
        }
        if (cpu_nan) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const uint32_t code = (w[k] >> (8 * (i >> 1) + ((i & 1) ? 0 : 4))) & 15u;
            v[i] = mul_like_cpu(s_value[code], am);
          }
        }
        store_unit<D>(out, u, v, cpu_nan);
      } else {
        for (int64_t i = u << 3; i < min(n, (u << 3) + 8); ++i) {
          const uint32_t byte = packed[i >> 1];
          const float c = s_value[(i & 1) ? (byte & 15u) : (byte >> 4)];
          store_scalar<D>(out, i, cpu_nan ? mul_like_cpu(c, am) : __fmul_rn(c, am), cpu_nan);
        }
      }
    }
  }
}

// ---- 8-bit blockwise (double quantization of absmax: a few thousand values) ------------------
// One warp per block, two passes over it (the second from cache); the 256-entry code in shared
// memory for format.h's encode_8bit.

__global__ void __launch_bounds__(kThreads)
quantize_8bit_kernel(const float* __restrict__ x, int64_t n, int lg_bs, const float* __restrict__ code,
                     uint8_t* __restrict__ q, float* __restrict__ absmax,
                     int32_t* __restrict__ nonfinite) {
  __shared__ float s_code[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) s_code[i] = __ldg(code + i);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t nblocks = ((n - 1) >> lg_bs) + 1;
  const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); b < nblocks;
       b += nwarps) {  // uniform over the warp
    const int64_t begin = b << lg_bs, end = min(n, begin + (int64_t{1} << lg_bs));
    uint32_t m = 0;
    for (int64_t i = begin + lane; i < end; i += 32) m = max(m, __float_as_uint(__ldg(x + i)) & 0x7fffffffu);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
    const bool bad = m >= kAbsInfBits;
    const float amax = __uint_as_float(m);
    const float scale = block_scale(amax);
    for (int64_t i = begin + lane; i < end; i += 32)
      q[i] = encode_8bit(s_code, bad ? 0.0f : __fmul_rn(__ldg(x + i), scale));
    if (lane == 0) {
      absmax[b] = bad ? __uint_as_float(kCpuNaN) : amax;
      if (bad && nonfinite != nullptr) atomicAdd(nonfinite, 1);
    }
  }
}

// Units of 4 elements (one 32-bit word of codes, one 16-byte store); blocks hold >= 16.
__global__ void __launch_bounds__(kThreads)
dequantize_8bit_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                       const float* __restrict__ code, int64_t n, int lg_bs,
                       float* __restrict__ out, bool vector_ok) {
  __shared__ float s_code[256];
  for (int i = threadIdx.x; i < 256; i += kThreads) s_code[i] = __ldg(code + i);
  __syncthreads();
  const int64_t nunits = (n + 3) >> 2, nfull = n >> 2;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < nunits; u += stride) {
    const float am = __ldg(absmax + ((u << 2) >> lg_bs));
    if (vector_ok && u < nfull) {
      const uint32_t w = __ldg(reinterpret_cast<const uint32_t*>(q) + u);
      float v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = mul_like_cpu(s_code[(w >> (8 * i)) & 0xffu], am);
      reinterpret_cast<float4*>(out)[u] = make_float4(v[0], v[1], v[2], v[3]);
    } else {
      for (int64_t i = u << 2; i < min(n, (u << 2) + 4); ++i) out[i] = mul_like_cpu(s_code[q[i]], am);
    }
  }
}

template <DType D>
void launch_quantize_4bit(const void* x, int64_t n, int lg_bs, const Codebook4& cb, uint8_t* packed,
                          float* absmax, int32_t* nonfinite, cudaStream_t stream) {
  constexpr auto kernel = quantize_4bit_kernel<D>;
  constexpr uintptr_t kPackedAlign = 16 / Elem<D>::kBytes / 2;  // bytes written per vector
  const bool vector_ok = aligned_to(x, 16) && aligned_to(packed, kPackedAlign);
  const int64_t nblocks = num_blocks(n, int64_t{1} << lg_bs);
  const int64_t ntiles = ((nblocks - 1) >> (kLgTile - lg_bs)) + 1;
  const int grid = resident_grid<kernel, kThreads>(ntiles, "quantize_4bit_cuda");
  kernel<<<grid, kThreads, 0, stream>>>(x, n, lg_bs, cb, packed, absmax, nonfinite, vector_ok);
}

template <DType D, bool kNested>
void launch_dequantize_4bit(const uint8_t* packed, const AbsmaxArgs& a, int64_t n, int lg_bs,
                            const Codebook4& cb, void* out, cudaStream_t stream) {
  constexpr auto kernel = dequantize_4bit_kernel<D, kNested>;
  const bool vector_ok = aligned_to(packed, 4) && aligned_to(out, 16);
  const int64_t units = (n + 7) >> 3;
  const int64_t per_cta = int64_t{kThreads} * kDequantUnroll;
  const int grid = resident_grid<kernel, kThreads>((units + per_cta - 1) / per_cta, "dequantize_4bit_cuda");
  kernel<<<grid, kThreads, 0, stream>>>(packed, a, n, lg_bs, cb, out, vector_ok);
}

template <DType D>
void launch_dequantize_4bit(const uint8_t* packed, const AbsmaxArgs& a, bool nested, int64_t n,
                            int lg_bs, const Codebook4& cb, void* out, cudaStream_t stream) {
  if (nested) launch_dequantize_4bit<D, true>(packed, a, n, lg_bs, cb, out, stream);
  else launch_dequantize_4bit<D, false>(packed, a, n, lg_bs, cb, out, stream);
}

}  // namespace

bool cuda_compiled() { return true; }

void quantize_4bit_cuda(const void* x, DType x_dtype, int64_t n, int64_t blocksize, QuantType qt,
                        uint8_t* packed, float* absmax, int32_t* nonfinite, void* stream) {
  if (!check_quantize_4bit_args(x, x_dtype, n, blocksize, qt, packed, absmax)) return;
  const Codebook4 cb = make_codebook(qt);
  const int lg_bs = log2_exact(blocksize);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (x_dtype) {
    case DType::F32: launch_quantize_4bit<DType::F32>(x, n, lg_bs, cb, packed, absmax, nonfinite, s); break;
    case DType::F16: launch_quantize_4bit<DType::F16>(x, n, lg_bs, cb, packed, absmax, nonfinite, s); break;
    case DType::BF16: launch_quantize_4bit<DType::BF16>(x, n, lg_bs, cb, packed, absmax, nonfinite, s); break;
  }
  check_launch("quantize_4bit_cuda");
}

void dequantize_4bit_cuda(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                          int64_t blocksize, QuantType qt, void* out, DType out_dtype,
                          void* stream) {
  if (!check_dequantize_4bit_args(packed, absmax, n, blocksize, qt, out, out_dtype)) return;
  const AbsmaxArgs a = make_absmax_args(absmax);
  const bool nested = absmax.nested();
  const Codebook4 cb = make_codebook(qt);
  const int lg_bs = log2_exact(blocksize);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (out_dtype) {
    case DType::F32: launch_dequantize_4bit<DType::F32>(packed, a, nested, n, lg_bs, cb, out, s); break;
    case DType::F16: launch_dequantize_4bit<DType::F16>(packed, a, nested, n, lg_bs, cb, out, s); break;
    case DType::BF16: launch_dequantize_4bit<DType::BF16>(packed, a, nested, n, lg_bs, cb, out, s); break;
  }
  check_launch("dequantize_4bit_cuda");
}

void quantize_8bit_blockwise_cuda(const float* x, int64_t n, int64_t blocksize, const float* code,
                                  uint8_t* q, float* absmax, int32_t* nonfinite, void* stream) {
  if (!check_blockwise_8bit_args(x, "x", n, blocksize, code, q, absmax)) return;
  const int64_t nblocks = num_blocks(n, blocksize);
  const int grid = resident_grid<quantize_8bit_kernel, kThreads>((nblocks + kWarps - 1) / kWarps,
                                                       "quantize_8bit_blockwise_cuda");
  quantize_8bit_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      x, n, log2_exact(blocksize), code, q, absmax, nonfinite);
  check_launch("quantize_8bit_blockwise_cuda");
}

void dequantize_8bit_blockwise_cuda(const uint8_t* q, const float* absmax, const float* code,
                                    int64_t n, int64_t blocksize, float* out, void* stream) {
  if (!check_blockwise_8bit_args(out, "out", n, blocksize, code, q, absmax)) return;
  const bool vector_ok = aligned_to(q, 4) && aligned_to(out, 16);
  const int64_t units = (n + 3) >> 2;
  const int grid = resident_grid<dequantize_8bit_kernel, kThreads>((units + kThreads - 1) / kThreads,
                                                         "dequantize_8bit_blockwise_cuda");
  dequantize_8bit_kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      q, absmax, code, n, log2_exact(blocksize), out, vector_ok);
  check_launch("dequantize_8bit_blockwise_cuda");
}

}  // namespace nf4lora
