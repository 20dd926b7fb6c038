// test_matmul.cpp — C++ tests of matmul_4bit_cpu and matmul_4bit_t_cpu (nf4lora/matmul.h): every
// CPU variant this machine supports, forced in turn, against the scalar reference
// (cpp/src/matmul_4bit_ref.cpp) and a float64 product of the dequantized fp32 weight, under the
// error bound derived at `tolerance` below. No framework (test_util.h).

// Over awkward M/N/K, blocksizes, NF4/FP4, plain and double-quantized absmax, fp32/fp16/bf16,
// bias, threads; plus NaN propagation, no-op sizes and argument validation.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "nf4lora/format.h"
#include "nf4lora/matmul.h"
#include "nf4lora/quantize.h"
#include "double_quant.h"  // nf4lora_testsupport (tests/cpp/support/)
#include "test_util.h"

using namespace nf4lora;
using namespace nf4lora::test;

namespace {

constexpr uint8_t kCanary = 0xA5;
constexpr size_t kGuardBytes = 64;

// Unit roundoff of the output dtype, and the largest absolute rounding error in its subnormal
// range (half its smallest subnormal).
double unit_roundoff(DType d) { return d == DType::F32 ? 0x1p-24 : d == DType::F16 ? 0x1p-11 : 0x1p-8; }
double subnormal_error(DType d) { return d == DType::F32 ? 0x1p-150 : d == DType::F16 ? 0x1p-25 : 0x1p-134; }

// Error bound for one output, against y64 = bias + sum_k x_k w_k in float64 (x_k, w_k, bias exact
// fp32 values, so y64 is exact up to K * 2^-53 * S, negligible). With S = sum_k |x_k w_k| and
// u = 2^-24: any fp32 summation order of K (rounded or fused) products is within gamma_K * S,
// gamma_K = K u / (1 - K u) (Higham, Accuracy and Stability, 3.1; the bound does not depend on the
// order, so it covers the SIMD lanes + horizontal reduction as well as the reference loop).
// Adding the bias in fp32 costs u * |acc + bias| <= u * (|y64| + gamma_K * S), and the final
// rounding to dtype u_out * |value| + (a subnormal absolute error). Summed with 1% slack for the
// second-order terms:  tol = u_out |y64| + 1.01 (1 + u_out) (K + 2) u (S + |bias|) + sub_out.
// The AVX512_BF16 variant rounds each weight to bf16 before its (exact) product with a bf16 x,
// as "dequantize to bf16 + dense matmul" does: at most 2^-9 |x_k w_k| more per product, so
// 2^-9 S more in all (bf16_weights).
double tolerance(DType d, int64_t K, double y64, double S, double bias, bool bf16_weights = false) {
  const double u = 0x1p-24, uo = unit_roundoff(d);
  return uo * std::fabs(y64) + 1.01 * (1 + uo) * double(K + 2) * u * (S + std::fabs(bias)) +
         (bf16_weights ? 1.01 * 0x1p-9 * S : 0.0) + subnormal_error(d);
}

uint16_t to_bits(DType d, float v) { return d == DType::F16 ? float_to_half_bits(v) : float_to_bf16_bits(v); }
float from_bits(DType d, uint16_t b) { return d == DType::F16 ? half_bits_to_float(b) : bf16_bits_to_float(b); }

// A tensor in dtype plus the exact fp32 value of each element.
struct Tensor {
  DType dtype;
  std::vector<uint8_t> bytes;
  std::vector<float> values;
  Tensor(DType d, const std::vector<float>& v) : dtype(d), bytes(v.size() * dtype_bytes(d) + kGuardBytes, kCanary), values(v.size()) {
    for (size_t i = 0; i < v.size(); ++i) set(i, v[i]);
  }
  void set(size_t i, float v) {
    if (dtype == DType::F32) {
      std::memcpy(bytes.data() + 4 * i, &v, 4);
      values[i] = v;
    } else {
      const uint16_t b = to_bits(dtype, v);
      std::memcpy(bytes.data() + 2 * i, &b, 2);
      values[i] = from_bits(dtype, b);
    }
  }
};

float read_out(DType d, const std::vector<uint8_t>& y, size_t i) {
  if (d == DType::F32) {
    float f;
    std::memcpy(&f, y.data() + 4 * i, 4);
    return f;
  }
  uint16_t b;
  std::memcpy(&b, y.data() + 2 * i, 2);
  return from_bits(d, b);
}

bool guard_intact(const std::vector<uint8_t>& y, size_t payload) {
  for (size_t i = payload; i < y.size(); ++i)
    if (y[i] != kCanary) return false;
  return true;
}

// A quantized weight W [N, K] with plain or double-quantized absmax, and its dequantized fp32 values.
struct QWeight {
  int64_t N, K, blocksize;
  QuantType qt;
  bool dq;
  std::vector<uint8_t> packed;
  std::vector<float> absmax, w;
  DoubleQuant nested;

