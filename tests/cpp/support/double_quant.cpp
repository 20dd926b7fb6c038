// double_quant.cpp — in nf4lora_testsupport: DoubleQuant (double_quant.h), the double quantization
// python/nf4lora/functional.py does, for the C++ tests and benchmarks. A fixture; the Python tests
// check the real double quantization against bitsandbytes.
#include "double_quant.h"

#include <cmath>

namespace nf4lora::test {

void DoubleQuant::build(const float* absmax, int64_t nblocks, int num_threads) {
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

AbsmaxSource DoubleQuant::source() const {
  AbsmaxSource s;
  s.qabsmax = q.data();
  s.nested_absmax = nested_absmax.data();
  s.nested_code = kDynamicSigned;
  s.offset = &offset;
  s.nested_blocksize = kNestedBlocksize;
  return s;
}

}  // namespace nf4lora::test
