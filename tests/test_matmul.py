"""matmul_4bit: against a float64 reference under the "<= 2x the error of dequantize-in-the-same-
dtype + torch matmul" rule, gradients against the float64 chain rule and finite differences,
what backward keeps alive, autocast / checkpoint / torch.compile, bitsandbytes side by side,
and bad input."""
import pytest
import torch

import nf4lora
from nf4lora import matmul_4bit
from nf4lora.ops import DISPATCH

M_VALUES = [1, 2, 3, 8, 17, 64, 118]
# (N, K): K = 4160 is a long reduction for the forward, N = 1100 for the transposed product (more
# than one 64-row summation run); K = 416 leaves a partial 128-column strip.
NK = [(3, 64), (17, 96), (64, 128), (96, 4160), (130, 256), (1100, 416)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(N, K, seed=0, dq=True, qt="nf4"):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    packed, state = nf4lora.quantize_4bit(w, 64, qt, double_quant=dq)
    return packed, state


def grad_input(gy, packed, state):
    nested = (state.nested_absmax, state.nested_code, state.offset) if state.nested else (None, None, None)
    return torch.ops.nf4lora.matmul_4bit_t(gy, packed.view(-1), state.absmax, state.blocksize,
                                                    state.quant_type, list(state.shape), *nested,
                                                    state.nested_blocksize)


def check_error_within_twice_dense_same_dtype(dtype):
    """Forward y = x W^T + b and backward grad_x = grad_y W, every M, against float64."""
    g = torch.Generator().manual_seed(1)
    for N, K in NK:
        packed, state = weight(N, K, seed=N)
        w64 = nf4lora.dequantize_4bit(packed, state, dtype=torch.float32).double()
        w_same = nf4lora.dequantize_4bit(packed, state, dtype=dtype)
        bias = torch.randn(N, generator=g).to(dtype)
        for M in M_VALUES:
            x = torch.randn(M, K, generator=g).to(dtype)
            ref = x.double() @ w64.T + bias.double()
            dense = torch.nn.functional.linear(x, w_same, bias)
            got = matmul_4bit(x, packed, state, bias)
            assert got.shape == (M, N) and got.dtype == dtype
            err = (got.double() - ref).abs().max().item()
            dense_err = (dense.double() - ref).abs().max().item()
            assert err <= 2 * dense_err + 1e-6 * ref.abs().max().item(), ("fwd", N, K, M, err, dense_err)

            gy = torch.randn(M, N, generator=g).to(dtype)
            ref = gy.double() @ w64
            got = grad_input(gy, packed, state)
            assert got.shape == (M, K) and got.dtype == dtype
            err = (got.double() - ref).abs().max().item()
            dense_err = ((gy @ w_same).double() - ref).abs().max().item()
            assert err <= 2 * dense_err + 1e-6 * ref.abs().max().item(), ("bwd", N, K, M, err, dense_err)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_kernels_error_within_twice_dense_same_dtype(cpu_variant, dtype, monkeypatch):
    """Each variant's fused kernels for every M (the thresholds lifted)."""
    monkeypatch.setattr(DISPATCH, "cpu_fused_max_rows", 1 << 30)
    monkeypatch.setattr(DISPATCH, "cpu_fused_t_max_rows", 1 << 30)
    with nf4lora.use_cpu_variant(cpu_variant):
        check_error_within_twice_dense_same_dtype(dtype)


@pytest.mark.parametrize("fp32_gemm", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_error_within_twice_dense_same_dtype(dtype, fp32_gemm, monkeypatch):
    """matmul_4bit's own choice per M (fused kernel or scratch dequantize + dense GEMM), with bf16
    scratch-path GEMMs run as fp32 GEMMs (DISPATCH.cpu_gemm_fp32) forced on and off."""
    monkeypatch.setattr(DISPATCH, "cpu_gemm_fp32", fp32_gemm)
    check_error_within_twice_dense_same_dtype(dtype)


def test_fp32_gemm_of_bf16_rounds_once(monkeypatch):
    """The fp32 route multiplies x (bf16, exact in fp32) by W dequantized in fp32 and rounds once:
    against the product in float64 over those values, at most one bf16 rounding apart."""
    packed, state = weight(1100, 416, seed=3)
    w = nf4lora.dequantize_4bit(packed, state, dtype=torch.float32)
    bias = torch.randn(1100).bfloat16()
    x = torch.randn(70, 416).bfloat16()
    gy = torch.randn(70, 1100).bfloat16()
    exact_y = x.double() @ w.double().T + bias.double()
    exact_gx = gy.double() @ w.double()
    monkeypatch.setattr(DISPATCH, "cpu_gemm_fp32", True)
    y, gx = matmul_4bit(x, packed, state, bias), grad_input(gy, packed, state)
    assert y.dtype == gx.dtype == torch.bfloat16
    # one rounding to bf16 (relative 2^-8) of an fp32 sum that is exact to ~1e-6 here
    assert ((y.double() - exact_y).abs() <= exact_y.abs() * 2 ** -8 + 1e-4).all()
    assert ((gx.double() - exact_gx).abs() <= exact_gx.abs() * 2 ** -8 + 1e-4).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not turn the fp32 GEMMs back to bf16
        assert torch.equal(matmul_4bit(x, packed, state, bias), y) and torch.equal(grad_input(gy, packed, state), gx)
    assert DISPATCH.cpu_gemm_in_fp32(torch.bfloat16)
    assert not DISPATCH.cpu_gemm_in_fp32(torch.float16) and not DISPATCH.cpu_gemm_in_fp32(torch.float32)
    monkeypatch.setattr(DISPATCH, "cpu_gemm_fp32", False)
    assert not DISPATCH.cpu_gemm_in_fp32(torch.bfloat16)


def test_leading_dims_and_empty_batch():
    packed, state = weight(17, 96)
    x = torch.randn(2, 3, 5, 96)
    y = matmul_4bit(x, packed, state)
    assert y.shape == (2, 3, 5, 17)
    assert torch.allclose(y, x @ nf4lora.dequantize_4bit(packed, state).T, atol=1e-5)
    assert matmul_4bit(torch.randn(0, 96), packed, state).shape == (0, 17)


def test_nan_propagates_like_dense():
    packed, state = weight(17, 96)
    x = torch.randn(4, 96)
    x[1, 7] = float("nan")
    y = matmul_4bit(x, packed, state)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    gy = torch.randn(4, 17)
    gy[2, 3] = float("nan")
    gx = grad_input(gy, packed, state)
    assert torch.isnan(gx[2]).all() and torch.isfinite(gx[[0, 1, 3]]).all()
    assert grad_input(torch.randn(0, 17), packed, state).shape == (0, 96)


@pytest.mark.parametrize("dq", [False, True])
def test_gradients_match_float64_chain_rule(dq):
    packed, state = weight(33, 128, dq=dq)
    w64 = nf4lora.dequantize_4bit(packed, state, dtype=torch.float32).double()
    x = torch.randn(5, 128, requires_grad=True)
    bias = torch.randn(33, requires_grad=True)
    y = matmul_4bit(x, packed, state, bias)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert torch.allclose(x.grad.double(), gy.double() @ w64, atol=1e-4)
    assert torch.allclose(bias.grad.double(), gy.double().sum(0), atol=1e-5)
    assert packed.grad is None and not packed.requires_grad


def test_finite_differences():
    packed, state = weight(7, 64)
    x = torch.randn(3, 64)
    gy = torch.randn(3, 7)
    xg = x.clone().requires_grad_(True)
    (matmul_4bit(xg, packed, state) * gy).sum().backward()
    eps = 1e-2
    for i, j in [(0, 0), (1, 17), (2, 63)]:
        xp, xm = x.clone(), x.clone()
        xp[i, j] += eps
        xm[i, j] -= eps
        fd = ((matmul_4bit(xp, packed, state) - matmul_4bit(xm, packed, state)) * gy).sum() / (2 * eps)
        assert abs(fd.item() - xg.grad[i, j].item()) < 1e-3


def test_backward_saves_no_activation_or_dense_weight():
    packed, state = weight(64, 128)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(8, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = matmul_4bit(x, packed, state)
    assert not any(t.is_floating_point() and t.numel() >= 64 * 128 for t in saved)
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_autocast_and_checkpoint():
    packed, state = weight(32, 64)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = matmul_4bit(x, packed, state)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32

    x2 = x.detach().clone().requires_grad_(True)
    out = torch.utils.checkpoint.checkpoint(lambda t: matmul_4bit(t, packed, state).relu(), x2,
                                            use_reentrant=False)
    out.sum().backward()
    x3 = x.detach().clone().requires_grad_(True)
    matmul_4bit(x3, packed, state).relu().sum().backward()
    assert torch.equal(x2.grad, x3.grad)


def test_compile_fullgraph_forward_and_backward():
    packed1, state1 = weight(48, 64, seed=1)
    packed2, state2 = weight(64, 48, seed=2)

    def model(x):
        return matmul_4bit(torch.relu(matmul_4bit(x, packed1, state1)), packed2, state2)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 64, requires_grad=True)
    xc = x.detach().clone().requires_grad_(True)
    y, yc = model(x), compiled(xc)
    assert torch.allclose(y, yc, atol=1e-6)
    y.sum().backward()
    yc.sum().backward()
    assert torch.allclose(x.grad, xc.grad, atol=1e-6)


def test_opcheck():
    packed, state = weight(17, 96)
    x = torch.randn(3, 96, requires_grad=True)
    args = (x, packed.view(-1), state.absmax, 64, "nf4", [17, 96], state.nested_absmax,
            state.nested_code, state.offset, 256, torch.randn(17))
    torch.library.opcheck(torch.ops.nf4lora.matmul_4bit.default, args)


def test_matches_bitsandbytes_in_train_mode():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    import bitsandbytes.functional as F
    w = torch.randn(64, 128) * 0.05
    pb, sb = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    state = nf4lora.QuantState.from_dict(sb.as_dict(packed=True))
    x = torch.randn(9, 128, requires_grad=True)
    xb = x.detach().clone().requires_grad_(True)
    y = matmul_4bit(x, pb, state)
    yb = bnb.matmul_4bit(xb, pb.t(), quant_state=sb)
    assert torch.allclose(y, yb, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yb.backward(g)
    assert torch.allclose(x.grad, xb.grad, atol=1e-5)


def test_bad_input():
    packed, state = weight(17, 96)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] must be 96"):
        matmul_4bit(torch.randn(2, 95), packed, state)
    with pytest.raises(ValueError, match=r"bias has shape \(16,\), expected \(17,\)"):
        matmul_4bit(torch.randn(2, 96), packed, state, torch.randn(16))
    with pytest.raises(TypeError, match="bias dtype torch.bfloat16 differs from x dtype torch.float32"):
        matmul_4bit(torch.randn(2, 96), packed, state, torch.randn(17, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="x.dtype must be float32, float16 or bfloat16"):
        matmul_4bit(torch.randn(2, 96, dtype=torch.float64), packed, state)
    with pytest.raises(ValueError, match="one device"):
        matmul_4bit(torch.randn(2, 96, device="meta"), packed, state)
    flat_state = nf4lora.quantize_4bit(torch.randn(96))[1]
    with pytest.raises(ValueError, match="must be 2-D"):
        matmul_4bit(torch.randn(2, 96), nf4lora.quantize_4bit(torch.randn(96))[0], flat_state)
    with pytest.raises(TypeError, match="state must be a QuantState"):
        matmul_4bit(torch.randn(2, 96), packed, None)


def test_concurrent_forwards_do_not_share_scratch():
    import threading
    packed, state = weight(64, 128)
    xs = [torch.randn(32, 128, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = [matmul_4bit(x, packed, state) for x in xs]
    got = [None] * 4

    def run(i):
        for _ in range(20):
            got[i] = matmul_4bit(xs[i], packed, state)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("M", [1, 17])
def test_eager_path_equals_the_op(M):
    """matmul_4bit skips the custom op's dispatcher for plain CPU tensors in eager mode; it must
    give the op's results bit for bit, forward and backward (x and bias)."""
    packed, state = weight(96, 256)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(M, 256, generator=g, dtype=torch.bfloat16)
    bias = torch.randn(96, generator=g, dtype=torch.bfloat16)
    gy = torch.randn(M, 96, generator=g, dtype=torch.bfloat16)
    nested = (state.nested_absmax, state.nested_code, state.offset)
    outs = []
    for use_op in (False, True):
        xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
        if use_op:
            y = torch.ops.nf4lora.matmul_4bit(xg, packed.view(-1), state.absmax, 64, "nf4", [96, 256],
                                              *nested, state.nested_blocksize, bg)
        else:
            y = matmul_4bit(xg, packed, state, bg)
            assert type(y.grad_fn).__name__ == "_EagerCpuBackward"
        y.backward(gy)
        outs.append((y.detach(), xg.grad, bg.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_fake_tensors_and_dispatch_modes_take_the_op():
    """Under a dispatch mode (here FakeTensorMode, as torch.export / make_fx use) matmul_4bit must
    go through the op and its fake kernel: the eager path would hand fake storage to the kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    packed, state = weight(16, 64)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(3, 64))
        y = matmul_4bit(x, packed, state)
    assert y.shape == (3, 16)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, 64)
    with Record() as rec:
        y = matmul_4bit(x, packed, state)
    assert "nf4lora.matmul_4bit.default" in rec.ops
    assert torch.equal(y, matmul_4bit(x, packed, state))


def test_eager_path_keeps_double_backward_an_error():
    """create_graph through the frozen 4-bit weight behaves as the op does: the input gradient
    op has no autograd of its own, so a second derivative is an error, not a silent zero."""
    packed, state = weight(16, 64)
    x = torch.randn(2, 64, requires_grad=True)
    y = matmul_4bit(x, packed, state)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        torch.autograd.grad(gx.sum(), x)