  QWeight(const std::vector<float>& src, int64_t N_, int64_t K_, int64_t bs, QuantType q, bool dq_)
      : N(N_), K(K_), blocksize(bs), qt(q), dq(dq_) {
    const int64_t n = N * K, nb = num_blocks(n, bs);
    packed.assign(packed_bytes(n), 0);
    absmax.assign(nb, 0.0f);
    quantize_4bit_cpu(src.data(), DType::F32, n, bs, qt, packed.data(), absmax.data(), 1);
    if (dq) nested.build(absmax.data(), nb, 1);
    w.assign(n, 0.0f);
    dequantize_4bit_cpu(packed.data(), source(), n, bs, qt, w.data(), DType::F32, 1);
  }
  AbsmaxSource source() const {
    if (dq) return nested.source();
    AbsmaxSource a;
    a.absmax = absmax.data();
    return a;
  }
};

std::vector<CpuVariant> supported_variants() {
  std::vector<CpuVariant> v;
  for (int i = 0; i < kNumCpuVariants; ++i)
    if (cpu_variant_supported(static_cast<CpuVariant>(i))) v.push_back(static_cast<CpuVariant>(i));
  return v;
}

std::vector<uint8_t> run(CpuVariant v, const Tensor& x, int64_t M, const QWeight& W, const Tensor* bias, int threads) {
  force_cpu_variant(v);
  std::vector<uint8_t> y(M * W.N * dtype_bytes(x.dtype) + kGuardBytes, kCanary);
  const AbsmaxSource src = W.source();
  matmul_4bit_cpu(x.bytes.data(), x.dtype, M, W.K, W.packed.data(), src, W.N, W.blocksize, W.qt,
                  bias ? bias->bytes.data() : nullptr, y.data(), threads);
  reset_cpu_variant();
  return y;
}

// grad_x [M, K] = g [M, N] @ W.
std::vector<uint8_t> run_t(CpuVariant v, const Tensor& g, int64_t M, const QWeight& W, int threads) {
  force_cpu_variant(v);
  std::vector<uint8_t> out(M * W.K * dtype_bytes(g.dtype) + kGuardBytes, kCanary);
  const AbsmaxSource src = W.source();
  matmul_4bit_t_cpu(g.bytes.data(), g.dtype, M, W.N, W.packed.data(), src, W.K, W.blocksize,
                    W.qt, out.data(), threads);
  reset_cpu_variant();
  return out;
}

// Per variant: cases where it ran its own kernel, and cases where its bytes differed from the
// reference's (a SIMD kernel sums in another order, so some must). Checked at the end of main: a
// variant that never ran, or always gave the reference's bytes (it ran the reference kernel),
// fails instead of passing a comparison of the reference with itself.
int g_own_kernel[kNumCpuVariants] = {}, g_differs_from_ref[kNumCpuVariants] = {}, g_ref_fallbacks = 0;

std::mt19937 g_rng(1234);
std::vector<float> randn(size_t n, float scale) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& f : v) f = d(g_rng);
  return v;
}

