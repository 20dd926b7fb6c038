"""DoRA (use_dora=True) against PEFT 0.21's DoRA: outputs and the gradients of x, A, B and the
magnitude over nn.Linear bases (same dtype, PEFT's formula) and over 4-bit bases (ours vs PEFT
over a bitsandbytes Linear4bit holding the same packed bytes, both against a float64 DoRA on the
dequantized weight, under the 2x error rule), with and without lora_dropout; the chunked row norm
against a dense float64 one; merge / unmerge / merge_and_unload against the unmerged forward; and
PEFT's files both ways on tests/tiny_lm.py's Llama (lora_magnitude_vector keys, use_dora: true)."""
import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nf4lora as nl
from nf4lora import Linear4bit, LoraConfig, LoraLinear
from nf4lora.lora import layer as lora_layer

peft = pytest.importorskip("peft", reason="PEFT's DoRA is the reference (pip install '.[test]')")
transformers = pytest.importorskip("transformers", reason="tests/tiny_lm.py's Llama is a transformers model")
bnb = pytest.importorskip("bitsandbytes", reason="PEFT's QDoRA runs over a bitsandbytes Linear4bit (pip install '.[test]')")

from tests.tiny_lm import tiny_config  # noqa: E402

NAMES = ("y", "dx", "dA", "dB", "dm")


def stack(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 8))


