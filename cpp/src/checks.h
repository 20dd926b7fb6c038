// checks.h — argument validation shared by the CPU entry points (dispatch.cpp) and the CUDA ones
// (cuda/quantize.cu), so both reject bad input with the same std::invalid_argument messages,
// each naming the argument. Internal; tested through tests/cpp/test_core.cpp and the Python tests.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "nf4lora/format.h"

namespace nf4lora::detail {

inline void check_blocksize_4bit(int64_t blocksize) {
  if (!valid_blocksize(blocksize))
    throw std::invalid_argument("blocksize must be a power of two in [32, 4096], got " +
                                std::to_string(blocksize));
}
inline void check_blocksize_8bit(int64_t blocksize) {
  if (!is_pow2(blocksize) || blocksize < 16 || blocksize > 4096)
    throw std::invalid_argument("8-bit blocksize must be a power of two in [16, 4096], got " +
                                std::to_string(blocksize));
}
inline void check_n(int64_t n) {
  if (n < 0) throw std::invalid_argument("element count n must be >= 0, got " + std::to_string(n));
}
inline void check_ptr(const void* p, const char* name) {
  if (p == nullptr) throw std::invalid_argument(std::string(name) + " must not be null");
}
inline void check_qt(QuantType qt) {
  if (qt != QuantType::NF4 && qt != QuantType::FP4)
    throw std::invalid_argument("quant_type must be NF4 (2) or FP4 (1)");
}
inline void check_dtype(DType dt, const char* name) {
  if (dt != DType::F32 && dt != DType::F16 && dt != DType::BF16)
    throw std::invalid_argument(std::string(name) + " must be float32, float16 or bfloat16");
}

}  // namespace nf4lora::detail
