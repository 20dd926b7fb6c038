"""Greedy and sampled decoding for `nf4lora generate`: a plain loop of the model's own forward with
its KV cache, one token per step, instead of transformers' generate(), whose per-step machinery
(logits processors, stopping criteria, input preparation, cache bookkeeping) costs as much as the
135M model's forward on a CPU. The forward calls, their inputs and the token choice are generate()'s,
so the tokens are the same: tests/test_generate.py compares the logits of every step with
generate(output_logits=True), bit for bit; bench/bench_generate.py measures the speed."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn


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
                out = model(input_ids=torch.tensor([[token]], device=device), attention_mask=mask[:, :n],
                            use_cache=True, **{cache_kw: cache}, **keep)
                cache = getattr(out, cache_attr)
    finally:
        model.train(was_training)
    return out_ids
