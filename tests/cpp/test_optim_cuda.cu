// test_optim_cuda.cu — cuda/optim.cu against the CPU reference (optim_ref.cpp), bit for bit, for
// AdamW and Lion: params, fp32 state, 8-bit codes and absmax, skipped-block counts, for every param
// dtype, awkward sizes and several steps with a NaN gradient block; state in cudaMallocManaged
// memory (prefetched as the paged optimizer does) and param/grad in device memory. Prints the GB/s
// of a 50M step (unless NF4LORA_NO_BENCH is set, e.g. under compute-sanitizer).
// Built with CUDA builds (ctest: test_optim_cuda); exits 77 (ctest SKIP_RETURN_CODE: "skipped")
// with a note when no GPU is present.
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "nf4lora/optim.h"
#include "nf4lora/quantize.h"

using namespace nf4lora;

namespace {

int g_failed = 0, g_passed = 0;
const char* g_algo = "AdamW";
void check(bool ok, const char* what, int dt, long n, int bits) {
  if (ok) { ++g_passed; return; }
  if (++g_failed <= 30) std::printf("FAIL: %s %s (dtype %d, n %ld, %d-bit)\n", g_algo, what, dt, n, bits);
}

void put(std::vector<uint8_t>& b, DType dt, int64_t i, float x) {
  if (dt == DType::F32) { std::memcpy(b.data() + 4 * i, &x, 4); return; }
  const uint16_t h = dt == DType::F16 ? float_to_half_bits(x) : float_to_bf16_bits(x);
  std::memcpy(b.data() + 2 * i, &h, 2);
}

template <class T> T* dev(const std::vector<T>& h) {
  T* d = nullptr;
  cudaMalloc(&d, h.size() * sizeof(T) + 1);
  cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}
template <class T> std::vector<T> host(const T* d, size_t n) {
  std::vector<T> h(n);
  cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return h;
}

void compare(DType dt, int64_t n, bool eight, bool lion) {
  g_algo = lion ? "Lion" : "AdamW";
  const size_t es = dt == DType::F32 ? 4 : 2, nb = optim_num_blocks(n);
  std::mt19937 rng(static_cast<uint32_t>(n));
  std::normal_distribution<float> normal;
  std::vector<uint8_t> p(n * es);
  for (int64_t i = 0; i < n; ++i) put(p, dt, i, normal(rng));
  std::vector<float> m(n, 0), v(n, 0), am(nb, 0), av(nb, 0);
  std::vector<uint8_t> qm(n, 0), qv(n, 0);
  uint8_t* dp = dev(p);
  float *dm = static_cast<float*>(managed_alloc(4 * n)), *dv = static_cast<float*>(managed_alloc(4 * n));
  uint8_t *dqm = static_cast<uint8_t*>(managed_alloc(n)), *dqv = static_cast<uint8_t*>(managed_alloc(n));
  float *dam = static_cast<float*>(managed_alloc(4 * nb)), *dav = static_cast<float*>(managed_alloc(4 * nb));
  int32_t* dskip = nullptr;
  cudaMalloc(&dskip, 4);
  cudaMemset(dskip, 0, 4);
  int64_t cpu_skipped = 0;
  AdamWHyper h;
  h.lr = 1e-2;
  h.weight_decay = 0.1;
  LionHyper lh;
  lh.lr = 1e-3;
  lh.weight_decay = 0.1;
  for (int step = 1; step <= 3; ++step) {
    std::vector<uint8_t> g(n * es);
    for (int64_t i = 0; i < n; ++i) put(g, dt, i, normal(rng) * std::pow(10.0f, float(i / 256 % 5) - 3));
    if (step == 2) put(g, dt, n / 2, NAN);
    h.step = step;
    uint8_t* dg = dev(g);
    managed_prefetch(dm, 4 * n, 0, nullptr);
    if (lion && eight) {
      cpu_skipped += lion_8bit_cpu(p.data(), dt, g.data(), qm.data(), am.data(), n, lh, 2);
      lion_8bit_cuda(dp, dt, dg, dqm, dam, n, lh, dskip, nullptr);
    } else if (lion) {
      cpu_skipped += lion_32bit_cpu(p.data(), dt, g.data(), m.data(), n, lh, 2);
      lion_32bit_cuda(dp, dt, dg, dm, n, lh, dskip, nullptr);
    } else if (eight) {
      cpu_skipped += adamw_8bit_cpu(p.data(), dt, g.data(), qm.data(), qv.data(), am.data(), av.data(), n, h, 2);
      adamw_8bit_cuda(dp, dt, dg, dqm, dqv, dam, dav, n, h, dskip, nullptr);
    } else {
      cpu_skipped += adamw_32bit_cpu(p.data(), dt, g.data(), m.data(), v.data(), n, h, 2);
      adamw_32bit_cuda(dp, dt, dg, dm, dv, n, h, dskip, nullptr);
    }
    cudaDeviceSynchronize();
    cudaFree(dg);
  }
  const int d = static_cast<int>(dt);
  check(cudaGetLastError() == cudaSuccess, "no CUDA error", d, n, eight ? 8 : 32);
  check(host(dp, n * es) == p, "params", d, n, eight ? 8 : 32);
  check(host(dskip, 1)[0] == cpu_skipped && cpu_skipped == 1, "skipped blocks", d, n, eight ? 8 : 32);
  if (eight) {
    check(std::memcmp(dqm, qm.data(), n) == 0 && std::memcmp(dqv, qv.data(), n) == 0, "codes", d, n, 8);
    check(std::memcmp(dam, am.data(), 4 * nb) == 0 && std::memcmp(dav, av.data(), 4 * nb) == 0, "absmax", d, n, 8);
  } else {
    check(std::memcmp(dm, m.data(), 4 * n) == 0 && std::memcmp(dv, v.data(), 4 * n) == 0, "fp32 state", d, n, 32);
  }
  cudaFree(dp); cudaFree(dskip);
  for (void* x : {(void*)dm, (void*)dv, (void*)dqm, (void*)dqv, (void*)dam, (void*)dav}) managed_free(x);
}

void bench(int64_t n) {
  float *p, *g, *m, *v, *am, *av;
  uint8_t *qm, *qv;
  cudaMalloc(&p, 4 * n); cudaMalloc(&g, 4 * n); cudaMalloc(&m, 4 * n); cudaMalloc(&v, 4 * n);
  cudaMalloc(&qm, n); cudaMalloc(&qv, n); cudaMalloc(&am, 4 * optim_num_blocks(n)); cudaMalloc(&av, 4 * optim_num_blocks(n));
  cudaMemset(p, 0, 4 * n); cudaMemset(g, 0, 4 * n); cudaMemset(m, 0, 4 * n); cudaMemset(v, 0, 4 * n);
  cudaMemset(qm, 0, n); cudaMemset(qv, 0, n); cudaMemset(am, 0, 4 * optim_num_blocks(n)); cudaMemset(av, 0, 4 * optim_num_blocks(n));
  AdamWHyper h;
  LionHyper lh;
  struct Variant { const char* name; double bytes; };  // bytes a step moves per fp32 param
  const Variant variants[] = {{"AdamW 32-bit", 28}, {"AdamW 8-bit", 16}, {"Lion 32-bit", 20}, {"Lion 8-bit", 14}};
  for (int k = 0; k < 4; ++k) {
    auto run = [&] {
      if (k == 0) adamw_32bit_cuda(p, DType::F32, g, m, v, n, h, nullptr, nullptr);
      else if (k == 1) adamw_8bit_cuda(p, DType::F32, g, qm, qv, am, av, n, h, nullptr, nullptr);
      else if (k == 2) lion_32bit_cuda(p, DType::F32, g, m, n, lh, nullptr, nullptr);
      else lion_8bit_cuda(p, DType::F32, g, qm, am, n, lh, nullptr, nullptr);
    };
    run();
    cudaDeviceSynchronize();
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < 20; ++i) run();
    cudaDeviceSynchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 20;
    std::printf("%lldM fp32 params, %s: %.3f ms/step, %.0f GB/s of %.0f bytes/param\n",
                (long long)(n / 1000000), variants[k].name, s * 1e3, variants[k].bytes * n / s / 1e9,
                variants[k].bytes);
  }
  for (void* x : {(void*)p, (void*)g, (void*)m, (void*)v, (void*)qm, (void*)qv, (void*)am, (void*)av}) cudaFree(x);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("test_optim_cuda: no CUDA GPU, nothing run (skipped)\n");
    return 77;  // ctest reports it as skipped (SKIP_RETURN_CODE in CMakeLists.txt), not passed
  }
  std::printf("concurrent managed access: %d\n", managed_prefetch_supported(0) ? 1 : 0);
  for (DType dt : {DType::F32, DType::F16, DType::BF16})
    for (int64_t n : {1000, 4097, 70001, 160787})
      for (bool eight : {false, true})
        for (bool lion : {false, true}) compare(dt, n, eight, lion);
  if (std::getenv("NF4LORA_NO_BENCH") == nullptr) bench(50000000);
  std::printf("test_optim_cuda: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
