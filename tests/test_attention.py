"""nf4lora.train.cpu_attention: a tiny Llama switched to the fp32-on-CPU sdpa gives sdpa's logits and
gradients to bf16 precision (with padding), and exactly sdpa's when the fp32 route is off."""
import pytest
import torch

from nf4lora.ops import DISPATCH
from nf4lora.train import cpu_attention as attention

from .tiny_lm import tiny_config


def run(model, ids, mask):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    logits.float().square().mean().backward()
    return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fp32", [True, False])
def test_matches_sdpa(fp32, monkeypatch):
    from transformers import AutoModelForCausalLM
    monkeypatch.setattr(DISPATCH, "cpu_gemm_fp32", fp32)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).to(torch.bfloat16)
    ids = torch.randint(0, 259, (3, 37))
    mask = torch.ones_like(ids)
    mask[1, 25:] = 0
    assert model.config._attn_implementation == "sdpa"
    ref_logits, ref_grads = run(model, ids, mask)
    assert attention.use_fp32_cpu_attention(model) and model.config._attn_implementation == attention.ATTN_IMPLEMENTATION
    assert not attention.use_fp32_cpu_attention(model)  # already switched
    logits, grads = run(model, ids, mask)
    if not fp32:
        assert torch.equal(logits, ref_logits) and all(torch.equal(grads[k], ref_grads[k]) for k in ref_grads)
        return
    assert not torch.equal(logits, ref_logits)  # the fp32 route did run
    assert (logits - ref_logits).abs().max() <= 0.02 * ref_logits.abs().max()
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert (grads[k] - ref_grads[k]).abs().max() <= 0.05 * ref_grads[k].abs().max() + 1e-6, k
