// bench_matmul_4bit_small_m.cpp — C++ benchmark of matmul_4bit_cpu at decode sizes (M = 1 and 8,
// the fused GEMV / small-M GEMM) per CPU variant, against the memory-bandwidth bound: a memcpy of
// the packed weight bytes with the same threads. Each variant is checked against the reference
// (ref) first.
// Usage: bench_matmul_4bit_small_m [--threads T] [--iters I] [--shape N K] [--plain-absmax] [--smoke]

// LLaMA-7B layer shapes, bf16 activations, NF4 + double quantization (blocksize 64).
// --shape N K times one shape instead; a small one (256 4096: 512 KiB of codes, L2-resident)
// measures the decode throughput of each kernel without the memory bound.
// --plain-absmax: fp32 absmax instead of double quantization (what the nested decode costs).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "nf4lora/detail/parallel.h"
#include "nf4lora/matmul.h"
#include "nf4lora/quantize.h"
#include "bench_util.h"

using namespace nf4lora;
using namespace nf4lora::bench;
using Clock = std::chrono::steady_clock;

namespace {

}  // namespace

int main(int argc, char** argv) {
  int threads = std::max(1u, std::thread::hardware_concurrency());
  int iters = 20;
  bool smoke = false;
  int64_t shape_n = 0, shape_k = 0;
  bool plain_absmax = false;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--iters" && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (a == "--smoke") smoke = true;
    else if (a == "--plain-absmax") plain_absmax = true;
    else if (a == "--shape" && i + 2 < argc) shape_n = std::atoll(argv[++i]), shape_k = std::atoll(argv[++i]);
    else {
      std::fprintf(stderr, "usage: bench_matmul_4bit_small_m [--threads T] [--iters I] [--shape N K] [--plain-absmax] [--smoke]\n");
      return 2;
    }
  }
  struct Shape { int64_t N, K; };
  std::vector<Shape> shapes = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  if (shape_n > 0 && shape_k > 0) shapes = {{shape_n, shape_k}};
  if (smoke) shapes = {{256, 512}}, iters = 2;
  std::printf("bench_matmul_4bit_small_m: bf16 x, NF4 + %s (blocksize 64), threads %d, median of %d\n",
              plain_absmax ? "fp32 absmax" : "double quant", threads, iters);
  std::printf("%-12s %3s %-7s %10s %9s %12s %9s\n", "N x K", "M", "variant", "ms", "GB/s", "memcpy ms", "vs bound");
  std::mt19937 rng(42);
  for (const Shape s : shapes) {
    const int64_t n = s.N * s.K;
    Quantized q;
    quantize_dq(random_bf16(n, 0.02f, rng), n, threads, q);
    AbsmaxSource src = q.source();
    if (plain_absmax) src = AbsmaxSource{}, src.absmax = q.absmax.data();
    const double weight_bytes = double(q.packed.size());
    // The bound: read the packed bytes once (and write a copy, which a GEMV does not).
    std::vector<uint8_t> copy(q.packed.size());
    const double memcpy_ms = median_ms(iters, [&] {
      detail::parallel_for(int64_t(q.packed.size()), int64_t{1} << 16, threads, [&](int64_t b, int64_t e) {
        std::memcpy(copy.data() + b, q.packed.data() + b, e - b);
      });
    });
    for (const int64_t M : {int64_t{1}, int64_t{8}}) {
      const std::vector<uint16_t> x = random_bf16(M * s.K, 1.0f, rng);
      std::vector<uint16_t> yref(M * s.N), y(M * s.N);
      force_cpu_variant(CpuVariant::Ref);
      auto t0 = Clock::now();
      matmul_4bit_cpu(x.data(), DType::BF16, M, s.K, q.packed.data(), src, s.N, 64, QuantType::NF4, nullptr, yref.data(), threads);
      const double ref_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      char shape[32];
      std::snprintf(shape, sizeof shape, "%lldx%lld", (long long)s.N, (long long)s.K);
      std::printf("%-12s %3lld %-7s %10.3f %9.2f %12.3f %8.2fx  (1 run)\n", shape, (long long)M, "ref", ref_ms,
                  weight_bytes / ref_ms * 1e-6, memcpy_ms, ref_ms / memcpy_ms);
      for (int vi = 1; vi < kNumCpuVariants; ++vi) {
        const CpuVariant v = static_cast<CpuVariant>(vi);
        if (!cpu_variant_supported(v)) continue;
        force_cpu_variant(v);
        matmul_4bit_cpu(x.data(), DType::BF16, M, s.K, q.packed.data(), src, s.N, 64, QuantType::NF4, nullptr, y.data(), threads);
        // Not bit-exact (summation order; avx512_bf16 rounds W to bf16): a loose sanity check
        // against the outputs' RMS, the real one is test_matmul.
        double max_diff = 0.0, rms = 0.0;
        for (size_t i = 0; i < y.size(); ++i) {
          const double a = bf16_bits_to_float(y[i]), b = bf16_bits_to_float(yref[i]);
          max_diff = std::max(max_diff, std::fabs(a - b)), rms += b * b;
        }
        rms = std::sqrt(rms / double(y.size()));
        if (!(max_diff < 0.05 * rms)) {  // a few bf16 ulps of the largest outputs
          std::printf("%s: %s disagrees with the reference (max diff %.3g, output RMS %.3g)\n", shape,
                      cpu_variant_name(v), max_diff, rms);
          return 1;
        }
        const double ms = median_ms(iters, [&] {
          matmul_4bit_cpu(x.data(), DType::BF16, M, s.K, q.packed.data(), src, s.N, 64, QuantType::NF4, nullptr, y.data(), threads);
        });
        std::printf("%-12s %3lld %-7s %10.3f %9.2f %12.3f %8.2fx\n", shape, (long long)M, cpu_variant_name(v), ms,
                    weight_bytes / ms * 1e-6, memcpy_ms, ms / memcpy_ms);
      }
      reset_cpu_variant();
    }
  }
  return 0;
}