// Every variant, against float64 and against the reference, for one weight, dtype and M: the
// forward product y = x W^T (+ bias), or with `transposed` grad_x = g W (reduction over N).
void check_case(const QWeight& W, DType dt, int64_t M, const std::vector<CpuVariant>& variants,
                bool transposed = false) {
  const int64_t N = W.N, K = W.K;
  const int64_t in_len = transposed ? N : K, out_len = transposed ? K : N;  // reduction, outputs
  const Tensor x(dt, randn(M * in_len, 1.0f)), bias(dt, randn(N, 1.0f));
  std::vector<double> dot(M * out_len), S(M * out_len);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < out_len; ++o) {
      double s = 0.0, a = 0.0;
      for (int64_t r = 0; r < in_len; ++r) {
        const double w = transposed ? W.w[r * K + o] : W.w[o * K + r];
        const double p = double(x.values[m * in_len + r]) * w;
        s += p, a += std::fabs(p);
      }
      dot[m * out_len + o] = s, S[m * out_len + o] = a;
    }
  const size_t payload = M * out_len * dtype_bytes(dt);
  // gemv_dispatch.cpp runs the reference kernel for every variant unless rows hold whole blocks
  // (and N > 0 for the transposed product): then a variant is checked to equal it bit for bit and
  // counted as a fallback, not as a check of that variant.
  const bool own_kernels = K > 0 && K % W.blocksize == 0 && (!transposed || N > 0);
  struct Combo { int threads; bool bias; };
  for (const Combo c : {Combo{1, false}, Combo{1, true}, Combo{2, true}, Combo{2, false}}) {
    if (transposed && c.bias) continue;
    const Tensor* b = c.bias ? &bias : nullptr;
    auto go = [&](CpuVariant v) { return transposed ? run_t(v, x, M, W, c.threads) : run(v, x, M, W, b, c.threads); };
    const std::vector<uint8_t> yref = go(CpuVariant::Ref);
    for (CpuVariant v : variants) {
      const bool ref = v == CpuVariant::Ref;
      const std::vector<uint8_t> y = ref ? yref : go(v);
      const std::string what = std::string(transposed ? "matmul_4bit_t " : "") + cpu_variant_name(v) + " M=" +
                               std::to_string(M) + " N=" + std::to_string(N) + " K=" + std::to_string(K) +
                               " bs=" + std::to_string(W.blocksize) + (W.qt == QuantType::NF4 ? " nf4" : " fp4") +
                               (W.dq ? " dq " : " ") + dtype_name(dt) + (c.bias ? " bias" : "") +
                               " threads=" + std::to_string(c.threads);
      const bool bf16_weights = !transposed && v == CpuVariant::AVX512_BF16 && dt == DType::BF16;
      bool ok64 = true, okref = true;
      double worst = 0.0;
      for (int64_t i = 0; i < M * out_len; ++i) {
        const double bv = c.bias ? double(bias.values[i % N]) : 0.0;
        const double y64 = dot[i] + bv;
        const double tol = tolerance(dt, in_len, y64, S[i], bv, bf16_weights);
        const double got = read_out(dt, y, i), want_ref = read_out(dt, yref, i);
        if (!(std::fabs(got - y64) <= tol)) ok64 = false;
        if (!(std::fabs(got - want_ref) <= 2 * tol)) okref = false;
        if (tol > 0) worst = std::max(worst, std::fabs(got - y64) / tol);
      }
      check(ok64, what + " vs float64 (worst err/tol " + std::to_string(worst) + ")");
      check(guard_intact(y, payload), what + " writes past y");
      if (ref) continue;  // the reference itself: float64 above is its check (y is yref)
      const bool same = std::memcmp(y.data(), yref.data(), payload) == 0;
      if (!own_kernels) {
        check(same, what + " (runs the reference kernel here) equals ref");
        ++g_ref_fallbacks;
        continue;
      }
      check(okref, what + " vs ref");
      ++g_own_kernel[static_cast<int>(v)];
      if (!same) ++g_differs_from_ref[static_cast<int>(v)];
    }
  }
}

