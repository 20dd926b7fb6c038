// test_optim.cpp — C++ tests of the fused AdamW kernels (optim.h), no framework: every CPU variant
// this machine supports is forced in turn and must equal the scalar reference bit for bit (params,
// fp32 state, 8-bit codes and absmax) over awkward sizes, all param dtypes, several steps and
// thread counts; blocks with non-finite gradients are left untouched; bad hyperparameters throw.
// The AVX-512 variants run twice where the CPU has AVX512-VBMI + GFNI: with the VBMI codec and
// without (set_optim_vbmi). The 8-bit codecs alone must equal encode_8bit_mids on every kind of
// input (midpoints and their neighbours, ties, +-0, +-inf, NaN, subnormals, random bit patterns).
// Run by ctest; exits nonzero on any failure. Python-level tests compare with torch/bitsandbytes.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "nf4lora/optim.h"
#include "nf4lora/quantize.h"
#include "test_util.h"

using namespace nf4lora;
using namespace nf4lora::test;

namespace {

constexpr int64_t kSizes[] = {1, 3, 17, 63, 255, 256, 257, 4097, 70001};

struct Problem {  // one parameter tensor with its gradients for each step and both kinds of state
  DType dt;
  int64_t n;
  std::vector<uint8_t> param;               // n elements of dt
  std::vector<std::vector<uint8_t>> grads;  // per step
  std::vector<float> m, v;
  std::vector<uint8_t> qm, qv;
  std::vector<float> am, av;
};

void put(std::vector<uint8_t>& buf, DType dt, int64_t i, float x) {
  if (dt == DType::F32) std::memcpy(buf.data() + 4 * i, &x, 4);
  else {
    const uint16_t h = dt == DType::F16 ? float_to_half_bits(x) : float_to_bf16_bits(x);
    std::memcpy(buf.data() + 2 * i, &h, 2);
  }
}

Problem make_problem(DType dt, int64_t n, int steps, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Problem p{dt, n, std::vector<uint8_t>(n * dtype_bytes(dt)), {}, std::vector<float>(n),
            std::vector<float>(n), std::vector<uint8_t>(n), std::vector<uint8_t>(n),
            std::vector<float>(optim_num_blocks(n)), std::vector<float>(optim_num_blocks(n))};
  for (int64_t i = 0; i < n; ++i) put(p.param, dt, i, normal(rng));
  for (int s = 0; s < steps; ++s) {
    std::vector<uint8_t> g(n * dtype_bytes(dt));
    // Mixed magnitudes per block so 8-bit blocks see both large and tiny moments.
    for (int64_t i = 0; i < n; ++i) put(g, dt, i, normal(rng) * std::pow(10.0f, float(i / 256 % 5) - 3));
    p.grads.push_back(std::move(g));
  }
  return p;
}

void run(Problem& p, bool eight_bit, int threads, int64_t* skipped_total) {
  AdamWHyper h;
  h.lr = 1e-2;
  h.weight_decay = 0.1;
  for (size_t s = 0; s < p.grads.size(); ++s) {
    h.step = static_cast<int64_t>(s) + 1;
    const int64_t skipped =
        eight_bit ? adamw_8bit_cpu(p.param.data(), p.dt, p.grads[s].data(), p.qm.data(), p.qv.data(),
                                   p.am.data(), p.av.data(), p.n, h, threads)
                  : adamw_32bit_cpu(p.param.data(), p.dt, p.grads[s].data(), p.m.data(), p.v.data(),
                                    p.n, h, threads);
    if (skipped_total) *skipped_total += skipped;
  }
}

bool same_bytes(const void* a, const void* b, size_t n) { return std::memcmp(a, b, n) == 0; }

// Every CPU kernel configuration this machine can run: each supported variant, and the AVX-512
// ones with and without the VBMI codec.
struct Config {
  CpuVariant variant;
  bool vbmi;
  std::string name() const { return std::string(cpu_variant_name(variant)) + (vbmi ? "+vbmi" : ""); }
  void apply() const {
    force_cpu_variant(variant);
    set_optim_vbmi(vbmi);
  }
};

std::vector<Config> configs() {
  std::vector<Config> out;
  for (int v = 0; v < kNumCpuVariants; ++v) {
    const auto cv = static_cast<CpuVariant>(v);
    if (!cpu_variant_supported(cv)) continue;
    out.push_back({cv, false});
    if ((cv == CpuVariant::AVX512 || cv == CpuVariant::AVX512_BF16) && optim_vbmi_supported())
      out.push_back({cv, true});
  }
  return out;
}

void reset_config() {
  reset_cpu_variant();
  set_optim_vbmi(true);
}

void test_variants_match_reference() {
  // The SIMD kernels are bit-identical to the reference by design, so a variant that silently ran
  // the reference would pass: at least make sure some non-reference configuration is compared
  // wherever this CPU runs one.
  int simd = 0;
  for (const Config& cfg : configs()) simd += cfg.variant != CpuVariant::Ref;
  check(simd > 0 || !cpu_variant_supported(CpuVariant::AVX2), "no SIMD configuration to compare with the reference");
  for (DType dt : kDTypes)
    for (int64_t n : kSizes)
      for (bool eight : {false, true}) {
        Problem ref = make_problem(dt, n, 3, 1234u + static_cast<uint32_t>(n));
        force_cpu_variant(CpuVariant::Ref);
        run(ref, eight, 1, nullptr);
        for (const Config& cfg : configs()) {
          for (int threads : {1, 2}) {
            // The reference on 1 thread is what `ref` holds: comparing it would compare it with
            // itself. On 2 threads it checks the split over threads.
            if (cfg.variant == CpuVariant::Ref && threads == 1) continue;
            Problem p = make_problem(dt, n, 3, 1234u + static_cast<uint32_t>(n));
            cfg.apply();
            run(p, eight, threads, nullptr);
            const std::string what = cfg.name() + " " + dtype_name(dt) +
                                     " n=" + std::to_string(n) + (eight ? " 8bit" : " 32bit") +
                                     " threads=" + std::to_string(threads);
            check(same_bytes(p.param.data(), ref.param.data(), p.param.size()), what + ": params");
            if (eight) {
              check(p.qm == ref.qm && p.qv == ref.qv, what + ": 8-bit codes");
              check(same_bytes(p.am.data(), ref.am.data(), 4 * p.am.size()) &&
                        same_bytes(p.av.data(), ref.av.data(), 4 * p.av.size()),
                    what + ": absmax");
            } else {
              check(same_bytes(p.m.data(), ref.m.data(), 4 * n) &&
                        same_bytes(p.v.data(), ref.v.data(), 4 * n),
                    what + ": fp32 state");
            }
          }
        }
      }
  reset_config();
}

// The 8-bit state decodes close to the fp32 state it tracks (blockwise: error <= half a map step
// of the block's absmax; the signed map's coarsest step near 1 is ~0.0078).
void test_8bit_state_tracks_fp32() {
  Problem a = make_problem(DType::F32, 4097, 5, 7u), b = a;
  run(a, false, 1, nullptr);
  run(b, true, 1, nullptr);
  double worst = 0;
  for (int64_t i = 0; i < a.n; ++i) {
    const float m8 = kDynamicSigned[b.qm[i]] * b.am[i / kOptimBlock];
    worst = std::max(worst, std::fabs(double(m8) - a.m[i]) / b.am[i / kOptimBlock]);
  }
  check(worst < 0.05, "8-bit first moment within 5% of its block absmax of the fp32 one, got " + std::to_string(worst));
}

void test_nonfinite_blocks_skipped() {
  for (const Config& cfg : configs()) {
    cfg.apply();
    for (bool eight : {false, true})
      for (float bad : {NAN, INFINITY, -INFINITY}) {
        Problem p = make_problem(DType::F32, 1000, 1, 99u);
        put(p.grads[0], DType::F32, 300, bad);  // block 1 of 4
        const Problem before = p;
        int64_t skipped = 0;
        run(p, eight, 2, &skipped);
        const std::string what = cfg.name() + (eight ? " 8bit" : " 32bit");
        check(skipped == 1, what + ": one skipped block, got " + std::to_string(skipped));
        check(same_bytes(p.param.data() + 4 * 256, before.param.data() + 4 * 256, 4 * 256),
              what + ": params of the bad block untouched");
        check(!same_bytes(p.param.data(), before.param.data(), 4 * 256), what + ": other blocks updated");
        bool finite = true;
        for (int64_t i = 0; i < p.n; ++i) finite = finite && std::isfinite(p.m[i]) && std::isfinite(p.v[i]);
        for (float x : p.am) finite = finite && std::isfinite(x);
        check(finite, what + ": state stays finite");
      }
  }
  reset_config();
}

// Finite gradients so large that v overflows to inf: the block's absmax is inf, its scaled second
// moments NaN (inf * 0), which every variant must encode as the reference does (code 0). One step
// only: a further step decodes 0 * inf = NaN moments, whose running maximum the SIMD variants
// (vmaxps) and the reference (std::max) fold differently; that state is beyond repair anyway.
void test_overflowing_moments_match_reference() {
  Problem base = make_problem(DType::F32, 1000, 1, 5u);
  for (auto& g : base.grads)
    for (int64_t i = 256; i < 512; ++i) put(g, DType::F32, i, (i % 3 ? 3e38f : -2e37f) * (i % 2 ? 1 : -1));
  Problem ref = base;
  force_cpu_variant(CpuVariant::Ref);
  run(ref, true, 1, nullptr);
  for (const Config& cfg : configs()) {
    Problem p = base;
    cfg.apply();
    run(p, true, 2, nullptr);
    check(same_bytes(p.param.data(), ref.param.data(), p.param.size()), cfg.name() + ": overflow params");
    check(p.qm == ref.qm, cfg.name() + ": overflow qm");
    check(p.qv == ref.qv, cfg.name() + ": overflow qv");
    check(same_bytes(p.am.data(), ref.am.data(), 4 * p.am.size()), cfg.name() + ": overflow absmax m");
    check(same_bytes(p.av.data(), ref.av.data(), 4 * p.av.size()),
          cfg.name() + ": overflowing moments as the reference");
  }
  reset_config();
}

// The 8-bit codecs alone, on inputs built to hit every edge of encode_8bit_mids.
void test_codecs_match_reference() {
  std::mt19937 rng(42);
  for (bool signed_map : {true, false}) {
    const float* map = signed_map ? kDynamicSigned : kDynamicUnsigned;
    std::vector<float> x;
    for (int j = 0; j < 255; ++j) {
      const float mid = midpoint_8bit(map, j);
      for (float y : {mid, std::nextafter(mid, -INFINITY), std::nextafter(mid, INFINITY), map[j], -mid})
        x.push_back(y);
    }
    for (float y : {0.0f, -0.0f, 1.0f, -1.0f, 1.0000001f, -1.0000001f, 2.0f, -3.5f, INFINITY, -INFINITY,
                    NAN, -NAN, bits_float(0x7f800001u), bits_float(0xffc12345u), 1e-45f, -1e-45f, 1e-38f,
                    -1e-38f, 3e38f, -3e38f})
      x.push_back(y);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f), e(-9.0f, 0.0f);
    for (int i = 0; i < 200000; ++i) x.push_back(u(rng) * std::pow(10.0f, e(rng)));
    for (int i = 0; i < 200000; ++i) x.push_back(bits_float(static_cast<uint32_t>(rng())));
    std::shuffle(x.begin() + 1300, x.end(), rng);
    x.push_back(0.5f);  // an odd length: the codecs' scalar tails run too
    std::vector<uint8_t> codes(256 * 37 + 5);
    for (size_t i = 0; i < codes.size(); ++i) codes[i] = static_cast<uint8_t>(i < 256 ? i : rng());

    const std::string map_name = signed_map ? " signed map" : " unsigned map";
    std::vector<uint8_t> want(x.size());
    const std::vector<float> mids = [&] {
      std::vector<float> m(256);
      for (int j = 0; j < 255; ++j) m[j] = midpoint_8bit(map, j);
      m[255] = INFINITY;
      return m;
    }();
    for (size_t i = 0; i < x.size(); ++i) want[i] = encode_8bit_mids(mids.data(), x[i]);
    for (const Config& cfg : configs()) {
      cfg.apply();
      for (size_t offset : {size_t{0}, size_t{3}}) {  // unaligned starts too
        std::vector<uint8_t> got(x.size() - offset);
        encode_8bit_state_cpu(signed_map, x.data() + offset, static_cast<int64_t>(got.size()), got.data());
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < got.size(); ++i)
          if (got[i] != want[i + offset] && bad++ == 0) first = i + offset;
        check(bad == 0, cfg.name() + map_name + " encode offset " + std::to_string(offset) + ": " +
                            std::to_string(bad) + " codes differ, first at x=" + std::to_string(x[first]));
        std::vector<float> dec(codes.size() - offset);
        decode_8bit_state_cpu(signed_map, codes.data() + offset, static_cast<int64_t>(dec.size()), dec.data());
        bool ok = true;
        for (size_t i = 0; i < dec.size(); ++i) ok = ok && float_bits(dec[i]) == float_bits(map[codes[i + offset]]);
        check(ok, cfg.name() + map_name + " decode offset " + std::to_string(offset));
      }
    }
  }
  reset_config();
}

