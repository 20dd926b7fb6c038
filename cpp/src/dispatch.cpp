// dispatch.cpp — the public CPU entry points of quantize.h: argument validation, run-time
// choice of the kernel variant from CPUID (or a forced one), and the split over threads.
// The 8-bit blockwise kernels (double quantization of absmax; a few thousand elements per
// weight) are scalar only and live here too.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "nf4lora/detail/checks.h"
#include "nf4lora/detail/parallel.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace nf4lora {
namespace {

using namespace detail;  // the argument checks of checks.h

constexpr int64_t kGrainElements = int64_t{1} << 16;  // below this per thread, use fewer threads

struct CpuFeatures {
  bool avx2 = false;    // AVX2 + FMA + F16C, OS saves YMM state
  bool avx512 = false;  // AVX-512 F/BW/VL/DQ, OS saves ZMM state
  bool avx512_bf16 = false;  // and AVX512_BF16 (CPUID leaf 7 subleaf 1, EAX bit 5)
  bool avx512_vbmi_gfni = false;  // and AVX512-VBMI + GFNI (leaf 7.0 ECX bits 1, 8): optimizer codec
};

CpuFeatures detect_cpu() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(_M_X64)
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12),
             f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  unsigned xlo, xhi;
  __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
  const uint64_t xcr0 = (uint64_t(xhi) << 32) | xlo;
  if ((xcr0 & 0x6) != 0x6) return f;  // XMM + YMM state
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = (b & (1u << 5)) && fma && f16c;
  const bool zmm_state = (xcr0 & 0xE0) == 0xE0;  // opmask + ZMM_Hi256 + Hi16_ZMM
  const bool f512 = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  f.avx512 = f.avx2 && zmm_state && f512 && dq && bw && vl;
  f.avx512_vbmi_gfni = f.avx512 && (c & (1u << 1)) && (c & (1u << 8));
  const unsigned max_subleaf = a;
  if (f.avx512 && max_subleaf >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512_bf16 = a & (1u << 5);
  }
#endif
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect_cpu();
  return f;
}

std::atomic<int> g_forced_variant{-1};

const detail::QuantKernels& kernels_for(CpuVariant v) {
  switch (v) {
#if defined(NF4LORA_HAVE_AVX512)
    case CpuVariant::AVX512:
    case CpuVariant::AVX512_BF16: return detail::kAvx512Kernels;
#endif
#if defined(NF4LORA_HAVE_AVX2)
    case CpuVariant::AVX2: return detail::kAvx2Kernels;
#endif
    default: return detail::kRefKernels;
  }
}

const detail::QuantKernels& active_kernels() { return kernels_for(active_cpu_variant()); }

int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, kGrainElements / blocksize); }

}  // namespace

bool detail::cpu_has_avx512_vbmi_gfni() { return cpu_features().avx512_vbmi_gfni; }

const char* cpu_variant_name(CpuVariant v) {
  switch (v) {
    case CpuVariant::Ref: return "ref";
    case CpuVariant::AVX2: return "avx2";
    case CpuVariant::AVX512: return "avx512";
    case CpuVariant::AVX512_BF16: return "avx512_bf16";
  }
  return "unknown";
}

bool cpu_variant_compiled(CpuVariant v) {
  switch (v) {
    case CpuVariant::Ref: return true;
#if defined(NF4LORA_HAVE_AVX2)
    case CpuVariant::AVX2: return true;
#endif
#if defined(NF4LORA_HAVE_AVX512)
    case CpuVariant::AVX512: return true;
#endif
#if defined(NF4LORA_HAVE_AVX512BF16)
    case CpuVariant::AVX512_BF16: return true;
#endif
    default: return false;
  }
}

bool cpu_variant_supported(CpuVariant v) {
  if (!cpu_variant_compiled(v)) return false;
  switch (v) {
    case CpuVariant::Ref: return true;
    case CpuVariant::AVX2: return cpu_features().avx2;
    case CpuVariant::AVX512: return cpu_features().avx512;
    case CpuVariant::AVX512_BF16: return cpu_features().avx512_bf16;
  }
  return false;
}

// AVX512_BF16 is never chosen automatically: its vdpbf16ps GEMV measured slower than the fp32
// AVX-512 one on the Sapphire Rapids VM it was written on (bf16 4096x4096, 1 thread, 5
// interleaved rounds: 1.2-3.8x the time at M = 1, 1.05-2.1x at M = 8). Force it to use it.
CpuVariant best_cpu_variant() {
  if (cpu_variant_supported(CpuVariant::AVX512)) return CpuVariant::AVX512;
  if (cpu_variant_supported(CpuVariant::AVX2)) return CpuVariant::AVX2;
  return CpuVariant::Ref;
}