void test_shapes() {
  const auto variants = supported_variants();
  struct Shape { int64_t N, K; };
  // K % 32 == 0 shapes take the SIMD paths; the last ones (K % blocksize != 0, odd K, rows that
  // start mid-byte, blocks spanning rows) take the reference path whatever the variant.
  // {130, 416} and {300, 224}: more than one 64-row summation run, column strips of 128 plus a
  // partial one (transposed product). {1024, 1024}: 512 KiB of codes, enough for the dispatcher
  // to split rows (and column strips) over 2 threads.
  const Shape shapes[] = {{1, 32}, {3, 64}, {17, 96}, {64, 128}, {100, 4096}, {33, 4160}, {1024, 1024},
                          {130, 416}, {300, 224}, {5, 100}, {7, 33}, {3, 1000}, {9, 4095}};
  const int64_t Ms[] = {1, 2, 3, 8, 17};
  const int64_t blocksizes[] = {32, 64, 128, 4096};
  // NF4LORA_TEST_QUICK (CI's sanitizer job): skip the large shapes, which add run time under
  // ASan but no new code paths.
  const bool quick = std::getenv("NF4LORA_TEST_QUICK") != nullptr;
  for (const Shape s : shapes) {
    if (quick && s.N * s.K > 100000) continue;
    const std::vector<float> src = randn(s.N * s.K, 1.0f);
    for (const int64_t bs : blocksizes) {
      const bool divides = s.K % bs == 0;
      // Aligned shapes: every blocksize that divides K. Others: 64 and 128 (blocks span rows).
      if (s.K % 32 == 0 ? !divides : (bs != 64 && bs != 128)) continue;
      const bool big = s.N * s.K > 100000;
      for (const QuantType qt : kQTypes)
        for (const bool dq : {false, true}) {
          const QWeight W(src, s.N, s.K, bs, qt, dq);
          for (const DType dt : kDTypes)
            for (const int64_t M : Ms) {
              if (big && M != 1 && M != 3 && M != 17 && dt != DType::BF16) continue;  // keeps the run short
              check_case(W, dt, M, variants);
              if (!big || M != 3) check_case(W, dt, M, variants, /*transposed=*/true);
            }
        }
    }
  }
}

// NaN in x poisons its own row of y only; NaN in W (a non-finite block) its own columns only.
void test_nan() {
  const int64_t M = 3, N = 16, K = 128, bs = 64;
  for (CpuVariant v : supported_variants())
    for (const DType dt : kDTypes) {
      std::vector<float> src = randn(N * K, 1.0f);
      const QWeight W(src, N, K, bs, QuantType::NF4, false);
      Tensor x(dt, randn(M * K, 1.0f));
      const std::vector<uint8_t> clean = run(v, x, M, W, nullptr, 1);
      x.set(1 * K + 77, NAN);
      const std::vector<uint8_t> y = run(v, x, M, W, nullptr, 2);
      bool ok = true;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          const float got = read_out(dt, y, m * N + n), want = read_out(dt, clean, m * N + n);
          ok = ok && (m == 1 ? std::isnan(got) : got == want);
        }
      check(ok, std::string("NaN in x row ") + cpu_variant_name(v) + " " + dtype_name(dt));

      // Row 5's first block gets absmax NaN. Plain absmax: double quantization would spread the
      // NaN over its whole nested block of 256 absmax values, i.e. every row here.
      src[5 * K + 10] = INFINITY;
      const QWeight Wn(src, N, K, bs, QuantType::NF4, false);
      Tensor x2(dt, randn(M * K, 1.0f));
      const std::vector<uint8_t> y2 = run(v, x2, M, Wn, nullptr, 1);
      ok = true;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          const float got = read_out(dt, y2, m * N + n);
          ok = ok && (n == 5 ? std::isnan(got) : std::isfinite(got));
        }
      check(ok, std::string("non-finite W block ") + cpu_variant_name(v) + " " + dtype_name(dt));
    }
}