def perturb(model, seed=1):
    """A trained-looking DoRA adapter: B != 0 and a magnitude away from ||W + sBA||."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))


def copy_adapters(src, dst):
    """Our adapter parameters into PEFT's model (same names but PEFT's base_model.model. prefix)."""
    theirs = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_" in name:
                theirs["base_model.model." + name].copy_(p)


def lora_grads(model):
    return {n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_float_base_outputs_and_gradients_equal_peft(dropout):
    cfg = dict(r=4, lora_alpha=8, target_modules=["0", "2", "4"], use_dora=True, lora_dropout=dropout)
    ours = nl.get_lora_model(stack(), LoraConfig(**cfg))
    theirs = peft.get_peft_model(stack(), peft.LoraConfig(**cfg))
    # a fresh DoRA adapter is a no-op and its magnitude is PEFT's initial one, ||W||_row
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(2))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        assert torch.allclose(ours(x), stack()(x), atol=1e-6)
    m_ours = dict(ours.named_parameters())["2.lora_magnitude_vector.default.weight"]
    m_theirs = dict(theirs.named_parameters())["base_model.model.2.lora_magnitude_vector.default.weight"]
    assert torch.allclose(m_ours, m_theirs, rtol=1e-6)
    perturb(ours)
    copy_adapters(ours, theirs)
    ours.train(), theirs.train()
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = []
    for model, xx in zip((ours, theirs), xs):
        torch.manual_seed(5)  # the same dropout masks: PEFT and we draw them in the same order
        y = model(xx)
        y.square().sum().backward()
        outs.append(y.detach())
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    assert torch.allclose(xs[0].grad, xs[1].grad, atol=1e-5, rtol=1e-5)
    g_ours, g_theirs = lora_grads(ours), lora_grads(theirs)
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) == 3 * 3
    for name, g in g_ours.items():
        assert torch.allclose(g, g_theirs[name], atol=1e-4, rtol=1e-5), name


# ---- 4-bit bases: ours vs PEFT over bitsandbytes, both against float64 ---------------------------


def dora_4bit_pair(N, K, dtype, dropout=0.0, seed=0):
    """Our LoraLinear(Linear4bit, use_dora) and PEFT's DoRA over a bitsandbytes Linear4bit with the
    same packed bytes and state, with the same adapter."""
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(K, N)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
        dense.bias.copy_(torch.randn(N, generator=g) * 0.1)
    base = Linear4bit.from_linear(dense, compute_dtype=dtype)
    ours = LoraLinear(base, r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True)
    stats = {k[len("weight."):]: v for k, v in base.state_dict().items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=base.weight.data.clone(), quantized_stats=stats, device="cpu")
    theirs_base = bnb.nn.Linear4bit(K, N, bias=True, compute_dtype=dtype, quant_type="nf4")
    theirs_base.weight = param
    theirs_base.bias = nn.Parameter(dense.bias.detach().clone(), requires_grad=False)
    theirs = peft.get_peft_model(nn.Sequential(theirs_base), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0"], use_dora=True))
    with torch.no_grad():
        ours.lora_A["default"].weight.copy_(torch.randn(4, K, generator=g) * 0.1)
        ours.lora_B["default"].weight.copy_(torch.randn(N, 4, generator=g) * 0.1)
        m = ours.lora_magnitude_vector["default"].weight
        m.mul_(1 + 0.2 * torch.randn(m.shape, generator=g))
        layer = theirs.base_model.model[0]
        for d in ("lora_A", "lora_B", "lora_magnitude_vector"):
            getattr(layer, d)["default"].weight.copy_(getattr(ours, d)["default"].weight)
    return ours, theirs


def reference(ours, x, x_d=None):
    """DoRA in float64 over the dequantized weight (the norm detached, as the paper and PEFT)."""
    base = ours.base_layer
    W = base.dequantize(torch.float32).double()
    A, B = ours.lora_A["default"].weight, ours.lora_B["default"].weight
    m = ours.lora_magnitude_vector["default"].weight
    s = ours.scaling["default"]
    A64, B64 = A.double(), B.double()
    norm = torch.linalg.vector_norm(W + s * B64.detach() @ A64.detach(), dim=1)
    c = m.double() / norm
    x64 = x.double()
    b = base.bias.double()
    if x_d is None:
        return c * (x64 @ W.T + s * (x64 @ A64.T) @ B64.T) + b
    xd = x_d.double()
    return x64 @ W.T + b + (c - 1) * (xd @ W.T) + c * (s * (xd @ A64.T) @ B64.T)


def run(fn, params, x, gy):
    xx = x.clone().requires_grad_(True)
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    y = fn(xx)
    y.backward(gy.to(y.dtype))
    out = [y.detach().double(), xx.grad.double()] + [p.grad.double() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("fp32_gemm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [3, 40, 300])
def test_4bit_base_within_twice_peft_error(dtype, M, fp32_gemm, monkeypatch):
    # fp32_gemm: bf16 products above the fused-kernel sizes as fp32 GEMMs (nf4lora.ops.DISPATCH)
    monkeypatch.setattr(nl.ops.DISPATCH, "cpu_gemm_fp32", fp32_gemm)
    worst = {}
    for N, K in [(48, 64), (96, 192)]:
        ours, theirs = dora_4bit_pair(N, K, dtype, seed=N)
        ours.train(), theirs.train()  # bitsandbytes' CPU eval path is off its own weights by ~2e-3
        layer = theirs.base_model.model[0]
        P_ours = [ours.lora_A["default"].weight, ours.lora_B["default"].weight,
                  ours.lora_magnitude_vector["default"].weight]
        P_theirs = [getattr(layer, d)["default"].weight for d in ("lora_A", "lora_B", "lora_magnitude_vector")]
        g = torch.Generator().manual_seed(M)
        x = torch.randn(M, K, generator=g).to(dtype)
        gy = torch.randn(M, N, generator=g)
        ref = run(lambda t: reference(ours, t), P_ours, x, gy)
        got = run(ours, P_ours, x, gy)
        peft_ = run(theirs, P_theirs, x, gy)
        for what, r, o, p in zip(NAMES, ref, got, peft_):
            e, pe, scale = worst.get(what, (0.0, 0.0, 0.0))
            worst[what] = (max(e, (o - r).abs().max().item()), max(pe, (p - r).abs().max().item()),
                           max(scale, r.abs().max().item()))
    for what, (err, peft_err, scale) in worst.items():
        assert err <= 2 * peft_err + 1e-6 * scale, (dtype, M, what, err, peft_err)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_4bit_dropout_path_matches_float64(dtype):
    """With lora_dropout in training: base(x) + (c - 1) x_d W^T + c s x_d A^T B^T, PEFT's formula,
    on the same dropped input; within twice PEFT's error on the same masks."""
    N, K, M = 48, 128, 17
    ours, theirs = dora_4bit_pair(N, K, dtype, dropout=0.25, seed=3)
    ours.train(), theirs.train()
    layer = theirs.base_model.model[0]
    P_ours = [ours.lora_A["default"].weight, ours.lora_B["default"].weight, ours.lora_magnitude_vector["default"].weight]
    P_theirs = [getattr(layer, d)["default"].weight for d in ("lora_A", "lora_B", "lora_magnitude_vector")]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(M, K, generator=g).to(dtype)
    gy = torch.randn(M, N, generator=g)
    mask = (torch.rand(M, K, generator=g) > 0.25).to(dtype) / 0.75

    def dropped(module):
        def f(t):
            return t * mask.to(t.dtype)
        return f

    for model in (ours.lora_dropout["default"], layer.lora_dropout["default"]):
        model.forward = dropped(model)
    ref = run(lambda t: reference(ours, t, x_d=t * mask), P_ours, x, gy)
    got = run(ours, P_ours, x, gy)
    peft_ = run(theirs, P_theirs, x, gy)
    for what, r, o, p in zip(NAMES, ref, got, peft_):
        err, peft_err = (o - r).abs().max().item(), (p - r).abs().max().item()
        assert err <= 2 * peft_err + 1e-6 * r.abs().max().item(), (dtype, what, err, peft_err)


