// nf4lora/decode.h — the 4-bit part of one decode step (one new token) through a Llama decoder
// stack on the CPU, between two attentions: the output projection, residual, RMSNorm, SwiGLU MLP
// and residual of layer i, then the RMSNorm, q/k/v projections, rotary embedding and KV-cache
// write of layer i + 1, with the products split over one team of threads (no thread wake-up and
// no Python between those operations), in one call or in segments (for LoRA terms added between
// them). The attention itself stays the caller's (torch's scaled_dot_product_attention over the
// cache). bf16 activations. Implemented in cpp/src/decode_llama.cpp; tested by
// tests/test_generate.py (every logit bit-equal to the same layers run by torch, over quant types,
// blocksizes, head layouts, thread counts and LoRA adapters).
//
// Roundings follow transformers' LlamaDecoderLayer run in bf16 by torch, operation by operation:
// RMSNorm sums the squares in fp32 in torch's vectorized order (lanes = torch's fp32 vector
// width), divides by the size, adds eps, multiplies by 1 / sqrt, rounds to bf16, multiplies by the
// bf16 weight and rounds; each elementwise product and sum of bf16 tensors is one fp32 operation
// rounded to bf16; the projections are matmul_4bit_cpu's kernels (same kernel, same bits).
#pragma once

#include <cstdint>

#include "nf4lora/quantize.h"

namespace nf4lora {

// One 4-bit weight W [N, K] as quantize_4bit packs it (row-major over the flat index).
struct Weight4bitView {
  const uint8_t* packed = nullptr;
  AbsmaxSource absmax;
  int64_t N = 0, K = 0, blocksize = 0;
  QuantType qt = QuantType::NF4;
};

// One decoder layer. Norm weights are bf16 [hidden]; the caches bf16 [kv_heads, max_len,
// head_dim], contiguous; position p of kv head j starts at (j * max_len + p) * head_dim.
struct LlamaLayer4bit {
  const uint16_t* input_norm = nullptr;
  const uint16_t* post_norm = nullptr;
  Weight4bitView q, k, v, o, gate, up, down;
  uint16_t* k_cache = nullptr;
  uint16_t* v_cache = nullptr;
};

struct LlamaDecodeShape {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, intermediate = 0, max_len = 0;
  float norm_eps = 1e-5f;
  int sum_lanes = 8;  // lanes of torch's fp32 sum kernel (8 on x86, AVX-512 CPUs included)
};

// Throws std::invalid_argument naming the first inconsistent field (shapes of every projection,
// kv_heads dividing heads, even head_dim, null pointers, sum_lanes 4, 8 or 16).
void check_llama_decode(const LlamaDecodeShape& s, const LlamaLayer4bit* layers, int64_t n_layers);

// What happens between the attentions of layer i and layer i + 1, in segments, in this order (the
// first four finish layer i given its attention output att, bf16 [heads * head_dim] head-major; the
// last two start layer i + 1):
enum class LlamaDecodeSegment : int {
  kOProj = 0,     // o = att Wo^T
  kGateUp = 1,    // h += o; x = RMSNorm(h); g = x Wg^T; u = x Wu^T
  kDown = 2,      // m = silu(g) * u; o = m Wd^T
  kResidual = 3,  // h += o
  kQkv = 4,       // x = RMSNorm(h); q, k, v = x Wq^T, x Wk^T, x Wv^T
  kRope = 5,      // rotary embedding of q and k; k and v written at position pos of the caches
};

// The activations the segments hand each other (bf16), kept by the caller between calls.
struct LlamaDecodeBuffers {
  uint16_t* x = nullptr;  // [hidden]: the input of q/k/v, and of gate/up
  uint16_t* o = nullptr;  // [hidden]: o_proj's output, then down_proj's
  uint16_t* g = nullptr;  // [intermediate]
  uint16_t* u = nullptr;  // [intermediate]
  uint16_t* m = nullptr;  // [intermediate]: down_proj's input
  uint16_t* q = nullptr;  // [heads * head_dim]
  uint16_t* k = nullptr;  // [kv_heads * head_dim]
  uint16_t* v = nullptr;  // [kv_heads * head_dim]
};

// Segments first .. last from layer `layer` (-1: kQkv and kRope only, the first layer's start;
// the last layer: up to kResidual) on one team of at most num_threads threads (one without
// OpenMP). h: bf16 [hidden], the residual stream, in and out; cos, sin: bf16 [head_dim] of position
// pos (kRope). The caller may change the buffers between two calls: a LoRA term added to a
// projection's output (o after kOProj or kDown, g and u after kGateUp, q, k and v after kQkv)
// enters the next segment as it enters the next operation of the model; after kRope, q is the
// layer's rotated query. Checks the layers it touches as check_llama_decode does, first <= last,
// 0 <= pos < max_len and that every pointer the segments use is non-null (buffer sizes are the
// caller's promise).
void llama_decode_segments_cpu(const LlamaDecodeShape& s, const LlamaLayer4bit* layers, int64_t n_layers,
                               int64_t layer, LlamaDecodeSegment first, LlamaDecodeSegment last,
                               const uint16_t* att, uint16_t* h, const uint16_t* cos, const uint16_t* sin,
                               int64_t pos, const LlamaDecodeBuffers& buf, int num_threads);

}  // namespace nf4lora
