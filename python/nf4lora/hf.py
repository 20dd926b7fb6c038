"""transformers integration: `AutoModelForCausalLM.from_pretrained(path,
quantization_config=nf4lora.hf.NF4Config())` gives a model whose linears (all but lm_head) are
nf4lora Linear4bit layers, registered through transformers' public quantizer registry
(register_quantization_config / register_quantizer under the method name "nf4lora"), quantized
tensor by tensor as transformers reads the checkpoint (its on-load quantization hook).
`save_pretrained` writes bitsandbytes' 4-bit format (our Linear4bit state dict is it) with a
bitsandbytes quantization_config, so transformers + bitsandbytes and nl.load_model load it.
Imported on demand (`import nf4lora` does not import transformers).
Tested by tests/test_hf.py (codes and logits against nl.load_model, the saved checkpoint in
transformers + bitsandbytes, the load's peak memory against the dense model's)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from transformers.core_model_loading import ConversionOps
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
        if not isinstance(double_quant, bool):
            raise TypeError(f"double_quant must be a bool, got {double_quant!r}")
        if (not isinstance(skip_modules, (list, tuple, set, frozenset))
                or not all(isinstance(m, str) for m in skip_modules)):
            raise TypeError(f"skip_modules must be a sequence of module names (str), got {skip_modules!r}")
        self.quant_method = METHOD
        self.quant_type, self.double_quant, self.blocksize = quant_type, double_quant, blocksize
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


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """nl.quantize_model's skip rule: the module's name is, or ends with ".", a pattern."""
    return any(name == p or name.endswith("." + p) for p in patterns)


class _PendingLinear4bit(nl.Linear4bit):
    """A Linear4bit waiting for its checkpoint weight (on the meta device until then). Its state
    dict is the dense layer's key names only (weight, bias), so transformers does not expect the
    bitsandbytes state keys from a dense checkpoint; once quantized it becomes a plain
    nl.Linear4bit (same attributes, the class swapped back)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


class _QuantizeOnLoad(ConversionOps):
    """transformers' per-tensor hook for a weight that needs quantization (the model's weight
    name, its one dense checkpoint tensor already cast to the load dtype): quantizes it with
    nl.quantize_4bit into its (meta) Linear4bit's packed codes and scales, then drops the dense
    tensor."""

    def __init__(self, hf_quantizer: "NF4Quantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model: Any = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module = model.get_submodule(name.rpartition(".")[0])
            out[name] = self.hf_quantizer.quantize(module, value, name.rpartition(".")[0])
        return out


@_register(AUTO_QUANTIZER_MAPPING, register_quantizer, METHOD)
class NF4Quantizer(HfQuantizer):
    """Quantizes as transformers loads, one tensor at a time: before the weights load, every
    nn.Linear but the skipped ones becomes an nf4lora Linear4bit on the meta device; then each
    dense checkpoint weight of those layers, as transformers reads and casts it to the load
    dtype, is quantized (nl.quantize_4bit, the codes nl.load_model gives) and freed before the
    next one is read. Peak memory: the 4-bit model plus about one dense tensor (bench/bench_hf_load.py).
    Biases, norms, embeddings and the skipped layers load as transformers loads them."""

    requires_calibration = False
    quantization_config: NF4Config

    def __init__(self, quantization_config: NF4Config, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.loaded_states: dict[str, Any] = {}  # module name -> the QuantState its weight was quantized to

    def quantize(self, module: nl.Linear4bit, dense: torch.Tensor, name: str) -> torch.Tensor:
        """Quantizes the dense weight into the pending layer `name`; returns its packed codes."""
        c = self.quantization_config
        if tuple(dense.shape) != (module.out_features, module.in_features):
            raise ValueError(f"{name}.weight: the checkpoint's tensor has shape {list(dense.shape)}, the layer is "
                             f"[{module.out_features}, {module.in_features}]")
        packed, state = nl.quantize_4bit(dense.contiguous(), c.blocksize, c.quant_type, c.double_quant)
        module.set_quantized(packed, state)
        module.__class__ = nl.Linear4bit
        module._is_hf_initialized = True
        self.loaded_states[name] = state
        return module.weight

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if self.pre_quantized:
            raise ValueError("NF4Config quantizes a dense checkpoint; this one is already quantized "
                             "(load it without quantization_config, or with nl.load_model)")

    @property
    def quantized_element_size(self) -> float:
        return 0.5  # for transformers' device-map arithmetic: about 4 bits a weight

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        module_name, _, leaf = param_name.rpartition(".")
        return leaf == "weight" and isinstance(model.get_submodule(module_name), nl.Linear4bit)

    def get_quantize_ops(self) -> ConversionOps:
        return _QuantizeOnLoad(self)

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        c = self.quantization_config
        skip = tuple(c.skip_modules)
        targets = [(name, m) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and not _matches(name, skip)]
        for name, dense in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            layer = _PendingLinear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                                       quant_type=c.quant_type, blocksize=c.blocksize, double_quant=c.double_quant,
                                       compute_dtype=c.compute_dtype, device="meta", dtype=dense.weight.dtype)
            setattr(parent, child, layer)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        # After the weights load, transformers replaces every non-persistent buffer by
        # torch.empty_like (for _init_weights to refill; Llama's rotary inv_freq): that wipes the
        # Linear4bit's scales and code books, so each layer gets its state back here.
        for name, state in self.loaded_states.items():
            module = model.get_submodule(name)
            module.set_quantized(module.weight.data, state)
        self.loaded_states.clear()
        missing = []
        for name, module in model.named_modules():
            if not isinstance(module, _PendingLinear4bit):
                continue
            w = module.weight
            if w.is_floating_point() and w.device.type != "meta":
                # tied to a dense weight the checkpoint does have (an lm_head tied to the
                # embeddings when skip_modules leaves it in): quantized from it, so untied
                self.quantize(module, w.detach(), name)
                self.loaded_states.clear()
            else:
                missing.append(name + ".weight")
        if missing:
            raise ValueError(f"NF4Config: the checkpoint has no weight for {len(missing)} layer(s) it would quantize: "
                             f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        model.is_loaded_in_4bit = True
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True
