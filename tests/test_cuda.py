"""The CUDA kernels (cuda/quantize.cu) against the CPU path, bit for bit, through the public API:
awkward sizes, every block size, fp32/fp16/bf16 in and out, NF4/FP4, double quantization,
CPU-made state dequantized on the GPU, out=, misaligned views (the scalar fallback), NaN/Inf
blocks, > 2^31 elements, and bitsandbytes' CUDA kernels when installed. Needs a GPU; every test
is marked `cuda` and skips without one (run: pytest -m cuda tests, or bench/gpu_check.sh)."""
import pytest
import torch

import nf4lora
from nf4lora import QuantState
from nf4lora.ops.native import _C, dtype_code, quant_type_code

from . import reference as ref

HAS_GPU = torch.cuda.is_available() and nf4lora.has_cuda()
pytestmark = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(
    not HAS_GPU,
    reason="needs a CUDA GPU and an nf4lora build with CUDA kernels "
           f"(torch.cuda.is_available()={torch.cuda.is_available()}, nf4lora.has_cuda()={nf4lora.has_cuda()})")
needs_cuda_build = pytest.mark.skipif(not nf4lora.has_cuda(), reason="nf4lora was built without CUDA kernels")

SHAPES = [(1,), (3,), (63,), (65,), (4097,), (7, 13)]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
QUANT_TYPES = ["nf4", "fp4"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns (on the CPU), so that -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.detach().cpu().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def sample(shape, dtype, seed=0):
    """Normal data plus, when there is room, a block scaled by exactly 1.0 whose values sit on
    the NF4 and FP4 decision thresholds (ties must take the lower code on both devices)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3.0
    flat = x.view(-1)
    if flat.numel() >= 64:
        mids = torch.cat([ref.bounds("nf4")[0], ref.bounds("fp4")[0]])
        flat[:32] = mids[torch.arange(32) % mids.numel()]
        flat[0] = 1.0
    return x.to(dtype)


def cpu_state_to_cuda(state: QuantState) -> QuantState:
    moved = state.to("cuda")
    assert moved.absmax.is_cuda and (moved.offset is None or moved.offset.is_cuda)
    return moved


# ---- quantize -----------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_cpu(quant_type, dtype):
    for shape in SHAPES:
        x = sample(shape, dtype, seed=shape[-1])
        xc = x.cuda()
        for bs in BLOCKSIZES:
            p_cpu, s_cpu = nf4lora.quantize_4bit(x, bs, quant_type, double_quant=False)
            p_gpu, s_gpu = nf4lora.quantize_4bit(xc, bs, quant_type, double_quant=False)
            assert p_gpu.is_cuda and s_gpu.absmax.is_cuda
            assert p_gpu.shape == p_cpu.shape and p_gpu.dtype == torch.uint8
            assert torch.equal(p_gpu.cpu(), p_cpu), (shape, bs)
            assert same_bits(s_gpu.absmax, s_cpu.absmax), (shape, bs)
            assert (s_gpu.shape, s_gpu.dtype, s_gpu.blocksize) == (x.shape, dtype, bs)


@needs_gpu
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_double_quant_matches_cpu(quant_type):
    """Bit-exact given the same offset. The offset is torch.mean of the absmax, whose CUDA and
    CPU reductions may round differently in the last bit; then only the 8-bit codes that
    depend on it may differ, and by at most one step."""
    for shape, bs in [((4097,), 32), ((300, 64), 64), ((5, 4096), 4096), ((1,), 64), ((7, 13), 128)]:
        x = sample(shape, torch.bfloat16, seed=bs)
        p_cpu, s_cpu = nf4lora.quantize_4bit(x, bs, quant_type, double_quant=True)
        p_gpu, s_gpu = nf4lora.quantize_4bit(x.cuda(), bs, quant_type, double_quant=True)
        assert torch.equal(p_gpu.cpu(), p_cpu)
        assert s_gpu.nested and s_gpu.nested_blocksize == s_cpu.nested_blocksize == 256
        assert same_bits(s_gpu.nested_code, s_cpu.nested_code)
        if same_bits(s_gpu.offset, s_cpu.offset):
            assert torch.equal(s_gpu.absmax.cpu(), s_cpu.absmax), shape
            assert same_bits(s_gpu.nested_absmax, s_cpu.nested_absmax), shape
        else:
            torch.testing.assert_close(s_gpu.offset.cpu(), s_cpu.offset, rtol=1e-6, atol=0)
            assert (s_gpu.absmax.cpu().int() - s_cpu.absmax.int()).abs().max() <= 1


@needs_gpu
def test_blockwise_8bit_matches_cpu():
    code = nf4lora.dynamic_map(signed=True)
    for bs in (16, 64, 256, 4096):
        for n in (1, 3, 255, 256, 257, 5000):
            x = torch.randn(n, generator=torch.Generator().manual_seed(n + bs))
            x[0] = code[17].item()  # an exact map value, and a midpoint (ties to the lower code)
            if n > 2:
                x[1] = ((code[100] + code[101]) / 2).item()
            if n > 300:
                x[257:300] = 0.0
            q, absmax = torch.ops.nf4lora.quantize_blockwise_8bit(x, code, bs)
            qg, absmaxg = torch.ops.nf4lora.quantize_blockwise_8bit(x.cuda(), code.cuda(), bs)
            assert torch.equal(qg.cpu(), q) and same_bits(absmaxg, absmax), (bs, n)
            back = torch.ops.nf4lora.dequantize_blockwise_8bit(q, absmax, code, bs)
            backg = torch.ops.nf4lora.dequantize_blockwise_8bit(q.cuda(), absmax.cuda(), code.cuda(), bs)
            assert same_bits(backg, back), (bs, n)


# ---- dequantize ---------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_cpu_state_on_cuda(out_dtype, quant_type, double_quant):
    """A state made on the CPU, moved with .to("cuda"), dequantizes to the CPU's exact bits."""
    for shape in SHAPES:
        x = sample(shape, torch.float32, seed=shape[-1] + 1)
        for bs in BLOCKSIZES:
            packed, state = nf4lora.quantize_4bit(x, bs, quant_type, double_quant=double_quant)
            want = nf4lora.dequantize_4bit(packed, state, dtype=out_dtype)
            got = nf4lora.dequantize_4bit(packed.cuda(), cpu_state_to_cuda(state), dtype=out_dtype)
            assert got.is_cuda and got.shape == x.shape and got.dtype == out_dtype
            assert same_bits(got, want), (shape, bs)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_4096x4096_round_trip_matches_cpu(dtype):
    x = (torch.randn(4096, 4096, generator=torch.Generator().manual_seed(5)) * 0.02).to(dtype)
    for quant_type in QUANT_TYPES:
        p_cpu, s_cpu = nf4lora.quantize_4bit(x, 64, quant_type, double_quant=False)
        p_gpu, s_gpu = nf4lora.quantize_4bit(x.cuda(), 64, quant_type, double_quant=False)
        assert torch.equal(p_gpu.cpu(), p_cpu) and same_bits(s_gpu.absmax, s_cpu.absmax)
        p_cpu, s_cpu = nf4lora.quantize_4bit(x, 64, quant_type, double_quant=True)
        want = nf4lora.dequantize_4bit(p_cpu, s_cpu)
        got = nf4lora.dequantize_4bit(p_cpu.cuda(), cpu_state_to_cuda(s_cpu))
        assert same_bits(got, want)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_and_huge_values_match_cpu(dtype):
    """Subnormal inputs, scales and outputs (no flush-to-zero anywhere), huge absmax whose
    reciprocal is subnormal, and fp16 outputs that overflow to Inf."""
    g = torch.Generator().manual_seed(9)
    for scale in (1e-39, 1e-30, 1e-6, 1.0, 7e4, 1e30, 3e38):
        x = (torch.randn(7, 300, generator=g).clamp(-1, 1) * scale).to(dtype)
        if not torch.isfinite(x).all():
            continue  # the scale is beyond this dtype's range
        for quant_type in QUANT_TYPES:
            p_cpu, s_cpu = nf4lora.quantize_4bit(x, 64, quant_type, double_quant=False)
            p_gpu, s_gpu = nf4lora.quantize_4bit(x.cuda(), 64, quant_type, double_quant=False)
            assert torch.equal(p_gpu.cpu(), p_cpu) and same_bits(s_gpu.absmax, s_cpu.absmax), scale
            for out_dtype in DTYPES:
                want = nf4lora.dequantize_4bit(p_cpu, s_cpu, dtype=out_dtype)
                got = nf4lora.dequantize_4bit(p_cpu.cuda(), s_cpu.to("cuda"), dtype=out_dtype)
                assert same_bits(got, want), (scale, quant_type, out_dtype)


@needs_gpu
@pytest.mark.parametrize("nested_blocksize", [16, 64, 4096])
def test_other_nested_blocksizes(nested_blocksize):
    """Checkpoints may carry any power-of-two nested block size; the fused decode must agree."""
    x = sample((300, 64 * 9), torch.bfloat16, seed=nested_blocksize)
    packed, plain = nf4lora.quantize_4bit(x, 64, "nf4", double_quant=False)
    offset = plain.absmax.mean()
    code = nf4lora.dynamic_map(signed=True)
    q, nested = torch.ops.nf4lora.quantize_blockwise_8bit(plain.absmax - offset, code, nested_blocksize)
    state = QuantState(absmax=q, shape=x.shape, dtype=x.dtype, blocksize=64, quant_type="nf4",
                       code=nf4lora.codebook("nf4"), offset=offset, nested_absmax=nested,
                       nested_code=code, nested_blocksize=nested_blocksize)
    for out_dtype in DTYPES:
        want = nf4lora.dequantize_4bit(packed, state, dtype=out_dtype)
        got = nf4lora.dequantize_4bit(packed.cuda(), state.to("cuda"), dtype=out_dtype)
        assert same_bits(got, want), out_dtype


@needs_gpu
def test_out_variant_fills_in_place():
    x = torch.randn(257, 320, dtype=torch.bfloat16, device="cuda")
    for double_quant in (False, True):
        packed, state = nf4lora.quantize_4bit(x, 64, "nf4", double_quant=double_quant)
        for dtype in DTYPES:
            out = torch.full(x.shape, float("nan"), dtype=dtype, device="cuda")
            ptr = out.data_ptr()
            res = nf4lora.dequantize_4bit(packed, state, out=out)
            assert res is out and out.data_ptr() == ptr
            assert same_bits(out, nf4lora.dequantize_4bit(packed, state, dtype=dtype))
            want = nf4lora.dequantize_4bit(packed.cpu(), state.to("cpu"), dtype=dtype)
            assert same_bits(out, want)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_views_take_the_scalar_path(dtype):
    """Views whose data pointers are not 16-byte aligned (storage offset 1 element / 1 byte)."""
    n = 4 * 4096 + 37
    base = sample((n + 1,), dtype, seed=3).cuda()
    x = base[1:]  # contiguous, data_ptr misaligned by one element
    assert x.data_ptr() % 16 != 0
    for bs in (32, 64, 4096):
        p_cpu, s_cpu = nf4lora.quantize_4bit(x.cpu(), bs, "nf4", double_quant=False)
        p_gpu, s_gpu = nf4lora.quantize_4bit(x, bs, "nf4", double_quant=False)
        assert torch.equal(p_gpu.cpu(), p_cpu) and same_bits(s_gpu.absmax, s_cpu.absmax), bs
        # packed at an odd address, output at a misaligned address
        buf = torch.zeros(p_cpu.numel() + 1, dtype=torch.uint8, device="cuda")
        buf[1:].copy_(p_cpu.view(-1))
        out_base = torch.empty(n + 1, dtype=dtype, device="cuda")
        out = out_base[1:]
        state = s_cpu.to("cuda")
        nf4lora.dequantize_4bit(buf[1:].view(-1, 1), state, out=out)
        assert same_bits(out, nf4lora.dequantize_4bit(p_cpu, s_cpu)), bs


@needs_gpu
def test_non_default_stream():
    x = torch.randn(1000, 96, device="cuda")
    packed, state = nf4lora.quantize_4bit(x)
    want = nf4lora.dequantize_4bit(packed, state)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        p2, st2 = nf4lora.quantize_4bit(x)
        got = nf4lora.dequantize_4bit(p2, st2)
    s.synchronize()
    assert torch.equal(p2, packed) and same_bits(got, want)


# ---- zeros, NaN/Inf -----------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_zero_blocks(quant_type):
    x = torch.randn(5, 64)
    x[1:3] = 0.0
    for xx in (x, torch.zeros(100, dtype=torch.bfloat16), torch.zeros(1)):
        for double_quant in (False, True):
            p_cpu, s_cpu = nf4lora.quantize_4bit(xx, 64, quant_type, double_quant=double_quant)
            p_gpu, s_gpu = nf4lora.quantize_4bit(xx.cuda(), 64, quant_type, double_quant=double_quant)
            assert torch.equal(p_gpu.cpu(), p_cpu)
            y = nf4lora.dequantize_4bit(p_gpu, s_gpu)
            assert not torch.isnan(y).any()
            assert same_bits(nf4lora.dequantize_4bit(p_cpu.cuda(), s_cpu.to("cuda")),
                             nf4lora.dequantize_4bit(p_cpu, s_cpu))
    z = torch.zeros(100, dtype=torch.bfloat16, device="cuda")
    pz, sz = nf4lora.quantize_4bit(z, 64, quant_type, double_quant=False)
    assert torch.equal(sz.absmax.cpu(), torch.zeros(2))
    assert torch.all(nf4lora.dequantize_4bit(pz, sz) == 0)


@needs_gpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_raises(bad):
    x = torch.randn(4, 64, device="cuda")
    x[2, 5] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf in 1 of 4 blocks \(first: block 2"):
        nf4lora.quantize_4bit(x)


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_blocks_match_cpu(dtype):
    x = torch.randn(6, 64)
    x[2, 5] = float("inf")
    x[3, 0] = float("nan")
    x[5, 63] = float("-inf")
    x = x.to(dtype)
    p_cpu, s_cpu = nf4lora.quantize_4bit(x, allow_nonfinite=True, double_quant=False)
    p_gpu, s_gpu = nf4lora.quantize_4bit(x.cuda(), allow_nonfinite=True, double_quant=False)
    assert torch.equal(p_gpu.cpu(), p_cpu)  # the canonical form: every code the one of 0.0
    assert same_bits(s_gpu.absmax, s_cpu.absmax)  # NaN with the CPU's bit pattern
    for out_dtype in DTYPES:  # one NaN operand per product: the CPU's NaN pattern, exactly
        want = nf4lora.dequantize_4bit(p_cpu, s_cpu, dtype=out_dtype)
        assert same_bits(nf4lora.dequantize_4bit(p_gpu, s_gpu, dtype=out_dtype), want)
    # With double quantization the NaN offset meets NaN nested scales: which NaN x86 returns
    # then depends on operand order in the compiled CPU code, so only NaN-ness is compared.
    p_gpu, s_gpu = nf4lora.quantize_4bit(x.cuda(), allow_nonfinite=True, double_quant=True)
    assert torch.isnan(nf4lora.dequantize_4bit(p_gpu, s_gpu)).all()


@needs_gpu
def test_nonfinite_counter():
    """The native entry point counts non-finite blocks into a device int32 (added to)."""
    x = torch.randn(10 * 64 + 5, device="cuda")
    x[[3, 70, 71, 200, 10 * 64 + 4]] = torch.tensor([float("nan"), float("inf"), 1.0, float("-inf"), float("nan")],
                                                    device="cuda")
    packed = torch.empty((x.numel() + 1) // 2, dtype=torch.uint8, device="cuda")
    absmax = torch.empty(11, device="cuda")
    counter = torch.full((1,), 5, dtype=torch.int32, device="cuda")
    _C.quantize_4bit_cuda(x.data_ptr(), dtype_code(x.dtype), x.numel(), 64, quant_type_code("nf4"),
                          packed.data_ptr(), absmax.data_ptr(), counter.data_ptr(),
                          torch.cuda.current_stream().cuda_stream)
    assert counter.item() == 5 + 4  # blocks 0, 1, 3, 10
    assert torch.isnan(absmax.cpu()).tolist() == [True, True, False, True] + [False] * 6 + [True]


# ---- native argument checks (no GPU needed: they run before any CUDA call) ----------------------


@needs_cuda_build
def test_native_argument_errors():
    stream = 0
    with pytest.raises(ValueError, match=r"blocksize must be a power of two in \[32, 4096\], got 48"):
        _C.quantize_4bit_cuda(16, 0, 8, 48, 2, 16, 16, 0, stream)
    with pytest.raises(ValueError, match="element count n must be >= 0, got -1"):
        _C.dequantize_4bit_cuda(16, 16, 0, 0, 0, 0, 256, -1, 64, 2, 16, 0, stream)
    with pytest.raises(ValueError, match="quant_type must be NF4"):
        _C.quantize_4bit_cuda(16, 0, 8, 64, 3, 16, 16, 0, stream)
    with pytest.raises(ValueError, match="out_dtype must be float32, float16 or bfloat16"):
        _C.dequantize_4bit_cuda(16, 16, 0, 0, 0, 0, 256, 8, 64, 2, 16, 9, stream)
    with pytest.raises(ValueError, match="offset must not be null"):
        _C.dequantize_4bit_cuda(16, 0, 16, 16, 16, 0, 256, 8, 64, 2, 16, 0, stream)
    with pytest.raises(ValueError, match=r"8-bit blocksize must be a power of two in \[16, 4096\], got 8"):
        _C.quantize_8bit_blockwise_cuda(16, 8, 8, 16, 16, 16, 0, stream)
    with pytest.raises(ValueError, match="x must not be null"):
        _C.quantize_4bit_cuda(0, 0, 8, 64, 2, 16, 16, 0, stream)
    # n == 0 launches nothing (and needs no pointers)
    _C.quantize_4bit_cuda(0, 0, 0, 64, 2, 0, 0, 0, stream)
    _C.dequantize_4bit_cuda(0, 0, 0, 0, 0, 0, 256, 0, 64, 2, 0, 0, stream)


# ---- int64 indexing -----------------------------------------------------------------------------


@needs_gpu
def test_more_than_2_31_elements():
    """n = 2^31 + 2^20 + 3 (odd): blocks around element 2^31 and the partial last block match
    the CPU on the same slices (a slice starting on a block boundary quantizes the same bytes)."""
    n = (1 << 31) + (1 << 20) + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 14 * (1 << 30):
        pytest.skip(f"needs ~14 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    bs = 64
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    x.normal_(generator=torch.Generator("cuda").manual_seed(1))
    packed, state = nf4lora.quantize_4bit(x, bs, "nf4", double_quant=False)
    out = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    nf4lora.dequantize_4bit(packed, state, out=out)
    torch.cuda.synchronize()
    for start in (0, (1 << 31) - 8 * bs, n - (n % bs) - 64 * bs):
        stop = min(n, start + 128 * bs)
        xs = x[start:stop].cpu()
        p_cpu, s_cpu = nf4lora.quantize_4bit(xs, bs, "nf4", double_quant=False)
        assert torch.equal(packed.view(-1)[start // 2:(stop + 1) // 2].cpu(), p_cpu.view(-1)), start
        assert same_bits(state.absmax[start // bs:(stop + bs - 1) // bs], s_cpu.absmax), start
        assert same_bits(out[start:stop], nf4lora.dequantize_4bit(p_cpu, s_cpu)), start
    del x, out, packed


# ---- bitsandbytes' CUDA kernels -----------------------------------------------------------------


def _bnb_cuda():
    try:
        import bitsandbytes.functional as F
        F.quantize_4bit(torch.ones(64, device="cuda"), blocksize=64, quant_type="nf4")
        return F
    except Exception:  # not installed, or no CUDA library in this bitsandbytes
        return None


@needs_gpu
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_bitsandbytes_cuda(quant_type, dtype):
    """Same absmax; NF4: same bytes, FP4: same dequantized values (bitsandbytes' CUDA FP4 kernel
    sets the sign bit of values that round to zero from below; we follow its CPU rule, +0's
    code, so codes may differ there while the values are equal). Both libraries dequantize the
    same packed data and state to the same bits (FP4: the same values, +-0 aside).
    bitsandbytes builds with --use_fast_math (approximate 1/absmax) and writes its NF4
    thresholds as decimal literals, so a code can land on the neighbouring value on a rare
    tie; those are counted and must stay below 1e-4 of the elements."""
    F = _bnb_cuda()
    if F is None:
        pytest.skip("bitsandbytes with CUDA support is not installed")
    g = torch.Generator().manual_seed(11)
    near = total = 0
    for shape in [(64, 128), (33, 64), (4097,), (7, 13), (1024, 1024)]:
        x = (torch.randn(shape, generator=g) * 0.5).to(dtype).cuda()
        for bs in (64, 128, 256, 1024, 4096):
            pb, sb = F.quantize_4bit(x, blocksize=bs, compress_statistics=False, quant_type=quant_type)
            p, s = nf4lora.quantize_4bit(x, bs, quant_type, double_quant=False)
            assert same_bits(s.absmax, sb.absmax.float()), (shape, bs)
            mine = nf4lora.dequantize_4bit(p, s, dtype=torch.float32)
            theirs_state = QuantState(absmax=sb.absmax.float(), shape=x.shape, dtype=dtype, blocksize=bs,
                                      quant_type=quant_type, code=nf4lora.codebook(quant_type, "cuda"))
            theirs = nf4lora.dequantize_4bit(pb, theirs_state, dtype=torch.float32)
            if quant_type == "nf4":
                differ = p.view(-1) != pb.view(-1)
            else:
                differ = mine.view(-1) != theirs.view(-1)  # == treats -0 and +0 as equal
            near += int(differ.sum())
            total += differ.numel()
            # dequantize: same packed bytes and state -> same output in both libraries
            ours_out = nf4lora.dequantize_4bit(pb, theirs_state)
            bnb_out = F.dequantize_4bit(pb, sb)
            if quant_type == "nf4":
                assert same_bits(ours_out, bnb_out), (shape, bs)
            else:
                assert torch.equal(ours_out, bnb_out), (shape, bs)
    assert near <= max(1, total // 10_000), (near, total)
