"""LoRA: the fused 4-bit autograd function against the unfused composition under DESIGN.md's rule
(error vs a float64 reference <= 2x that of the same computation in PyTorch at the same
precision), forward and all gradients, with dropout; frozen bases bit-identical after optimizer
steps; merge/unmerge invariants; named adapters; disable_adapters reproducing the base bit for
bit; merge_and_unload; gradient checkpointing and torch.compile; bad input leaving the model as it was."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import nf4lora as nl
from nf4lora import Linear4bit, LoraConfig, LoraLinear

M_VALUES = [1, 3, 8, 17, 64, 118]
NK = [(17, 96), (64, 128), (130, 256)]


HAS_GPU = torch.cuda.is_available() and nl.has_cuda()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not HAS_GPU, reason="needs a CUDA GPU and an nf4lora build with CUDA kernels")])]


def lora_layer_4bit(N, K, r=4, dtype=torch.bfloat16, seed=0, dropout=0.0, bias=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dense = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(N, K, generator=g) * 0.05)
        if bias:
            dense.bias.copy_(torch.randn(N, generator=g))
    layer = LoraLinear(Linear4bit.from_linear(dense.to(device), compute_dtype=dtype), r=r, lora_alpha=2 * r,
                       lora_dropout=dropout)
    with torch.no_grad():  # a trained-looking adapter: B = 0 would hide half the math
        layer.lora_A["default"].weight.copy_(torch.randn(r, K, generator=g) * 0.1)
        layer.lora_B["default"].weight.copy_(torch.randn(N, r, generator=g) * 0.1)
    return layer


def composition(layer, x, dtype, x_d=None):
    """The unfused composition in `dtype` (float64: the reference): F.linear on the dequantized
    weight plus the LoRA branch, differentiable in x, A, B and the bias."""
    base = layer.base_layer
    w = base.dequantize(torch.float32).to(dtype)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    xc = x.to(dtype)
    xd = xc if x_d is None else x_d.to(dtype)
    return F.linear(xc, w, base.bias.to(dtype)) + layer.scaling["default"] * ((xd @ A.to(dtype).T) @ B.to(dtype).T)


def grads_of(fn, layer, x, gy):
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.base_layer.bias]
    xg = x.clone().requires_grad_(True)
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    y = fn(xg)
    y.backward(gy.to(y.dtype))
    out = [y.detach().double(), xg.grad.double()] + [p.grad.double() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("fp32_gemm", [False, True])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_forward_and_backward_within_twice_the_unfused_error(dtype, device, fp32_gemm, monkeypatch):
    # fp32_gemm: bf16 products above the fused-kernel sizes as fp32 GEMMs (nf4lora.ops.DISPATCH), forced on and off
    monkeypatch.setattr(nl.ops.DISPATCH, "cpu_gemm_fp32", fp32_gemm)
    # Max errors are taken over all M for one layer: with a handful of bf16 outputs both paths sit
    # at one rounding of the output, and which one lands nearer a rounding boundary is chance.
    g = torch.Generator().manual_seed(1)
    for N, K in NK:
        layer = lora_layer_4bit(N, K, dtype=dtype, seed=N, device=device)
        worst = {}
        for M in M_VALUES:
            x = torch.randn(M, K, generator=g).to(dtype).to(device)
            gy = torch.randn(M, N, generator=g).to(device)
            ref = grads_of(lambda t: composition(layer, t, torch.float64), layer, x, gy)
            same = grads_of(lambda t: composition(layer, t, dtype), layer, x, gy)
            got = grads_of(layer, layer, x, gy)
            for what, r, s, o in zip(["y", "dx", "dA", "dB", "dbias"], ref, same, got):
                e, se, scale = worst.get(what, (0.0, 0.0, 0.0))
                worst[what] = (max(e, (o - r).abs().max().item()), max(se, (s - r).abs().max().item()),
                               max(scale, r.abs().max().item()))
        for what, (err, same_err, scale) in worst.items():
            assert err <= 2 * same_err + 1e-6 * scale, (N, K, what, err, same_err)


@pytest.mark.parametrize("rows", [3, 40])
def test_fp32_gemm_route_is_the_same_under_autocast(rows, monkeypatch):
    """The fp32 routes on the CPU give the same bits with and without autocast around them:
    autocast must not turn their fp32 GEMMs back into bf16 ones. 40 rows: base and adapter in
    fp32 (bf16, more rows than the fused kernels take); 3 rows: the fused base kernel, the
    adapter's products in fp32."""
    monkeypatch.setattr(nl.ops.DISPATCH, "cpu_gemm_fp32", True)
    layer = lora_layer_4bit(96, 130, dtype=torch.bfloat16)
    x = torch.randn(rows, 130).bfloat16()
    gy = torch.randn(rows, 96)
    plain = grads_of(layer, layer, x, gy)

    def under_autocast(t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(t)

    for a, b in zip(plain, grads_of(under_autocast, layer, x, gy)):
        assert torch.equal(a, b)


def test_dropout_mask_reaches_the_lora_branch_only():
    layer = lora_layer_4bit(33, 128, dtype=torch.float32, dropout=0.5)
    layer.train()
    x = torch.randn(6, 128)
    gy = torch.randn(6, 33)

    def fused(t):
        torch.manual_seed(7)
        return layer(t)

    def unfused(t):
        torch.manual_seed(7)
        return composition(layer, t, torch.float32, x_d=F.dropout(t, 0.5, training=True))

    for a, b in zip(grads_of(fused, layer, x, gy), grads_of(unfused, layer, x, gy)):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    layer.eval()  # eval: no dropout, the two paths are the plain composition again
    assert torch.allclose(layer(x), composition(layer, x, torch.float32), atol=1e-4)


@pytest.mark.parametrize("fp32_gemm", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropout_path_in_half_precision_within_twice_the_unfused_error(dtype, fp32_gemm, monkeypatch):
    """The dropout path in bf16/fp16 (the fused kernels' rows and GEMM rows): the same mask as
    F.dropout on the same seed, forward and every gradient within 2x the error of the unfused
    composition in the same dtype, both against float64 on the same dropped input."""
    monkeypatch.setattr(nl.ops.DISPATCH, "cpu_gemm_fp32", fp32_gemm)
    layer = lora_layer_4bit(33, 128, dtype=dtype, dropout=0.5)
    layer.train()
    g = torch.Generator().manual_seed(3)
    for M in (3, 40):
        x = torch.randn(M, 128, generator=g).to(dtype)
        gy = torch.randn(M, 33, generator=g)

        def dropped(t):
            torch.manual_seed(7)
            return F.dropout(t, 0.5, training=True)

        def fused(t):
            torch.manual_seed(7)
            return layer(t)

        ref = grads_of(lambda t: composition(layer, t, torch.float64, x_d=dropped(t)), layer, x, gy)
        same = grads_of(lambda t: composition(layer, t, dtype, x_d=dropped(t)), layer, x, gy)
        got = grads_of(fused, layer, x, gy)
        for what, r, s_, o in zip(["y", "dx", "dA", "dB", "dbias"], ref, same, got):
            err, same_err = (o - r).abs().max().item(), (s_ - r).abs().max().item()
            assert err <= 2 * same_err + 1e-6 * r.abs().max().item(), (M, what, err, same_err)


def test_leading_dims_autocast_and_what_backward_keeps():
    layer = lora_layer_4bit(40, 64, dtype=None)
    x = torch.randn(2, 3, 64, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32
    assert torch.allclose(y, composition(layer, x, torch.float32), atol=1e-4)
    dense_bytes = 40 * 64 * 4  # backward keeps x, x A^T, A, B: never a dense copy of W
    assert all(t.numel() * t.element_size() < dense_bytes for t in y.grad_fn.saved_tensors)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = layer(x)
    assert yb.dtype == torch.float32  # back in x's dtype; computed in bf16
    assert (yb - y).abs().max() < 0.05 * y.abs().max()


def test_float_base_is_peft_formula_and_fresh_adapter_is_a_no_op():
    torch.manual_seed(0)
    dense = nn.Linear(48, 20)
    x = torch.randn(5, 48)
    layer = LoraLinear(copy.deepcopy(dense), r=4, lora_alpha=8)
    assert torch.equal(layer(x), dense(x))  # B = 0 at init
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bound = 1 / math.sqrt(48)  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound
    with torch.no_grad():
        B.normal_()
    assert torch.allclose(layer(x), dense(x) + 2.0 * (x @ A.T) @ B.T, atol=1e-5)
    rs = LoraLinear(copy.deepcopy(dense), r=4, lora_alpha=8, use_rslora=True, init="gaussian")
    assert rs.scaling["default"] == 8 / 2.0
    assert abs(rs.lora_A["default"].weight.std().item() - 1 / 4) < 0.05


def tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.ModuleDict({
        "body": nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU()),
        "lm_head": nn.Linear(64, 10),
    })


class Net(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(64, 96)
        self.down = nn.Linear(96, 64)
        self.norm = nn.LayerNorm(64)
        self.lm_head = nn.Linear(64, 10)

    def forward(self, x):
        return self.lm_head(self.norm(self.down(F.relu(self.up(x)))))


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_injection_freezes_everything_else_and_counts_parameters():
    model = Net()
    nl.get_lora_model(model, LoraConfig(r=4, lora_alpha=8), quantize="nf4")
    assert isinstance(model.up, LoraLinear) and isinstance(model.up.base_layer, Linear4bit)
    assert type(model.lm_head) is nn.Linear  # "all-linear" leaves the output head out
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"up.lora_A.default.weight", "up.lora_B.default.weight",
                         "down.lora_A.default.weight", "down.lora_B.default.weight"}
    report = nl.trainable_parameters(model)
    lora = 4 * (64 + 96) * 2
    total = lora + 64 * 96 * 2 + 96 + 64 + 2 * 64 + 64 * 10 + 10
    assert (report.trainable, report.total) == (lora, total)
    assert f"{report.percent:.4f}" in str(report)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_base_bit_identical_after_optimizer_steps(quantize):
    model = Net()
    nl.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1), quantize=quantize)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    lora = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        loss = model(torch.randn(8, 64)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(after[k], v) for k, v in lora.items() if "lora_B" in k)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_disable_adapters_reproduces_the_base_exactly(quantize):
    model = Net()
    base = copy.deepcopy(model)
    if quantize:
        nl.quantize_model(base, skip_modules=("lm_head",))
    nl.get_lora_model(model, LoraConfig(r=4, lora_alpha=8), quantize=quantize)
    randomize_adapters(model)
    x = torch.randn(7, 64)
    with nl.disable_adapters(model):
        assert torch.equal(model(x), base(x))
    assert not torch.allclose(model(x), base(x), atol=1e-3)


