// norm.cpp — rms_norm_bf16_cpu and rms_norm_backward_bf16_cpu (nf4lora/norm.h): rows split over
// threads; each row in one pass over fp32 scratch. Tested by tests/test_fused_norm.py.
#include <algorithm>
#include <atomic>
#include <initializer_list>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "nf4lora/detail/checks.h"
#include "nf4lora/detail/parallel.h"
#include "nf4lora/format.h"
#include "nf4lora/norm.h"
#include "torch_order.h"

namespace nf4lora {
namespace {

using namespace detail;

constexpr int64_t kGradWBlock = 64;  // rows per partial sum of grad_w

// A worker's fp32 scratch rows of n floats. parallel_for's workers must not throw: a failed
// allocation sets the flag (the caller throws std::bad_alloc after the loop) and returns false.
bool scratch(int64_t n, std::initializer_list<std::vector<float>*> rows, std::atomic<bool>& out_of_memory) {
  try {
    for (auto* r : rows) r->resize(static_cast<size_t>(n));
    return true;
  } catch (const std::bad_alloc&) {
    out_of_memory = true;
    return false;
  }
}

void check_norm_args(const void* x, const void* w, int64_t rows, int64_t n, int sum_lanes) {
  if (rows < 0 || n <= 0)
    throw std::invalid_argument("rms_norm: rows must be >= 0 and n > 0, got " + std::to_string(rows) + " and " +
                                std::to_string(n));
  if (sum_lanes != 4 && sum_lanes != 8 && sum_lanes != 16)
    throw std::invalid_argument("rms_norm: sum_lanes must be 4, 8 or 16, got " + std::to_string(sum_lanes));
  if (rows > 0) {
    check_ptr(x, "x");
    check_ptr(w, "weight");
  }
}

}  // namespace

void rms_norm_bf16_cpu(const uint16_t* x, const uint16_t* w, int64_t rows, int64_t n, float eps, int sum_lanes,
                       uint16_t* y, float* rstd, int num_threads) {
  check_norm_args(x, w, rows, n, sum_lanes);
  if (rows == 0) return;
  check_ptr(y, "y");
  check_ptr(rstd, "rstd");
  // ~64 KiB of activations per thread before a second one is woken
  std::atomic<bool> out_of_memory{false};
  parallel_for(rows, std::max<int64_t>(1, (int64_t{1} << 15) / n), std::max(1, num_threads),
               [&](int64_t r0, int64_t r1) {
                 std::vector<float> xf, sq;
                 if (!scratch(n, {&xf, &sq}, out_of_memory)) return;
                 for (int64_t r = r0; r < r1; ++r)
                   rstd[r] = rms_norm_row_bf16(x + r * n, w, n, eps, sum_lanes, xf.data(), sq.data(), y + r * n);
               });
  if (out_of_memory) throw std::bad_alloc();
}

void rms_norm_backward_bf16_cpu(const uint16_t* x, const uint16_t* w, const float* rstd, const uint16_t* grad_y,
                                int64_t rows, int64_t n, int sum_lanes, uint16_t* grad_x, float* grad_w,
                                int num_threads) {
  check_norm_args(x, w, rows, n, sum_lanes);
  if (grad_w != nullptr) std::fill(grad_w, grad_w + n, 0.0f);
  if (rows == 0) return;
  check_ptr(rstd, "rstd");
  check_ptr(grad_y, "grad_y");
  const int64_t blocks = (rows + kGradWBlock - 1) / kGradWBlock;
  std::vector<float> partial(grad_w != nullptr ? static_cast<size_t>(blocks * n) : 0, 0.0f);
  std::vector<float> wf(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) wf[i] = bf16_bits_to_float(w[i]);
  std::atomic<bool> out_of_memory{false};
  parallel_for(blocks, 1, std::max(1, num_threads), [&](int64_t b0, int64_t b1) {
    std::vector<float> xh, gh, prod;
    if (!scratch(n, {&xh, &gh, &prod}, out_of_memory)) return;
    for (int64_t b = b0; b < b1; ++b) {
      float* pw = grad_w != nullptr ? partial.data() + b * n : nullptr;
      for (int64_t r = b * kGradWBlock; r < std::min(rows, (b + 1) * kGradWBlock); ++r) {
        const uint16_t* xr = x + r * n;
        const uint16_t* gr = grad_y + r * n;
        const float s = rstd[r];
        for (int64_t i = 0; i < n; ++i) {
          const float g = bf16_bits_to_float(gr[i]);
          xh[i] = bf16_bits_to_float(xr[i]) * s;
          gh[i] = g * wf[i];
          prod[i] = gh[i] * xh[i];
          if (pw != nullptr) {
            const float gx = g * xh[i];
            pw[i] += gx;
          }
        }
        if (grad_x == nullptr) continue;
        const float dot = torch_order_sum(prod.data(), n, sum_lanes) / static_cast<float>(n);
        uint16_t* out = grad_x + r * n;
        for (int64_t i = 0; i < n; ++i) {
          const float t = xh[i] * dot;
          out[i] = float_to_bf16_bits((gh[i] - t) * s);
        }
      }
    }
  });
  if (out_of_memory) throw std::bad_alloc();
  if (grad_w != nullptr)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t i = 0; i < n; ++i) grad_w[i] += partial[b * n + i];
}

}  // namespace nf4lora
