"""LoRA: the layer (LoraLinear over nn.Linear or Linear4bit, with a fused autograd function for the
4-bit base), PEFT-compatible configs, model-level injection and named adapters, PEFT's on-disk
adapter format, and LoftQ / PiSSA initialization."""
from .config import ALL_LINEAR, LoraConfig
from .io import load_adapter, read_adapter, save_adapter
from .layer import LoraLinear, ModulesToSave, lora_matmul_4bit
from .loftq import LoftQResult, loftq_init, pissa_init
from .model import (LayerwiseInjection, TrainableParameters, active_adapter, adapter_config, adapter_names,
                    add_adapter, delete_adapter, disable_adapters, get_lora_model, merge_adapter,
                    merge_and_unload, set_adapter, trainable_parameters, unmerge_adapter)

__all__ = [
    "ALL_LINEAR", "LayerwiseInjection", "LoftQResult", "LoraConfig", "LoraLinear", "ModulesToSave",
    "TrainableParameters", "active_adapter", "adapter_config", "adapter_names", "add_adapter",
    "delete_adapter", "disable_adapters", "get_lora_model", "load_adapter", "loftq_init",
    "lora_matmul_4bit", "merge_adapter", "merge_and_unload", "pissa_init", "read_adapter",
    "save_adapter", "set_adapter", "trainable_parameters", "unmerge_adapter",
]