def test_merge_unmerge_float_base_is_exact():
    model = Net()
    nl.get_lora_model(model, LoraConfig(r=4, lora_alpha=8))
    randomize_adapters(model)
    x = torch.randn(7, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = model(x)
    assert nl.merge_adapter(model) == {}
    assert torch.allclose(model(x), y, atol=1e-5)
    assert not torch.equal(model.up.base_layer.weight, before["up.base_layer.weight"])
    with nl.disable_adapters(model):  # unmerged inside, merged again after
        assert torch.equal(model.up.base_layer.weight, before["up.base_layer.weight"])
    assert torch.allclose(model(x), y, atol=1e-5)
    with pytest.raises(ValueError, match="unmerge_adapter"):
        nl.add_adapter(model, "other", LoraConfig(r=2, target_modules=["up"]))
    assert nl.adapter_names(model) == ["default"] and list(model.up.lora_A) == ["default"]
    nl.unmerge_adapter(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), y)


def test_merge_into_4bit_reports_error_and_unmerge_restores_the_bytes():
    model = Net()
    nl.get_lora_model(model, LoraConfig(r=4, lora_alpha=8), quantize="nf4", compute_dtype=None)
    randomize_adapters(model)
    x = torch.randn(7, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = model(x)
    with pytest.raises(ValueError, match="merge_into_4bit=True"):
        nl.merge_adapter(model)
    report = nl.merge_adapter(model, merge_into_4bit=True)
    assert set(report) == {"up", "down"} and all(0 < e < 0.2 for e in report.values())
    merged_bytes = model.up.base_layer.weight.clone()
    assert not torch.equal(merged_bytes, before["up.base_layer.weight"])
    old_w = nl.dequantize_4bit(before["up.base_layer.weight"], model.up._merge_backup[1], dtype=torch.float32)
    exact = old_w + model.up.delta_weight("default")
    merged = model.up.base_layer.dequantize(torch.float32)
    err = torch.linalg.matrix_norm(merged - exact) / torch.linalg.matrix_norm(exact)
    assert abs(report["up"] - err.item()) < 1e-6  # the report is the error actually added
    nl.unmerge_adapter(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), y)
    nl.merge_adapter(model, merge_into_4bit=True)  # deterministic: the same bytes again
    assert torch.equal(model.up.base_layer.weight, merged_bytes)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_and_unload_gives_a_dense_model_with_the_same_outputs(quantize):
    model = Net()
    nl.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, modules_to_save=["norm"]), quantize=quantize,
                      compute_dtype=None)
    randomize_adapters(model)
    with torch.no_grad():
        model.norm.modules_to_save["default"].weight.mul_(1.5)
    x = torch.randn(7, 64)
    y = model(x)
    nl.merge_and_unload(model, dtype=None)
    assert all(type(m) in (nn.Linear, nn.LayerNorm, Net) for m in model.modules())
    assert torch.allclose(model(x), y, atol=1e-5)
    assert nl.adapter_names(model) == []
    with pytest.raises(ValueError, match="no LoRA adapters"):
        nl.merge_and_unload(model)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_and_unload_keeps_the_dtype_unless_told(quantize):
    """As PEFT's merge_and_unload: an fp32 model stays fp32 (its outputs to fp32 rounding);
    dtype=torch.bfloat16 casts the whole model."""
    model = Net()
    nl.get_lora_model(model, LoraConfig(r=4, lora_alpha=8), quantize=quantize, compute_dtype=None)
    randomize_adapters(model)
    x = torch.randn(7, 64)
    y = model(x)
    nl.merge_and_unload(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-4 * y.abs().max().item())
    peft = pytest.importorskip("peft", reason="the PEFT comparison needs peft")
    ref = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up"]))
    assert {p.dtype for p in ref.merge_and_unload().parameters()} == {torch.float32}


