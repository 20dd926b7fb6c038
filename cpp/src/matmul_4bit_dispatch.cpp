// matmul_4bit_dispatch.cpp — the public CPU entry points matmul_4bit_cpu (y = x W^T) and
// matmul_4bit_t_cpu (y = g W) of nf4lora/matmul.h: argument checks, the kernel chosen by
// active_matmul_cpu_variant(), x (g) copied once in the kernel's lane order, W split over threads (rows
// forward, column strips transposed). Reference kernels: matmul_4bit_ref.cpp. Tested by
// tests/cpp/test_matmul.cpp.
#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <vector>

#include "matmul_4bit_kernels.h"
#include "nf4lora/detail/checks.h"
#include "nf4lora/detail/parallel.h"
#include "nf4lora/matmul.h"

namespace nf4lora {
namespace {

using namespace detail;

// Rows of W are handed out in units of 8 (the SIMD kernels tile 4 rows), and a thread should
// get at least 256 KiB of packed weight before another one is started. Chosen when parallel_for
// started a std::thread per call (~10 us here, about the time the AVX-512 kernel takes for
// 100 KiB): at 64 KiB, SmolLM2's 576x576 layer (162 KiB) took 30 us on 2 threads against 19 us on
// one (`./build-dev/bench_matmul_4bit_small_m --threads 1|2 --shape 576 576`, M = 1). Waking an
// OpenMP worker costs less, and how much less depends on the machine: the Python layer measures
// the grain (set_matmul_grain_bytes) with the kernel variant (set_matmul_cpu_variant).
constexpr int64_t kRowUnit = 8;
std::atomic<int64_t> g_grain_bytes{kMatmulDefaultGrainBytes};
std::atomic<int> g_matmul_variant{-1};  // -1: best_cpu_variant()

// Work units per thread: at least the grain's bytes of packed weight (units of `unit_bytes`).
int64_t grain_units(int64_t unit_bytes) {
  return std::max<int64_t>(1, g_grain_bytes.load() / std::max<int64_t>(1, unit_bytes));
}

CpuVariant matmul_variant() {
  if (cpu_variant_forced()) return active_cpu_variant();
  const int v = g_matmul_variant.load();
  return v >= 0 ? static_cast<CpuVariant>(v) : best_cpu_variant();
}

const MatmulKernels& matmul_kernels_for(CpuVariant v) {
  switch (v) {
#if defined(NF4LORA_HAVE_AVX512BF16)
    case CpuVariant::AVX512_BF16: return kMatmulAvx512Bf16Kernels;
#endif
#if defined(NF4LORA_HAVE_AVX512)
    case CpuVariant::AVX512: return kMatmulAvx512Kernels;
#endif
#if defined(NF4LORA_HAVE_AVX2)
    case CpuVariant::AVX2: return kMatmulAvx2Kernels;
#endif
    default: return kMatmulRefKernels;
  }
}

}  // namespace

namespace detail {

const MatmulKernels& forward_kernels(DType dtype, int64_t K, int64_t blocksize) {
  const MatmulKernels* k = &matmul_kernels_for(matmul_variant());
  if (k->other_dtypes != nullptr && (dtype != DType::BF16 || blocksize < 64)) k = k->other_dtypes;
  // The SIMD kernels need whole blocks per row (no block spans two rows, rows start on a byte).
  if (K == 0 || K % blocksize != 0) k = &kMatmulRefKernels;
  return *k;
}

}  // namespace detail

void set_matmul_cpu_variant(CpuVariant v) {
  check_cpu_variant_supported(v);
  g_matmul_variant.store(static_cast<int>(v));
}

void reset_matmul_cpu_variant() { g_matmul_variant.store(-1); }

CpuVariant active_matmul_cpu_variant() { return matmul_variant(); }

void set_matmul_grain_bytes(int64_t bytes) {
  if (bytes < 1024 || bytes > (int64_t{1} << 30))
    throw std::invalid_argument("matmul grain must be between 1 KiB and 1 GiB, got " +
                                std::to_string(bytes) + " bytes");
  g_grain_bytes.store(bytes);
}

int64_t matmul_grain_bytes() { return g_grain_bytes.load(); }

void matmul_4bit_cpu(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed,
                     const AbsmaxSource& absmax, int64_t N, int64_t blocksize, QuantType qt,
                     const void* bias, void* y, int num_threads) {
  if (!check_matmul_4bit_args(x, dtype, M, K, packed, absmax, N, blocksize, qt, y)) return;
  const MatmulKernels* k = &forward_kernels(dtype, K, blocksize);

  MatmulArgs a{x, nullptr, nullptr, dtype, M, K, N, packed, &absmax, blocksize, qt, bias, y};
  std::vector<float> xf;  // the one allocation: x in fp32, M * K floats (small for small M)
  std::vector<uint16_t> xb;  // or in bf16
  if (k->x_bf16) {
    xb.resize(static_cast<size_t>(M * K));
    group_x_bf16(x, K, M, k->x_group, xb.data());
    a.xb = xb.data();
  } else if (k->x_group > 0) {
    xf.resize(static_cast<size_t>(M * K));
    group_x_f32(x, dtype, K, 0, M, k->x_group, xf.data());
    a.xf = xf.data();
  }
  const int64_t units = (N + kRowUnit - 1) / kRowUnit;
  parallel_for(units, grain_units(kRowUnit * K / 2), std::max(1, num_threads),
               [&](int64_t u0, int64_t u1) {
                 k->rows(a, u0 * kRowUnit, std::min(N, u1 * kRowUnit));
               });
}

void matmul_4bit_t_cpu(const void* grad_y, DType dtype, int64_t M, int64_t N,
                       const uint8_t* packed, const AbsmaxSource& absmax, int64_t K,
                       int64_t blocksize, QuantType qt, void* grad_x, int num_threads) {
  // The forward check with the roles of K and N swapped: nothing to do for M == 0 or K == 0,
  // zeros for N == 0. Sizes are checked here first so a bad one is named correctly.
  if (N < 0) throw std::invalid_argument("N must be >= 0, got " + std::to_string(N));
  if (K < 0) throw std::invalid_argument("K must be >= 0, got " + std::to_string(K));
  if (!check_matmul_4bit_args(grad_y, dtype, M, N, packed, absmax, K, blocksize, qt, grad_x)) return;
  const MatmulKernels* k = &matmul_kernels_for(matmul_variant());
  if (N == 0 || K % blocksize != 0) k = &kMatmulRefKernels;
  MatmulTArgs a{grad_y, nullptr, dtype, M, K, N, packed, &absmax, blocksize, qt, grad_x};
  std::vector<float> gf;  // grad_y in fp32, M * N floats
  if (k->cols_read_gf) {
    gf.resize(static_cast<size_t>(M * N));
    for (int64_t i = 0; i < M * N; ++i) gf[i] = load_as_float(grad_y, dtype, i);
    a.gf = gf.data();
  }
  // Column strips of kTColUnit (N * 64 bytes of W each); as in the forward, a thread should get
  // at least the grain's bytes of packed weight before another one is woken.
  const int64_t units = (K + kTColUnit - 1) / kTColUnit;
  parallel_for(units, grain_units(N * kTColUnit / 2), std::max(1, num_threads),
               [&](int64_t u0, int64_t u1) {
                 k->cols(a, u0 * kTColUnit, std::min(K, u1 * kTColUnit));
               });
}

}  // namespace nf4lora
