"""nf4lora.train.fused_norm: the hand-written RMSNorm against transformers' LlamaRMSNorm, forward and
both gradients, in fp32 and bf16, each under the 2x error rule (error against a float64 run of
LlamaRMSNorm at most twice that of LlamaRMSNorm in the same dtype); a tiny Llama switched to it
gives the same logits and gradients and is switched back; test_the_check_catches_mutants shows the
check fails for a backward without the mean term, without the 1/rms factor, a weight gradient
without x_hat, and a forward that forgets the weight."""
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from nf4lora.train.fused_norm import RMSNormFunction, restore_rmsnorm, rms_norm, use_fused_rmsnorm

from .tiny_lm import tiny_config


def inputs(dtype, seed=0, shape=(3, 29, 96)):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)
    return x, w, gy


def run(fn, x, w, gy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    y.backward(gy)
    return y.detach(), x.grad, w.grad


def hf_norm(eps):
    def fn(x, w):
        m = LlamaRMSNorm(w.shape[0], eps)
        del m.weight
        m.weight = w  # the leaf itself, so its .grad is filled
        return m(x)
    return fn


def errors(fn, dtype, eps=1e-5):
    """max |error| of (y, dL/dx, dL/dw) of fn and of LlamaRMSNorm in dtype, against float64."""
    x, w, gy = inputs(dtype)
    ref = run(hf_norm(eps), x.double(), w.double(), gy.double())
    ours = run(fn, x, w, gy)
    theirs = run(hf_norm(eps), x, w, gy)
    err = [(a.double() - r).abs().max().item() for a, r in zip(ours, ref)]
    err_torch = [(a.double() - r).abs().max().item() for a, r in zip(theirs, ref)]
    scale = [r.abs().max().item() for r in ref]
    for a, r in zip(ours, ref):
        assert a.dtype == dtype and a.shape == r.shape
    return err, err_torch, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_llama_rmsnorm_under_the_2x_rule(dtype):
    err, err_torch, scale = errors(lambda x, w: rms_norm(x, w, 1e-5), dtype)
    for name, e, et, s in zip(("y", "dL/dx", "dL/dw"), err, err_torch, scale):
        assert e <= 2 * et + 1e-6 * s, (name, e, et)


def test_fp32_input_is_not_modified_and_bad_shapes_are_refused():
    x, w, gy = inputs(torch.float32)
    keep = x.clone()
    xr = x.clone().requires_grad_()
    rms_norm(xr, w, 1e-5).backward(gy)
    assert torch.equal(xr.detach(), keep)
    with pytest.raises(ValueError, match="last dimension"):
        rms_norm(x, w[:-1], 1e-5)


def test_a_tiny_llama_gives_the_same_logits_and_gradients_and_is_switched_back():
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).to(torch.bfloat16)
    ids = torch.randint(0, 259, (2, 23))

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        logits.float().square().mean().backward()
        return logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}

    ref_logits, ref_grads = step()
    switched = use_fused_rmsnorm(model)
    n_norms = sum(type(m).__name__ == "LlamaRMSNorm" for m in model.modules())
    assert len(switched) == n_norms > 0 and use_fused_rmsnorm(model) == []  # already switched
    logits, grads = step()
    assert (logits - ref_logits).abs().max() <= 0.02 * ref_logits.abs().max()
    for k in ref_grads:
        assert (grads[k] - ref_grads[k]).abs().max() <= 0.05 * ref_grads[k].abs().max() + 1e-6, k
    restore_rmsnorm(switched)
    assert all("forward" not in m.__dict__ for m in model.modules())
    logits, grads = step()
    assert torch.equal(logits, ref_logits)


def test_other_norms_are_left_alone():
    class GemmaRMSNorm(torch.nn.Module):  # y = (1 + w) * x_hat: not the formula
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

    assert use_fused_rmsnorm(torch.nn.Sequential(GemmaRMSNorm())) == []


def _mutant_backward(kind):
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        x_hat = x.float() * rstd
        g_hat = grad_y.float() * weight.float()
        dot = (g_hat * x_hat).mean(-1, keepdim=True)
        grad_x = (g_hat - x_hat * dot) * rstd
        grad_w = (grad_y.float() * x_hat).reshape(-1, x.shape[-1]).sum(0)
        if kind == "no mean term":
            grad_x = g_hat * rstd
        elif kind == "no 1/rms":
            grad_x = g_hat - x_hat * dot
        elif kind == "dL/dw without x_hat":
            grad_w = grad_y.float().reshape(-1, x.shape[-1]).sum(0)
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None
    return staticmethod(backward)


@pytest.mark.parametrize("kind", ["no mean term", "no 1/rms", "dL/dw without x_hat", "no weight"])
def test_the_check_catches_mutants(kind, monkeypatch):
    if kind == "no weight":
        fn = lambda x, w: rms_norm(x, torch.ones_like(w), 1e-5) + 0 * w  # noqa: E731
    else:
        monkeypatch.setattr(RMSNormFunction, "backward", _mutant_backward(kind))
        fn = lambda x, w: rms_norm(x, w, 1e-5)  # noqa: E731
    err, err_torch, scale = errors(fn, torch.float32)
    assert any(e > 2 * et + 1e-6 * s for e, et, s in zip(err, err_torch, scale)), (kind, err, err_torch)


@pytest.mark.parametrize("shape", [(3, 29, 96), (1, 1, 576), (2, 70, 100), (5, 2048), (4, 17)])
def test_native_bf16_kernels_against_the_torch_ops(shape, monkeypatch):
    """bf16 on the CPU runs nf4lora/norm.h (ops/norm.py): its forward is the torch ops' (and
    LlamaRMSNorm's) bit for bit, mean summed in torch's order; its backward is the same formula
    within a bf16 rounding (dL/dx) and fp32 summation order (dL/dw), and does not depend on the
    thread count. Sizes that are and are not multiples of the 8-lane sum."""
    import nf4lora.train.fused_norm as fn
    x, w, gy = inputs(torch.bfloat16, seed=5, shape=shape)
    calls = []
    original = fn.native_norm.rms_norm_bf16

    def counted(*a):
        calls.append(1)
        return original(*a)
    monkeypatch.setattr(fn.native_norm, "rms_norm_bf16", counted)
    native = run(lambda a, b: rms_norm(a, b, 1e-5), x, w, gy)
    assert calls, "the native kernels did not run"
    monkeypatch.setattr(fn, "NATIVE", False)
    ops = run(lambda a, b: rms_norm(a, b, 1e-5), x, w, gy)
    hf = run(hf_norm(1e-5), x, w, gy)
    assert torch.equal(native[0], ops[0]) and torch.equal(native[0], hf[0])
    assert (native[1].float() - ops[1].float()).abs().max() <= 2 ** -7 * ops[1].float().abs().max()
    assert torch.allclose(native[2].float(), ops[2].float(), rtol=2 ** -7, atol=1e-3)
    monkeypatch.setattr(fn, "NATIVE", True)
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        again = run(lambda a, b: rms_norm(a, b, 1e-5), x, w, gy)
        assert all(torch.equal(a, b) for a, b in zip(again, native))


def test_native_kernels_take_only_plain_bf16_cpu_tensors():
    from nf4lora.ops import norm as native_norm
    x, w, _ = inputs(torch.bfloat16)
    assert native_norm.applies(x, w)
    assert not native_norm.applies(x.float(), w.float())
    assert not native_norm.applies(x, w.float())
    assert not native_norm.applies(x[:, :0], w)
