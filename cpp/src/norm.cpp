// norm.cpp — rms_norm_bf16_cpu and rms_norm_backward_bf16_cpu (nf4lora/norm.h): rows split over
// threads, every fp32 intermediate recomputed from the bf16 row where it is used (no scratch, so
// the workers never allocate). Tested by tests/test_fused_norm.py.
#include <algorithm>
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
  parallel_for(rows, std::max<int64_t>(1, (int64_t{1} << 15) / n), std::max(1, num_threads),
               [&](int64_t r0, int64_t r1) {
                 for (int64_t r = r0; r < r1; ++r)
                   rstd[r] = rms_norm_row_bf16(x + r * n, w, n, eps, sum_lanes, y + r * n);
               });
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
  parallel_for(blocks, 1, std::max(1, num_threads), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* pw = grad_w != nullptr ? partial.data() + b * n : nullptr;
      for (int64_t r = b * kGradWBlock; r < std::min(rows, (b + 1) * kGradWBlock); ++r) {
        const uint16_t* xr = x + r * n;
        const uint16_t* gr = grad_y + r * n;
        const float s = rstd[r];
        // x_hat = x * rstd, g_hat = g * w, each rounded to fp32, as the torch ops hold them
        const auto x_hat = [&](int64_t i) { return bf16_bits_to_float(xr[i]) * s; };
        const auto g_hat = [&](int64_t i) { return bf16_bits_to_float(gr[i]) * wf[i]; };
        if (pw != nullptr)
          for (int64_t i = 0; i < n; ++i) {
            const float gx = bf16_bits_to_float(gr[i]) * x_hat(i);
            pw[i] += gx;
          }
        if (grad_x == nullptr) continue;
        const auto prod = [&](int64_t i) { return g_hat(i) * x_hat(i); };
        const float dot = torch_order_sum(prod, n, sum_lanes) / static_cast<float>(n);
        uint16_t* out = grad_x + r * n;
        for (int64_t i = 0; i < n; ++i) {
          const float t = x_hat(i) * dot;
          out[i] = float_to_bf16_bits((g_hat(i) - t) * s);
        }
      }
    }
  });
  if (grad_w != nullptr)
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t i = 0; i < n; ++i) grad_w[i] += partial[b * n + i];
}

}  // namespace nf4lora
