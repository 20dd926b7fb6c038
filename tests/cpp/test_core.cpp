// test_core.cpp — C++ tests of the native CPU core, no framework: every CPU variant this machine
// supports is forced in turn and must equal the scalar reference (Ref) bit for bit — packed
// codes, absmax, non-finite counts, dequantized outputs — over awkward sizes, every blocksize,
// every dtype, NF4/FP4, plain and double-quantized absmax and edge-case data; plus argument
// validation and table invariants. Run by ctest; exits nonzero on any failure.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "nf4lora/format.h"
#include "nf4lora/quantize.h"
#include "double_quant.h"  // nf4lora_testsupport (tests/cpp/support/)
#include "test_util.h"

#if defined(__SSE2__)
#include <xmmintrin.h>
#define NF4LORA_TEST_MXCSR 1
#endif

using namespace nf4lora;
using namespace nf4lora::test;

namespace {


// A byte buffer whose payload starts at a chosen alignment (64 B, or 64 B + skew) and is
// followed by a canary region, so that out-of-bounds writes are caught.
class Buffer {
 public:
  static constexpr size_t kGuard = 128;
  static constexpr uint8_t kCanary = 0xA5;
  Buffer(size_t bytes, size_t skew = 0) : bytes_(bytes), raw_(bytes + kGuard + 64 + skew, kCanary) {
    const uintptr_t base = reinterpret_cast<uintptr_t>(raw_.data());
    offset_ = ((64 - base % 64) % 64) + skew;
  }
  uint8_t* data() { return raw_.data() + offset_; }
  const uint8_t* data() const { return raw_.data() + offset_; }
  size_t size() const { return bytes_; }
  bool guard_intact() const {
    for (size_t i = 0; i < kGuard; ++i)
      if (raw_[offset_ + bytes_ + i] != kCanary) return false;
    return true;
  }
  void fill(uint8_t v) { std::memset(data(), v, bytes_); }

 private:
  size_t bytes_;
  std::vector<uint8_t> raw_;
  size_t offset_ = 0;
};

// ---- test data (fp32 source values, converted to each input dtype) ---------------------------

enum class Kind { Normal, Ties, Zeros, NonFinite, Denormal, Huge, NegZero, Mixed };
constexpr Kind kKinds[] = {Kind::Normal, Kind::Ties,    Kind::Zeros,   Kind::NonFinite,
                           Kind::Denormal, Kind::Huge, Kind::NegZero, Kind::Mixed};
const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Normal: return "normal";
    case Kind::Ties: return "ties";
    case Kind::Zeros: return "zeros";
    case Kind::NonFinite: return "nonfinite";
    case Kind::Denormal: return "denormal";
    case Kind::Huge: return "huge";
    case Kind::NegZero: return "negzero";
    case Kind::Mixed: return "mixed";
  }
  return "?";
}

