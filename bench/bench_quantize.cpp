// bench_quantize.cpp — C++ benchmark of the CPU 4-bit kernels (no Python): NF4 + double
// quantization of an N x K bf16 matrix and dequantization into a preallocated bf16 buffer, per
// CPU variant, against the memory-copy limit (the same output bytes copied between two
// preallocated buffers with the same threads). Each variant is validated against the scalar
// reference before it is timed. Usage: bench_quantize [N K] [--threads T] [--iters I] [--smoke]
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
#include "nf4lora/quantize.h"
#include "bench_util.h"

using namespace nf4lora;
using namespace nf4lora::bench;


int main(int argc, char** argv) {
  int64_t N = 4096, K = 4096;
  int threads = std::max(1u, std::thread::hardware_concurrency());
  int iters = 20;
  bool smoke = false;
  std::vector<int64_t> dims;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (a == "--iters" && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (a == "--smoke") smoke = true;
    else dims.push_back(std::atoll(argv[i]));
  }
  if (dims.size() == 2) N = dims[0], K = dims[1];
  if (smoke) N = 256, K = 320, iters = 2;
  const int64_t n = N * K, nb = num_blocks(n, 64);

  std::mt19937 rng(0);
  const std::vector<uint16_t> w = random_bf16(n, 0.02f, rng);

  Quantized ref;
  force_cpu_variant(CpuVariant::Ref);
  quantize_dq(w, n, threads, ref);
  std::vector<uint16_t> ref_out(n), out(n), copy_src(n, 0x3f80);
  dequantize_4bit_cpu(ref.packed.data(), ref.source(), n, 64, QuantType::NF4, ref_out.data(), DType::BF16, threads);

  const double out_bytes = double(n) * 2, in_bytes = double(packed_bytes(n)) + nb;
  const double copy_ms = median_ms(iters, [&] {
    detail::parallel_for(n, 1 << 16, threads, [&](int64_t b, int64_t e) {
      std::memcpy(out.data() + b, copy_src.data() + b, (e - b) * 2);
    });
  });
  std::printf("nf4lora bench_quantize: %lld x %lld bf16, NF4 block 64 + double quant, %d thread(s), median of %d\n",
              (long long)N, (long long)K, threads, iters);
  std::printf("%-28s %10s %10s %12s\n", "what", "ms", "GB/s", "vs copy");
  std::printf("%-28s %10.3f %10.1f %12s\n", "memcpy of the bf16 output", copy_ms, 2 * out_bytes / copy_ms / 1e6, "1.00x");

  int failures = 0;
  for (int v = 0; v < kNumCpuVariants; ++v) {
    const auto cv = static_cast<CpuVariant>(v);
    if (!cpu_variant_supported(cv)) continue;
    force_cpu_variant(cv);
    Quantized q = ref;
    quantize_dq(w, n, threads, q);
    std::fill(out.begin(), out.end(), 0);
    dequantize_4bit_cpu(q.packed.data(), q.source(), n, 64, QuantType::NF4, out.data(), DType::BF16, threads);
    const bool same = q.packed == ref.packed && q.dq.q == ref.dq.q && out == ref_out;
    if (!same) {
      std::printf("%s: MISMATCH against the reference\n", cpu_variant_name(cv));
      ++failures;
      continue;
    }
    const double qms = median_ms(iters, [&] { quantize_dq(w, n, threads, q); });
    const double dms = median_ms(iters, [&] {
      dequantize_4bit_cpu(q.packed.data(), q.source(), n, 64, QuantType::NF4, out.data(), DType::BF16, threads);
    });
    std::string name = std::string("quantize  [") + cpu_variant_name(cv) + "]";
    std::printf("%-28s %10.3f %10.1f %12s\n", name.c_str(), qms, (out_bytes + in_bytes) / qms / 1e6, "-");
    name = std::string("dequantize[") + cpu_variant_name(cv) + "]";
    char ratio[32];
    std::snprintf(ratio, sizeof ratio, "%.2fx", dms / copy_ms);
    std::printf("%-28s %10.3f %10.1f %12s\n", name.c_str(), dms, (out_bytes + in_bytes) / dms / 1e6, ratio);
  }
  reset_cpu_variant();
  std::printf("(GB/s counts bytes read + written; 'vs copy' = dequantize time / copy time, lower is better)\n");
  return failures ? 1 : 0;
}
