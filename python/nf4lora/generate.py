"""Greedy and sampled decoding for `nf4lora generate`: a plain loop of the model's own forward with
its KV cache, one token per step, instead of transformers' generate(), whose per-step machinery
(logits processors, stopping criteria, input preparation, cache bookkeeping) costs as much as the
135M model's forward on a CPU. For a transformers Llama (the default SmolLM2 model) the steps after
the prompt run through _LlamaStep: the same operations over the model's own submodules with a
preallocated KV cache, without transformers' per-layer machinery. The forward calls, their inputs
and the token choice are generate()'s, so the tokens are the same: tests/test_generate.py compares
the logits of every step with generate(output_logits=True), bit for bit; bench/bench_generate.py
measures the speed."""
from __future__ import annotations

import inspect
import sys
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Set to False to decode every architecture through the model's own forward (bench A/B, tests).
LLAMA_DECODE_STEP = True


class _LlamaStep:
    """One decode step of a transformers Llama (LlamaForCausalLM, sdpa attention, default RoPE),
    run directly over the model's own submodules: the same operations in the same order as
    LlamaModel.forward + sdpa_attention_forward for one new token with no padding mask, without
    transformers' per-call machinery (kwargs decorators, mask creation, DynamicCache bookkeeping,
    output classes). Keys and values live in a preallocated cache (static: no torch.cat per step),
    filled from the prompt's DynamicCache. The projections are whatever modules the model holds
    (Linear4bit, LoRA layers, nn.Linear), called as the model would. tests/test_generate.py checks
    its logits against the model's forward, bit for bit."""

    def __init__(self, model: nn.Module, cache: Any, prompt_len: int, max_len: int) -> None:
        inner = model.model
        self.model, self.inner, self.layers = model, inner, list(inner.layers[: model.config.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.head_dim = attn.head_dim
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        for i in range(len(self.layers)):
            k, v = cache.layers[i].keys, cache.layers[i].values
            if k.shape[0] != 1 or k.shape[2] != prompt_len:
                raise ValueError("unexpected KV cache layout")
            kk = k.new_empty(1, k.shape[1], max_len, k.shape[3])
            vv = v.new_empty(1, v.shape[1], max_len, v.shape[3])
            kk[:, :, :prompt_len] = k
            vv[:, :, :prompt_len] = v
            self.keys.append(kk)
            self.values.append(vv)

    @staticmethod
    def supports(model: nn.Module, cache: Any) -> bool:
        """Only the plain transformers Llama, where this step is the model's own computation."""
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        if (not LLAMA_DECODE_STEP or type(model).__name__ != "LlamaForCausalLM" or inner is None
                or type(inner).__name__ != "LlamaModel" or config is None):
            return False
        if getattr(config, "_attn_implementation", None) != "sdpa":
            return False
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default" or getattr(inner.rotary_emb, "rope_type", "default") != "default":
            return False
        layers = getattr(inner, "layers", [])
        if (not layers or any(type(layer).__name__ != "LlamaDecoderLayer" for layer in layers)
                or type(model).forward.__module__ != type(inner).forward.__module__):
            return False
        cache_layers = getattr(cache, "layers", None)
        return (cache_layers is not None and len(cache_layers) >= config.num_hidden_layers
                and all(isinstance(getattr(c, "keys", None), Tensor) for c in cache_layers[: config.num_hidden_layers]))

    def __call__(self, token: int, pos: int) -> Tensor:
        """The logits [1, 1, vocab] for `token` at position `pos` (the cache holds 0..pos-1)."""
        device = self.keys[0].device
        h = self.inner.embed_tokens(torch.tensor([[token]], device=device))
        cos, sin = self.inner.rotary_emb(h, position_ids=torch.tensor([[pos]], device=device))
        hd, end = self.head_dim, pos + 1
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = h
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, 1, -1, hd).transpose(1, 2)
            k = attn.k_proj(x).view(1, 1, -1, hd).transpose(1, 2)
            v = attn.v_proj(x).view(1, 1, -1, hd).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            kc, vc = self.keys[i], self.values[i]
            kc[:, :, pos:end] = k
            vc[:, :, pos:end] = v
            o = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=None, dropout_p=0.0,
                                               scale=attn.scaling, is_causal=False,
                                               enable_gqa=attn.num_key_value_groups > 1)
            o = o.transpose(1, 2).contiguous().reshape(1, 1, -1).contiguous()
            h = residual + attn.o_proj(o)
            residual = h
            h = residual + layer.mlp(layer.post_attention_layernorm(h))
        h = self.inner.norm(h)
        return self.model.lm_head(h[:, -1:, :])


class _Logits:
    def __init__(self, logits: Tensor) -> None:
        self.logits = logits


def _cache_names(model: nn.Module) -> tuple[str, str]:
    """(forward keyword, output attribute) of the KV cache: transformers 5 renamed past_key_values
    to cache (the old name still works there, with a deprecation warning)."""
    params = inspect.signature(model.forward).parameters
    return ("cache", "cache") if "cache" in params else ("past_key_values", "past_key_values")


def generate_tokens(model: nn.Module, input_ids: Iterable[int], max_new_tokens: int, *,
                    eos_token_id: Any = None, temperature: float = 0.0,
                    generator: Optional[torch.Generator] = None,
                    on_token: Optional[Callable[[int], None]] = None,
                    on_logits: Optional[Callable[[Tensor], None]] = None) -> list[int]:
    """The new token ids (at most max_new_tokens; the loop ends after an end-of-sequence id, which
    is included, as generate() does). temperature 0: greedy (argmax of the fp32 logits, first
    index on ties, as generate()); above 0: sampled from softmax(logits / temperature) with
    `generator`. on_token(id) is called for each token as it is chosen (streaming), on_logits(fp32
    [1, vocab]) with the logits it was chosen from."""
    ids = [int(i) for i in input_ids]
    if not ids:
        raise ValueError("input_ids: empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if eos_token_id is None:
        eos_token_id = getattr(model.config, "eos_token_id", None)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    device = next(model.parameters()).device
    cache_kw, cache_attr = _cache_names(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    was_training = model.training
    model.eval()
    out_ids: list[int] = []
    try:
        with torch.inference_mode():
            x = torch.tensor([ids], device=device)
            mask = torch.ones(1, len(ids) + max_new_tokens, dtype=torch.long, device=device)
            out = model(input_ids=x, attention_mask=mask[:, :len(ids)], use_cache=True, **keep)
            cache = getattr(out, cache_attr)
            fast = (_LlamaStep(model, cache, len(ids), len(ids) + max_new_tokens)
                    if max_new_tokens > 1 and _LlamaStep.supports(model, cache) else None)
            for step in range(max_new_tokens):
                logits = out.logits[:, -1].to(dtype=torch.float32)
                if on_logits is not None:
                    on_logits(logits.clone())
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    token = int(torch.argmax(logits, dim=-1))
                out_ids.append(token)
                if on_token is not None:
                    on_token(token)
                if token in eos or step == max_new_tokens - 1:
                    break
                n = len(ids) + len(out_ids)
                if fast is not None:
                    out = _Logits(fast(token, n - 1))
                    continue
                out = model(input_ids=torch.tensor([[token]], device=device), attention_mask=mask[:, :n],
                            use_cache=True, **{cache_kw: cache}, **keep)
                cache = getattr(out, cache_attr)
    finally:
        model.train(was_training)
    return out_ids