std::vector<float> make_data(Kind kind, int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> v(static_cast<size_t>(n));
  float chunk_scale = 1.0f;
  for (int64_t i = 0; i < n; ++i) {
    float x = normal(rng);
    switch (kind) {
      case Kind::Normal: break;
      case Kind::Ties: {
        // Every 32-element chunk starts with +-2^k, so each block's absmax is a power of two and
        // x * (1 / absmax) lands exactly on thresholds, their fp32 neighbours and codebook values.
        if (i % 32 == 0) {
          chunk_scale = std::ldexp(1.0f, pick(rng) % 21 - 10);
          x = (pick(rng) & 1) ? chunk_scale : -chunk_scale;
          break;
        }
        const QuantType qt = (pick(rng) & 1) ? QuantType::NF4 : QuantType::FP4;
        const int j = pick(rng) % 15;
        float base;
        switch (pick(rng) % 4) {
          case 0: base = threshold(qt, j); break;
          case 1: base = std::nextafter(threshold(qt, j), inf); break;
          case 2: base = std::nextafter(threshold(qt, j), -inf); break;
          default: base = codebook_value(qt, j); break;
        }
        x = base * chunk_scale;
        break;
      }
      case Kind::Zeros: x = 0.0f; break;
      case Kind::NonFinite: {
        const int r = pick(rng) % 600;
        if (r == 0) x = nan;
        else if (r == 1) x = inf;
        else if (r == 2) x = -inf;
        else if (r == 3) x = -nan;
        break;
      }
      case Kind::Denormal:
        // fp32/bf16 subnormals, and fp16 subnormals (below 2^-14) for half inputs.
        x *= (i / 64) % 2 ? 1e-39f : 3e-6f;
        break;
      case Kind::Huge: x *= 1e37f; break;
      case Kind::NegZero: {
        const int r = pick(rng) % 4;
        x = r == 0 ? -0.0f : r == 1 ? 0.0f : r == 2 ? x * 1e-3f : -0.0f;
        break;
      }
      case Kind::Mixed: {
        // Per-64-element scales from subnormal to near FLT_MAX, with a few specials.
        static constexpr float kScales[] = {1e-40f, 1e-20f, 6e-5f, 1.0f, 300.0f, 7e4f, 1e30f, 3e37f};
        if (i % 64 == 0) chunk_scale = kScales[pick(rng) % 8];
        x *= chunk_scale;
        const int r = pick(rng) % 4000;
        if (r == 0) x = -0.0f;
        else if (r == 1) x = nan;
        else if (r == 2) x = 1.0f;
        break;
      }
    }
    v[static_cast<size_t>(i)] = x;
  }
  return v;
}

void convert_to(const std::vector<float>& src, DType dt, uint8_t* dst) {
  for (size_t i = 0; i < src.size(); ++i) {
    if (dt == DType::F32) {
      std::memcpy(dst + 4 * i, &src[i], 4);
    } else {
      const uint16_t h = dt == DType::F16 ? float_to_half_bits(src[i]) : float_to_bf16_bits(src[i]);
      std::memcpy(dst + 2 * i, &h, 2);
    }
  }
}

// ---- one quantize + dequantize comparison ------------------------------------------------------

struct QuantResult {
  int64_t nonfinite = 0;
  Buffer packed, absmax;
  QuantResult(int64_t n, int64_t bs)
      : packed(static_cast<size_t>(packed_bytes(n))), absmax(static_cast<size_t>(num_blocks(n, bs)) * 4) {}
};

DoubleQuant make_nested(const float* absmax, int64_t nblocks) {
  DoubleQuant r;
  r.build(absmax, nblocks, 1);
  return r;
}

int64_t first_diff(const uint8_t* a, const uint8_t* b, size_t bytes) {
  if (std::memcmp(a, b, bytes) == 0) return -1;
  for (size_t i = 0; i < bytes; ++i)
    if (a[i] != b[i]) return static_cast<int64_t>(i);
  return -1;
}

std::vector<CpuVariant> fast_variants() {
  std::vector<CpuVariant> v;
  for (CpuVariant c : {CpuVariant::AVX2, CpuVariant::AVX512})
    if (cpu_variant_supported(c)) v.push_back(c);
  return v;
}

struct Case {
  int64_t n, bs;
  Kind kind;
  uint64_t seed;
  std::vector<DType> in_dtypes{std::begin(kDTypes), std::end(kDTypes)};
  std::vector<QuantType> qtypes{std::begin(kQTypes), std::end(kQTypes)};
  bool skewed_out = false;  // also dequantize into outputs one element and 16 bytes off a 64-byte line
  bool flush_denormals = false;  // run the kernels with MXCSR FTZ + DAZ (torch.set_flush_denormal)
};

// Sets FTZ + DAZ for its lifetime when asked (x86 only), restoring the caller's MXCSR.
class DenormalsFlushed {
 public:
  explicit DenormalsFlushed(bool on) {
#if defined(NF4LORA_TEST_MXCSR)
    saved_ = _mm_getcsr();
    if (on) _mm_setcsr(saved_ | 0x8040u);  // FTZ (bit 15) | DAZ (bit 6)
#else
    (void)on;
#endif
  }
  ~DenormalsFlushed() {
#if defined(NF4LORA_TEST_MXCSR)
    _mm_setcsr(saved_);
#endif
  }
  DenormalsFlushed(const DenormalsFlushed&) = delete;
  DenormalsFlushed& operator=(const DenormalsFlushed&) = delete;