def test_merge_and_unload_casts_when_given_a_dtype():
    model = Net()
    nl.get_lora_model(model, LoraConfig(r=4, lora_alpha=8), quantize="nf4")
    randomize_adapters(model)
    x = torch.randn(7, 64)
    y = model(x)
    nl.merge_and_unload(model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert (model(x.bfloat16()).float() - y).abs().max() < 0.05 * y.abs().max()


def test_named_adapters_switch_train_and_delete():
    model = Net()
    base = copy.deepcopy(model)
    nl.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    randomize_adapters(model, seed=1)
    nl.add_adapter(model, "other", LoraConfig(r=2, lora_alpha=2, target_modules=["up"]))
    assert nl.active_adapter(model) == "default" and nl.adapter_names(model) == ["default", "other"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".other." in n)
    x = torch.randn(5, 64)
    y_default = model(x)
    nl.set_adapter(model, "other")
    assert model.down.active_adapter is None  # "other" has no adapter there
    assert torch.equal(model(x), base(x))  # B = 0 still
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "up.lora_A.other.weight", "up.lora_B.other.weight"}
    nl.set_adapter(model, "default")
    assert torch.equal(model(x), y_default)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        nl.set_adapter(model, "nope")
    with pytest.raises(ValueError, match="already exists"):
        nl.add_adapter(model, "other", LoraConfig(r=2, target_modules=["up"]))
    nl.delete_adapter(model, "other")
    nl.delete_adapter(model, "default")
    assert type(model.up) is nn.Linear and torch.equal(model(x), base(x))


