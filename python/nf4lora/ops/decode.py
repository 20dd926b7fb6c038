"""The native decode layers of a Llama (cpp/include/nf4lora/decode.h) for generate.py: one object
per generation holding every layer's 4-bit weights, RMSNorm weights and KV caches, checked once,
and the activation buffers; segments() runs the work between two attentions (which stay the
caller's: torch's sdpa), whole or in parts so that the caller can add LoRA terms to the
projections' outputs in between. Bit-equal to the same layers run by torch
(tests/test_generate.py)."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from .checks import check_weight
from .native import TORCH_SUM_LANES, _C, absmax_pointers, quant_type_code
from .weight import Weight4bit

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# decode.h's LlamaDecodeSegment, in order: the first four finish a layer, the last two start the next.
SEGMENTS = ("o_proj", "gate_up", "down", "residual", "qkv", "rope")


def _bf16_cpu(name: str, t: Tensor) -> int:
    if t.dtype != torch.bfloat16 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous bfloat16 CPU tensor, got {t.dtype} on {t.device}"
                         f"{'' if t.is_contiguous() else ', not contiguous'}")
    return t.data_ptr()


class LlamaDecoder:
    """layers: per layer a mapping with "input_norm" and "post_norm" (bf16 [hidden]), "k_cache" and
    "v_cache" (bf16 [1, kv_heads, max_len, head_dim], contiguous) and the seven projections of
    PROJECTIONS as Weight4bit ([out, in], no bias). Raises ValueError naming the first
    inconsistent tensor or shape. The object keeps every tensor it was given alive."""

    def __init__(self, *, hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int,
                 max_len: int, norm_eps: float, layers: Sequence[Mapping[str, object]]) -> None:
        fields = []
        for i, layer in enumerate(layers):
            at = f"layer {i} "
            row = [_bf16_cpu(at + "input_norm", layer["input_norm"]), _bf16_cpu(at + "post_norm", layer["post_norm"]),
                   _bf16_cpu(at + "k_cache", layer["k_cache"]), _bf16_cpu(at + "v_cache", layer["v_cache"])]
            for name in PROJECTIONS:
                w = layer[name]
                if not isinstance(w, Weight4bit) or w.device.type != "cpu":
                    raise ValueError(f"{at}{name}: expected a CPU Weight4bit")
                check_weight(w)
                row += [w.packed.data_ptr(), *absmax_pointers(w), *w.shape, w.blocksize, quant_type_code(w.quant_type)]
            fields.append(row)
        # The activations the segments hand each other (decode.h's LlamaDecodeBuffers), [1, n] so
        # that a LoRA term's [1, n] product adds into them as into the model's own outputs.
        def buf(n: int) -> Tensor:
            return torch.empty(1, n, dtype=torch.bfloat16)

        self.x, self.o = buf(hidden), buf(hidden)
        self.g, self.u, self.m = buf(intermediate), buf(intermediate), buf(intermediate)
        self.q, self.k, self.v = buf(heads * head_dim), buf(kv_heads * head_dim), buf(kv_heads * head_dim)
        buffers = [t.data_ptr() for t in (self.x, self.o, self.g, self.u, self.m, self.q, self.k, self.v)]
        self._native = _C.LlamaDecoder(hidden, heads, kv_heads, head_dim, intermediate, max_len, float(norm_eps),
                                       TORCH_SUM_LANES, fields, buffers)
        self._alive = [dict(layer) for layer in layers]

    def segments(self, layer: int, first: str, last: str, att: Optional[Tensor], h: Tensor, cos: Tensor,
                 sin: Tensor, pos: int) -> None:
        """Segments first .. last (SEGMENTS' names) from `layer` (-1: "qkv" and "rope" only) over
        this object's buffers: x (the normed input of q/k/v, and of gate/up), o (o_proj's output,
        then down_proj's), g, u, m (down_proj's input), q, k, v, each bf16 [1, n]. att: the layer's
        attention output (bf16 [1, heads, 1, head_dim], contiguous: head-major) for "o_proj"; h:
        bf16 [1, 1, hidden], the residual stream, updated in place; cos/sin: bf16 [head_dim] of
        position pos, whose k and v "rope" writes into the caches. Between two calls the caller may
        add to the buffers (a LoRA term: o after "o_proj" or "down", g and u after "gate_up", q, k
        and v after "qkv"); after "rope", q is the layer's rotated query. Contiguity is the caller's
        promise (generate.py's buffers); sizes, layers and positions are checked natively."""
        for name in (first, last):
            if name not in SEGMENTS:
                raise ValueError(f"unknown segment {name!r}; the segments are {SEGMENTS}")
        self._native.segments(layer, SEGMENTS.index(first), SEGMENTS.index(last),
                              0 if att is None else att.data_ptr(), h.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                              pos, torch.get_num_threads())
