"""transformers integration: `AutoModelForCausalLM.from_pretrained(path,
quantization_config=nf4lora.hf.NF4Config())` gives a model whose linears (all but lm_head) are
nf4lora Linear4bit layers, registered through transformers' public quantizer registry
(register_quantization_config / register_quantizer under the method name "nf4lora").
`save_pretrained` writes bitsandbytes' 4-bit format (our Linear4bit state dict is it) with a
bitsandbytes quantization_config, so transformers + bitsandbytes and nl.load_model load it.
Imported on demand (`import nf4lora` does not import transformers).
Tested by tests/test_hf.py (codes and logits against nl.load_model, the saved checkpoint in
transformers + bitsandbytes)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

import nf4lora as nl

METHOD = "nf4lora"


def _register(mapping: dict, register: Any, name: str):
    """The registry refuses a second registration (a re-imported module): keep the first."""
    def deco(cls: type) -> type:
        return register(name)(cls) if name not in mapping else mapping[name]
    return deco


@_register(AUTO_QUANTIZATION_CONFIG_MAPPING, register_quantization_config, METHOD)
class NF4Config(QuantizationConfigMixin):
    """nf4lora 4-bit quantization for from_pretrained: the arguments of nl.quantize_model.

    The BitsAndBytesConfig equivalent of NF4Config(quant_type="nf4", double_quant=True,
    compute_dtype=torch.bfloat16) is BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16). Saved (to_dict) as that
    bitsandbytes config, since the saved tensors are in bitsandbytes' format."""

    def __init__(self, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                 compute_dtype: Optional[torch.dtype] = torch.bfloat16,
                 skip_modules: Sequence[str] = ("lm_head",)) -> None:
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if blocksize != 64:
            # bitsandbytes' checkpoints and transformers' loader assume its block size of 64
            raise ValueError(f"blocksize must be 64 (bitsandbytes' checkpoint format), got {blocksize}")
        if compute_dtype is not None and (not isinstance(compute_dtype, torch.dtype)
                                          or not compute_dtype.is_floating_point):
            raise TypeError(f"compute_dtype must be a float torch.dtype or None, got {compute_dtype!r}")
        self.quant_method = METHOD
        self.quant_type, self.double_quant, self.blocksize = quant_type, bool(double_quant), blocksize
        self.compute_dtype = compute_dtype
        self.skip_modules = tuple(skip_modules)

    def to_dict(self) -> dict[str, Any]:
        dtype = str(self.compute_dtype or torch.float32).removeprefix("torch.")
        return {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": self.quant_type, "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": dtype, "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": list(self.skip_modules), "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
        }


@_register(AUTO_QUANTIZER_MAPPING, register_quantizer, METHOD)
class NF4Quantizer(HfQuantizer):
    """Loads the checkpoint's weights as transformers does, then turns every nn.Linear but the
    skipped ones into an nf4lora Linear4bit (nl.quantize_model: the codes nl.load_model gives for
    the same tensors). Peak memory: the dense model in the load dtype, then the 4-bit one (not
    tensor by tensor as nl.load_model reads)."""

    requires_calibration = False
    quantization_config: NF4Config

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.pre_quantized:
            raise ValueError("NF4Config quantizes a dense checkpoint; this one is already quantized "
                             "(load it without quantization_config, or with nl.load_model)")

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        return False  # weights load dense; quantized after loading

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        c = self.quantization_config
        nl.quantize_model(model, skip_modules=c.skip_modules, quant_type=c.quant_type, blocksize=c.blocksize,
                          double_quant=c.double_quant, compute_dtype=c.compute_dtype)
        model.is_loaded_in_4bit = True
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True