def test_target_forms_patterns_and_bias_modes():
    model = tiny_mlp()
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=r"body\.[02]", exclude_modules=["2"],
                     rank_pattern={"body.0": 2}, alpha_pattern={r"body\.\d": 3}, bias="lora_only")
    nl.get_lora_model(model, cfg)
    layer = model["body"][0]
    assert isinstance(layer, LoraLinear) and type(model["body"][2]) is nn.Linear
    assert layer.r["default"] == 2 and layer.scaling["default"] == 1.5
    assert layer.base_layer.bias.requires_grad and not model["lm_head"].bias.requires_grad
    model2 = tiny_mlp()
    nl.get_lora_model(model2, LoraConfig(r=2, target_modules=["0"], bias="all"))
    assert model2["lm_head"].bias.requires_grad and not model2["lm_head"].weight.requires_grad


def test_modules_to_save_trains_a_copy():
    model = Net()
    nl.get_lora_model(model, LoraConfig(r=4, target_modules=["up"], modules_to_save=["lm_head"]))
    head = model.lm_head
    assert isinstance(head, nl.ModulesToSave)
    assert head.weight is head.modules_to_save["default"].weight  # attribute reads go to the copy
    assert head.modules_to_save["default"].weight.requires_grad and not head.original_module.weight.requires_grad
    x = torch.randn(3, 64)
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)
    y = model(x)
    with nl.disable_adapters(model):
        assert not torch.allclose(model(x), y)


