"""quantize_4bit / dequantize_4bit on the CPU: every kernel variant against the pure-PyTorch
reference, bit for bit, over awkward sizes, all block sizes, dtypes and both 4-bit types;
double quantization; the out= path; error statistics; bad input."""
import math

import pytest
import torch

import nf4lora
from nf4lora import QuantState

from . import reference as ref

SHAPES = [(1,), (3,), (63,), (65,), (4097,), (7, 13), (64, 96), (33, 64), (2, 4096)]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern view, so that -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def sample(shape, dtype, seed=0):
    """Normal data with ties: some blocks hold 1.0 and exact codebook midpoints."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3.0
    flat = x.view(-1)
    mids = torch.cat([ref.bounds("nf4")[0], ref.bounds("fp4")[0]])
    if flat.numel() >= 64:  # a block scaled by exactly 1: its values land on thresholds
        flat[:32] = mids[torch.arange(32) % mids.numel()]
        flat[0] = 1.0
    return x.to(dtype)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_reference(cpu_variant, quant_type, dtype):
    with nf4lora.use_cpu_variant(cpu_variant):
        for shape in SHAPES:
            x = sample(shape, dtype, seed=len(shape) * 1000 + shape[-1])
            for bs in BLOCKSIZES:
                packed, state = nf4lora.quantize_4bit(x, bs, quant_type, double_quant=False)
                want_packed, want_absmax = ref.quantize_4bit(x, bs, quant_type)
                assert packed.shape == ((x.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
                assert torch.equal(packed, want_packed), (shape, bs)
                assert torch.equal(bits(state.absmax), bits(want_absmax)), (shape, bs)
                assert state.shape == x.shape and state.dtype == dtype and state.blocksize == bs


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_matches_reference(cpu_variant, quant_type, out_dtype):
    with nf4lora.use_cpu_variant(cpu_variant):
        for shape in SHAPES:
            x = sample(shape, torch.float32, seed=shape[-1])
            for bs in BLOCKSIZES:
                packed, state = nf4lora.quantize_4bit(x, bs, quant_type, double_quant=False)
                got = nf4lora.dequantize_4bit(packed, state, dtype=out_dtype)
                want = ref.dequantize_4bit(packed, state.absmax, bs, quant_type, shape, out_dtype)
                assert got.shape == x.shape and got.dtype == out_dtype
                assert torch.equal(bits(got), bits(want)), (shape, bs)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_double_quant_matches_reference(cpu_variant, quant_type):
    with nf4lora.use_cpu_variant(cpu_variant):
        for shape, bs in [((4097,), 32), ((300, 64), 64), ((64, 96), 64), ((5, 4096), 4096), ((1,), 64)]:
            x = sample(shape, torch.bfloat16, seed=bs)
            packed, state = nf4lora.quantize_4bit(x, bs, quant_type, double_quant=True)
            _, plain_absmax = ref.quantize_4bit(x, bs, quant_type)
            assert state.nested and state.nested_blocksize == 256
            assert torch.equal(state.offset, plain_absmax.mean())
            q, nested = ref.quantize_blockwise_8bit(plain_absmax - state.offset, state.nested_code, 256)
            assert torch.equal(state.absmax, q) and torch.equal(state.nested_absmax, nested)
            absmax = ref.nested_absmax(state.absmax, state.nested_absmax, state.nested_code, state.offset)
            for out_dtype in DTYPES:
                got = nf4lora.dequantize_4bit(packed, state, dtype=out_dtype)
                want = ref.dequantize_4bit(packed, absmax, bs, quant_type, shape, out_dtype)
                assert torch.equal(bits(got), bits(want)), (shape, bs, out_dtype)


def test_blockwise_8bit_matches_reference():
    code = nf4lora.dynamic_map(signed=True)
    for n in (1, 3, 255, 256, 257, 5000):
        x = torch.randn(n, generator=torch.Generator().manual_seed(n))
        x[0] = code[17].item()  # exact map values and midpoints
        if n > 2:
            x[1] = ((code[100] + code[101]) / 2).item()
        q, absmax = torch.ops.nf4lora.quantize_blockwise_8bit(x, code, 256)
        want_q, want_absmax = ref.quantize_blockwise_8bit(x, code, 256)
        assert torch.equal(q, want_q) and torch.equal(absmax, want_absmax)
        back = torch.ops.nf4lora.dequantize_blockwise_8bit(q, absmax, code, 256)
        assert torch.equal(back, code[q.long()] * absmax.repeat_interleave(256)[:n])


def test_preallocated_out_is_filled_in_place(cpu_variant):
    x = torch.randn(256, 320, dtype=torch.bfloat16)
    packed, state = nf4lora.quantize_4bit(x)
    with nf4lora.use_cpu_variant(cpu_variant):
        for dtype in DTYPES:
            out = torch.full(x.shape, float("nan"), dtype=dtype)
            ptr = out.data_ptr()
            res = nf4lora.dequantize_4bit(packed, state, out=out)
            assert res is out and out.data_ptr() == ptr
            assert torch.equal(bits(out), bits(nf4lora.dequantize_4bit(packed, state, dtype=dtype)))


def test_threads_do_not_change_results():
    x = torch.randn(1 << 20)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            packed, state = nf4lora.quantize_4bit(x, 64, "nf4")
            results.append((packed, state.absmax, nf4lora.dequantize_4bit(packed, state)))
    finally:
        torch.set_num_threads(before)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], r))


def test_nf4_error_on_normal_data():
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1))
    rel = {}
    for qt in QUANT_TYPES:
        packed, state = nf4lora.quantize_4bit(x, 64, qt)
        err = nf4lora.dequantize_4bit(packed, state) - x
        rel[qt] = (err.pow(2).mean().sqrt() / x.pow(2).mean().sqrt()).item()
    assert 0.088 < rel["nf4"] < 0.096, rel  # QLoRA's NF4 at block 64: ~0.092
    assert rel["fp4"] > rel["nf4"], rel


def test_zero_blocks_round_trip_to_exact_zeros(cpu_variant):
    with nf4lora.use_cpu_variant(cpu_variant):
        for qt in QUANT_TYPES:
            x = torch.randn(5, 64)
            x[1:3] = 0.0
            packed, state = nf4lora.quantize_4bit(x, 64, qt)
            y = nf4lora.dequantize_4bit(packed, state)
            assert torch.all(y[1:3] == 0) and not torch.any(torch.isnan(y))
            z = torch.zeros(100, dtype=torch.bfloat16)
            pz, sz = nf4lora.quantize_4bit(z, 64, qt, double_quant=False)
            assert torch.equal(sz.absmax, torch.zeros(2)) and torch.all(nf4lora.dequantize_4bit(pz, sz) == 0)


def test_bits_per_param():
    x = torch.randn(1024, 4096, dtype=torch.bfloat16)
    _, dq = nf4lora.quantize_4bit(x, 64, "nf4", double_quant=True)
    _, plain = nf4lora.quantize_4bit(x, 64, "nf4", double_quant=False)
    assert abs(dq.bits_per_param - 4.127) < 0.003, dq.bits_per_param  # + the 16/256-entry tables
    assert abs(plain.bits_per_param - 4.5) < 0.001, plain.bits_per_param
    assert dq.nbytes == 1024 * 4096 // 2 + 65536 + 256 * 4 + 4 + 16 * 4 + 256 * 4


def test_float_storage_dtype_loads():
    x = torch.randn(64, 128)
    packed, state = nf4lora.quantize_4bit(x)
    as_bf16 = packed.view(-1).view(torch.bfloat16).reshape(-1, 1)  # bitsandbytes' quant_storage
    assert torch.equal(nf4lora.dequantize_4bit(as_bf16, state), nf4lora.dequantize_4bit(packed, state))


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_raises_by_default(bad):
    x = torch.randn(4, 64)
    x[2, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf in 1 of 4 blocks \(first: block 2"):
        nf4lora.quantize_4bit(x)


def test_nonfinite_allowed_gives_nan_blocks(cpu_variant):
    with nf4lora.use_cpu_variant(cpu_variant):
        for dq in (False, True):
            x = torch.randn(4, 64)
            x[2, 5] = float("inf")
            x[3, 0] = float("nan")
            packed, state = nf4lora.quantize_4bit(x, allow_nonfinite=True, double_quant=dq)
            y = nf4lora.dequantize_4bit(packed, state)
            want_packed, _ = ref.quantize_4bit(x, 64, "nf4")
            assert torch.equal(packed, want_packed)
            if not dq:
                assert torch.isnan(y[2:]).all() and torch.isfinite(y[:2]).all()
            else:  # the NaN absmax spreads through the mean offset to every block
                assert torch.isnan(y).all()


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(8, 64)
    with pytest.raises(ValueError, match="empty tensor"):
        nf4lora.quantize_4bit(torch.empty(0, 64))
    for bs in (48, 16, 8192, 0, -64):
        with pytest.raises(ValueError, match="blocksize must be a power of two in \\[32, 4096\\]"):
            nf4lora.quantize_4bit(x, blocksize=bs)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        nf4lora.quantize_4bit(x, blocksize=64.0)
    with pytest.raises(ValueError, match="quant_type must be 'nf4' or 'fp4'"):
        nf4lora.quantize_4bit(x, quant_type="int4")
    for dtype in (torch.float64, torch.int32, torch.uint8):
        with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
            nf4lora.quantize_4bit(x.to(dtype))
    with pytest.raises(ValueError, match="must be contiguous"):  # the op's contract; the API copies
        torch.ops.nf4lora.quantize_4bit(x.t(), 64, "nf4")
    packed_t, _ = nf4lora.quantize_4bit(x.t())
    assert torch.equal(packed_t, nf4lora.quantize_4bit(x.t().contiguous())[0])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        nf4lora.quantize_4bit([1.0, 2.0])


def test_bad_dequantize_arguments_raise_clear_errors():
    x = torch.randn(8, 64)
    packed, state = nf4lora.quantize_4bit(x)
    with pytest.raises(ValueError, match="packed holds 255 bytes but a QuantState of shape \\(8, 64\\) needs 256"):
        nf4lora.dequantize_4bit(packed[:-1], state)
    wrong = QuantState(**{**state.__dict__, "shape": torch.Size([16, 64])})
    with pytest.raises(ValueError, match="needs 512"):
        nf4lora.dequantize_4bit(packed, wrong)
    with pytest.raises(ValueError, match="out has shape \\(64, 8\\), expected \\(8, 64\\)"):
        nf4lora.dequantize_4bit(packed, state, out=torch.empty(64, 8))
    with pytest.raises(ValueError, match="conflicts with out.dtype"):
        nf4lora.dequantize_4bit(packed, state, out=torch.empty(8, 64), dtype=torch.float16)
    with pytest.raises(TypeError, match="out.dtype must be float32, float16 or bfloat16"):
        nf4lora.dequantize_4bit(packed, state, out=torch.empty(8, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be contiguous"):
        nf4lora.dequantize_4bit(packed, state, out=torch.empty(64, 8).t())
    with pytest.raises(ValueError, match="is on meta but the QuantState is on cpu"):
        nf4lora.dequantize_4bit(packed.to("meta"), state)
    bad_absmax = QuantState(**{**state.__dict__, "absmax": state.absmax[:-1]})
    with pytest.raises(ValueError, match="absmax .* must have 8 elements, got 7"):
        nf4lora.dequantize_4bit(packed, bad_absmax)
    with pytest.raises(TypeError, match="state must be a QuantState"):
        nf4lora.dequantize_4bit(packed, {"absmax": state.absmax})


def test_ops_pass_opcheck():
    x = torch.randn(7, 96, dtype=torch.bfloat16)
    code = nf4lora.dynamic_map()
    torch.library.opcheck(torch.ops.nf4lora.quantize_4bit.default, (x, 64, "nf4"))
    packed, absmax = torch.ops.nf4lora.quantize_4bit(x, 64, "nf4")
    q, nested = torch.ops.nf4lora.quantize_blockwise_8bit(absmax - absmax.mean(), code, 256)
    offset = absmax.mean()
    flat = packed.view(-1)
    torch.library.opcheck(torch.ops.nf4lora.dequantize_4bit.default,
                          (flat, absmax, 64, "nf4", [7, 96], torch.bfloat16, None, None, None, 256))
    torch.library.opcheck(torch.ops.nf4lora.dequantize_4bit.default,
                          (flat, q, 64, "nf4", [7, 96], torch.float32, nested, code, offset, 256))
    torch.library.opcheck(torch.ops.nf4lora.dequantize_4bit_out.default,
                          (flat, q, 64, "nf4", nested, code, offset, 256, torch.empty(7, 96)))
    torch.library.opcheck(torch.ops.nf4lora.quantize_blockwise_8bit.default, (absmax - offset, code, 256))
    torch.library.opcheck(torch.ops.nf4lora.dequantize_blockwise_8bit.default, (q, nested, code, 256))


def test_dequantize_compiles_without_graph_breaks():
    x = torch.randn(32, 128)
    packed, state = nf4lora.quantize_4bit(x)

    @torch.compile(fullgraph=True, backend="eager")
    def f(p):
        return nf4lora.dequantize_4bit(p, state) * 2

    assert torch.equal(f(packed), nf4lora.dequantize_4bit(packed, state) * 2)


def test_large_element_counts_use_int64_indexing_in_checks():
    state = QuantState(absmax=torch.empty(0), shape=torch.Size([1 << 20, 1 << 20]), dtype=torch.bfloat16,
                       blocksize=64, quant_type="nf4", code=nf4lora.codebook("nf4"))
    assert state.packed_nbytes == (1 << 39)
    with pytest.raises(ValueError, match="packed holds 16 bytes"):
        nf4lora.dequantize_4bit(torch.zeros(16, 1, dtype=torch.uint8), state)
    assert math.isfinite(state.bits_per_param)
