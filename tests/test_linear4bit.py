"""Linear4bit and quantize_model: outputs against the dense layer, bitsandbytes' state-dict
format both ways, load/save round trips, .to(dtype/device), deepcopy, bad checkpoints."""
import copy

import pytest
import torch
from torch import nn

from nf4lora import Linear4bit, quantize_model


def dense(in_f=96, out_f=40, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).to(dtype)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16])
def test_from_linear_matches_the_dequantized_dense_layer(compute_dtype):
    lin = dense()
    q = Linear4bit.from_linear(lin, compute_dtype=compute_dtype)
    x = torch.randn(5, 96)
    cd = compute_dtype or x.dtype
    w = q.dequantize(torch.float32)
    ref = (x.to(cd).double() @ w.double().T + lin.bias.to(cd).double())
    same_dtype = nn.functional.linear(x.to(cd), w.to(cd), lin.bias.to(cd)).float()
    dense_err = (same_dtype.double() - ref).abs().max().item()
    assert (q(x).double() - ref).abs().max().item() <= 2 * dense_err + 1e-6
    assert q(x).dtype == x.dtype
    assert (q(x) - lin(x)).abs().max() < 0.1 * lin(x).abs().max()
    assert q.weight.dtype == torch.uint8 and not q.weight.requires_grad and q.weight_shape == (40, 96)


def test_gradients_reach_input_and_bias_only():
    q = Linear4bit.from_linear(dense(), compute_dtype=None)
    x = torch.randn(3, 96, requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None and q.bias.grad is not None and q.weight.grad is None


def test_state_dict_round_trip_into_a_fresh_layer(tmp_path):
    from safetensors.torch import load_file, save_file
    q = Linear4bit.from_linear(dense(dtype=torch.bfloat16))
    sd = q.state_dict()
    assert sorted(sd) == sorted(["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                 "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "l.safetensors"))
    fresh = Linear4bit(96, 40, dtype=torch.bfloat16)
    fresh.load_state_dict(load_file(str(tmp_path / "l.safetensors")))
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), q(x))
    assert fresh.weight_dtype == torch.bfloat16 and fresh.double_quant