 private:
  unsigned saved_ = 0;
};

void run_case(const Case& c, const std::vector<CpuVariant>& variants) {
  const std::vector<float> src = make_data(c.kind, c.n, c.seed);
  const int64_t nblocks = num_blocks(c.n, c.bs);
  for (DType in_dt : c.in_dtypes) {
    Buffer x(static_cast<size_t>(c.n) * dtype_bytes(in_dt));
    convert_to(src, in_dt, x.data());
    const DenormalsFlushed mode(c.flush_denormals);  // after the conversion: it must not flush
    for (QuantType qt : c.qtypes) {
      char tag[160];
      std::snprintf(tag, sizeof tag, "n=%lld bs=%lld in=%s %s data=%s%s", (long long)c.n,
                    (long long)c.bs, dtype_name(in_dt), qt_name(qt), kind_name(c.kind),
                    c.flush_denormals ? " ftz+daz" : "");
      force_cpu_variant(CpuVariant::Ref);
      QuantResult ref(c.n, c.bs);
      ref.nonfinite = quantize_4bit_cpu(x.data(), in_dt, c.n, c.bs, qt, ref.packed.data(),
                                        reinterpret_cast<float*>(ref.absmax.data()), 1);
      const float* ref_absmax = reinterpret_cast<const float*>(ref.absmax.data());
      const DoubleQuant nested = make_nested(ref_absmax, nblocks);
      AbsmaxSource plain;
      plain.absmax = ref_absmax;

      // Reference dequantizations, per output dtype and absmax source. The dequantize kernels
      // never see the input dtype, so past small n one input dtype covers all output dtypes
      // (keeps the scalar reference, the slow part of this test, to a few seconds).
      const bool all_out = c.n <= 4097 || in_dt == c.in_dtypes.front();
      std::vector<DType> out_dts = all_out ? std::vector<DType>(std::begin(kDTypes), std::end(kDTypes))
                                           : std::vector<DType>{in_dt};
      std::vector<Buffer> ref_out;
      for (DType out_dt : out_dts)
        for (int nest = 0; nest < 2; ++nest) {
          ref_out.emplace_back(static_cast<size_t>(c.n) * dtype_bytes(out_dt));
          dequantize_4bit_cpu(ref.packed.data(), nest ? nested.source() : plain, c.n, c.bs, qt,
                              ref_out.back().data(), out_dt, 1);
        }

      for (CpuVariant v : variants) {
        force_cpu_variant(v);
        for (int threads : {1, 2}) {
          const std::string where = std::string(cpu_variant_name(v)) + " threads=" +
                                    std::to_string(threads) + " " + tag;
          QuantResult got(c.n, c.bs);
          got.nonfinite = quantize_4bit_cpu(x.data(), in_dt, c.n, c.bs, qt, got.packed.data(),
                                            reinterpret_cast<float*>(got.absmax.data()), threads);
          const int64_t dp = first_diff(got.packed.data(), ref.packed.data(), got.packed.size());
          check(dp < 0, "quantize packed differs at byte " + std::to_string(dp) + ": " + where);
          const int64_t da = first_diff(got.absmax.data(), ref.absmax.data(), got.absmax.size());
          check(da < 0, "quantize absmax differs at block " + std::to_string(da / 4) + ": " + where);
          check(got.nonfinite == ref.nonfinite,
                "quantize non-finite count " + std::to_string(got.nonfinite) + " vs ref " +
                    std::to_string(ref.nonfinite) + ": " + where);
          check(got.packed.guard_intact() && got.absmax.guard_intact(),
                "quantize wrote past the end: " + where);

          size_t k = 0;
          for (DType out_dt : out_dts)
            for (int nest = 0; nest < 2; ++nest, ++k) {
              // Off the vector alignment by one element (a float* 2 bytes off would be UB) and by 16.
              const size_t elem = dtype_bytes(out_dt);
              for (size_t skew : c.skewed_out ? std::vector<size_t>{0, elem, 16} : std::vector<size_t>{0}) {
                Buffer out(static_cast<size_t>(c.n) * dtype_bytes(out_dt), skew);
                out.fill(0x5A);
                dequantize_4bit_cpu(ref.packed.data(), nest ? nested.source() : plain, c.n, c.bs,
                                    qt, out.data(), out_dt, threads);
                const std::string w2 = where + " out=" + dtype_name(out_dt) +
                                       (nest ? " nested" : " plain") + " skew=" + std::to_string(skew);
                const int64_t d = first_diff(out.data(), ref_out[k].data(), out.size());
                check(d < 0, "dequantize differs at element " +
                                 std::to_string(d < 0 ? d : d / int64_t(dtype_bytes(out_dt))) + ": " + w2);
                check(out.guard_intact(), "dequantize wrote past the end: " + w2);
              }
            }
        }
      }
      reset_cpu_variant();
    }
  }
}

