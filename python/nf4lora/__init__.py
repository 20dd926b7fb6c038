"""nf4lora: QLoRA fine-tuning with frozen NF4 (+ double quantization) base weights, LoRA
adapters and paged optimizers, on native C++ (CPU) and CUDA kernels.

The 4-bit format is bitsandbytes' bit for bit; see DESIGN.md in the repository."""
from . import _ops  # noqa: F401  (registers the nf4lora:: custom ops)
from ._native import (BUILD_INFO, active_cpu_variant, cpu_variants, has_cuda, set_cpu_variant,
                      use_cpu_variant)
from .functional import dequantize_4bit, quantize_4bit
from .matmul import matmul_4bit
from .nn import Linear4bit, quantize_model
from .quant_state import QuantState, codebook, dynamic_map
from .loftq import LoftQResult, loftq_init, pissa_init
from .lora import LoraLinear, ModulesToSave, lora_matmul_4bit
from .lora_config import LoraConfig
from .lora_io import load_adapter, read_adapter, save_adapter
from .lora_model import (TrainableParameters, active_adapter, adapter_config, adapter_names, add_adapter,
                         delete_adapter, disable_adapters, get_lora_model, merge_adapter, merge_and_unload,
                         set_adapter, trainable_parameters, unmerge_adapter)
from . import optim
from .loading import load_model
from .adapter_base import load_model_for_adapter

__version__ = "0.1.0"


def __getattr__(name: str):
    # nf4lora.hf (the transformers quantizer) imports transformers: loaded on first use only
    if name == "hf":
        import importlib
        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module 'nf4lora' has no attribute {name!r}")


__all__ = [
    "BUILD_INFO",
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
]
