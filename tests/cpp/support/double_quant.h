// double_quant.h — in nf4lora_testsupport (tests/cpp/support/), the library the C++ tests and
// benchmarks link: double quantization of a block-absmax vector as python/nf4lora/functional.py
// does it, and the AbsmaxSource that points the kernels at the result. A fixture, not itself under
// test: the Python tests check the real double quantization against bitsandbytes.
#pragma once

#include <cstdint>
#include <vector>

#include "nf4lora/quantize.h"

namespace nf4lora::test {

// offset = mean of the finite absmax entries, then absmax - offset quantized to 8 bits with the
// signed dynamic map, block kNestedBlocksize (256). The mean is taken in double (Python uses
// torch.mean): only the kernels under test read it, so its last bit does not matter.
struct DoubleQuant {
  std::vector<uint8_t> q;
  std::vector<float> nested_absmax;
  float offset = 0.0f;

  // Buffers are sized on first use only, so that timing build() in a loop measures quantization.
  void build(const float* absmax, int64_t nblocks, int num_threads);
  AbsmaxSource source() const;
};

}  // namespace nf4lora::test
