"""nf4lora.train.cpu_attention: a tiny Llama switched to the calibrated CPU attention gives sdpa's
logits and gradients to bf16 precision (with padding) by each route (fp32; bf16 with enable_gqa),
and exactly sdpa's by the "sdpa" route. The attention function itself is checked on peaked scores
(most of a row's weight on a few keys) against a float64 softmax(q k^T * scaling + mask) v under
the 2x error rule (error at most twice that of torch's bf16 sdpa), and so are the gradients of
q, k, v by each route of nf4lora.ops.attention; test_the_check_catches_mutants shows that check
fails for a softmax scale off by 5%, values scaled by 1.01 and a dropped mask."""
import math

import pytest
import torch

from nf4lora.ops import DISPATCH
from nf4lora.train import cpu_attention as attention

from .tiny_lm import tiny_config


class _Attn(torch.nn.Module):  # what sdpa_attention_forward reads from a transformers attention module
    num_key_value_groups = 2
    is_causal = True


def peaked_inputs(seed=0):
    """bf16 q, k, v [batch 3, heads 4 (2 kv heads), 37 tokens, head dim 16] with scores of std ~4
    (a row's largest softmax weight has a median of ~0.7), and a causal mask with right padding in
    row 1 and left padding in row 2, as a bool [3, 1, 37, 37] (True: attend)."""
    g = torch.Generator().manual_seed(seed)
    B, H, KV, L, D = 3, 4, 2, 37, 16
    q = (torch.randn(B, H, L, D, generator=g) * 2).bfloat16()
    k = (torch.randn(B, KV, L, D, generator=g) * 2).bfloat16()
    v = torch.randn(B, KV, L, D, generator=g).bfloat16()
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, 25:] = False
    keep[2, :6] = False
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool))[None, None] & keep[:, None, None, :]
    mask |= ~mask.any(-1, keepdim=True)  # rows with no key left (left padding) attend everywhere, as in transformers
    return q, k, v, mask, D ** -0.5


def attention_reference(q, k, v, mask, scaling):
    """float64 softmax(q k^T * scaling + mask) v, kv heads repeated; [batch, tokens, heads, dim]."""
    groups = q.shape[1] // k.shape[1]
    k64, v64 = (t.double().repeat_interleave(groups, 1) for t in (k, v))
    scores = (q.double() @ k64.transpose(-1, -2) * scaling).masked_fill(~mask, -math.inf)
    return (scores.softmax(-1) @ v64).transpose(1, 2)