void check_cpu_variant_supported(CpuVariant v) {
  if (static_cast<int>(v) < 0 || static_cast<int>(v) >= kNumCpuVariants)
    throw std::invalid_argument("unknown CPU variant " + std::to_string(static_cast<int>(v)));
  if (!cpu_variant_supported(v))
    throw std::invalid_argument(std::string("CPU variant '") + cpu_variant_name(v) +
                                "' is not supported on this machine or not compiled in");
}

void force_cpu_variant(CpuVariant v) {
  check_cpu_variant_supported(v);
  g_forced_variant.store(static_cast<int>(v));
}

void reset_cpu_variant() { g_forced_variant.store(-1); }

bool cpu_variant_forced() { return g_forced_variant.load() >= 0; }

CpuVariant active_cpu_variant() {
  const int forced = g_forced_variant.load();
  return forced >= 0 ? static_cast<CpuVariant>(forced) : best_cpu_variant();
}

int64_t quantize_4bit_cpu(const void* x, DType x_dtype, int64_t n, int64_t blocksize,
                          QuantType qt, uint8_t* packed, float* absmax, int num_threads) {
  if (!check_quantize_4bit_args(x, x_dtype, n, blocksize, qt, packed, absmax)) return 0;
  const auto& k = active_kernels();
  std::atomic<int64_t> nonfinite{0};
  detail::parallel_for(num_blocks(n, blocksize), grain_blocks(blocksize), num_threads,
                       [&](int64_t b0, int64_t b1) {
                         nonfinite += k.quantize_4bit(x, x_dtype, n, blocksize, qt, b0, b1, packed, absmax);
                       });
  return nonfinite.load();
}

void dequantize_4bit_cpu(const uint8_t* packed, const AbsmaxSource& absmax, int64_t n,
                         int64_t blocksize, QuantType qt, void* out, DType out_dtype,
                         int num_threads) {
  if (!check_dequantize_4bit_args(packed, absmax, n, blocksize, qt, out, out_dtype)) return;
  const auto& k = active_kernels();
  detail::parallel_for(num_blocks(n, blocksize), grain_blocks(blocksize), num_threads,
                       [&](int64_t b0, int64_t b1) {
                         k.dequantize_4bit(packed, absmax, n, blocksize, qt, b0, b1, out, out_dtype);
                       });
}

int64_t quantize_8bit_blockwise_cpu(const float* x, int64_t n, int64_t blocksize,
                                    const float* code, uint8_t* q, float* absmax,
                                    int num_threads) {
  if (!check_blockwise_8bit_args(x, "x", n, blocksize, code, q, absmax)) return 0;
  float mids[255];
  for (int j = 0; j < 255; ++j) mids[j] = midpoint_8bit(code, j);
  std::atomic<int64_t> nonfinite{0};
  detail::parallel_for(num_blocks(n, blocksize), grain_blocks(blocksize), num_threads,
                       [&](int64_t b0, int64_t b1) {
    int64_t bad = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
      float amax = 0.0f;
      bool finite = true;
      for (int64_t i = begin; i < end; ++i) {
        finite = finite && std::isfinite(x[i]);
        amax = std::max(amax, std::fabs(x[i]));
      }
      // A NaN/Inf block: absmax NaN and every code the one of 0.0, as in the 4-bit kernels.
      const float scale = finite ? block_scale(amax) : 0.0f;
      for (int64_t i = begin; i < end; ++i) q[i] = encode_8bit_mids(mids, finite ? x[i] * scale : 0.0f);
      absmax[b] = finite ? amax : NAN;
      bad += finite ? 0 : 1;
    }
    nonfinite += bad;
  });
  return nonfinite.load();
}

void dequantize_8bit_blockwise_cpu(const uint8_t* q, const float* absmax, const float* code,
                                   int64_t n, int64_t blocksize, float* out, int num_threads) {
  if (!check_blockwise_8bit_args(out, "out", n, blocksize, code, q, absmax)) return;
  detail::parallel_for(num_blocks(n, blocksize), grain_blocks(blocksize), num_threads,
                       [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
      for (int64_t i = begin; i < end; ++i) out[i] = code[q[i]] * absmax[b];
    }
  });
}

#if !defined(NF4LORA_WITH_CUDA)
bool cuda_compiled() { return false; }
#endif

}  // namespace nf4lora