def test_gradient_checkpointing_on_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    nl.get_lora_model(model, LoraConfig(r=4, lora_alpha=8), quantize="nf4", compute_dtype=None)
    randomize_adapters(model)
    ids = torch.randint(0, 64, (2, 9))
    model.train()

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 7 * 2
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and an nf4lora build with CUDA kernels")
def test_a_quantized_llama_trains_merges_and_saves_on_cuda(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).cuda()
    nl.get_lora_model(model, LoraConfig(r=4, lora_alpha=8, init="loftq"), quantize="nf4")
    ids = torch.randint(0, 64, (2, 9), device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    frozen = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight, frozen)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nl.save_adapter(model, tmp_path)
    cpu = copy.deepcopy(model).cpu()
    with torch.no_grad():
        assert (cpu(input_ids=ids.cpu()).logits - logits.cpu()).abs().max() < 0.05 * logits.abs().max()
    nl.merge_and_unload(model, dtype=torch.float32)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, logits, atol=0.05 * logits.abs().max().item())


def test_compile_a_lora_4bit_block_fullgraph():
    torch._dynamo.reset()
    block = nn.Sequential(lora_layer_4bit(40, 64, dtype=None, seed=1), nn.ReLU(),
                          lora_layer_4bit(8, 40, dtype=None, seed=2))
    x = torch.randn(3, 64)

    def outputs_and_grads(fn):
        block.zero_grad()
        xg = x.clone().requires_grad_(True)
        y = fn(xg)
        y.square().sum().backward()
        return [y.detach(), xg.grad] + [p.grad.clone() for p in block.parameters() if p.requires_grad]

    eager = outputs_and_grads(block)
    compiled = outputs_and_grads(torch.compile(block, fullgraph=True, backend="aot_eager"))
    assert len(eager) == 2 + 2 * 2 + 2  # y, dx, A and B of both layers, both biases
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(eager, compiled))


def snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def test_bad_input_is_refused_and_the_model_left_unchanged():
    with pytest.raises(ValueError, match="r must be positive"):
        LoraConfig(r=0)
    with pytest.raises(TypeError, match="r must be an int"):
        LoraConfig(r=2.5)
    with pytest.raises(ValueError, match="lora_alpha must be positive"):
        LoraConfig(lora_alpha=0)
    with pytest.raises(ValueError, match=r"lora_dropout must be a number in \[0, 1\)"):
        LoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="init must be one of"):
        LoraConfig(init="olora")
    with pytest.raises(ValueError, match="not a valid regex"):
        LoraConfig(target_modules="(")
    with pytest.raises(ValueError, match=r"rank_pattern\['up'\] must be positive"):
        LoraConfig(rank_pattern={"up": -1})
    model = Net()
    before = snapshot(model)
    bad = [
        (LoraConfig(target_modules=["up", "dwn"]), "'dwn' matches no module.*close matches: \\['down'\\]"),
        (LoraConfig(target_modules=["norm"]), "LoRA supports nn.Linear"),
        (LoraConfig(target_modules="nothing.*"), "matches no module"),
        (LoraConfig(target_modules=["up"], exclude_modules=["up"]), "no module left"),
        (LoraConfig(target_modules=["up"], modules_to_save=["up"]), "both a LoRA target"),
        (LoraConfig(target_modules=["up"], modules_to_save=["hed"]), "modules_to_save entry 'hed'"),
        (LoraConfig(init="loftq"), "quantize='nf4'"),
    ]
    for cfg, msg in bad:
        with pytest.raises(ValueError, match=msg):
            nl.get_lora_model(model, cfg)
        after = snapshot(model)
        assert after[0] == before[0] and all(torch.equal(v, before[1][k]) for k, v in after[1].items())
    with pytest.raises(ValueError, match="adapter_name must be a non-empty string without dots"):
        nl.get_lora_model(model, LoraConfig(), adapter_name="a.b")
    with pytest.raises(ValueError, match="quantize must be"):
        nl.get_lora_model(model, LoraConfig(), quantize="int8")
    with pytest.raises(TypeError, match="must be a LoraConfig"):
        nl.get_lora_model(model, {"r": 4})
    nl.quantize_model(model)
    with pytest.raises(ValueError, match="needs the dense weight"):
        nl.get_lora_model(model, LoraConfig(init="pissa"))
    nl.get_lora_model(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        nl.get_lora_model(model, LoraConfig(r=2))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        nl.save_adapter(Net(), "/nonexistent")
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        LoraLinear(nn.Conv1d(3, 3, 1))
