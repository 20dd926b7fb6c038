// matmul_4bit_ref.cpp — scalar reference of matmul_4bit (y = x W^T) and matmul_4bit_t (y = g W),
// the spec the SIMD variants are tested against; any K (blocks may span rows, rows may start
// mid-byte). Tested by tests/cpp/test_matmul.cpp (against a float64 product).

// W[n, k] = codebook[code(n*K + k)] * absmax(block of n*K + k) in fp32, y[m, n] = (sum over k of
// x[m, k] * W[n, k] in fp32) + bias[n], rounded once to dtype. The sum runs in 16 interleaved
// partial sums (lane k % 16) reduced pairwise, as a SIMD dot product or a dense GEMM does: a
// single running sum loses ~K/16 times more accuracy and would miss the "within 2x of dense
// torch" error rule at K in the thousands. The transposed product out[m, k] = sum over n of
// g[m, n] * W[n, k] sums in 16 lanes over n the same way.
#include "matmul_4bit_kernels.h"

namespace nf4lora::detail {
namespace {

void matmul_4bit_ref(const MatmulArgs& a, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    for (int64_t m = 0; m < a.M; ++m) {
      float lanes[16] = {};
      int64_t cached_block = -1;
      float amax = 0.0f;
      for (int64_t k = 0; k < a.K; ++k) {
        const int64_t i = n * a.K + k;
        const int64_t b = i / a.blocksize;
        if (b != cached_block) amax = block_absmax(*a.absmax, b), cached_block = b;
        const uint8_t byte = a.packed[i / 2];
        const int code = (i % 2 == 0) ? high_nibble(byte) : low_nibble(byte);
        // Separate multiply and add (the target builds with -ffp-contract=off): the plain
        // fp32 dot product a dense matmul would form from the dequantized weight.
        const float w = decode_4bit(a.qt, code, amax);
        lanes[k % 16] += load_as_float(a.x, a.dtype, m * a.K + k) * w;
      }
      for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
      store_matmul_output(a, m, n, lanes[0]);
    }
  }
}

// One output column k at a time: the 4-bit code and absmax of W[n, k] are looked up per element
// (the spec, not fast).
void matmul_4bit_t_ref(const MatmulTArgs& a, int64_t k_begin, int64_t k_end) {
  for (int64_t k = k_begin; k < k_end; ++k)
    for (int64_t m = 0; m < a.M; ++m) {
      float lanes[16] = {};
      for (int64_t n = 0; n < a.N; ++n) {
        const int64_t i = n * a.K + k;
        const uint8_t byte = a.packed[i / 2];
        const int code = (i % 2 == 0) ? high_nibble(byte) : low_nibble(byte);
        const float w = decode_4bit(a.qt, code, block_absmax(*a.absmax, i / a.blocksize));
        lanes[n % 16] += load_as_float(a.g, a.dtype, m * a.N + n) * w;
      }
      for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
      store_from_float(a.out, a.dtype, m * a.K + k, lanes[0]);
    }
}

}  // namespace

const MatmulKernels kMatmulRefKernels = {0, matmul_4bit_ref, matmul_4bit_t_ref, false};

}  // namespace nf4lora::detail
