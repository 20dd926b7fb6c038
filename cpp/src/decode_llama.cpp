// decode_llama.cpp — llama_decode_segments_cpu (nf4lora/decode.h): the 4-bit part of one decode
// step of a Llama decoder stack, between two attentions, on one team of threads.
//
// All six segments finish layer i given its attention output and start layer i + 1, phases
// separated by barriers (M: thread 0 alone, small elementwise work; P: split over the team):
//   kOProj     P  o = att Wo^T
//   kGateUp    M  h += o; x = RMSNorm(h)         P  g, u = x Wg^T, x Wu^T
//   kDown      P  m = silu(g) * u (ranges split) P  d = m Wd^T
//   kResidual  M  h += d
//   kQkv       M  x = RMSNorm(h) (layer i + 1)   P  q, k, v = x Wq^T, x Wk^T, x Wv^T
//   kRope      M  rotary embedding of q and k; k, v written at pos
// One call runs a range of them in one team region: all six without adapters, shorter ranges when
// the caller adds LoRA terms to the buffers in between.
// The products are matmul_4bit_cpu's kernels (forward_kernels), each thread grouping x into its
// own scratch and computing whole units of 8 rows, so every output row is the same computation as
// in a matmul_4bit_cpu call: same bits. Results move between threads only through the shared
// buffers, which the barriers order.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "matmul_4bit_kernels.h"
#include "nf4lora/decode.h"
#include "nf4lora/detail/checks.h"
#include "nf4lora/detail/parallel.h"
#include "nf4lora/format.h"
#include "torch_order.h"

