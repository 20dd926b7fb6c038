"""Linear4bit: a drop-in nn.Linear whose weight is stored packed in NF4/FP4 (with double
quantization by default), and quantize_model to swap a model's linears in place.

The state dict is bitsandbytes' (keys weight, weight.absmax, weight.quant_map,
weight.nested_absmax, weight.nested_quant_map, weight.quant_state.bitsandbytes__nf4, bias), so
a transformers-saved *-bnb-4bit checkpoint loads into it and bitsandbytes loads what it saves.
The quantization metadata lives in buffers and plain attributes, so it survives deepcopy,
state_dict round trips, .to(device) (no requantization) and torch.compile; .to(dtype) leaves
the packed codes and fp32 scales alone. Tested by tests/test_linear4bit.py."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..ops import Weight4bit, check_float_dtype, matmul_4bit, packed_bytes
from ..ops.checks import check_weight
from ..ops.matmul import forward as ops_forward, is_plain_eager_cpu
from .functional import dequantize_4bit, quantize_4bit
from .state import QuantState

_STATE_BUFFERS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_offset")


class Linear4bit(nn.Module):
    """y = x W^T + b with W [out_features, in_features] held as 4-bit codes + blockwise scales.

    The input is cast to `compute_dtype` (None: keep x's dtype) and the output back to x's
    dtype. The weight is frozen (no gradient); x and bias get gradients."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: Optional[torch.dtype] = torch.bfloat16, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        check_float_dtype(dtype, "dtype")
        if compute_dtype is not None:
            check_float_dtype(compute_dtype, "compute_dtype")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        # Placeholder codes (a zero weight) of the right sizes; load_state_dict or from_linear
        # fills in the real ones.
        packed, state = quantize_4bit(torch.zeros(out_features, in_features, dtype=dtype, device=device),
                                      blocksize, quant_type, double_quant)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self._set_state(state)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = torch.bfloat16) -> "Linear4bit":
        """Quantizes linear.weight (on its device, in its dtype); the bias is kept as is."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.compute_dtype = compute_dtype
        packed, state = quantize_4bit(w.contiguous(), blocksize, quant_type, double_quant)
        module.weight = nn.Parameter(packed, requires_grad=False)
        module._set_state(state)
        module.bias = (nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
                       if linear.bias is not None else None)
        return module

    @classmethod
    def from_quantized(cls, packed: Tensor, state: QuantState, bias: bool = True,
                       compute_dtype: Optional[torch.dtype] = torch.bfloat16) -> "Linear4bit":
        """A Linear4bit around already packed codes and their state: nothing is quantized (the
        placeholder is built on the meta device), and a bias, if any, stays on meta until it is
        set or loaded."""
        out_features, in_features = _weight_shape(state.shape)
        module = cls(in_features, out_features, bias=bias, quant_type=state.quant_type,
                     blocksize=state.blocksize, double_quant=state.nested, compute_dtype=compute_dtype,
                     device="meta")
        module.set_quantized(packed, state)
        return module

    def set_quantized(self, packed: Tensor, state: QuantState) -> None:
        """Replaces the weight by packed codes of the same [out_features, in_features] shape and
        their state (merging, LoftQ, loading). The codes become the frozen `weight` parameter."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"a state of shape {list(state.shape)} cannot replace the weight of a "
                             f"[{self.out_features}, {self.in_features}] Linear4bit")
        flat = packed_bytes(packed, state.shape)
        self.__dict__.pop("_weight4bit_cache", None)  # (it would keep the old codes alive)
        self.weight = nn.Parameter(flat.reshape(-1, 1), requires_grad=False)
        self._set_state(state)

    def _set_state(self, state: QuantState) -> None:
        self.weight_shape = state.shape
        self.weight_dtype = state.dtype
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.nested_blocksize = state.nested_blocksize
        self.register_buffer("absmax", state.absmax, persistent=False)
        self.register_buffer("quant_map", state.code, persistent=False)
        self.register_buffer("nested_absmax", state.nested_absmax, persistent=False)
        self.register_buffer("nested_quant_map", state.nested_code, persistent=False)
        self.register_buffer("quant_offset", state.offset, persistent=False)

    @property
    def quant_state(self) -> QuantState:
        return QuantState(absmax=self.absmax, shape=self.weight_shape, dtype=self.weight_dtype,
                          blocksize=self.blocksize, quant_type=self.quant_type, code=self.quant_map,
                          offset=self.quant_offset, nested_absmax=self.nested_absmax,
                          nested_code=self.nested_quant_map, nested_blocksize=self.nested_blocksize)

    def weight4bit(self) -> Weight4bit:
        """The packed weight and its state as the op layer takes them, built from the current
        parameter and buffers (so a moved, reloaded or all-gathered weight is what runs)."""
        return Weight4bit(packed_bytes(self.weight, self.weight_shape), self.absmax, self.blocksize,
                          self.quant_type, self.weight_shape, self.weight_dtype, self.nested_absmax,
                          self.nested_quant_map, self.quant_offset, self.nested_blocksize)

    def _checked_weight4bit(self) -> Weight4bit:
        """weight4bit(), checked once (ops' check_weight) and cached while the parameter and the
        buffers are the same tensor objects over the same memory: .to(), load_state_dict,
        set_quantized, an FSDP swap or a `.data =` assignment each make a new key, so the next call
        rebuilds and re-checks. In-place writes into the same memory need no rebuild (the cached
        views read it). Only the eager no-grad CPU route uses it (forward)."""
        params, buffers = self._parameters, self._buffers  # (nn.Module.__getattr__ costs ~1 us a name)
        buffers = [buffers.get(n, params.get(n)) for n in _STATE_BUFFERS]  # (FSDP may make absmax a parameter)
        tensors = (params["weight"], *buffers)
        key = (tuple(0 if t is None else t.data_ptr() for t in tensors), self.weight_shape, self.blocksize,
               self.quant_type, self.nested_blocksize)
        cached = self.__dict__.get("_weight4bit_cache")
        if (cached is not None and cached[1] == key
                and all(a is b for a, b in zip(cached[0], tensors))):
            return cached[2]
        w = self.weight4bit()
        check_weight(w)
        self.__dict__["_weight4bit_cache"] = (tensors, key, w)
        return w

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    # ---- compute ---------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        in_dtype = x.dtype
        dtype = self.compute_dtype or in_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        if (not torch.is_grad_enabled() and isinstance(x, Tensor) and is_plain_eager_cpu(x)
                and not torch.is_autocast_enabled("cpu")):
            # Inference (decoding): the cached, already checked weight straight into the eager
            # CPU route, which is what matmul_4bit would call here (no grad, no autocast).
            y = ops_forward(x.to(dtype), self._checked_weight4bit(), bias, weight_checked=True)
        else:
            y = matmul_4bit(x.to(dtype), self.weight4bit(), bias)
        return y if y.dtype == in_dtype else y.to(in_dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense weight [out_features, in_features] (original dtype unless given)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype=dtype or self.weight_dtype)

    def extra_repr(self) -> str:
        bits = self.quant_state.bits_per_param
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}, "
                f"bits_per_param={bits:.3f}")

    # ---- device / dtype moves: codes and scales keep their dtypes --------------------------

    def _apply(self, fn, recurse=True):
        # The inference cache would keep the tensors of before the move alive (a model moved to
        # the GPU after a CPU forward would hold its CPU codes): dropped, rebuilt on next use.
        self.__dict__.pop("_weight4bit_cache", None)
        # (nf4lora.fsdp may have made absmax a frozen parameter: then it moves as parameters do)
        kept = {name: self._buffers[name] for name in _STATE_BUFFERS if name in self._buffers}
        for name in kept:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                if t is None:
                    continue
                moved = fn(t)  # a move (or to_empty) applies as is; a dtype cast is undone
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    # ---- bitsandbytes state-dict format ----------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        for key, t in self.quant_state.to_dict(prefix + "weight.").items():
            destination[key] = t
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        known = {prefix + "weight", prefix + "bias"}
        wkey = prefix + "weight"
        if wkey not in state_dict:
            missing_keys.append(wkey)
        else:
            try:
                state = QuantState.from_dict(state_dict, wkey + ".", device=self.weight.device)
                known.update(state.to_dict(wkey + "."))
                if tuple(state.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"the checkpoint's weight has shape {list(state.shape)}, this layer is "
                                     f"[{self.out_features}, {self.in_features}]")
                packed = state_dict[wkey]
                if not isinstance(packed, Tensor):
                    raise TypeError(f"must be a tensor, got {type(packed).__name__}")
                packed = packed.detach().to(self.weight.device)
                flat = packed_bytes(packed.contiguous(), state.shape).clone().reshape(-1, 1)
                self.weight = nn.Parameter(flat, requires_grad=False)
                self._set_state(state)
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"{wkey}: {exc}")
        bkey = prefix + "bias"
        if self.bias is not None:
            if bkey not in state_dict:
                missing_keys.append(bkey)
            elif not isinstance(state_dict[bkey], Tensor) or not state_dict[bkey].is_floating_point():
                error_msgs.append(f"{bkey}: must be a floating-point tensor, got {_describe(state_dict[bkey])}")
            elif state_dict[bkey].shape != self.bias.shape:
                error_msgs.append(f"{bkey}: shape {tuple(state_dict[bkey].shape)}, expected {tuple(self.bias.shape)}")
            else:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bkey])
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)


def _weight_shape(shape) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"a Linear4bit weight is 2-D [out_features, in_features], got shape {list(shape)}")
    return int(shape[0]), int(shape[1])


def _describe(value) -> str:
    return f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantize_model(model: nn.Module, skip_modules: Iterable[str] = ("lm_head",), quant_type: str = "nf4",
                   blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: Optional[torch.dtype] = torch.bfloat16) -> nn.Module:
    """Replaces every nn.Linear (except those whose name is or ends with one of skip_modules) by
    a Linear4bit, in place and one module at a time, so peak memory stays near the quantized
    model plus one dense layer. Returns the model."""
    skip = tuple(skip_modules)
    targets = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not _matches(name, skip)]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = getattr(parent, child)
        setattr(parent, child, Linear4bit.from_linear(dense, quant_type, blocksize, double_quant, compute_dtype))
        del dense
    return model
