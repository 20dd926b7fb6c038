// nf4lora/detail/checks.h — argument validation shared by the CPU entry points
// (cpp/src/*dispatch.cpp) and the CUDA ones (cuda/*.cu), so both reject bad input with the same
// std::invalid_argument messages, each naming the argument. Internal (nf4lora::detail), not API.
// Tested through tests/cpp/test_{core,matmul,optim}.cpp and the Python tests.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "nf4lora/format.h"
#include "nf4lora/quantize.h"

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

// Where a 4-bit weight's block scales come from: plain fp32, or the double-quantized triple.
inline void check_absmax_source(const AbsmaxSource& absmax) {
  if (absmax.nested()) {
    check_ptr(absmax.nested_absmax, "nested_absmax");
    check_ptr(absmax.nested_code, "nested_code");
    check_ptr(absmax.offset, "offset");
    check_blocksize_8bit(absmax.nested_blocksize);
  } else {
    check_ptr(absmax.absmax, "absmax");
  }
}

// The checks of each public entry point, CPU and CUDA alike. Each returns false when n == 0
// (nothing to do; null pointers are then allowed) and throws on anything invalid.
inline bool check_quantize_4bit_args(const void* x, DType x_dtype, int64_t n, int64_t blocksize,
                                     QuantType qt, const void* packed, const void* absmax) {
  check_n(n);
  check_blocksize_4bit(blocksize);
  check_qt(qt);
  check_dtype(x_dtype, "x_dtype");
  if (n == 0) return false;
  check_ptr(x, "x");
  check_ptr(packed, "packed");
  check_ptr(absmax, "absmax");
  return true;
}

inline bool check_dequantize_4bit_args(const void* packed, const AbsmaxSource& absmax, int64_t n,
                                       int64_t blocksize, QuantType qt, const void* out,
                                       DType out_dtype) {
  check_n(n);
  check_blocksize_4bit(blocksize);
  check_qt(qt);
  check_dtype(out_dtype, "out_dtype");
  if (n == 0) return false;
  check_ptr(packed, "packed");
  check_ptr(out, "out");
  check_absmax_source(absmax);
  return true;
}

// Both directions of the 8-bit path: `floats` is x when quantizing and out when dequantizing.
inline bool check_blockwise_8bit_args(const void* floats, const char* floats_name, int64_t n,
                                      int64_t blocksize, const void* code, const void* q,
                                      const void* absmax) {
  check_n(n);
  check_blocksize_8bit(blocksize);
  if (n == 0) return false;
  check_ptr(floats, floats_name);
  check_ptr(code, "code");
  check_ptr(q, "q");
  check_ptr(absmax, "absmax");
  return true;
}


// matmul_4bit on the CPU and CUDA (matmul_4bit_t with its own sizes in the roles of M, K, N):
// returns false when there is nothing to compute (M == 0 or N == 0; null pointers are then
// allowed) and throws on anything invalid. With K == 0 the result is bias (or 0), so x and
// packed may be null.
inline bool check_matmul_4bit_args(const void* x, DType dtype, int64_t M, int64_t K,
                                   const void* packed, const AbsmaxSource& absmax, int64_t N,
                                   int64_t blocksize, QuantType qt, const void* y) {
  if (M < 0) throw std::invalid_argument("M must be >= 0, got " + std::to_string(M));
  if (K < 0) throw std::invalid_argument("K must be >= 0, got " + std::to_string(K));
  if (N < 0) throw std::invalid_argument("N must be >= 0, got " + std::to_string(N));
  check_blocksize_4bit(blocksize);
  check_qt(qt);
  check_dtype(dtype, "dtype");
  if (M == 0 || N == 0) return false;
  check_ptr(y, "y");
  if (K == 0) return true;
  check_ptr(x, "x");
  check_ptr(packed, "packed");
  check_absmax_source(absmax);
  return true;
}

// The optimizer steps (AdamW, Lion; CPU and CUDA), after their hyperparameters: n and the param
// dtype, then (unless n == 0: nothing to do, returns false) each pointer given, named as the
// Python state keys.
inline bool check_optim_step_args(int64_t n, DType dtype,
                                  std::initializer_list<std::pair<const void*, const char*>> pointers) {
  check_n(n);
  check_dtype(dtype, "dtype");
  if (n == 0) return false;
  for (const auto& [p, name] : pointers) check_ptr(p, name);
  return true;
}

}  // namespace nf4lora::detail