# ---- the row norm without a dense weight --------------------------------------------------------


@pytest.mark.parametrize("shape,blocksize,quant_type,double_quant", [
    ((37, 96), 64, "nf4", True),     # a block starts a row every 2 rows: chunks of even rows
    ((300, 64), 64, "fp4", True),    # chunks cross the 256-block groups of the nested absmax
    ((61, 40), 128, "nf4", False),   # blocks span rows: 16 rows per whole-block chunk
])
def test_chunked_row_norm_equals_the_dense_float64_norm(shape, blocksize, quant_type, double_quant, monkeypatch):
    N, K = shape
    g = torch.Generator().manual_seed(N)
    dense = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(N, K, generator=g))
    base = Linear4bit.from_linear(dense, quant_type, blocksize, double_quant, torch.float32)
    A, B = torch.randn(3, K, generator=g), torch.randn(N, 3, generator=g) * 0.3
    W = base.dequantize(torch.float32).double()
    expected = torch.linalg.vector_norm(W + 0.7 * B.double() @ A.double(), dim=1)
    seen = []
    real = lora_layer.dequantize_4bit

    def spy(packed, state, out=None, dtype=None):
        seen.append(tuple(out.shape))
        return real(packed, state, out=out, dtype=dtype)

    monkeypatch.setattr(lora_layer, "dequantize_4bit", spy)
    for chunk_bytes in (1, 4 * K * 5, 1 << 20):
        seen.clear()
        got = lora_layer.dora_weight_norm(base, A, B, 0.7, chunk_bytes=chunk_bytes)
        assert got.dtype == torch.float32 and got.shape == (N,)
        assert torch.allclose(got.double(), expected, rtol=1e-6), chunk_bytes
        rows = lora_layer._chunk_rows(base, chunk_bytes)
        assert sum(r for r, _ in seen) == N and max(r for r, _ in seen) == min(rows, N)
        if chunk_bytes < 4 * N * K:
            assert len(seen) > 1  # never the whole weight at once
    # the float base: the same norm from nn.Linear's weight
    got = lora_layer.dora_weight_norm(dense, A, B, 0.7, chunk_bytes=4 * K * 3)
    expected = torch.linalg.vector_norm(dense.weight.double() + 0.7 * B.double() @ A.double(), dim=1)
    assert torch.allclose(got.double(), expected, rtol=1e-6)


# ---- merging --------------------------------------------------------------------------------------


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config()).eval()


IDS = torch.randint(0, 259, (2, 9), generator=torch.Generator().manual_seed(4))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_merge_unmerge_and_merge_and_unload_float_base():
    model = nl.get_lora_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_dora=True))
    perturb(model)
    model.eval()
    expected = logits(model)
    plain = logits(tiny_llama())
    assert not torch.allclose(plain, expected, atol=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nl.merge_adapter(model)
    assert torch.allclose(logits(model), expected, atol=1e-4)
    nl.unmerge_adapter(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model), expected)
    dense = nl.merge_and_unload(model)
    assert not any(isinstance(m, LoraLinear) for m in dense.modules())
    assert torch.allclose(logits(dense), expected, atol=1e-4)


def test_merge_into_4bit_and_merge_and_unload_4bit_base():
    model = nl.get_lora_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_dora=True), quantize="nf4",
                              compute_dtype=torch.float32)
    perturb(model)
    model.eval()
    expected = logits(model)
    packed = {k: v.clone() for k, v in model.state_dict().items()}
    report = nl.merge_adapter(model, merge_into_4bit=True)
    assert len(report) == 2 * 7 and max(report.values()) < 0.15  # one NF4 requantization
    nl.unmerge_adapter(model)
    assert all(torch.equal(v, packed[k]) for k, v in model.state_dict().items())
    dense = nl.merge_and_unload(model)
    assert torch.allclose(logits(dense), expected, atol=1e-4)