// ---- the remaining checks -------------------------------------------------------------------

template <class Fn>
void expect_invalid(const std::string& what, Fn&& fn) {
  bool threw = false;
  try {
    fn();
  } catch (const std::invalid_argument&) {
    threw = true;
  } catch (...) {
  }
  check(threw, "expected std::invalid_argument: " + what);
}

void test_invalid_arguments() {
  std::vector<float> x(256, 1.0f), absmax(16, 1.0f), out(256);
  std::vector<uint8_t> packed(128);
  AbsmaxSource plain;
  plain.absmax = absmax.data();
  const QuantType nf4 = QuantType::NF4;
  for (int64_t bs : {48, 16, 8192, 0, -64}) {
    expect_invalid("quantize blocksize " + std::to_string(bs), [&] {
      quantize_4bit_cpu(x.data(), DType::F32, 256, bs, nf4, packed.data(), absmax.data(), 1);
    });
    expect_invalid("dequantize blocksize " + std::to_string(bs), [&] {
      dequantize_4bit_cpu(packed.data(), plain, 256, bs, nf4, out.data(), DType::F32, 1);
    });
  }
  expect_invalid("quantize n < 0", [&] {
    quantize_4bit_cpu(x.data(), DType::F32, -1, 64, nf4, packed.data(), absmax.data(), 1);
  });
  expect_invalid("dequantize n < 0", [&] {
    dequantize_4bit_cpu(packed.data(), plain, -1, 64, nf4, out.data(), DType::F32, 1);
  });
  expect_invalid("quantize x null", [&] {
    quantize_4bit_cpu(nullptr, DType::F32, 256, 64, nf4, packed.data(), absmax.data(), 1);
  });
  expect_invalid("quantize packed null", [&] {
    quantize_4bit_cpu(x.data(), DType::F32, 256, 64, nf4, nullptr, absmax.data(), 1);
  });
  expect_invalid("quantize absmax null", [&] {
    quantize_4bit_cpu(x.data(), DType::F32, 256, 64, nf4, packed.data(), nullptr, 1);
  });
  expect_invalid("quantize bad quant type", [&] {
    quantize_4bit_cpu(x.data(), DType::F32, 256, 64, static_cast<QuantType>(3), packed.data(),
                      absmax.data(), 1);
  });
  expect_invalid("quantize bad dtype", [&] {
    quantize_4bit_cpu(x.data(), static_cast<DType>(7), 256, 64, nf4, packed.data(), absmax.data(), 1);
  });
  expect_invalid("dequantize packed null", [&] {
    dequantize_4bit_cpu(nullptr, plain, 256, 64, nf4, out.data(), DType::F32, 1);
  });
  expect_invalid("dequantize out null", [&] {
    dequantize_4bit_cpu(packed.data(), plain, 256, 64, nf4, nullptr, DType::F32, 1);
  });
  expect_invalid("dequantize absmax null", [&] {
    dequantize_4bit_cpu(packed.data(), AbsmaxSource{}, 256, 64, nf4, out.data(), DType::F32, 1);
  });
  std::vector<uint8_t> q(16);
  float offset = 0.0f;
  AbsmaxSource nested;
  nested.qabsmax = q.data();
  nested.nested_code = kDynamicSigned;
  nested.offset = &offset;
  expect_invalid("dequantize nested_absmax null", [&] {
    dequantize_4bit_cpu(packed.data(), nested, 256, 64, nf4, out.data(), DType::F32, 1);
  });
  expect_invalid("8-bit quantize blocksize 8192", [&] {
    quantize_8bit_blockwise_cpu(x.data(), 256, 8192, kDynamicSigned, q.data(), absmax.data(), 1);
  });
  expect_invalid("force_cpu_variant(unknown)", [&] { force_cpu_variant(static_cast<CpuVariant>(9)); });
  // n == 0 is valid and touches nothing, even with null pointers.
  bool ok = true;
  try {
    check(quantize_4bit_cpu(nullptr, DType::F32, 0, 64, nf4, nullptr, nullptr, 1) == 0, "n == 0 quantize returns 0");
    dequantize_4bit_cpu(nullptr, AbsmaxSource{}, 0, 64, nf4, nullptr, DType::F32, 1);
  } catch (...) {
    ok = false;
  }
  check(ok, "n == 0 must not throw");
}

