// double_quant.h — double quantization of a block-absmax vector for the C++ tests and benchmarks,
// as the Python layer does it (offset = mean, absmax - offset quantized to 8 bits with the signed
// dynamic map, block 256), and the AbsmaxSource that points the kernels at the result. The mean
// here skips non-finite entries and is taken in double (Python uses torch.mean): only the kernels
// under test read it, so its last bit does not matter.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "nf4lora/quantize.h"

namespace nf4lora::test {

struct DoubleQuant {
  std::vector<uint8_t> q;
  std::vector<float> nested_absmax;
  float offset = 0.0f;

  // Buffers are sized on first use only, so that timing build() in a loop measures quantization.
  void build(const float* absmax, int64_t nblocks, int num_threads) {
    double sum = 0.0;
    int64_t finite = 0;
    for (int64_t i = 0; i < nblocks; ++i)
      if (std::isfinite(absmax[i])) sum += absmax[i], ++finite;
    offset = finite ? static_cast<float>(sum / finite) : 0.0f;
    std::vector<float> centered(static_cast<size_t>(nblocks));
    for (int64_t i = 0; i < nblocks; ++i) centered[i] = absmax[i] - offset;
    q.resize(static_cast<size_t>(nblocks));
    nested_absmax.resize(static_cast<size_t>(num_blocks(nblocks, kNestedBlocksize)));
    quantize_8bit_blockwise_cpu(centered.data(), nblocks, kNestedBlocksize, kDynamicSigned, q.data(),
                                nested_absmax.data(), num_threads);
  }

  AbsmaxSource source() const {
    AbsmaxSource s;
    s.qabsmax = q.data();
    s.nested_absmax = nested_absmax.data();
    s.nested_code = kDynamicSigned;
    s.offset = &offset;
    s.nested_blocksize = kNestedBlocksize;
    return s;
  }
};

}  // namespace nf4lora::test