// The transposed product: NaN in a row of g poisons that row of grad_x only; N == 0 gives zeros;
// M == 0 or K == 0 writes nothing; a negative N is named as N.
void test_transposed_edges() {
  const int64_t M = 3, N = 16, K = 256, bs = 64;
  const QWeight W(randn(N * K, 1.0f), N, K, bs, QuantType::NF4, true);
  for (CpuVariant v : supported_variants())
    for (const DType dt : kDTypes) {
      Tensor g(dt, randn(M * N, 1.0f));
      const std::vector<uint8_t> clean = run_t(v, g, M, W, 1);
      g.set(2 * N + 5, NAN);
      const std::vector<uint8_t> out = run_t(v, g, M, W, 2);
      bool ok = true;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < K; ++k) {
          const float got = read_out(dt, out, m * K + k), want = read_out(dt, clean, m * K + k);
          ok = ok && (m == 2 ? std::isnan(got) : got == want);
        }
      check(ok, std::string("matmul_4bit_t NaN in g row ") + cpu_variant_name(v) + " " + dtype_name(dt));
    }
  const AbsmaxSource none;
  std::vector<uint8_t> out(2 * 64 * 4 + kGuardBytes, kCanary);
  matmul_4bit_t_cpu(nullptr, DType::F32, 2, 0, nullptr, none, 64, 64, QuantType::NF4, out.data(), 2);
  bool ok = guard_intact(out, 2 * 64 * 4);
  for (int i = 0; i < 2 * 64; ++i) ok = ok && read_out(DType::F32, out, i) == 0.0f;
  check(ok, "matmul_4bit_t N == 0 gives zeros");
  std::vector<uint8_t> untouched(64, kCanary);
  matmul_4bit_t_cpu(nullptr, DType::F32, 0, 4, nullptr, none, 64, 64, QuantType::NF4, untouched.data(), 1);
  matmul_4bit_t_cpu(nullptr, DType::F32, 2, 4, nullptr, none, 0, 64, QuantType::NF4, untouched.data(), 1);
  check(guard_intact(untouched, 0), "matmul_4bit_t M == 0 / K == 0 are no-ops");
  bool named = false;
  try {
    matmul_4bit_t_cpu(nullptr, DType::F32, 2, -1, nullptr, none, 64, 64, QuantType::NF4, untouched.data(), 1);
  } catch (const std::invalid_argument& e) {
    named = std::string(e.what()).rfind("N must be", 0) == 0;
  }
  check(named, "matmul_4bit_t N < 0 rejected and named");
}

void test_noop_and_k0() {
  const AbsmaxSource none;
  std::vector<uint8_t> y(64, kCanary);
  // M == 0 or N == 0: nothing written, null inputs allowed.
  matmul_4bit_cpu(nullptr, DType::F32, 0, 64, nullptr, none, 4, 64, QuantType::NF4, nullptr, y.data(), 1);
  matmul_4bit_cpu(nullptr, DType::F32, 4, 64, nullptr, none, 0, 64, QuantType::NF4, nullptr, nullptr, 1);
  check(guard_intact(y, 0), "M == 0 is a no-op");
  // K == 0: y = bias (or 0).
  const Tensor bias(DType::BF16, {1.5f, -2.0f, 0.25f});
  std::vector<uint8_t> y2(2 * 3 * 2 + kGuardBytes, kCanary);
  matmul_4bit_cpu(nullptr, DType::BF16, 2, 0, nullptr, none, 3, 64, QuantType::NF4, bias.bytes.data(), y2.data(), 2);
  bool ok = guard_intact(y2, 12);
  for (int i = 0; i < 6; ++i) ok = ok && read_out(DType::BF16, y2, i) == bias.values[i % 3];
  check(ok, "K == 0 gives bias");
}

template <class F>
void expect_invalid(const char* what, F&& f) {
  bool threw = false;
  try {
    f();
  } catch (const std::invalid_argument&) {
    threw = true;
  } catch (...) {
  }
  check(threw, std::string("invalid argument rejected: ") + what);
}