template <class Fn>
void expect_invalid(const char* what, const char* needle, Fn fn) {
  try {
    fn();
    check(false, std::string(what) + ": no exception");
  } catch (const std::invalid_argument& e) {
    check(std::string(e.what()).find(needle) != std::string::npos,
          std::string(what) + ": message '" + e.what() + "' should name " + needle);
  }
}

// Lion: every configuration equals the reference bit for bit (fp32 and 8-bit state, all dtypes,
// awkward sizes, 1 and 2 threads), and the reference follows the formula on fp32 data.
void run_lion(Problem& p, bool eight_bit, int threads) {
  LionHyper h;
  h.lr = 1e-3;
  h.weight_decay = 0.1;
  for (const auto& g : p.grads) {
    if (eight_bit) lion_8bit_cpu(p.param.data(), p.dt, g.data(), p.qm.data(), p.am.data(), p.n, h, threads);
    else lion_32bit_cpu(p.param.data(), p.dt, g.data(), p.m.data(), p.n, h, threads);
  }
}

void test_lion_variants_match_reference() {
  for (DType dt : kDTypes)
    for (int64_t n : kSizes)
      for (bool eight : {false, true}) {
        Problem ref = make_problem(dt, n, 3, 77u + static_cast<uint32_t>(n));
        force_cpu_variant(CpuVariant::Ref);
        run_lion(ref, eight, 1);
        for (const Config& cfg : configs())
          for (int threads : {1, 2}) {
            Problem p = make_problem(dt, n, 3, 77u + static_cast<uint32_t>(n));
            cfg.apply();
            run_lion(p, eight, threads);
            const std::string what = "lion " + cfg.name() + " " + dtype_name(dt) + " n=" + std::to_string(n) +
                                     (eight ? " 8bit" : " 32bit") + " threads=" + std::to_string(threads);
            check(same_bytes(p.param.data(), ref.param.data(), p.param.size()), what + ": params");
            if (eight)
              check(p.qm == ref.qm && same_bytes(p.am.data(), ref.am.data(), 4 * p.am.size()), what + ": 8-bit state");
            else
              check(same_bytes(p.m.data(), ref.m.data(), 4 * n), what + ": fp32 state");
          }
      }
  reset_config();

  // The formula, written out: p <- p (1 - lr wd) - lr sign(b1 m + (1 - b1) g); m <- b2 m + (1 - b2) g.
  Problem p = make_problem(DType::F32, 1000, 2, 3u);
  std::vector<float> param(p.n), m(p.n, 0.0f);
  std::memcpy(param.data(), p.param.data(), 4 * p.n);
  run_lion(p, false, 2);
  int64_t bad = 0;
  for (const auto& gb : p.grads)
    for (int64_t i = 0; i < p.n; ++i) {
      float g;
      std::memcpy(&g, gb.data() + 4 * i, 4);
      const float c = 0.9f * m[i] + 0.1f * g;
      param[i] = param[i] * (1.0f - 1e-3f * 0.1f) - 1e-3f * float((c > 0) - (c < 0));
      m[i] = 0.99f * m[i] + (1.0f - 0.99f) * g;
    }
  for (int64_t i = 0; i < p.n; ++i) {
    float got;
    std::memcpy(&got, p.param.data() + 4 * i, 4);
    bad += std::fabs(got - param[i]) > 1e-6f * (1 + std::fabs(param[i])) || std::fabs(p.m[i] - m[i]) > 1e-6f;
  }
  check(bad == 0, "lion follows its formula (" + std::to_string(bad) + " elements differ)");
  LionHyper h;
  h.beta2 = 1.0;
  float x = 1, g = 1, mm = 0;
  expect_invalid("lion beta2=1", "beta2", [&] { lion_32bit_cpu(&x, DType::F32, &g, &mm, 1, h, 1); });
  check(x == 1 && mm == 0, "a rejected Lion step leaves param and state as they were");
}