# ---- PEFT's files, both ways ----------------------------------------------------------------------


def test_saved_keys_and_config_are_what_peft_writes(tmp_path):
    ours = nl.get_lora_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_dora=True))
    nl.save_adapter(ours, tmp_path / "ours")
    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           use_dora=True))
    pm.save_pretrained(tmp_path / "peft")
    shapes = {name: {k: tuple(v.shape) for k, v in nl.read_adapter(tmp_path / name)[1].items()}
              for name in ("ours", "peft")}
    assert shapes["ours"] == shapes["peft"] and len(shapes["ours"]) == 3 * 7 * 2
    assert shapes["ours"]["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] == (64,)
    for name in ("ours", "peft"):
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_ours_loads_in_peft_and_peft_loads_in_ours(dropout, tmp_path):
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
               lora_dropout=dropout)
    ours = nl.get_lora_model(tiny_llama(), LoraConfig(**cfg))
    perturb(ours)
    ours.eval()
    expected = logits(ours)
    nl.save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert torch.allclose(logits(loaded), expected, atol=1e-5)

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**cfg))
    perturb(pm, seed=7)
    pm.eval()
    expected = logits(pm)
    pm.save_pretrained(tmp_path / "peft")
    model = nl.load_adapter(tiny_llama(), tmp_path / "peft")
    assert nl.adapter_config(model).use_dora
    assert torch.allclose(logits(model), expected, atol=1e-5)
    # trained further from PEFT's file: the magnitude is a trainable parameter
    model = nl.load_adapter(tiny_llama(), tmp_path / "peft", is_trainable=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight" in names and len(names) == 3 * 3 * 2


def test_adapter_trained_on_a_4bit_base_loads_in_peft_on_the_dequantized_base(tmp_path):
    model = nl.get_lora_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_dora=True), quantize="nf4",
                              compute_dtype=torch.float32)
    perturb(model)
    model.eval()
    expected = logits(model)
    nl.save_adapter(model, tmp_path)
    base = tiny_llama()
    nl.quantize_model(base, compute_dtype=None)
    nl.merge_and_unload(nl.get_lora_model(base, LoraConfig(r=1, target_modules=["q_proj"])), dtype=None)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    assert torch.allclose(logits(loaded), expected, atol=1e-4)


def test_file_and_config_must_agree_on_dora(tmp_path):
    plain = nl.get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    nl.save_adapter(plain, tmp_path / "plain")
    dora = nl.get_lora_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    nl.save_adapter(dora, tmp_path / "dora")
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(ValueError, match="DoRA magnitudes"):
        nl.load_adapter(tiny_llama(), tmp_path / "dora")
    cfg = json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    (tmp_path / "plain" / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="missing keys.*lora_magnitude_vector"):
        nl.load_adapter(tiny_llama(), tmp_path / "plain")
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        LoraConfig(use_dora="yes")


def test_named_adapters_mix_dora_and_lora_and_train_the_magnitude():
    model = nl.get_lora_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    nl.add_adapter(model, "plain", LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    q = model.model.layers[0].self_attn.q_proj
    assert q.use_dora == {"default": True, "plain": False}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight" in trainable
    assert nl.trainable_parameters(model).trainable == 2 * (4 * 64 + 64 * 4 + 64)
    nl.set_adapter(model, "plain")
    assert not any("magnitude" in n for n, p in model.named_parameters() if p.requires_grad)
    nl.set_adapter(model, "default")
    perturb(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    m0 = q.lora_magnitude_vector["default"].weight.detach().clone()
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    assert not torch.equal(q.lora_magnitude_vector["default"].weight, m0)
    nl.delete_adapter(model, "default")
    assert len(q.lora_magnitude_vector) == 0 and "dora" not in repr(q)


def test_load_model_with_a_dora_config_equals_get_lora_model(tmp_path):
    from tests.tiny_lm import save_tiny_model
    folder = save_tiny_model(tmp_path / "tiny")
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True)
    layerwise, _ = nl.load_model(folder, lora=cfg)  # each target wrapped as its weight arrives
    model, _ = nl.load_model(folder)
    whole = nl.get_lora_model(model, cfg)
    m1 = {n: p for n, p in layerwise.named_parameters() if "magnitude" in n}
    m2 = {n: p for n, p in whole.named_parameters() if "magnitude" in n}
    assert m1.keys() == m2.keys() and len(m1) == 2 * 7
    assert all(torch.equal(p, m2[n]) for n, p in m1.items())