def test_loads_a_model_state_dict_with_prefixes_and_reports_bad_keys():
    model = nn.Sequential(dense(), nn.ReLU(), dense(40, 8, seed=1))
    quantize_model(model, skip_modules=())
    sd = model.state_dict()
    model2 = quantize_model(nn.Sequential(dense(seed=5), nn.ReLU(), dense(40, 8, seed=6)), skip_modules=())
    model2.load_state_dict(sd)
    x = torch.randn(2, 96)
    assert torch.equal(model(x), model2(x))
    sd_extra = dict(sd, **{"0.weight.bogus": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="Unexpected key.*0.weight.bogus"):
        model2.load_state_dict(sd_extra)
    sd_missing = {k: v for k, v in sd.items() if k != "2.weight.absmax"}
    with pytest.raises(RuntimeError, match="missing key '2.weight.absmax'"):
        model2.load_state_dict(sd_missing)


def test_wrong_shape_checkpoint_is_refused():
    q = Linear4bit.from_linear(dense(96, 40))
    other = Linear4bit(64, 40)
    with pytest.raises(RuntimeError, match=r"weight has shape \[40, 96\], this layer is \[40, 64\]"):
        other.load_state_dict(q.state_dict())


def test_bitsandbytes_state_dict_loads_both_ways():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    import bitsandbytes.functional as F
    lin = dense(128, 40, dtype=torch.bfloat16)  # K % 64 == 0: bitsandbytes' CPU row bug stays out
    layer = bnb.nn.Linear4bit(128, 40, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4").to(torch.bfloat16)
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")
    ours = Linear4bit(128, 40, dtype=torch.bfloat16)
    ours.load_state_dict(layer.state_dict())
    assert torch.equal(ours.dequantize(), F.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    layer.train()  # bitsandbytes' CPU eval path repacks the weight; compare in train mode
    assert torch.allclose(ours(x).float(), layer(x).float(), atol=2e-2, rtol=2e-2)
    # ours -> bitsandbytes, the way transformers loads a *-bnb-4bit checkpoint
    q = Linear4bit.from_linear(lin)
    sd = q.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats, device="cpu")
    assert torch.equal(F.dequantize_4bit(param.data, param.quant_state), q.dequantize())


def test_to_dtype_keeps_codes_and_scales_and_deepcopy_works():
    q = Linear4bit.from_linear(dense())
    x = torch.randn(2, 96)
    before = q(x)
    q.to(torch.bfloat16)
    assert q.weight.dtype == torch.uint8 and q.absmax.dtype == torch.uint8
    assert q.nested_absmax.dtype == torch.float32 and q.quant_map.dtype == torch.float32
    assert q.quant_offset.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
    q.to("cpu")
    clone = copy.deepcopy(q)
    assert torch.equal(clone(x), q(x))
    assert (q(x) - before).abs().max() < 0.05
    assert "bits_per_param=" in repr(q) and "quant_type=nf4" in repr(q)


def test_to_meta_device_moves_everything():
    q = Linear4bit.from_linear(dense()).to("meta")
    assert all(t.device.type == "meta" for t in [q.weight, q.absmax, q.quant_map, q.nested_absmax,
                                                  q.nested_quant_map, q.quant_offset, q.bias])


def test_construct_on_meta_then_load():
    q = Linear4bit(96, 40, device="meta", compute_dtype=None)  # how loaders build models before reading weights
    assert q.weight.device.type == "meta" and q.weight.shape == (96 * 40 // 2, 1)
    src = Linear4bit.from_linear(dense(), compute_dtype=None)
    q = q.to_empty(device="cpu")
    q.load_state_dict(src.state_dict())
    x = torch.randn(2, 96)
    assert torch.equal(q(x), src(x))


def test_quantize_model_replaces_linears_except_skipped():
    model = nn.ModuleDict({"body": nn.Sequential(dense(), nn.GELU(), dense(40, 40, seed=2)),
                           "lm_head": dense(40, 10, seed=3)})
    x = torch.randn(4, 96)
    ref = model["lm_head"](model["body"](x))
    quantize_model(model, compute_dtype=None)
    assert isinstance(model["body"][0], Linear4bit) and isinstance(model["body"][2], Linear4bit)
    assert type(model["lm_head"]) is nn.Linear
    out = model["lm_head"](model["body"](x))
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_compile_a_block_without_graph_breaks():
    model = nn.Sequential(dense(), nn.ReLU(), dense(40, 8, seed=1))
    quantize_model(model, skip_modules=(), compute_dtype=None)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 96)
    assert torch.allclose(compiled(x), model(x), atol=1e-6)


def test_constructor_validates():
    with pytest.raises(ValueError, match="must be positive"):
        Linear4bit(0, 4)
    with pytest.raises(ValueError, match="blocksize must be a power of two"):
        Linear4bit(64, 4, blocksize=48)
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(3, 3, 1))


def _uncached(m, x):
    """The output through matmul_4bit with a freshly built and checked weight (no cache)."""
    from nf4lora.ops import matmul_4bit
    with torch.enable_grad():
        y = matmul_4bit(x.to(m.compute_dtype), m.weight4bit(), None if m.bias is None else m.bias.to(m.compute_dtype))
    return y.to(x.dtype).detach()


def test_inference_cache_follows_every_weight_change():
    """The no-grad forward reuses a checked weight per module: each way of replacing or moving the
    weight must reach the kernel (compared with the uncached path, bit for bit)."""
    x = torch.randn(3, 96)
    m = Linear4bit.from_linear(dense(), compute_dtype=torch.bfloat16)
    other = Linear4bit.from_linear(dense(seed=7), compute_dtype=torch.bfloat16)

    def check():
        with torch.no_grad():
            got = m(x)
        assert torch.equal(got, _uncached(m, x))
        with torch.inference_mode():
            assert torch.equal(m(x), got)
        return got

    first = check()
    m.set_quantized(other.weight.detach().clone(), other.quant_state)  # set_quantized
    assert not torch.equal(check(), first)
    m.load_state_dict(Linear4bit.from_linear(dense(seed=9)).state_dict())  # load_state_dict
    third = check()
    m.weight.data = other.weight.detach().clone()  # a `.data =` swap (as module._apply does)
    m.absmax.data = other.absmax.clone()
    m.nested_absmax.data = other.nested_absmax.clone()
    m.quant_offset.data = other.quant_offset.clone()
    assert not torch.equal(check(), third)
    m.weight = nn.Parameter(Linear4bit.from_linear(dense(seed=11)).weight.detach().clone(),
                            requires_grad=False)  # FSDP-style setattr of a new parameter
    m.absmax = Linear4bit.from_linear(dense(seed=11)).absmax  # with its scales
    check()
    before = check()
    m.nested_absmax = other.nested_absmax.clone() * 1.5  # one buffer alone replaced
    assert not torch.equal(check(), before)
    with torch.no_grad():  # in-place writes into the same memory
        m.weight.copy_(other.weight)
        m.absmax.copy_(other.absmax)
        m.nested_absmax.copy_(other.nested_absmax)
        m.quant_offset.copy_(other.quant_offset)
    check()
    m.to(torch.float16)  # dtype casts leave codes and scales; a move re-keys
    check()
    twin = copy.deepcopy(m)
    with torch.no_grad():
        twin.weight.copy_(Linear4bit.from_linear(dense(seed=13)).weight)
        twin.absmax.copy_(Linear4bit.from_linear(dense(seed=13)).absmax)
    with torch.no_grad():
        assert torch.equal(twin(x), _uncached(twin, x))
        assert torch.equal(m(x), _uncached(m, x))
        assert not torch.equal(twin(x), m(x))


def test_inference_cache_lets_go_of_moved_and_replaced_codes():
    """After .to() or set_quantized the cache no longer holds the old codes (a model moved to the
    GPU after a CPU forward must not keep its CPU weights alive)."""
    import gc
    import weakref
    m = Linear4bit.from_linear(dense())
    with torch.no_grad():
        m(torch.randn(2, 96))
    old = weakref.ref(m.weight)
    m.to(torch.device("meta"))
    gc.collect()
    assert old() is None
    m = Linear4bit.from_linear(dense())
    with torch.no_grad():
        m(torch.randn(2, 96))
    old = weakref.ref(m.weight)
    other = Linear4bit.from_linear(dense(seed=7))
    m.set_quantized(other.weight.detach().clone(), other.quant_state)
    gc.collect()
    assert old() is None


def test_inference_cache_checks_a_damaged_weight():
    m = Linear4bit.from_linear(dense())
    with torch.no_grad():
        m(torch.randn(2, 96))
    m.absmax = m.absmax[:-1].clone()  # wrong block count: checked again, not trusted
    with torch.no_grad(), pytest.raises(ValueError, match="absmax"):
        m(torch.randn(2, 96))