void test_tables() {
  bool nf4_sorted = true, thr_sorted = true, fp4_sorted = true, perm = true, dyn_sorted = true;
  for (int i = 0; i + 1 < 16; ++i) nf4_sorted = nf4_sorted && kNF4Codebook[i] < kNF4Codebook[i + 1];
  for (QuantType qt : kQTypes)
    for (int i = 0; i + 1 < 15; ++i) thr_sorted = thr_sorted && threshold(qt, i) < threshold(qt, i + 1);
  for (int i = 0; i + 1 < 16; ++i)
    fp4_sorted = fp4_sorted && kFP4Codebook[kFP4Ascending[i]] <= kFP4Codebook[kFP4Ascending[i + 1]];
  int seen = 0;
  for (int i = 0; i < 16; ++i) seen |= 1 << kFP4Ascending[i];
  perm = seen == 0xffff;
  for (int i = 0; i + 1 < 256; ++i) dyn_sorted = dyn_sorted && kDynamicSigned[i] < kDynamicSigned[i + 1];
  check(nf4_sorted, "NF4 codebook strictly increasing");
  check(thr_sorted, "NF4/FP4 thresholds strictly increasing");
  check(fp4_sorted, "FP4 codebook ascending in kFP4Ascending order");
  check(perm, "kFP4Ascending is a permutation of 0..15");
  check(dyn_sorted, "dynamic signed map strictly increasing");
  check(kNF4Codebook[7] == 0.0f && kNF4Codebook[0] == -1.0f && kNF4Codebook[15] == 1.0f, "NF4 endpoints");
  // Each codebook value encodes to its own code (FP4's -0 is the one value that shares +0's).
  for (QuantType qt : kQTypes)
    for (int c = 0; c < 16; ++c) {
      if (qt == QuantType::FP4 && c == 8) continue;
      check(encode_4bit(qt, codebook_value(qt, c)) == c,
            std::string("encode(codebook[") + std::to_string(c) + "]) == code, " + qt_name(qt));
    }
}

