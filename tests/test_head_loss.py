"""nf4lora.train.head_loss against the bf16-autocast reference (dense head + F.cross_entropy on fp32
logits): the loss and dL/dh, with and without bias, vocabularies that do not fill the last chunk,
fewer rows than a row chunk; bad input; CausalLMLoss fused == plain on a tiny Llama."""
import pytest
import torch
import torch.nn.functional as F

from nf4lora.train import head_loss
from nf4lora.train.head_loss import head_cross_entropy


CUDA = torch.cuda.is_available()
# "cpu": fp32 GEMMs over bf16 values (a CPU where they beat bf16 ones); "cpu-bf16": bf16 GEMMs, the
# scale kept a tensor (a CPU with fast bf16 GEMMs, and every other device); "cuda": that route on a GPU.
ROUTES = ["cpu", "cpu-bf16", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU")])]


def on(route, monkeypatch):
    """The device of `route`, with the module set to take that route there."""
    from nf4lora.ops import DISPATCH
    monkeypatch.setattr(DISPATCH, "cpu_gemm_fp32", route == "cpu")
    return "cuda" if route == "cuda" else "cpu"


def reference(h, w, b, t):
    hh = h.detach().clone().requires_grad_(True)
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        z = F.linear(hh, w, b)
    loss = F.cross_entropy(z.float(), t, reduction="sum")
    return loss, hh


@pytest.mark.parametrize("T,H,V,bias", [(1, 64, 259, False), (17, 96, 4097, True), (130, 64, 9000, False),
                                        (65, 32, 64, True)])
@pytest.mark.parametrize("route", ROUTES)
def test_matches_autocast_reference(T, H, V, bias, route, monkeypatch):
    dev = on(route, monkeypatch)
    monkeypatch.setattr(head_loss, "VOCAB_CHUNK", 1000)  # several chunks, a partial last one
    g = torch.Generator().manual_seed(T + V)
    h = (torch.randn(T, H, generator=g)).bfloat16().to(dev)
    w = (torch.randn(V, H, generator=g) * 0.3).bfloat16().to(dev)
    b = (torch.randn(V, generator=g) * 0.1).bfloat16().to(dev) if bias else None
    t = torch.randint(0, V, (T,), generator=g).to(dev)
    scale = 1.0 / 7
    ref, hr = reference(h, w, b, t)
    (ref * scale).backward()
    hf = h.clone().requires_grad_(True)
    got = head_cross_entropy(hf, w, b, t)
    (got * scale).backward()
    assert got.dtype == torch.float32 and got.device.type == dev
    # the same bf16 logits: the losses differ only by summation order
    assert abs(float(got.detach()) - float(ref.detach())) <= 1e-5 * abs(float(ref.detach())) + 1e-4
    # dL/dh: softmax - onehot rounded to bf16 before (here) or after (reference) the scale, then a
    # GEMM rounded to bf16: within a few bf16 ulps of the reference's magnitude
    err = (hf.grad.float() - hr.grad.float()).abs().max()
    assert hf.grad.dtype == torch.bfloat16 and err <= 2e-2 * hr.grad.float().abs().max() + 1e-6, float(err)


@pytest.mark.parametrize("route", ROUTES)
def test_same_under_autocast(route, monkeypatch):
    """Autocast must not change the GEMMs inside (the trainer calls it under autocast)."""
    dev = on(route, monkeypatch)
    h = torch.randn(70, 64).bfloat16().to(dev)
    w = (torch.randn(3000, 64) * 0.3).bfloat16().to(dev)
    t = torch.randint(0, 3000, (70,)).to(dev)
    outs = []
    for enabled in (False, True):
        hh = h.clone().requires_grad_(True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=enabled):
            loss = head_cross_entropy(hh, w, None, t)
            loss.backward()
        outs.append((loss.detach(), hh.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_no_grad_needed_keeps_nothing():
    h = torch.randn(5, 32).bfloat16()
    w = torch.randn(50, 32).bfloat16()
    t = torch.randint(0, 50, (5,))
    loss = head_cross_entropy(h, w, None, t)
    ref, _ = reference(h, w, None, t)
    assert loss.grad_fn is None and abs(float(loss) - float(ref.detach())) < 1e-3


def test_bad_input():
    h, w = torch.randn(4, 8).bfloat16(), torch.randn(10, 8).bfloat16()
    with pytest.raises(ValueError, match="must be"):
        head_cross_entropy(h, torch.randn(10, 9).bfloat16(), None, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets has shape"):
        head_cross_entropy(h, w, None, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
        head_cross_entropy(h, w, None, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
        head_cross_entropy(h, w, None, torch.tensor([0, -100, 1, 2]))
    with pytest.raises(ValueError, match="bias has shape"):
        head_cross_entropy(h, w, torch.zeros(9).bfloat16(), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("dev,fp32_gemm", [("cpu", True), ("cpu", False), pytest.param(
    "cuda", False, marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])])
def test_causal_lm_loss_fused_equals_plain(dev, fp32_gemm, monkeypatch):
    """The trainer's loss module: fused head against the plain head, same loss and same adapter
    gradients to bf16 precision, under bf16 autocast on the CPU (its GEMMs in fp32 or bf16, as
    calibrated) and on CUDA."""
    import nf4lora as nl
    from nf4lora.ops import DISPATCH
    from nf4lora.train import CausalLMLoss
    from transformers import AutoModelForCausalLM
    from .tiny_lm import tiny_config
    monkeypatch.setattr(DISPATCH, "cpu_gemm_fp32", fp32_gemm)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).to(torch.bfloat16).to(dev)
    model = nl.get_lora_model(nl.quantize_model(model), nl.LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ids = torch.randint(0, 259, (3, 40))
    labels = ids.clone()
    labels[:, :15] = -100
    mask = torch.ones_like(ids)
    mask[2, 30:] = 0
    labels[2, 30:] = -100
    ids, labels, mask = ids.to(dev), labels.to(dev), mask.to(dev)
    applies = True
    results = []
    for fused in (True, False):
        lm = CausalLMLoss(model, fused_head=fused)
        assert lm._fused(model.get_output_embeddings(), torch.zeros(1, device=dev).bfloat16()) is False  # no autocast here
        with torch.autocast(dev, dtype=torch.bfloat16):
            assert lm._fused(model.get_output_embeddings(), torch.zeros(1, device=dev)) == (fused and applies)
            loss, n = lm(input_ids=ids, attention_mask=mask, labels=labels)
        (loss / n).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        results.append((float(loss.detach()), int(n), grads))
    (l1, n1, g1), (l2, n2, g2) = results
    assert n1 == n2 == int((labels[:, 1:] != -100).sum())
    assert abs(l1 - l2) <= 1e-4 * abs(l2)
    for k in g1:
        scale = g2[k].abs().max()
        assert (g1[k] - g2[k]).abs().max() <= 3e-2 * scale + 1e-7, k
