// test_util.h — the tiny check framework the C++ tests share (no test library needed): pass/fail
// counters, names for dtypes and quant types, and the lists the tests loop over.
#pragma once

#include <cstddef>
#include <cstdio>
#include <string>

#include "nf4lora/format.h"

namespace nf4lora::test {

inline int g_passed = 0, g_failed = 0;

// Counts one check; prints the first 30 failures.
inline void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
    return;
  }
  if (++g_failed <= 30) std::printf("FAIL: %s\n", what.c_str());
}

inline const char* dtype_name(DType d) { return d == DType::F32 ? "f32" : d == DType::F16 ? "f16" : "bf16"; }
inline const char* qt_name(QuantType q) { return q == QuantType::NF4 ? "nf4" : "fp4"; }
inline size_t dtype_bytes(DType d) { return d == DType::F32 ? 4 : 2; }

constexpr DType kDTypes[] = {DType::F32, DType::F16, DType::BF16};
constexpr QuantType kQTypes[] = {QuantType::NF4, QuantType::FP4};

}  // namespace nf4lora::test