def attention_error_ratio(fn, q, k, v, mask, scaling):
    """(max error of fn, max error of torch's bf16 sdpa), both against the float64 reference."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    want = attention_reference(q, k, v, mask, scaling)
    got = fn(_Attn(), q, k, v, mask, dropout=0.0, scaling=scaling)[0]
    base = sdpa_attention_forward(_Attn(), q, k, v, mask, dropout=0.0, scaling=scaling)[0]
    assert got.shape == want.shape and got.dtype == q.dtype
    return (got.double() - want).abs().max().item(), (base.double() - want).abs().max().item()


def registered_attention():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS[attention.register()]


def run(model, ids, mask):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logits.float().square().mean().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("route", ["fp32", "gqa", "sdpa"])
def test_matches_sdpa(route, monkeypatch):
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(DISPATCH, "cpu_attention", route)
    fp32 = route != "sdpa"  # a route of its own: the 2x rule (the "sdpa" route: exactly sdpa)
    # The attention function itself, on peaked scores: the fp32 route under the 2x error rule,
    # the plain route exactly sdpa.
    q, k, v, amask, scaling = peaked_inputs()
    err, err_sdpa = attention_error_ratio(registered_attention(), q, k, v, amask, scaling)
    assert err <= 2 * err_sdpa if fp32 else err == err_sdpa, (err, err_sdpa)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config())
    with torch.no_grad():  # peaked attention in the model too (random init gives near-uniform weights)
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(6)
    model = model.to(torch.bfloat16)
    ids = torch.randint(0, 259, (3, 37))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, :6] = 0
    assert model.config._attn_implementation == "sdpa"
    ref_logits, ref_grads = run(model, ids, mask)
    assert attention.use_fp32_cpu_attention(model) and model.config._attn_implementation == attention.ATTN_IMPLEMENTATION
    assert not attention.use_fp32_cpu_attention(model)  # already switched
    logits, grads = run(model, ids, mask)
    if not fp32:
        assert torch.equal(logits, ref_logits) and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
        return
    if route == "fp32":
        assert not torch.equal(logits, ref_logits)  # the fp32 route did run
    assert (logits - ref_logits).abs().max() <= 0.02 * ref_logits.abs().max()
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert (grads[k] - ref_grads[k]).abs().max() <= 0.05 * ref_grads[k].abs().max() + 1e-6, k


@pytest.mark.parametrize("route", ["fp32", "gqa"])
def test_gradients_of_each_route_under_the_2x_rule(route):
    """dL/dq, dL/dk, dL/dv of nf4lora.ops.attend by `route` against float64, at most twice the
    error of transformers' bf16 sdpa (k, v repeated to the query heads)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from nf4lora.ops import attend
    q, k, v, mask, scaling = peaked_inputs()
    gy = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3], generator=torch.Generator().manual_seed(1))

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(gy.to(dtype))
        return [t.grad.double() for t in leaves]

    want = grads(lambda q, k, v: attention_reference(q, k, v, mask, scaling), torch.float64)
    ours = grads(lambda q, k, v: attend(q, k, v, mask, scaling, 0.0, False, route).transpose(1, 2), torch.bfloat16)
    base = grads(lambda q, k, v: sdpa_attention_forward(_Attn(), q, k, v, mask, dropout=0.0, scaling=scaling)[0],
                 torch.bfloat16)
    for name, a, b, w in zip("qkv", ours, base, want):
        err, err_sdpa = (a - w).abs().max().item(), (b - w).abs().max().item()
        assert err <= 2 * err_sdpa, (name, err, err_sdpa)
    with pytest.raises(ValueError, match="unknown attention route"):
        attend(q, k, v, mask, scaling, 0.0, False, "flash")
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attend(q[:, :3], k, v, mask, scaling, 0.0, False, route)


@pytest.mark.parametrize("route", ["fp32", "gqa"])
def test_the_check_catches_mutants(route, monkeypatch):
    """The check of test_matches_sdpa fails for an attention with the softmax scale off by 5%, the
    values scaled by 1.01, or the mask dropped (causal only, so the padding leaks in)."""
    monkeypatch.setattr(DISPATCH, "cpu_attention", route)
    fn = registered_attention()
    q, k, v, mask, scaling = peaked_inputs()
    mutants = {
        "scale x1.05": lambda m, q, k, v, am, scaling, **kw: fn(m, q, k, v, am, scaling=scaling * 1.05, **kw),
        "values x1.01": lambda m, q, k, v, am, **kw: fn(m, q, k, (v.float() * 1.01).to(v.dtype), am, **kw),
        "mask dropped": lambda m, q, k, v, am, **kw: fn(m, q, k, v, None, **kw),
    }
    for name, mutant in mutants.items():
        err, err_sdpa = attention_error_ratio(mutant, q, k, v, mask, scaling)
        assert err > 2 * err_sdpa, f"{name}: error {err:.4g} passes the 2x rule (sdpa {err_sdpa:.4g})"


def test_the_sdpa_route_is_transformers_sdpa():
    """nf4lora.ops.attend's "sdpa" route (what the calibration times as the baseline) gives exactly
    transformers' sdpa_attention_forward, output and gradients."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from nf4lora.ops import attend
    q, k, v, mask, scaling = peaked_inputs()
    gy = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).bfloat16()
    results = []
    for fn in (lambda q, k, v: attend(q, k, v, mask, scaling, 0.0, False, "sdpa").transpose(1, 2),
               lambda q, k, v: sdpa_attention_forward(_Attn(), q, k, v, mask, dropout=0.0, scaling=scaling)[0]):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(gy)
        results.append([out.detach()] + [t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*results))
