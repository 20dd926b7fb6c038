// bench_matmul_4bit_large_m.cpp — C++ benchmark of matmul_4bit_cpu and matmul_4bit_t_cpu (the
// transposed product of backward) at training-size M, per SIMD variant, against dequantizing all
// of W into a bf16 scratch buffer (the cost the dense-GEMM design pays first). Every variant's
// sampled outputs are checked against a float64 product before timing.
// Usage: bench_matmul_4bit_large_m [--threads T] [--iters I] [--m M ...] [--smoke]

// LLaMA-7B layer shapes, bf16, NF4 + double quantization (blocksize 64); time and GFLOP/s
// (bench/bench_matmul.py times the dense torch GEMM itself).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "nf4lora/matmul.h"
#include "nf4lora/quantize.h"
#include "bench_util.h"

using namespace nf4lora;
using namespace nf4lora::bench;

namespace {

// max over sampled outputs of |got - exact| / sum |products|: the fp32/bf16 error relative to
// the magnitudes summed (about 2^-8 for a bf16 output).
double sampled_error(const std::vector<uint16_t>& in, const std::vector<float>& w, const std::vector<uint16_t>& out,
                     int64_t M, int64_t N, int64_t K, bool transposed) {
  const int64_t in_len = transposed ? N : K, out_len = transposed ? K : N;
  double worst = 0.0;
  for (int64_t s = 0; s < 64; ++s) {
    const int64_t m = (s * 7919) % M, o = (s * 104729) % out_len;
    double dot = 0.0, mag = 0.0;
    for (int64_t r = 0; r < in_len; ++r) {
      const double p = double(bf16_bits_to_float(in[m * in_len + r])) * (transposed ? w[r * K + o] : w[o * K + r]);
      dot += p, mag += std::fabs(p);
    }
    worst = std::max(worst, std::fabs(bf16_bits_to_float(out[m * out_len + o]) - dot) / (mag + 1e-30));
  }
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = std::max(1u, std::thread::hardware_concurrency());
  int iters = 5;
  bool smoke = false;
  std::vector<int64_t> Ms;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--iters" && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (a == "--m") while (i + 1 < argc && argv[i + 1][0] != '-') Ms.push_back(std::atoll(argv[++i]));
    else if (a == "--smoke") smoke = true;
    else {
      std::fprintf(stderr, "usage: bench_matmul_4bit_large_m [--threads T] [--iters I] [--m M ...] [--smoke]\n");
      return 2;
    }
  }
  struct Shape { int64_t N, K; };
  std::vector<Shape> shapes = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  if (Ms.empty()) Ms = {16, 64, 512};
  if (smoke) shapes = {{256, 512}}, Ms = {16, 64}, iters = 2;
  std::printf("bench_matmul_4bit_large_m: bf16, NF4 + double quant (blocksize 64), threads %d, median of %d\n", threads, iters);
  std::printf("%-12s %4s %-4s %-12s %10s %9s %18s\n", "N x K", "M", "pass", "variant", "ms", "GFLOP/s", "dequant-scratch ms");
  std::mt19937 rng(42);
  for (const Shape s : shapes) {
    const int64_t n = s.N * s.K;
    Quantized q;
    quantize_dq(random_bf16(n, 0.02f, rng), n, threads, q);
    const AbsmaxSource src = q.source();
    std::vector<float> w(n);
    dequantize_4bit_cpu(q.packed.data(), src, n, 64, QuantType::NF4, w.data(), DType::F32, threads);
    std::vector<uint16_t> scratch(n);
    const double dequant_ms = median_ms(iters, [&] {
      dequantize_4bit_cpu(q.packed.data(), src, n, 64, QuantType::NF4, scratch.data(), DType::BF16, threads);
    });
    char shape[32];
    std::snprintf(shape, sizeof shape, "%lldx%lld", (long long)s.N, (long long)s.K);
    for (const int64_t M : Ms) {
      const std::vector<uint16_t> x = random_bf16(M * s.K, 1.0f, rng), gy = random_bf16(M * s.N, 1.0f, rng);
      std::vector<uint16_t> y(M * s.N), gx(M * s.K);
      const double gflop = 2.0 * M * s.N * s.K * 1e-9;
      for (int vi = 1; vi < kNumCpuVariants; ++vi) {
        const CpuVariant v = static_cast<CpuVariant>(vi);
        if (!cpu_variant_supported(v)) continue;
        force_cpu_variant(v);
        auto fwd = [&] { matmul_4bit_cpu(x.data(), DType::BF16, M, s.K, q.packed.data(), src, s.N, 64, QuantType::NF4, nullptr, y.data(), threads); };
        auto bwd = [&] { matmul_4bit_t_cpu(gy.data(), DType::BF16, M, s.N, q.packed.data(), src, s.K, 64, QuantType::NF4, gx.data(), threads); };
        fwd(), bwd();
        // A bf16 output is within 2^-8 of its value; the fp32 sums add far less.
        const double ef = sampled_error(x, w, y, M, s.N, s.K, false), eb = sampled_error(gy, w, gx, M, s.N, s.K, true);
        if (!(ef < 0x1p-7) || !(eb < 0x1p-7)) {
          std::printf("%s M=%lld: %s is wrong (sampled error fwd %.3g, bwd %.3g)\n", shape, (long long)M, cpu_variant_name(v), ef, eb);
          return 1;
        }
        const double tf = median_ms(iters, fwd), tb = median_ms(iters, bwd);
        std::printf("%-12s %4lld %-4s %-12s %10.3f %9.1f %18.3f\n", shape, (long long)M, "fwd", cpu_variant_name(v), tf, gflop / tf * 1e3, dequant_ms);
        std::printf("%-12s %4lld %-4s %-12s %10.3f %9.1f %18.3f\n", shape, (long long)M, "bwd", cpu_variant_name(v), tb, gflop / tb * 1e3, dequant_ms);
      }
      reset_cpu_variant();
    }
  }
  return 0;
}
