"""matmul_4bit on CUDA (cuda/matmul.cu through nf4lora/ops/cuda.py): each path forced in turn
(fused GEMV, dequantize + cuBLAS), forward and backward, every M of the done-rule
{1, 2, 3, 8, 17, 64, 118} and awkward N/K, against a float64 product of the dequantized weight
under the rule "error <= 2x the error of dequantize-in-the-same-dtype + torch matmul". Needs a
GPU; every test is marked `cuda` and skips without one (bench/gpu_check.sh runs them)."""
import pytest
import torch

import nf4lora
from nf4lora.ops import DISPATCH
from nf4lora.ops.native import _C, dtype_code, quant_type_code

HAS_GPU = torch.cuda.is_available() and nf4lora.has_cuda()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(
    not HAS_GPU,
    reason="needs a CUDA GPU and an nf4lora build with CUDA kernels "
           f"(torch.cuda.is_available()={torch.cuda.is_available()}, nf4lora.has_cuda()={nf4lora.has_cuda()})")]

MS = [1, 2, 3, 8, 17, 64, 118]
# (N, K): K % 8 == 0, where the GEMV runs both ways (N of 136 and 72 leave a partial tile of the
# transposed GEMV's 32 rows); K odd, where every path falls back to dequantize + cuBLAS.
SHAPES = [(96, 256), (136, 320), (64, 136), (72, 40), (33, 99)]
PATHS = {  # (cuda_gemv_max_rows, cuda_gemv_t_max_rows) that force each path where the shape allows it
    "gemv": (8, 8),
    "dequant": (0, 0),
}


@pytest.fixture
def path(request, monkeypatch):
    for name, value in zip(("cuda_gemv_max_rows", "cuda_gemv_t_max_rows"), PATHS[request.param]):
        monkeypatch.setattr(DISPATCH, name, value)
    return request.param


def weight(N, K, qt="nf4", dq=True, blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    packed, state = nf4lora.quantize_4bit(w, blocksize=blocksize, quant_type=qt, double_quant=dq)
    w64 = nf4lora.dequantize_4bit(packed, state, dtype=torch.float32).double()
    return packed.cuda(), state.to("cuda"), w64


def within_rule(ours, dense, ref):
    err = (ours.double().cpu() - ref).abs().max().item()
    base = (dense.double().cpu() - ref).abs().max().item()
    assert err <= 2 * base + 1e-6 * ref.abs().max().item() + 1e-30, (err, base)


@pytest.mark.parametrize("path", list(PATHS), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("N,K", SHAPES)
def test_forward_and_backward_within_twice_dense(path, dtype, N, K):
    packed, state, w64 = weight(N, K)
    w_same = nf4lora.dequantize_4bit(packed, state, dtype=dtype)
    bias = (torch.randn(N) * 0.1).to(dtype).cuda()
    for M in MS:
        x = torch.randn(M, K).to(dtype).cuda().requires_grad_(True)
        y = nf4lora.matmul_4bit(x, packed, state, bias)
        ref = x.detach().double().cpu() @ w64.T + bias.double().cpu()
        dense = torch.nn.functional.linear(x.detach(), w_same, bias)
        assert y.dtype == dtype and y.shape == (M, N)
        within_rule(y.detach(), dense, ref)
        gy = torch.randn(M, N).to(dtype).cuda()
        y.backward(gy)
        within_rule(x.grad, gy @ w_same, gy.double().cpu() @ w64)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("path", list(PATHS), indirect=True)
def test_formats_and_blocksizes(path, qt, dq, blocksize):
    N, K = 160, 192  # rows of 192 elements: blocks of 64 and 256 straddle rows, 4096 spans many
    packed, state, w64 = weight(N, K, qt=qt, dq=dq, blocksize=blocksize, seed=1)
    w_same = nf4lora.dequantize_4bit(packed, state, dtype=torch.bfloat16)
    for M in (3, 40):
        x = torch.randn(2, M, K, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        y = nf4lora.matmul_4bit(x, packed, state)
        within_rule(y.detach(), x.detach() @ w_same.T, x.detach().double().cpu() @ w64.T)
        gy = torch.randn_like(y)
        y.backward(gy)
        within_rule(x.grad, gy @ w_same, gy.double().cpu() @ w64)


@pytest.mark.parametrize("path", ["gemv"], indirect=True)
def test_gemv_matches_cpu_kernel(path):
    packed, state, _ = weight(300, 512, seed=2)
    x = torch.randn(5, 512)
    y_gpu = nf4lora.matmul_4bit(x.cuda(), packed, state).cpu()
    y_cpu = nf4lora.matmul_4bit(x, packed.cpu(), state.to("cpu"))
    torch.testing.assert_close(y_gpu, y_cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", list(PATHS), indirect=True)
def test_nan_propagates_and_empty_batch(path):
    packed, state, _ = weight(64, 128)
    x = torch.randn(4, 128, dtype=torch.bfloat16, device="cuda")
    x[1, 5] = float("nan")
    y = nf4lora.matmul_4bit(x, packed, state)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2, 3]]).any()
    empty = nf4lora.matmul_4bit(torch.empty(0, 128, dtype=torch.bfloat16, device="cuda"), packed, state)
    assert empty.shape == (0, 64)


def test_misaligned_x_takes_the_fallback():
    packed, state, w64 = weight(64, 128)
    buf = torch.randn(3 * 128 + 1, dtype=torch.bfloat16, device="cuda")
    x = buf[1:].view(3, 128)  # 2-byte offset: no 16-byte vector loads
    y = nf4lora.matmul_4bit(x, packed, state)
    w_same = nf4lora.dequantize_4bit(packed, state, dtype=torch.bfloat16)
    within_rule(y, x @ w_same.T, x.double().cpu() @ w64.T)


def test_linear4bit_on_cuda_trains_its_bias():
    lin = torch.nn.Linear(256, 96).to(torch.bfloat16)
    q = nf4lora.Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16).cuda()
    x = torch.randn(7, 256, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    q(x).float().square().sum().backward()
    assert x.grad is not None and q.bias.grad is not None and torch.isfinite(x.grad).all()


def test_native_argument_errors():
    packed, state, _ = weight(64, 128)
    x = torch.randn(9, 128, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(9, 64, dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    absmax_args = (0, state.absmax.data_ptr(), state.nested_absmax.data_ptr(),
                   state.nested_code.data_ptr(), state.offset.data_ptr(), 256)
    with pytest.raises(ValueError, match="M must be <= 8"):
        _C.matmul_4bit_cuda(x.data_ptr(), dtype_code(x.dtype), 9, 128, packed.data_ptr(), *absmax_args,
                            64, 64, quant_type_code("nf4"), 0, y.data_ptr(), stream)
    with pytest.raises(ValueError, match="multiple of 8"):
        _C.matmul_4bit_cuda(x.data_ptr(), dtype_code(x.dtype), 3, 100, packed.data_ptr(), *absmax_args,
                            64, 64, quant_type_code("nf4"), 0, y.data_ptr(), stream)