void test_zero_blocks() {
  const int64_t n = 4096 + 65;
  std::vector<CpuVariant> variants = fast_variants();
  variants.push_back(CpuVariant::Ref);
  for (CpuVariant v : variants) {
    force_cpu_variant(v);
    for (DType in_dt : kDTypes)
      for (QuantType qt : kQTypes)
        for (int64_t bs : {32, 64, 4096}) {
          std::vector<float> src(n, 0.0f);
          for (int64_t i = 0; i < n; i += 3) src[i] = -0.0f;
          Buffer x(n * dtype_bytes(in_dt));
          convert_to(src, in_dt, x.data());
          QuantResult q(n, bs);
          const int64_t bad = quantize_4bit_cpu(x.data(), in_dt, n, bs, qt, q.packed.data(),
                                                reinterpret_cast<float*>(q.absmax.data()), 1);
          const std::string where = std::string(cpu_variant_name(v)) + " in=" + dtype_name(in_dt) +
                                    " " + qt_name(qt) + " bs=" + std::to_string(bs);
          check(bad == 0, "zero blocks are finite: " + where);
          bool absmax_zero = true;
          for (int64_t b = 0; b < num_blocks(n, bs); ++b)
            absmax_zero = absmax_zero && reinterpret_cast<const float*>(q.absmax.data())[b] == 0.0f;
          check(absmax_zero, "zero blocks have absmax 0: " + where);
          AbsmaxSource plain;
          plain.absmax = reinterpret_cast<const float*>(q.absmax.data());
          for (DType out_dt : kDTypes) {
            Buffer out(n * dtype_bytes(out_dt));
            out.fill(0x5A);
            dequantize_4bit_cpu(q.packed.data(), plain, n, bs, qt, out.data(), out_dt, 1);
            bool zeros = true;
            for (int64_t i = 0; i < n; ++i) {
              float val;
              if (out_dt == DType::F32) {
                std::memcpy(&val, out.data() + 4 * i, 4);
              } else {
                uint16_t h;
                std::memcpy(&h, out.data() + 2 * i, 2);
                val = out_dt == DType::F16 ? half_bits_to_float(h) : bf16_bits_to_float(h);
              }
              zeros = zeros && val == 0.0f;
            }
            check(zeros, std::string("all-zero blocks dequantize to 0: ") + where + " out=" + dtype_name(out_dt));
          }
        }
  }
  reset_cpu_variant();
}

}  // namespace

int main() {
  std::printf("test_core: CPU variants supported:");
  for (int v = 0; v < kNumCpuVariants; ++v)
    if (cpu_variant_supported(static_cast<CpuVariant>(v)))
      std::printf(" %s", cpu_variant_name(static_cast<CpuVariant>(v)));
  std::printf(" (best: %s)\n", cpu_variant_name(best_cpu_variant()));

  test_tables();
  test_invalid_arguments();
  test_zero_blocks();

  const std::vector<CpuVariant> variants = fast_variants();
  if (variants.empty()) std::printf("test_core: no SIMD variant supported here; Ref-only checks ran\n");
  uint64_t seed = 1;
  for (int64_t n : {1, 2, 3, 31, 33, 63, 64, 65, 127, 4097, 7 * 13, 100003})
    for (int64_t bs = kMinBlocksize; bs <= kMaxBlocksize; bs *= 2)
      for (Kind kind : kKinds) {
        Case c{n, bs, kind, seed++};
        // The largest of these rotates the first input dtype (the one dequantized to every
        // output dtype) instead of repeating the full product.
        if (n > 4097) std::rotate(c.in_dtypes.begin(), c.in_dtypes.begin() + seed % 3, c.in_dtypes.end());
        run_case(c, variants);
      }
  // Large: two threads really split the work (dispatch gives each thread >= 64K elements).
  for (int64_t bs : {64, 4096})
    for (Kind kind : {Kind::Normal, Kind::NonFinite, Kind::Mixed})
      run_case({(int64_t{1} << 18) + 33, bs, kind, seed++}, variants);
  // Flush-to-zero / denormals-are-zero mode, which torch users can switch on.
  for (int64_t bs : {32, 64, 4096})
    for (Kind kind : {Kind::Denormal, Kind::Mixed, Kind::Normal}) {
      Case c{4097, bs, kind, seed++};
      c.flush_denormals = true;
      run_case(c, variants);
    }
  // Outputs past the streaming-store size (8 MB): line-aligned, 16-byte aligned, misaligned.
  const int64_t big = (int64_t{4} << 20) + 97;
  run_case({big, 64, Kind::Normal, seed++, {DType::BF16}, {QuantType::NF4}, true}, variants);
  run_case({big, 32, Kind::Normal, seed++, {DType::F32}, {QuantType::FP4}, true}, variants);
  run_case({big + 4000, 4096, Kind::Mixed, seed++, {DType::F16}, {QuantType::NF4}, true}, variants);

  std::printf("test_core: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
