"""An SDPA attention for transformers models that computes bf16 attention on the CPU in fp32 over the
same bf16 q, k, v (widened exactly) and rounds the output to bf16 once, where bf16 GEMMs are the
slow ones (docs/decisions.md has the measurement). Everywhere else (GPU,
fp32/fp16, a CPU with AMX, see nf4lora.ops.DISPATCH.cpu_gemm_in_fp32) it is transformers' own sdpa.
Registered under the name ATTN_IMPLEMENTATION; use_fp32_cpu_attention(model) switches a loaded
model to it (the trainer does). Tested by tests/test_attention.py (against sdpa, forced on and off)."""
from __future__ import annotations

import torch
from torch import nn

ATTN_IMPLEMENTATION = "nf4lora_sdpa"
_registered = [False]


def _forward(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from ..ops import DISPATCH
    dtype = query.dtype
    if query.device.type != "cpu" or not DISPATCH.cpu_gemm_in_fp32(dtype):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


def register() -> str:
    """Registers the attention (and transformers' sdpa mask for it) once; returns its name."""
    if not _registered[0]:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(ATTN_IMPLEMENTATION, _forward)
        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
        _registered[0] = True
    return ATTN_IMPLEMENTATION


def use_fp32_cpu_attention(model: nn.Module) -> bool:
    """Switches a transformers model that uses sdpa to this attention; True if it did."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    name = register()
    model.set_attn_implementation(name)
    return getattr(model.config, "_attn_implementation", None) == name
