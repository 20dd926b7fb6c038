// gemv_dispatch.cpp — the public entry point gemm_4bit_cpu of matmul.h: argument checks
// (checks.h), choice of the kernel by active_cpu_variant(), one fp32 copy of x in the kernel's
// lane order, and the split of W's rows over threads (each thread reads its rows of W once, for
// all M rows of x). Tested by tests/cpp/test_matmul.cpp.
#include <algorithm>
#include <vector>

#include "checks.h"
#include "gemv_kernels.h"
#include "nf4lora/matmul.h"
#include "parallel.h"

namespace nf4lora {
namespace {

using namespace detail;

// Rows of W are handed out in units of 8 (the SIMD kernels tile 4 rows), and a thread should
// get at least ~64 KiB of packed weight before another one is woken.
constexpr int64_t kRowUnit = 8;
constexpr int64_t kGrainBytes = int64_t{1} << 16;

const GemvKernels& gemv_kernels_for(CpuVariant v) {
  switch (v) {
#if defined(NF4LORA_HAVE_AVX512)
    case CpuVariant::AVX512: return kGemvAvx512Kernels;
#endif
#if defined(NF4LORA_HAVE_AVX2)
    case CpuVariant::AVX2: return kGemvAvx2Kernels;
#endif
    default: return kGemvRefKernels;
  }
}

}  // namespace

void gemm_4bit_cpu(const void* x, DType dtype, int64_t M, int64_t K, const uint8_t* packed,
                   const AbsmaxSource& absmax, int64_t N, int64_t blocksize, QuantType qt,
                   const void* bias, void* y, int num_threads) {
  if (!check_gemm_4bit_args(x, dtype, M, K, packed, absmax, N, blocksize, qt, y)) return;
  const GemvKernels* k = &gemv_kernels_for(active_cpu_variant());
  // The SIMD kernels need whole blocks per row (no block spans two rows, rows start on a byte).
  if (K == 0 || K % blocksize != 0) k = &kGemvRefKernels;

  GemvArgs a{x, nullptr, dtype, M, K, N, packed, &absmax, blocksize, qt, bias, y};
  std::vector<float> xf;  // the one allocation: x in fp32, M * K floats (small for small M)
  if (k->x_group > 0) {
    xf.resize(static_cast<size_t>(M * K));
    group_x_f32(x, dtype, K, 0, M, k->x_group, xf.data());
    a.xf = xf.data();
  }
  const int64_t units = (N + kRowUnit - 1) / kRowUnit;
  const int64_t unit_bytes = std::max<int64_t>(1, kRowUnit * K / 2);
  parallel_for(units, std::max<int64_t>(1, kGrainBytes / unit_bytes), std::max(1, num_threads),
               [&](int64_t u0, int64_t u1) {
                 k->rows(a, u0 * kRowUnit, std::min(N, u1 * kRowUnit));
               });
}

}  // namespace nf4lora