void test_bad_hyperparameters() {
  float p = 1, g = 1, m = 0, v = 0;
  auto step = [&](AdamWHyper h) { adamw_32bit_cpu(&p, DType::F32, &g, &m, &v, 1, h, 1); };
  AdamWHyper h;
  expect_invalid("lr<0", "lr", [&] { auto x = h; x.lr = -1; step(x); });
  expect_invalid("beta1=1", "beta1", [&] { auto x = h; x.beta1 = 1; step(x); });
  expect_invalid("beta2<0", "beta2", [&] { auto x = h; x.beta2 = -0.1; step(x); });
  expect_invalid("eps=0", "eps", [&] { auto x = h; x.eps = 0; step(x); });
  expect_invalid("wd nan", "weight_decay", [&] { auto x = h; x.weight_decay = NAN; step(x); });
  expect_invalid("step 0", "step", [&] { auto x = h; x.step = 0; step(x); });
  expect_invalid("null grad", "grad", [&] { adamw_32bit_cpu(&p, DType::F32, nullptr, &m, &v, 1, h, 1); });
  check(p == 1 && m == 0 && v == 0, "rejected steps leave param and state as they were");
}

}  // namespace

int main() {
  test_variants_match_reference();
  test_codecs_match_reference();
  test_overflowing_moments_match_reference();
  test_8bit_state_tracks_fp32();
  test_nonfinite_blocks_skipped();
  test_bad_hyperparameters();
  test_lion_variants_match_reference();
  std::printf("test_optim: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
