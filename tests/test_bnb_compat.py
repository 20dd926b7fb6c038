"""Side by side with bitsandbytes 0.50 (skipped when it is not installed): the same bytes for
the same input, the same dequantized values for data bitsandbytes wrote, and state dicts that
load both ways. Known differences, each asserted precisely:
- bitsandbytes' CPU quantizer divides the partial last block by its absmax instead of
  multiplying by the reciprocal (its CUDA kernel multiplies, as we do); elements where the two
  roundings differ may land in a neighbouring code, and only those are exempt.
- bitsandbytes' CPU 8-bit quantizer (double quantization) uses a 16-bit lookup table that
  sometimes picks the neighbour of the nearest code; ours takes the exact nearest.
- bitsandbytes 0.50.2's CPU dequantize kernel computes blocks per row, which is wrong when the
  row length is not a multiple of the block size; there we compare with its pure-PyTorch
  backend, which is right."""
import pytest
import torch

import nf4lora
from nf4lora import QuantState


bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed (pip install .[test])")
F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 128), (33, 64), (4096,), (4097,), (7, 13), (64, 96), (3, 1000), (1,)]


def bnb_quantize(x, bs, qt, dq):
    return F.quantize_4bit(x, blocksize=bs, compress_statistics=dq, quant_type=qt)


def tail_exempt(x, bs):
    """Elements of the partial last block whose x/absmax and x*(1/absmax) round apart in fp32."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    exempt = torch.zeros(n + (n % 2), dtype=torch.bool)
    rem = n % bs
    if rem:
        tail = flat[n - rem:]
        am = tail.abs().max().clamp(min=1e-38)
        exempt[n - rem:n] = (tail / am) != (tail * (torch.tensor(1.0) / am))
    return exempt


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_same_bytes_as_bitsandbytes(qt, dtype):
    for shape in SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)
        for bs in (32, 64, 128, 256, 1024, 4096):
            pb, sb = bnb_quantize(x, bs, qt, dq=False)
            p, s = nf4lora.quantize_4bit(x, bs, qt, double_quant=False)
            assert torch.equal(s.absmax, sb.absmax), (shape, bs)
            codes = torch.stack([p.view(-1) >> 4, p.view(-1) & 15], 1).view(-1)
            codes_b = torch.stack([pb.view(-1) >> 4, pb.view(-1) & 15], 1).view(-1)
            keep = ~tail_exempt(x, bs)
            assert torch.equal(codes[keep], codes_b[keep]), (shape, bs)
            assert (codes != codes_b).sum() <= (~keep).sum()


def test_double_quant_matches_bitsandbytes_up_to_its_8bit_rounding():
    mismatched = total = 0
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(256, 1024, generator=g) * torch.rand(256, 1, generator=g) * 3).to(torch.bfloat16)
        pb, sb = bnb_quantize(x, 64, "nf4", dq=True)
        p, s = nf4lora.quantize_4bit(x, 64, "nf4", double_quant=True)
        assert torch.equal(p, pb)
        assert torch.equal(s.offset, sb.offset)  # both torch.mean of the same fp32 absmax
        assert torch.equal(s.nested_absmax, sb.state2.absmax)
        assert torch.equal(s.nested_code, sb.state2.code)
        diff = s.absmax.int() - sb.absmax.int()
        assert diff.abs().max() <= 1
        mismatched += int((diff != 0).sum())
        total += diff.numel()
        # where they differ, ours is the nearest code to the normalized value
        _, plain = nf4lora.quantize_4bit(x, 64, "nf4", double_quant=False)
        scaled = (plain.absmax - s.offset) / s.nested_absmax.repeat_interleave(256)[: plain.absmax.numel()]
        ours = (s.nested_code[s.absmax.long()] - scaled).abs()
        theirs = (s.nested_code[sb.absmax.long()] - scaled).abs()
        assert torch.all(ours <= theirs + 1e-7)
    assert mismatched / total < 0.005, (mismatched, total)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_dequantize_of_bitsandbytes_data_equals_bitsandbytes(qt, dq):
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    for shape in SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)
        for bs in (64, 256):
            pb, sb = bnb_quantize(x, bs, qt, dq)
            state = QuantState.from_dict(sb.as_dict(packed=True), "")  # their state, our reader
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                sb.dtype = dt
                ours = nf4lora.dequantize_4bit(pb, state, dtype=dt)
                if len(shape) == 1 or shape[-1] % bs == 0:
                    theirs = F.dequantize_4bit(pb, sb).reshape(shape)  # 1-D comes back as [1, n]
                else:  # their CPU kernel's per-row block bug; their PyTorch backend is right
                    absmax = sb.absmax if not dq else F.dequantize_blockwise(sb.absmax, sb.state2) + sb.offset
                    theirs = _dequantize_4bit_compute(pb.view(-1), absmax, sb.code, bs, shape, dt)
                assert torch.equal(ours.view(torch.int16 if dt != torch.float32 else torch.int32),
                                   theirs.view(torch.int16 if dt != torch.float32 else torch.int32)), (shape, bs, dt)


def test_bitsandbytes_cpu_dequant_row_bug_is_real():
    """Documents why the test above switches backends (fails when bitsandbytes fixes it)."""
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    pb, sb = bnb_quantize(x, 64, "nf4", dq=False)
    theirs = F.dequantize_4bit(pb, sb)
    ours = nf4lora.dequantize_4bit(pb, QuantState.from_dict(sb.as_dict(packed=True)))
    assert (ours - x).abs().max() < 0.5 * x.abs().max()
    if torch.equal(theirs, ours):
        pytest.fail("bitsandbytes' CPU dequantize now handles rows that are not a multiple of the "
                    "block size: drop the workaround in test_dequantize_of_bitsandbytes_data_equals_bitsandbytes")


def test_state_dict_identical_to_bitsandbytes_linear4bit(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    lin = torch.nn.Linear(192, 8, bias=True).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(192, 8, bias=True, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4").to(torch.bfloat16)
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")  # quantizes
    theirs = layer.state_dict()
    packed, state = nf4lora.quantize_4bit(lin.weight.data, 64, "nf4", double_quant=True)
    ours = {"weight": packed, **state.to_dict("weight."), "bias": lin.bias.data}
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert theirs[k].dtype == ours[k].dtype and theirs[k].shape == ours[k].shape, k
    assert torch.equal(theirs["weight"], ours["weight"])
    for k in ("weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map", "bias",
              "weight.quant_state.bitsandbytes__nf4"):  # the JSON bytes too, offset included
        assert torch.equal(theirs[k], ours[k]), k
    assert (theirs["weight.absmax"].int() - ours["weight.absmax"].int()).abs().max() <= 1

    # a file bitsandbytes wrote loads into our QuantState and dequantizes to their weights
    save_file({k: v.contiguous() for k, v in theirs.items()}, str(tmp_path / "bnb.safetensors"))
    loaded = load_file(str(tmp_path / "bnb.safetensors"))
    back = QuantState.from_dict(loaded, "weight.")
    w_theirs = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(nf4lora.dequantize_4bit(loaded["weight"], back), w_theirs)

    # and our dict loads into bitsandbytes the way transformers loads a *-bnb-4bit checkpoint
    stats = {k[len("weight."):]: v for k, v in ours.items() if k.startswith("weight.")}
    param = bnb.nn.Params4bit.from_prequantized(data=packed, quantized_stats=stats, device="cpu")
    assert torch.equal(F.dequantize_4bit(param.data, param.quant_state),
                       nf4lora.dequantize_4bit(packed, state))
