// bindings.cpp — the one pybind11 module, nf4lora._C: a thin layer over the torch-free core.
// Tensors cross as raw addresses (int) plus sizes and dtype codes; shape/dtype/device checks
// happen once in python/nf4lora/ops/ (native.py, checks.py). C++ std::invalid_argument arrives as ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "nf4lora/decode.h"
#include "nf4lora/format.h"
#include "nf4lora/matmul.h"
#include "nf4lora/memory.h"
#include "nf4lora/norm.h"
#include "nf4lora/optim.h"
#include "nf4lora/quantize.h"

namespace py = pybind11;
using namespace nf4lora;

namespace {

template <class T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

QuantType quant_type(int qt) { return static_cast<QuantType>(qt); }
DType dtype(int dt) { return static_cast<DType>(dt); }

AbsmaxSource absmax_source(uintptr_t absmax, uintptr_t qabsmax, uintptr_t nested_absmax,
                           uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize) {
  AbsmaxSource a;
  a.absmax = ptr<const float>(absmax);
  a.qabsmax = ptr<const uint8_t>(qabsmax);
  a.nested_absmax = ptr<const float>(nested_absmax);
  a.nested_code = ptr<const float>(nested_code);
  a.offset = ptr<const float>(offset);
  a.nested_blocksize = nested_blocksize;
  return a;
}

CpuVariant variant_from_name(const std::string& name) {
  for (int v = 0; v < kNumCpuVariants; ++v)
    if (name == cpu_variant_name(static_cast<CpuVariant>(v))) return static_cast<CpuVariant>(v);
  throw py::value_error("unknown CPU variant '" + name + "' (expected ref, avx2, avx512 or avx512_bf16)");
}

// nf4lora/decode.h's step over layers and buffers whose addresses were given once. Per layer, the ints in the
// order: input_norm, post_norm, k_cache, v_cache, then for q, k, v, o, gate,
// up and down each: packed, absmax, qabsmax, nested_absmax, nested_code, offset,
// nested_blocksize, N, K, blocksize, quant type. The Python owner keeps the tensors alive.
constexpr int kWeightFields = 11;
constexpr int kLayerFields = 4 + 7 * kWeightFields;

struct LlamaDecoder {
  LlamaDecodeShape shape;
  std::vector<LlamaLayer4bit> layers;
  LlamaDecodeBuffers buffers;  // the Python owner's tensors, given once
};

Weight4bitView weight_view(const std::vector<int64_t>& f, int at) {
  Weight4bitView w;
  w.packed = ptr<const uint8_t>(static_cast<uintptr_t>(f[at]));
  w.absmax = absmax_source(f[at + 1], f[at + 2], f[at + 3], f[at + 4], f[at + 5], f[at + 6]);
  w.N = f[at + 7];
  w.K = f[at + 8];
  w.blocksize = f[at + 9];
  w.qt = quant_type(static_cast<int>(f[at + 10]));
  return w;
}

template <size_t N>
std::vector<float> table(const float (&values)[N]) {
  return std::vector<float>(values, values + N);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nf4lora native core (torch-free kernels behind raw-pointer bindings)";
  using gil = py::call_guard<py::gil_scoped_release>;

  m.attr("QUANT_TYPE_FP4") = static_cast<int>(QuantType::FP4);
  m.attr("QUANT_TYPE_NF4") = static_cast<int>(QuantType::NF4);
  m.attr("DTYPE_F32") = static_cast<int>(DType::F32);
  m.attr("DTYPE_F16") = static_cast<int>(DType::F16);
  m.attr("DTYPE_BF16") = static_cast<int>(DType::BF16);
  m.attr("MIN_BLOCKSIZE") = kMinBlocksize;
  m.attr("MAX_BLOCKSIZE") = kMaxBlocksize;
  m.attr("DEFAULT_BLOCKSIZE") = kDefaultBlocksize;
  m.attr("NESTED_BLOCKSIZE") = kNestedBlocksize;
  m.attr("BUILD_INFO") = NF4LORA_BUILD_INFO;

  m.def("nf4_codebook", [] { return table(kNF4Codebook); });
  m.def("fp4_codebook", [] { return table(kFP4Codebook); });
  m.def("dynamic_map", [](bool is_signed) {
    return is_signed ? table(kDynamicSigned) : table(kDynamicUnsigned);
  }, py::arg("signed") = true);
  m.def("thresholds", [](int qt) {
    std::vector<float> t(15);
    for (int i = 0; i < 15; ++i) t[i] = threshold(quant_type(qt), i);
    return t;
  });
  m.def("fp4_ascending", [] { return std::vector<int>(kFP4Ascending, kFP4Ascending + 16); });

  m.def("cpu_variants", [] {
    std::vector<std::tuple<std::string, bool, bool>> out;
    for (int v = 0; v < kNumCpuVariants; ++v) {
      auto cv = static_cast<CpuVariant>(v);
      out.emplace_back(cpu_variant_name(cv), cpu_variant_compiled(cv), cpu_variant_supported(cv));
    }
    return out;
  }, "[(name, compiled, supported)] for every CPU kernel variant");
  m.def("best_cpu_variant", [] { return std::string(cpu_variant_name(best_cpu_variant())); });
  m.def("active_cpu_variant", [] { return std::string(cpu_variant_name(active_cpu_variant())); });
  m.def("force_cpu_variant", [](py::object name) {
    if (name.is_none()) reset_cpu_variant();
    else force_cpu_variant(variant_from_name(name.cast<std::string>()));
  }, py::arg("name"), "Force a CPU variant by name for later calls; None restores automatic choice");
  m.def("set_matmul_cpu_variant", [](py::object name) {
    if (name.is_none()) reset_matmul_cpu_variant();
    else set_matmul_cpu_variant(variant_from_name(name.cast<std::string>()));
  }, py::arg("name"), "The CPU products' variant when none is forced; None restores the default");
  m.def("active_matmul_cpu_variant", [] {
    return std::string(cpu_variant_name(active_matmul_cpu_variant()));
  });
  m.def("set_matmul_grain_bytes", &set_matmul_grain_bytes, py::arg("bytes"));
  m.def("matmul_grain_bytes", &matmul_grain_bytes);
  m.def("advise_huge_pages", [](uintptr_t address, int64_t nbytes) {
    return advise_huge_pages(ptr<void>(address), nbytes);
  }, "madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior of a fresh host buffer");
  m.def("has_cuda", &cuda_compiled, "True when the CUDA kernels were compiled into this build");

  m.def("quantize_4bit_cpu",
        [](uintptr_t x, int x_dtype, int64_t n, int64_t blocksize, int qt, uintptr_t packed,
           uintptr_t absmax, int num_threads) {
          return quantize_4bit_cpu(ptr<const void>(x), dtype(x_dtype), n, blocksize,
                                   quant_type(qt), ptr<uint8_t>(packed), ptr<float>(absmax),
                                   num_threads);
        }, gil());
  m.def("dequantize_4bit_cpu",
        [](uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax, uintptr_t nested_absmax,
           uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize, int64_t n,
           int64_t blocksize, int qt, uintptr_t out, int out_dtype, int num_threads) {
          dequantize_4bit_cpu(ptr<const uint8_t>(packed),
                              absmax_source(absmax, qabsmax, nested_absmax, nested_code, offset,
                                            nested_blocksize),
                              n, blocksize, quant_type(qt), ptr<void>(out), dtype(out_dtype),
                              num_threads);
        }, gil());
  // nf4lora/matmul.h: matmul_4bit (y = x W^T) and matmul_4bit_t (y = g W, its backward).
  m.def("matmul_4bit_cpu",
        [](uintptr_t x, int x_dtype, int64_t M, int64_t K, uintptr_t packed, uintptr_t absmax,
           uintptr_t qabsmax, uintptr_t nested_absmax, uintptr_t nested_code, uintptr_t offset,
           int64_t nested_blocksize, int64_t N, int64_t blocksize, int qt, uintptr_t bias,
           uintptr_t y, int num_threads) {
          matmul_4bit_cpu(ptr<const void>(x), dtype(x_dtype), M, K, ptr<const uint8_t>(packed),
                          absmax_source(absmax, qabsmax, nested_absmax, nested_code, offset,
                                        nested_blocksize),
                          N, blocksize, quant_type(qt), ptr<const void>(bias), ptr<void>(y),
                          num_threads);
        }, gil());
  // nf4lora/norm.h: RMSNorm over bf16 rows, forward and backward.
  m.def("rms_norm_bf16_cpu",
        [](uintptr_t x, uintptr_t w, int64_t rows, int64_t n, float eps, int sum_lanes, uintptr_t y, uintptr_t rstd,
           int num_threads) {
          rms_norm_bf16_cpu(ptr<const uint16_t>(x), ptr<const uint16_t>(w), rows, n, eps, sum_lanes, ptr<uint16_t>(y),
                            ptr<float>(rstd), num_threads);
        }, gil());
  m.def("rms_norm_backward_bf16_cpu",
        [](uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t grad_y, int64_t rows, int64_t n, int sum_lanes,
           uintptr_t grad_x, uintptr_t grad_w, int num_threads) {
          rms_norm_backward_bf16_cpu(ptr<const uint16_t>(x), ptr<const uint16_t>(w), ptr<const float>(rstd),
                                     ptr<const uint16_t>(grad_y), rows, n, sum_lanes, ptr<uint16_t>(grad_x),
                                     ptr<float>(grad_w), num_threads);
        }, gil());
  py::class_<LlamaDecoder>(m, "LlamaDecoder")
      .def(py::init([](int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate,
                       int64_t max_len, float norm_eps, int sum_lanes,
                       const std::vector<std::vector<int64_t>>& fields, const std::vector<uintptr_t>& buffers) {
             if (buffers.size() != 8) throw py::value_error("buffers: expected x, o, g, u, m, q, k, v");
             LlamaDecoder d;
             d.shape = LlamaDecodeShape{hidden, heads, kv_heads, head_dim, intermediate, max_len,
                                        norm_eps, sum_lanes};
             for (size_t i = 0; i < fields.size(); ++i) {
               const auto& f = fields[i];
               if (f.size() != static_cast<size_t>(kLayerFields))
                 throw py::value_error("layer " + std::to_string(i) + ": expected " +
                                       std::to_string(kLayerFields) + " fields, got " + std::to_string(f.size()));
               LlamaLayer4bit l;
               l.input_norm = ptr<const uint16_t>(static_cast<uintptr_t>(f[0]));
               l.post_norm = ptr<const uint16_t>(static_cast<uintptr_t>(f[1]));
               l.k_cache = ptr<uint16_t>(static_cast<uintptr_t>(f[2]));
               l.v_cache = ptr<uint16_t>(static_cast<uintptr_t>(f[3]));
               Weight4bitView* w[7] = {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down};
               for (int j = 0; j < 7; ++j) *w[j] = weight_view(f, 4 + j * kWeightFields);
               d.layers.push_back(l);
             }
             check_llama_decode(d.shape, d.layers.data(), static_cast<int64_t>(d.layers.size()));
             uint16_t** b[8] = {&d.buffers.x, &d.buffers.o, &d.buffers.g, &d.buffers.u,
                                &d.buffers.m, &d.buffers.q, &d.buffers.k, &d.buffers.v};
             for (int j = 0; j < 8; ++j) *b[j] = ptr<uint16_t>(buffers[j]);
             return d;
           }))
      .def("segments",
           [](const LlamaDecoder& d, int64_t layer, int first, int last, uintptr_t att, uintptr_t h, uintptr_t cos,
              uintptr_t sin, int64_t pos, int num_threads) {
             llama_decode_segments_cpu(d.shape, d.layers.data(), static_cast<int64_t>(d.layers.size()), layer,
                                       static_cast<LlamaDecodeSegment>(first), static_cast<LlamaDecodeSegment>(last),
                                       ptr<const uint16_t>(att), ptr<uint16_t>(h), ptr<const uint16_t>(cos),
                                       ptr<const uint16_t>(sin), pos, d.buffers, num_threads);
           }, gil());
  m.def("matmul_4bit_t_cpu",
        [](uintptr_t grad_y, int dt, int64_t M, int64_t N, uintptr_t packed, uintptr_t absmax,
           uintptr_t qabsmax, uintptr_t nested_absmax, uintptr_t nested_code, uintptr_t offset,
           int64_t nested_blocksize, int64_t K, int64_t blocksize, int qt, uintptr_t grad_x,
           int num_threads) {
          matmul_4bit_t_cpu(ptr<const void>(grad_y), dtype(dt), M, N,
                            ptr<const uint8_t>(packed),
                            absmax_source(absmax, qabsmax, nested_absmax, nested_code,
                                          offset, nested_blocksize),
                            K, blocksize, quant_type(qt), ptr<void>(grad_x), num_threads);
        }, gil());
  m.def("quantize_8bit_blockwise_cpu",
        [](uintptr_t x, int64_t n, int64_t blocksize, uintptr_t code, uintptr_t q,
           uintptr_t absmax, int num_threads) {
          return quantize_8bit_blockwise_cpu(ptr<const float>(x), n, blocksize,
                                             ptr<const float>(code), ptr<uint8_t>(q),
                                             ptr<float>(absmax), num_threads);
        }, gil());
  m.def("dequantize_8bit_blockwise_cpu",
        [](uintptr_t q, uintptr_t absmax, uintptr_t code, int64_t n, int64_t blocksize,
           uintptr_t out, int num_threads) {
          dequantize_8bit_blockwise_cpu(ptr<const uint8_t>(q), ptr<const float>(absmax),
                                        ptr<const float>(code), n, blocksize, ptr<float>(out),
                                        num_threads);
        }, gil());

#if defined(NF4LORA_WITH_CUDA)
  m.def("quantize_4bit_cuda",
        [](uintptr_t x, int x_dtype, int64_t n, int64_t blocksize, int qt, uintptr_t packed,
           uintptr_t absmax, uintptr_t nonfinite, uintptr_t stream) {
          quantize_4bit_cuda(ptr<const void>(x), dtype(x_dtype), n, blocksize, quant_type(qt),
                             ptr<uint8_t>(packed), ptr<float>(absmax), ptr<int32_t>(nonfinite),
                             ptr<void>(stream));
        }, gil());
  m.def("dequantize_4bit_cuda",
        [](uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax, uintptr_t nested_absmax,
           uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize, int64_t n,
           int64_t blocksize, int qt, uintptr_t out, int out_dtype, uintptr_t stream) {
          dequantize_4bit_cuda(ptr<const uint8_t>(packed),
                               absmax_source(absmax, qabsmax, nested_absmax, nested_code, offset,
                                             nested_blocksize),
                               n, blocksize, quant_type(qt), ptr<void>(out), dtype(out_dtype),
                               ptr<void>(stream));
        }, gil());
  m.def("quantize_8bit_blockwise_cuda",
        [](uintptr_t x, int64_t n, int64_t blocksize, uintptr_t code, uintptr_t q,
           uintptr_t absmax, uintptr_t nonfinite, uintptr_t stream) {
          quantize_8bit_blockwise_cuda(ptr<const float>(x), n, blocksize, ptr<const float>(code),
                                       ptr<uint8_t>(q), ptr<float>(absmax),
                                       ptr<int32_t>(nonfinite), ptr<void>(stream));
        }, gil());
  m.def("dequantize_8bit_blockwise_cuda",
        [](uintptr_t q, uintptr_t absmax, uintptr_t code, int64_t n, int64_t blocksize,
           uintptr_t out, uintptr_t stream) {
          dequantize_8bit_blockwise_cuda(ptr<const uint8_t>(q), ptr<const float>(absmax),
                                         ptr<const float>(code), n, blocksize, ptr<float>(out),
                                         ptr<void>(stream));
        }, gil());
  // Products with a 4-bit weight (cuda/matmul.cu). Absmax arguments as dequantize_4bit_cuda's.
  m.def("matmul_4bit_cuda",
        [](uintptr_t x, int x_dtype, int64_t M, int64_t K, uintptr_t packed, uintptr_t absmax,
           uintptr_t qabsmax, uintptr_t nested_absmax, uintptr_t nested_code, uintptr_t offset,
           int64_t nested_blocksize, int64_t N, int64_t blocksize, int qt, uintptr_t bias,
           uintptr_t y, uintptr_t stream) {
          matmul_4bit_cuda(ptr<const void>(x), dtype(x_dtype), M, K, ptr<const uint8_t>(packed),
                           absmax_source(absmax, qabsmax, nested_absmax, nested_code, offset,
                                         nested_blocksize),
                           N, blocksize, quant_type(qt), ptr<const void>(bias), ptr<void>(y),
                           ptr<void>(stream));
        }, gil());
  m.def("matmul_4bit_t_cuda",
        [](uintptr_t g, int g_dtype, int64_t M, int64_t N, uintptr_t packed, uintptr_t absmax,
           uintptr_t qabsmax, uintptr_t nested_absmax, uintptr_t nested_code, uintptr_t offset,
           int64_t nested_blocksize, int64_t K, int64_t blocksize, int qt, uintptr_t out,
           uintptr_t stream) {
          matmul_4bit_t_cuda(ptr<const void>(g), dtype(g_dtype), M, N, ptr<const uint8_t>(packed),
                             absmax_source(absmax, qabsmax, nested_absmax, nested_code, offset,
                                           nested_blocksize),
                             K, blocksize, quant_type(qt), ptr<float>(out), ptr<void>(stream));
        }, gil());
#endif

  // ---- optimizers (nf4lora/optim.h): fused AdamW steps; return the count of skipped blocks ----
  m.attr("OPTIM_BLOCK") = kOptimBlock;
  m.attr("MIN_8BIT_ELEMENTS") = kMin8bitElements;
  m.attr("MIN_PAGED_ELEMENTS") = kMinPagedElements;
  auto hyper = [](double lr, double beta1, double beta2, double eps, double weight_decay,
                  int64_t step) {
    AdamWHyper h;
    h.lr = lr; h.beta1 = beta1; h.beta2 = beta2; h.eps = eps; h.weight_decay = weight_decay;
    h.step = step;
    return h;
  };
  m.def("adamw_check", [hyper](double lr, double beta1, double beta2, double eps,
                               double weight_decay, int64_t step) {
    adamw_scalars(hyper(lr, beta1, beta2, eps, weight_decay, step));
  }, "Raises ValueError naming the first invalid AdamW hyperparameter");
  m.def("adamw_32bit_cpu",
        [hyper](uintptr_t param, int dt, uintptr_t grad, uintptr_t m1, uintptr_t v1, int64_t n,
                double lr, double beta1, double beta2, double eps, double weight_decay,
                int64_t step, int num_threads) {
          return adamw_32bit_cpu(ptr<void>(param), dtype(dt), ptr<const void>(grad),
                                 ptr<float>(m1), ptr<float>(v1), n,
                                 hyper(lr, beta1, beta2, eps, weight_decay, step), num_threads);
        }, gil());
  m.def("adamw_8bit_cpu",
        [hyper](uintptr_t param, int dt, uintptr_t grad, uintptr_t qm, uintptr_t qv,
                uintptr_t absmax_m, uintptr_t absmax_v, int64_t n, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t step, int num_threads) {
          return adamw_8bit_cpu(ptr<void>(param), dtype(dt), ptr<const void>(grad),
                                ptr<uint8_t>(qm), ptr<uint8_t>(qv), ptr<float>(absmax_m),
                                ptr<float>(absmax_v), n,
                                hyper(lr, beta1, beta2, eps, weight_decay, step), num_threads);
        }, gil());
  auto lion_hyper = [](double lr, double beta1, double beta2, double weight_decay) {
    LionHyper h;
    h.lr = lr; h.beta1 = beta1; h.beta2 = beta2; h.weight_decay = weight_decay;
    return h;
  };
  m.def("optim_vbmi_supported", &optim_vbmi_supported,
        "Whether the AVX-512 optimizer kernels can use their VBMI+GFNI 8-bit codec here");
  m.def("set_optim_vbmi", &set_optim_vbmi,
        "Let (True, the default) or stop (False) the AVX-512 optimizer kernels using the VBMI codec");
  m.def("lion_check", [lion_hyper](double lr, double beta1, double beta2, double weight_decay) {
    lion_scalars(lion_hyper(lr, beta1, beta2, weight_decay));
  }, "Raises ValueError naming the first invalid Lion hyperparameter");
  m.def("lion_32bit_cpu",
        [lion_hyper](uintptr_t param, int dt, uintptr_t grad, uintptr_t m1, int64_t n, double lr,
                     double beta1, double beta2, double weight_decay, int num_threads) {
          return lion_32bit_cpu(ptr<void>(param), dtype(dt), ptr<const void>(grad), ptr<float>(m1), n,
                                lion_hyper(lr, beta1, beta2, weight_decay), num_threads);
        }, gil());
  m.def("lion_8bit_cpu",
        [lion_hyper](uintptr_t param, int dt, uintptr_t grad, uintptr_t qm, uintptr_t absmax_m,
                     int64_t n, double lr, double beta1, double beta2, double weight_decay,
                     int num_threads) {
          return lion_8bit_cpu(ptr<void>(param), dtype(dt), ptr<const void>(grad), ptr<uint8_t>(qm),
                               ptr<float>(absmax_m), n, lion_hyper(lr, beta1, beta2, weight_decay),
                               num_threads);
        }, gil());
#if defined(NF4LORA_WITH_CUDA)
  m.def("adamw_32bit_cuda",
        [hyper](uintptr_t param, int dt, uintptr_t grad, uintptr_t m1, uintptr_t v1, int64_t n,
                double lr, double beta1, double beta2, double eps, double weight_decay,
                int64_t step, uintptr_t skipped, uintptr_t stream) {
          adamw_32bit_cuda(ptr<void>(param), dtype(dt), ptr<const void>(grad), ptr<float>(m1),
                           ptr<float>(v1), n, hyper(lr, beta1, beta2, eps, weight_decay, step),
                           ptr<int32_t>(skipped), ptr<void>(stream));
        }, gil());
  m.def("adamw_8bit_cuda",
        [hyper](uintptr_t param, int dt, uintptr_t grad, uintptr_t qm, uintptr_t qv,
                uintptr_t absmax_m, uintptr_t absmax_v, int64_t n, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t step, uintptr_t skipped,
                uintptr_t stream) {
          adamw_8bit_cuda(ptr<void>(param), dtype(dt), ptr<const void>(grad), ptr<uint8_t>(qm),
                          ptr<uint8_t>(qv), ptr<float>(absmax_m), ptr<float>(absmax_v), n,
                          hyper(lr, beta1, beta2, eps, weight_decay, step),
                          ptr<int32_t>(skipped), ptr<void>(stream));
        }, gil());
  m.def("lion_32bit_cuda",
        [lion_hyper](uintptr_t param, int dt, uintptr_t grad, uintptr_t m1, int64_t n, double lr,
                     double beta1, double beta2, double weight_decay, uintptr_t skipped, uintptr_t stream) {
          lion_32bit_cuda(ptr<void>(param), dtype(dt), ptr<const void>(grad), ptr<float>(m1), n,
                          lion_hyper(lr, beta1, beta2, weight_decay), ptr<int32_t>(skipped), ptr<void>(stream));
        }, gil());
  m.def("lion_8bit_cuda",
        [lion_hyper](uintptr_t param, int dt, uintptr_t grad, uintptr_t qm, uintptr_t absmax_m, int64_t n,
                     double lr, double beta1, double beta2, double weight_decay, uintptr_t skipped,
                     uintptr_t stream) {
          lion_8bit_cuda(ptr<void>(param), dtype(dt), ptr<const void>(grad), ptr<uint8_t>(qm),
                         ptr<float>(absmax_m), n, lion_hyper(lr, beta1, beta2, weight_decay),
                         ptr<int32_t>(skipped), ptr<void>(stream));
        }, gil());
  m.def("managed_alloc", [](int64_t nbytes) {
    return reinterpret_cast<uintptr_t>(managed_alloc(nbytes));
  }, "Zero-filled cudaMallocManaged memory; returns its address");
  m.def("managed_free", [](uintptr_t address) { managed_free(ptr<void>(address)); });
  m.def("managed_prefetch_supported", &managed_prefetch_supported);
  m.def("managed_prefetch", [](uintptr_t address, int64_t nbytes, int device, uintptr_t stream) {
    managed_prefetch(ptr<const void>(address), nbytes, device, ptr<void>(stream));
  }, gil());
#endif
}
