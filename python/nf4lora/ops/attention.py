"""The CPU attention routes that calibration chooses among (DISPATCH.cpu_attention_route), for bf16
q, k, v with grouped-query heads. All compute softmax(q k^T * scale + mask) v with torch's sdpa;
they differ in precision and in how the key/value heads reach the query heads:

    sdpa  k and v repeated to the query heads, sdpa in q's dtype: what transformers' sdpa does
          with a mask (its own path, the default when calibration is off)
    gqa   sdpa in q's dtype with enable_gqa=True: no repeated k and v, no reduction of their
          gradients over the repeated heads
    fp32  q, k, v widened exactly to fp32, sdpa with enable_gqa=True, the output rounded to q's
          dtype once (where bf16 GEMMs are the slow ones)

Which one is fastest depends on the CPU (bf16 GEMMs are 2x slower than fp32 on some CPUs without
AMX and 5x faster with it): ops/calibrate.py measures them, forward + backward, at a model's
shape. Used by nf4lora.train.cpu_attention; tested by tests/test_attention.py."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ROUTES = ("sdpa", "gqa", "fp32")


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
           scale: Optional[float], dropout: float, is_causal: bool, route: str) -> torch.Tensor:
    """sdpa over [batch, heads, tokens, dim] query and [batch, kv heads, tokens, dim] key/value
    (heads a multiple of kv heads) by `route`; returns [batch, heads, tokens, dim] in q's dtype.
    `mask` is sdpa's attn_mask (bool: True attends, or additive float) or None."""
    if route not in ROUTES:
        raise ValueError(f"unknown attention route {route!r}; routes: {ROUTES}")
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    groups = heads // kv_heads
    if route == "sdpa":
        if groups > 1:
            key, value = (t[:, :, None].expand(t.shape[0], kv_heads, groups, *t.shape[2:])
                          .reshape(t.shape[0], heads, *t.shape[2:]) for t in (key, value))
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                              scale=scale, is_causal=is_causal)
    dtype = query.dtype
    if route == "fp32":
        query, key, value = query.float(), key.float(), value.float()
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
    with torch.autocast(query.device.type, enabled=False):
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale,
                                             is_causal=is_causal, enable_gqa=groups > 1)
    return out.to(dtype)


def sample_inputs(generator: torch.Generator, batch: int = 2, heads: int = 9, kv_heads: int = 3, tokens: int = 128,
                  dim: int = 64) -> tuple:
    """bf16 q, k, v of a small model's shape (SmolLM2-135M's heads) with a causal + right-padding
    bool mask, for the calibration's timing."""
    q = torch.randn(batch, heads, tokens, dim, generator=generator).bfloat16().requires_grad_()
    k = torch.randn(batch, kv_heads, tokens, dim, generator=generator).bfloat16().requires_grad_()
    v = torch.randn(batch, kv_heads, tokens, dim, generator=generator).bfloat16().requires_grad_()
    keep = torch.ones(batch, tokens, dtype=torch.bool)
    keep[-1, tokens * 3 // 4:] = False
    mask = torch.tril(torch.ones(tokens, tokens, dtype=torch.bool))[None, None] & keep[:, None, None, :]
    return q, k, v, mask