namespace nf4lora {
namespace {

using namespace detail;

inline float bf(uint16_t b) { return bf16_bits_to_float(b); }
inline uint16_t rb(float f) { return float_to_bf16_bits(f); }

constexpr int64_t kRowUnit = 8;  // rows per work unit, as matmul_4bit_cpu hands them out

// silu(x) = x / (1 + exp(-x)) for every bf16 x, computed in fp32 from a correctly rounded
// exp and rounded to bf16: torch's bf16 silu (fp32 arithmetic, Sleef's exp within 1 ulp) gives
// the same bf16 for every one of the 65,536 inputs (tests/test_generate.py checks that premise;
// glibc's expf alone differed in a few). Built once, on first use (thread-safe static init).
const uint16_t* silu_bf16_table() {
  static const std::vector<uint16_t> table = [] {
    std::vector<uint16_t> t(65536);
    for (uint32_t b = 0; b < 65536; ++b) {
      const float x = bf(static_cast<uint16_t>(b));
      const float e = static_cast<float>(std::exp(-static_cast<double>(x)));
      t[b] = rb(x / (1.0f + e));
    }
    return t;
  }();
  return table.data();
}

// q * cos + rotate_half(q) * sin over one head (rotate_half(q) = cat(-q2, q1)), each product and
// the sum rounded to bf16 as torch computes them.
void rope(uint16_t* q, const uint16_t* cos, const uint16_t* sin, int64_t hd) {
  const int64_t half = hd / 2;
  alignas(64) float in[512];
  for (int64_t d = 0; d < hd; ++d) in[d] = bf(q[d]);
  for (int64_t d = 0; d < hd; ++d) {
    const float rot = d < half ? -in[d + half] : in[d - half];
    const float a = bf(rb(in[d] * bf(cos[d])));
    const float b = bf(rb(rot * bf(sin[d])));
    q[d] = rb(a + b);
  }
}

// The kernels of one projection and what it reads and writes.
struct Product {
  const Weight4bitView* w;
  const MatmulKernels* k;
  const uint16_t* x;  // bf16 [K]
  uint16_t* y;        // bf16 [N]
};

// This thread's share of the rows of `count` products (units of kRowUnit rows over all of them),
// each computed as matmul_4bit_cpu computes it (x grouped for the kernel in this thread's scratch
// xf / xb, room for the widest K).
void run_products(const Team& t, const Product* p, int count, float* xf, uint16_t* xb) {
  int64_t total = 0;
  for (int i = 0; i < count; ++i) total += (p[i].w->N + kRowUnit - 1) / kRowUnit;
  const auto [u0, u1] = t.share(total);
  int64_t first = 0;  // first unit of product i
  for (int i = 0; i < count; ++i) {
    const Weight4bitView& w = *p[i].w;
    const int64_t units = (w.N + kRowUnit - 1) / kRowUnit;
    const int64_t b = std::max(u0, first) - first, e = std::min(u1, first + units) - first;
    first += units;
    if (b >= e) continue;
    const MatmulKernels& k = *p[i].k;
    MatmulArgs a{p[i].x, nullptr, nullptr, DType::BF16, 1, w.K, w.N, w.packed, &w.absmax,
                 w.blocksize, w.qt, nullptr, p[i].y};
    if (k.x_bf16) {
      group_x_bf16(p[i].x, w.K, 1, k.x_group, xb);
      a.xb = xb;
    } else if (k.x_group > 0) {
      group_x_f32(p[i].x, DType::BF16, w.K, 0, 1, k.x_group, xf);
      a.xf = xf;
    }
    k.rows(a, b * kRowUnit, std::min(w.N, e * kRowUnit));
  }
}

// "layer i field" for messages: built only when a check fails (the checks run on every call).
std::string field_name(int64_t layer, const char* field) {
  return "layer " + std::to_string(layer) + " " + field;
}

void check_layer_ptr(const void* p, int64_t layer, const char* field) {
  if (p == nullptr) throw std::invalid_argument(field_name(layer, field) + " must not be null");
}

void check_weight(const Weight4bitView& w, int64_t N, int64_t K, int64_t layer, const char* field) {
  if (w.N != N || w.K != K)
    throw std::invalid_argument(field_name(layer, field) + ": expected a [" + std::to_string(N) + ", " +
                                std::to_string(K) + "] weight, got [" + std::to_string(w.N) + ", " +
                                std::to_string(w.K) + "]");
  if (w.packed == nullptr) throw std::invalid_argument(field_name(layer, field) + ".packed must not be null");
  check_blocksize_4bit(w.blocksize);
  check_qt(w.qt);
  check_absmax_source(w.absmax);
}

void check_decode_shape(const LlamaDecodeShape& s) {
  auto positive = [](int64_t v, const char* name) {
    if (v <= 0) throw std::invalid_argument(std::string(name) + " must be > 0, got " + std::to_string(v));
  };
  positive(s.hidden, "hidden");
  positive(s.heads, "heads");
  positive(s.kv_heads, "kv_heads");
  positive(s.head_dim, "head_dim");
  positive(s.intermediate, "intermediate");
  positive(s.max_len, "max_len");
  if (s.head_dim % 2 != 0 || s.head_dim > 512)
    throw std::invalid_argument("head_dim must be even and at most 512, got " + std::to_string(s.head_dim));
  if (s.heads % s.kv_heads != 0)
    throw std::invalid_argument("kv_heads (" + std::to_string(s.kv_heads) + ") must divide heads (" +
                                std::to_string(s.heads) + ")");
  if (s.sum_lanes != 4 && s.sum_lanes != 8 && s.sum_lanes != 16)
    throw std::invalid_argument("sum_lanes must be 4, 8 or 16, got " + std::to_string(s.sum_lanes));
  if (!(s.norm_eps >= 0.0f)) throw std::invalid_argument("norm_eps must be >= 0");
}

void check_layer(const LlamaDecodeShape& s, const LlamaLayer4bit& l, int64_t i) {
  const int64_t qd = s.heads * s.head_dim, kvd = s.kv_heads * s.head_dim;
  check_layer_ptr(l.input_norm, i, "input_norm");
  check_layer_ptr(l.post_norm, i, "post_norm");
  check_layer_ptr(l.k_cache, i, "k_cache");
  check_layer_ptr(l.v_cache, i, "v_cache");
  check_weight(l.q, qd, s.hidden, i, "q_proj");
  check_weight(l.k, kvd, s.hidden, i, "k_proj");
  check_weight(l.v, kvd, s.hidden, i, "v_proj");
  check_weight(l.o, s.hidden, qd, i, "o_proj");
  check_weight(l.gate, s.intermediate, s.hidden, i, "gate_proj");
  check_weight(l.up, s.intermediate, s.hidden, i, "up_proj");
  check_weight(l.down, s.hidden, s.intermediate, i, "down_proj");
}

}  // namespace

void check_llama_decode(const LlamaDecodeShape& s, const LlamaLayer4bit* layers, int64_t n_layers) {
  check_decode_shape(s);
  if (n_layers < 1) throw std::invalid_argument("n_layers must be >= 1, got " + std::to_string(n_layers));
  check_ptr(layers, "layers");
  for (int64_t i = 0; i < n_layers; ++i) check_layer(s, layers[i], i);
}

namespace {

using Seg = LlamaDecodeSegment;

bool finishes(Seg first) { return first <= Seg::kResidual; }
bool starts(Seg last) { return last >= Seg::kQkv; }

// Checks a call of segments first .. last from `layer`: the layers it touches, first <= last within
// the layers that exist, pos, and every pointer the segments use.
void check_segments(const LlamaDecodeShape& s, const LlamaLayer4bit* layers, int64_t n_layers, int64_t layer,
                    Seg first, Seg last, const uint16_t* att, const uint16_t* h, const uint16_t* cos,
                    const uint16_t* sin, int64_t pos, const LlamaDecodeBuffers& b) {
  check_decode_shape(s);
  if (n_layers < 1) throw std::invalid_argument("n_layers must be >= 1, got " + std::to_string(n_layers));
  check_ptr(layers, "layers");
  if (layer < -1 || layer >= n_layers)
    throw std::invalid_argument("layer must be in [-1, " + std::to_string(n_layers) + "), got " +
                                std::to_string(layer));
  if (first < Seg::kOProj || last > Seg::kRope || first > last)
    throw std::invalid_argument("segments must satisfy kOProj <= first <= last <= kRope, got " +
                                std::to_string(static_cast<int>(first)) + ".." +
                                std::to_string(static_cast<int>(last)));
  if (finishes(first)) {
    if (layer < 0) throw std::invalid_argument("layer -1 has no segment before kQkv");
    check_layer(s, layers[layer], layer);
    if (first == Seg::kOProj) check_ptr(att, "att");
  }
  if (first <= Seg::kGateUp || last >= Seg::kResidual) check_ptr(h, "h");
  if (starts(last)) {
    if (layer + 1 >= n_layers)
      throw std::invalid_argument("layer " + std::to_string(layer) + " is the last: no segment after kResidual");
    check_layer(s, layers[layer + 1], layer + 1);
  }
  if (last == Seg::kRope) {
    check_ptr(cos, "cos");
    check_ptr(sin, "sin");
    if (pos < 0 || pos >= s.max_len)
      throw std::invalid_argument("pos must be in [0, max_len = " + std::to_string(s.max_len) + "), got " +
                                  std::to_string(pos));
  }
  auto in = [&](Seg seg) { return first <= seg && seg <= last; };
  if (finishes(first)) check_ptr(b.o, "buffers.o");
  if (in(Seg::kGateUp) || in(Seg::kQkv)) check_ptr(b.x, "buffers.x");
  if (in(Seg::kGateUp) || in(Seg::kDown)) {
    check_ptr(b.g, "buffers.g");
    check_ptr(b.u, "buffers.u");
  }
  if (in(Seg::kDown)) check_ptr(b.m, "buffers.m");
  if (in(Seg::kQkv) || in(Seg::kRope)) {
    check_ptr(b.q, "buffers.q");
    check_ptr(b.k, "buffers.k");
    check_ptr(b.v, "buffers.v");
  }
}

// Segments first .. last (checked) on one team: phases separated by barriers, M phases on thread 0.
void run_segments(const LlamaDecodeShape& s, const LlamaLayer4bit* layers, int64_t layer, Seg first, Seg last,
                  const uint16_t* att, uint16_t* h, const uint16_t* cos, const uint16_t* sin, int64_t pos,
                  const LlamaDecodeBuffers& b, int num_threads) {
  const int64_t H = s.hidden, I = s.intermediate, hd = s.head_dim, qd = s.heads * hd;
  auto in = [&](Seg seg) { return first <= seg && seg <= last; };
  const MatmulKernels* kt[7] = {};  // layer's o, gate, up, down; the next layer's q, k, v
  if (finishes(first)) {
    const LlamaLayer4bit& L = layers[layer];
    const Weight4bitView* w[4] = {&L.o, &L.gate, &L.up, &L.down};
    for (int j = 0; j < 4; ++j) kt[j] = &forward_kernels(DType::BF16, w[j]->K, w[j]->blocksize);
  }
  if (in(Seg::kQkv)) {
    const LlamaLayer4bit& N = layers[layer + 1];
    const Weight4bitView* w[3] = {&N.q, &N.k, &N.v};
    for (int j = 0; j < 3; ++j) kt[4 + j] = &forward_kernels(DType::BF16, w[j]->K, w[j]->blocksize);
  }
  // Every thread's scratch for grouped x, allocated here so that nothing allocates (or throws)
  // inside the parallel region.
  const int threads = std::max(1, num_threads);
  const size_t widest = static_cast<size_t>(std::max({H, I, qd}));
  std::vector<float> xf_all(widest * threads);
  std::vector<uint16_t> xb_all(widest * threads);
  const uint16_t* silu = in(Seg::kDown) ? silu_bf16_table() : nullptr;  // built on first use, here

  parallel_team(threads, [&](const Team& t) {
    float* xf = xf_all.data() + widest * t.tid;
    uint16_t* xb = xb_all.data() + widest * t.tid;
    for (int seg = static_cast<int>(first); seg <= static_cast<int>(last); ++seg) {
      if (seg != static_cast<int>(first)) t.barrier();  // the previous segment's outputs are complete
      switch (static_cast<Seg>(seg)) {
        case Seg::kOProj: {
          const Product op[1] = {{&layers[layer].o, kt[0], att, b.o}};
          run_products(t, op, 1, xf, xb);
          break;
        }
        case Seg::kGateUp: {
          const LlamaLayer4bit& L = layers[layer];
          if (t.tid == 0) {
            for (int64_t i = 0; i < H; ++i) h[i] = rb(bf(h[i]) + bf(b.o[i]));
            rms_norm_row_bf16(h, L.post_norm, H, s.norm_eps, s.sum_lanes, b.x);
          }
          t.barrier();
          const Product gu[2] = {{&L.gate, kt[1], b.x, b.g}, {&L.up, kt[2], b.x, b.u}};
          run_products(t, gu, 2, xf, xb);
          break;
        }
        case Seg::kDown: {
          const auto [i0, i1] = t.share(I);
          for (int64_t i = i0; i < i1; ++i) b.m[i] = rb(bf(silu[b.g[i]]) * bf(b.u[i]));
          t.barrier();
          const Product dp[1] = {{&layers[layer].down, kt[3], b.m, b.o}};
          run_products(t, dp, 1, xf, xb);
          break;
        }
        case Seg::kResidual:
          if (t.tid == 0)
            for (int64_t i = 0; i < H; ++i) h[i] = rb(bf(h[i]) + bf(b.o[i]));
          break;
        case Seg::kQkv: {
          const LlamaLayer4bit& N = layers[layer + 1];
          if (t.tid == 0) rms_norm_row_bf16(h, N.input_norm, H, s.norm_eps, s.sum_lanes, b.x);
          t.barrier();
          const Product qkv[3] = {{&N.q, kt[4], b.x, b.q}, {&N.k, kt[5], b.x, b.k}, {&N.v, kt[6], b.x, b.v}};
          run_products(t, qkv, 3, xf, xb);
          break;
        }
        case Seg::kRope:
          if (t.tid == 0) {
            const LlamaLayer4bit& N = layers[layer + 1];
            for (int64_t hh = 0; hh < s.heads; ++hh) rope(b.q + hh * hd, cos, sin, hd);
            for (int64_t j = 0; j < s.kv_heads; ++j) {
              rope(b.k + j * hd, cos, sin, hd);
              std::copy_n(b.k + j * hd, hd, N.k_cache + (j * s.max_len + pos) * hd);
              std::copy_n(b.v + j * hd, hd, N.v_cache + (j * s.max_len + pos) * hd);
            }
          }
          break;
      }
    }
  });
}

}  // namespace

void llama_decode_segments_cpu(const LlamaDecodeShape& s, const LlamaLayer4bit* layers, int64_t n_layers,
                               int64_t layer, LlamaDecodeSegment first, LlamaDecodeSegment last,
                               const uint16_t* att, uint16_t* h, const uint16_t* cos, const uint16_t* sin,
                               int64_t pos, const LlamaDecodeBuffers& buf, int num_threads) {
  check_segments(s, layers, n_layers, layer, first, last, att, h, cos, sin, pos, buf);
  run_segments(s, layers, layer, first, last, att, h, cos, sin, pos, buf, num_threads);
}

}  // namespace nf4lora