void test_invalid_args() {
  const int64_t N = 4, K = 64;
  std::vector<float> x(2 * K, 1.0f), y(2 * N), absmax(num_blocks(N * K, 64), 1.0f);
  std::vector<uint8_t> packed(N * K / 2, 0x77), q(absmax.size(), 0);
  const float offset = 0.0f, nested = 1.0f;
  AbsmaxSource plain;
  plain.absmax = absmax.data();
  AbsmaxSource dq;
  dq.qabsmax = q.data(), dq.nested_absmax = &nested, dq.nested_code = kDynamicSigned, dq.offset = &offset;
  auto call = [&](const void* xp, DType dt, int64_t M, int64_t k, const uint8_t* p, const AbsmaxSource& a,
                  int64_t n, int64_t bs, QuantType qt, void* yp) {
    return [=, &a] { matmul_4bit_cpu(xp, dt, M, k, p, a, n, bs, qt, nullptr, yp, 1); };
  };
  const auto nf4 = QuantType::NF4;
  expect_invalid("M < 0", call(x.data(), DType::F32, -1, K, packed.data(), plain, N, 64, nf4, y.data()));
  expect_invalid("K < 0", call(x.data(), DType::F32, 2, -1, packed.data(), plain, N, 64, nf4, y.data()));
  expect_invalid("N < 0", call(x.data(), DType::F32, 2, K, packed.data(), plain, -4, 64, nf4, y.data()));
  expect_invalid("blocksize 48", call(x.data(), DType::F32, 2, K, packed.data(), plain, N, 48, nf4, y.data()));
  expect_invalid("blocksize 16", call(x.data(), DType::F32, 2, K, packed.data(), plain, N, 16, nf4, y.data()));
  expect_invalid("quant type 3", call(x.data(), DType::F32, 2, K, packed.data(), plain, N, 64, QuantType(3), y.data()));
  expect_invalid("dtype 7", call(x.data(), DType(7), 2, K, packed.data(), plain, N, 64, nf4, y.data()));
  expect_invalid("null x", call(nullptr, DType::F32, 2, K, packed.data(), plain, N, 64, nf4, y.data()));
  expect_invalid("null packed", call(x.data(), DType::F32, 2, K, nullptr, plain, N, 64, nf4, y.data()));
  expect_invalid("null y", call(x.data(), DType::F32, 2, K, packed.data(), plain, N, 64, nf4, nullptr));
  const AbsmaxSource none;
  expect_invalid("null absmax", call(x.data(), DType::F32, 2, K, packed.data(), none, N, 64, nf4, y.data()));
  AbsmaxSource no_code = dq;
  no_code.nested_code = nullptr;
  expect_invalid("null nested_code", call(x.data(), DType::F32, 2, K, packed.data(), no_code, N, 64, nf4, y.data()));
  AbsmaxSource no_offset = dq;
  no_offset.offset = nullptr;
  expect_invalid("null offset", call(x.data(), DType::F32, 2, K, packed.data(), no_offset, N, 64, nf4, y.data()));
  AbsmaxSource bad_nested = dq;
  bad_nested.nested_blocksize = 100;
  expect_invalid("nested_blocksize 100", call(x.data(), DType::F32, 2, K, packed.data(), bad_nested, N, 64, nf4, y.data()));
  // And the same valid call does not throw.
  bool threw = false;
  try {
    call(x.data(), DType::F32, 2, K, packed.data(), dq, N, 64, nf4, y.data())();
  } catch (...) {
    threw = true;
  }
  check(!threw, "valid double-quant call accepted");
}

