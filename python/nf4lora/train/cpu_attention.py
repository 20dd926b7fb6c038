"""An SDPA attention for transformers models that runs bf16 attention on the CPU by the route the
calibration measured fastest on this machine (nf4lora.ops.DISPATCH.cpu_attention_route; the routes
are in nf4lora/ops/attention.py): in fp32 over the same bf16 q, k, v (widened exactly, rounded
once), where bf16 GEMMs are the slow ones, or in bf16 without repeating the key/value heads
(enable_gqa), or transformers' own sdpa (docs/decisions.md has the measurements). Everywhere else
(GPU, fp32/fp16, a KV cache longer than the query, a position bias) it is transformers' own sdpa.
Registered under the name ATTN_IMPLEMENTATION; use_fp32_cpu_attention(model) switches a loaded
model to it (the trainer does). Tested by tests/test_attention.py (against sdpa, forced on and off)."""
from __future__ import annotations

from torch import nn

ATTN_IMPLEMENTATION = "nf4lora_sdpa"
_registered = [False]


def _forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from ..ops import DISPATCH, attend
    route = DISPATCH.cpu_attention_route(query.dtype) if query.device.type == "cpu" else "sdpa"
    if (route == "sdpa" or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
            or kwargs.get("output_attentions") or key.shape[2] != query.shape[2]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # as sdpa_attention_forward: the causal flag only without a mask and for more than one query
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    out = attend(query, key, value, attention_mask, scaling, dropout, is_causal, route)
    return out.transpose(1, 2).contiguous(), None


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
