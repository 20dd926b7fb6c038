"""nf4lora: QLoRA fine-tuning with frozen NF4 (+ double quantization) base weights, LoRA
adapters and paged optimizers, on native C++ (CPU) and CUDA kernels.

The 4-bit format is bitsandbytes' bit for bit. The package's layers, bottom up: ops (the only
code that touches the native core), quant, lora and optim, loading, train, cli; see
docs/ARCHITECTURE.md in the repository."""
from . import ops
from .ops import (BUILD_INFO, active_cpu_variant, codebook, cpu_variants, dynamic_map, has_cuda,
                  set_cpu_variant, use_cpu_variant)
from .quant import Linear4bit, QuantState, dequantize_4bit, matmul_4bit, quantize_4bit, quantize_model
from .lora import (LoftQResult, LoraConfig, LoraLinear, ModulesToSave, TrainableParameters, active_adapter,
                   adapter_config, adapter_names, add_adapter, delete_adapter, disable_adapters,
                   get_lora_model, load_adapter, loftq_init, lora_matmul_4bit, merge_adapter,
                   merge_and_unload, pissa_init, read_adapter, save_adapter, set_adapter,
                   trainable_parameters, unmerge_adapter)
from . import optim
from .loading import load_model, load_model_for_adapter
from .version import __version__  # noqa: F401  (nf4lora.__version__)


def __getattr__(name: str):
    # nf4lora.hf (the transformers quantizer) imports transformers: loaded on first use only
    if name == "hf":
        import importlib
        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'nf4lora' has no attribute {name!r}")


__all__ = [
    "BUILD_INFO",
    "__version__",
    "Linear4bit",
    "QuantState",
    "active_cpu_variant",
    "codebook",
    "cpu_variants",
    "dequantize_4bit",
    "dynamic_map",
    "matmul_4bit",
    "has_cuda",
    "quantize_4bit",
    "quantize_model",
    "set_cpu_variant",
    "use_cpu_variant",
    # LoRA
    "LoftQResult",
    "LoraConfig",
    "LoraLinear",
    "ModulesToSave",
    "TrainableParameters",
    "active_adapter",
    "adapter_config",
    "adapter_names",
    "add_adapter",
    "delete_adapter",
    "disable_adapters",
    "get_lora_model",
    "load_adapter",
    "loftq_init",
    "lora_matmul_4bit",
    "merge_adapter",
    "merge_and_unload",
    "pissa_init",
    "read_adapter",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge_adapter",
    "optim",
    "load_model",
    "load_model_for_adapter",
    "ops",
]