// The calibrated choices (set_matmul_cpu_variant, set_matmul_grain_bytes): the variant set
// without forcing is the kernel that runs (same bytes as that variant forced), a forced variant
// wins over it, and the grain changes only how rows/columns are split among threads (bit-equal).
void test_calibrated_choices() {
  const int64_t N = 200, K = 256, M = 3;
  const QWeight W(randn(N * K, 0.05f), N, K, 64, QuantType::NF4, true);
  const Tensor x(DType::BF16, randn(M * K, 1.0f)), g(DType::BF16, randn(M * N, 1.0f));
  auto plain = [&](int threads) {  // no variant forced: whatever the matmul choice is
    std::vector<uint8_t> y(M * N * 2 + kGuardBytes, kCanary), gx(M * K * 2 + kGuardBytes, kCanary);
    const AbsmaxSource src = W.source();
    matmul_4bit_cpu(x.bytes.data(), DType::BF16, M, K, W.packed.data(), src, N, 64, QuantType::NF4, nullptr,
                    y.data(), threads);
    matmul_4bit_t_cpu(g.bytes.data(), DType::BF16, M, N, W.packed.data(), src, K, 64, QuantType::NF4, gx.data(),
                      threads);
    y.insert(y.end(), gx.begin(), gx.end());
    return y;
  };
  auto forced = [&](CpuVariant v) {
    std::vector<uint8_t> y = run(v, x, M, W, nullptr, 2), gx = run_t(v, g, M, W, 2);
    y.insert(y.end(), gx.begin(), gx.end());
    return y;
  };
  check(active_matmul_cpu_variant() == best_cpu_variant(), "the products default to best_cpu_variant()");
  for (CpuVariant v : supported_variants()) {
    set_matmul_cpu_variant(v);
    check(active_matmul_cpu_variant() == v, std::string("matmul variant set to ") + cpu_variant_name(v));
    check(plain(2) == forced(v), std::string("set_matmul_cpu_variant(") + cpu_variant_name(v) +
                                     ") runs that variant's kernels");
    force_cpu_variant(CpuVariant::Ref);
    check(active_matmul_cpu_variant() == CpuVariant::Ref, "a forced variant wins over the matmul choice");
    reset_cpu_variant();
  }
  reset_matmul_cpu_variant();
  check(active_matmul_cpu_variant() == best_cpu_variant(), "reset_matmul_cpu_variant restores the default");
  const std::vector<uint8_t> base = plain(2);
  for (int64_t grain : {int64_t{1024}, int64_t{16} << 10, int64_t{1} << 30}) {
    set_matmul_grain_bytes(grain);
    check(matmul_grain_bytes() == grain, "grain set");
    check(plain(2) == base && plain(1) == base, "grain " + std::to_string(grain) + " gives the same bytes");
  }
  set_matmul_grain_bytes(kMatmulDefaultGrainBytes);
  expect_invalid("grain 512 bytes", [] { set_matmul_grain_bytes(512); });
  expect_invalid("grain 2 GiB", [] { set_matmul_grain_bytes(int64_t{2} << 30); });
  expect_invalid("variant 9", [] { set_matmul_cpu_variant(static_cast<CpuVariant>(9)); });
  for (int i = 0; i < kNumCpuVariants; ++i)
    if (!cpu_variant_supported(static_cast<CpuVariant>(i)))
      expect_invalid("unsupported variant", [i] { set_matmul_cpu_variant(static_cast<CpuVariant>(i)); });
}

}  // namespace

int main() {
  std::printf("variants:");
  for (CpuVariant v : supported_variants()) std::printf(" %s", cpu_variant_name(v));
  std::printf("\n");
  test_invalid_args();
  test_noop_and_k0();
  test_transposed_edges();
  test_nan();
  test_shapes();
  test_calibrated_choices();
  for (CpuVariant v : supported_variants()) {
    if (v == CpuVariant::Ref) continue;
    const int i = static_cast<int>(v);
    std::printf("%s: %d cases on its own kernel (%d not bit-equal to ref)\n", cpu_variant_name(v), g_own_kernel[i],
                g_differs_from_ref[i]);
    check(g_own_kernel[i] > 0, std::string(cpu_variant_name(v)) + " never ran its own kernel");
    check(g_differs_from_ref[i] > 0, std::string(cpu_variant_name(v)) +
                                          " gave the reference's bytes in every case: did it run the reference kernel?");
  }
  std::printf("reference-kernel fallbacks checked (not counted as variant checks): %d\n", g_ref_fallbacks);
  std::printf("test_matmul: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
