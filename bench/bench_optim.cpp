// bench_optim.cpp — the fused AdamW CPU step without Python: ms per step of adamw_32bit_cpu and
// adamw_8bit_cpu on n fp32 params for every CPU variant this machine supports (the AVX-512 8-bit
// step with and without its VBMI codec), interleaved rounds, medians of wall and of CPU time. bench/bench_optim.py compares
// the same kernels with torch.optim.AdamW; this binary is for quick kernel iteration.
//
//     bench_optim [millions=50] [threads=2] [rounds=7]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <ctime>
#include <vector>

#include "nf4lora/optim.h"
#include "nf4lora/quantize.h"

using namespace nf4lora;

static double cpu_ms() {  // CPU time of the whole process (every thread), in ms
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

int main(int argc, char** argv) {
  const int64_t n = static_cast<int64_t>((argc > 1 ? std::atof(argv[1]) : 50.0) * 1e6);
  const int threads = argc > 2 ? std::atoi(argv[2]) : 2;
  const int rounds = argc > 3 ? std::atoi(argv[3]) : 7;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> param(n), grad(n), m(n), v(n), am(optim_num_blocks(n)), av(optim_num_blocks(n));
  std::vector<uint8_t> qm(n), qv(n);
  for (int64_t i = 0; i < n; ++i) param[i] = normal(rng), grad[i] = 1e-3f * normal(rng);
  AdamWHyper h;
  h.lr = 1e-5;
  struct Row {
    std::string name;
    std::function<void()> fn;
    std::vector<double> ms, cpu_ms;
  };
  std::vector<Row> rows;
  for (int vi = 0; vi < kNumCpuVariants; ++vi) {
    const auto cv = static_cast<CpuVariant>(vi);
    if (!cpu_variant_supported(cv) || cv == CpuVariant::AVX512_BF16) continue;
    rows.push_back({std::string(cpu_variant_name(cv)) + " 32-bit", [&, cv] {
                      force_cpu_variant(cv);
                      adamw_32bit_cpu(param.data(), DType::F32, grad.data(), m.data(), v.data(), n, h, threads);
                    }, {}});
    for (int vbmi = 0; vbmi < (cv == CpuVariant::AVX512 && optim_vbmi_supported() ? 2 : 1); ++vbmi)
      rows.push_back({std::string(cpu_variant_name(cv)) + (vbmi ? "+vbmi" : "") + " 8-bit", [&, cv, vbmi] {
                        force_cpu_variant(cv);
                        set_optim_vbmi(vbmi != 0);
                        adamw_8bit_cpu(param.data(), DType::F32, grad.data(), qm.data(), qv.data(),
                                       am.data(), av.data(), n, h, threads);
                        set_optim_vbmi(true);
                      }, {}});
  }
  for (auto& r : rows) r.fn();  // first touch, state creation
  for (int k = 0; k < rounds; ++k)
    for (auto& r : rows) {
      h.step += 1;
      const double c0 = cpu_ms();
      const auto t0 = std::chrono::steady_clock::now();
      r.fn();
      r.ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      r.cpu_ms.push_back(cpu_ms() - c0);
    }
  std::printf("%.2fM fp32 params, %d threads, %d rounds: median wall ms/step, median CPU ms/step "
              "(all threads; what a loaded machine distorts least)\n", n / 1e6, threads, rounds);
  for (auto& r : rows) {
    std::sort(r.ms.begin(), r.ms.end());
    std::sort(r.cpu_ms.begin(), r.cpu_ms.end());
    std::printf("  %-22s %8.2f %8.2f\n", r.name.c_str(), r.ms[r.ms.size() / 2], r.cpu_ms[r.cpu_ms.size() / 2]);
  }
  reset_cpu_variant();
  return 0;
}
