"""One thread pool with torch: after `import torch, nf4lora` the process has exactly one OpenMP
runtime (read from /proc/self/maps), running our kernels adds no thread beyond torch's pool (both
checks are shown to fail on a process that loads a second runtime), and quantize / dequantize / the
fused products / the optimizer step give the same bits on 1 and 2 threads (each output element is
computed by one thread in a fixed order, so the split must not show)."""
import os
import re
import subprocess
import sys

import pytest
import torch

import nf4lora

LINUX = sys.platform.startswith("linux")
needs_proc = pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps and /proc/self/task (Linux only)")

# The OpenMP runtimes a process can hold: GNU (libgomp, torch's Linux wheels), LLVM (libomp), Intel
# (libiomp5), each possibly renamed with a hash by auditwheel/delocate (libgomp-a34b3233.so.1).
_OMP_RUNTIME = re.compile(r"^lib(gomp|omp|iomp5)([-.].*)?\.(so|dylib)(\..*)?$")


def openmp_runtimes(maps_text: str) -> list[str]:
    """The distinct OpenMP runtime files mapped, from the text of a /proc/<pid>/maps."""
    files = set()
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and _OMP_RUNTIME.match(os.path.basename(fields[5].strip())):
            files.add(fields[5].strip())
    return sorted(files)


# A fresh process (pytest's own imports must not decide what is loaded): torch ops and our kernels
# at 2 threads, alternating; it prints its thread count after the first torch ops and at the end,
# then its maps. With second_runtime it also maps a copy of the OpenMP runtime under another file
# name, loaded by path (the loader reuses a loaded soname only for a bare name) and runs one
# parallel region on it: what a mislinked extension would do, so the checks are shown to see it.
_PROBE = """
import ctypes, os, re, shutil, tempfile
import torch, nf4lora
torch.set_num_threads(2)
a = torch.randn(512, 512)
packed, state = nf4lora.quantize_4bit(torch.randn(1024, 1024, dtype=torch.bfloat16))
x = torch.randn(1, 1024, dtype=torch.bfloat16)
for _ in range(3):
    a @ a
before = len(os.listdir('/proc/self/task'))
if {second_runtime}:
    first = next(l.split()[-1] for l in open('/proc/self/maps').read().splitlines()
                 if re.match(r'lib(gomp|omp|iomp5)', os.path.basename(l.split()[-1])))
    copy = os.path.join(tempfile.mkdtemp(), 'libgomp-second.so.1')
    shutil.copy(first, copy)
    lib = ctypes.CDLL(copy)
    region = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(lambda data: None)
    lib.GOMP_parallel.argtypes = [type(region), ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    lib.GOMP_parallel(region, None, 2, 0)
for _ in range(20):
    nf4lora.matmul_4bit(x, packed, state)
    nf4lora.dequantize_4bit(packed, state)
    a @ a
print(before, len(os.listdir('/proc/self/task')))
print(open('/proc/self/maps').read())
"""


def probe(second_runtime: bool) -> tuple[int, int, list[str]]:
    """(threads after torch ops, threads after alternating with our kernels, OpenMP runtimes)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", _PROBE.format(second_runtime=second_runtime)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    counts, maps = done.stdout.split("\n", 1)
    before, after = map(int, counts.split())
    return before, after, openmp_runtimes(maps)


@needs_proc
def test_one_openmp_runtime_and_pool_with_torch():
    before, after, runtimes = probe(second_runtime=False)
    assert len(runtimes) == 1, f"expected one OpenMP runtime, found {runtimes}"
    # Our kernels at 2 threads run on torch's pool (OpenMP) or join what they start (the
    # std::thread fallback): no second pool left behind.
    assert after == before, f"{before} threads after torch ops, {after} after our kernels"
    if "threads OpenMP" in nf4lora.BUILD_INFO:
        # The one runtime is the one torch loaded: its wheel's copy where it ships one.
        torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
        if any(_OMP_RUNTIME.match(f) for f in os.listdir(torch_lib)):
            assert os.path.dirname(os.path.realpath(runtimes[0])) == torch_lib, runtimes


@needs_proc
def test_checks_see_a_second_runtime_and_pool():
    before, after, runtimes = probe(second_runtime=True)
    assert len(runtimes) == 2, runtimes
    assert after > before


def at_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# Sizes over the kernels' grain, so that 2 threads really split the work (quantize: 64K elements
# per thread; the products: 256 KiB of packed weight per thread), with a ragged end.
N, K = 1096, 1024


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_dequantize_same_bits_on_1_and_2_threads(dtype, double_quant):
    w = (torch.randn(N * K + 37, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)

    def run():
        packed, state = nf4lora.quantize_4bit(w, 64, "nf4", double_quant=double_quant)
        return packed, state, nf4lora.dequantize_4bit(packed, state)

    p1, s1, d1 = at_threads(1, run)
    p2, s2, d2 = at_threads(2, run)
    assert torch.equal(p1, p2)
    for key, value in s1.to_dict("w.").items():
        assert same_bits(value, s2.to_dict("w.")[key]), key
    assert same_bits(d1, d2)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_products_same_bits_on_1_and_2_threads(dtype, M):
    g = torch.Generator().manual_seed(M)
    packed, state = nf4lora.quantize_4bit(torch.randn(N, K, generator=g) * 0.05)
    x = torch.randn(M, K, generator=g).to(dtype)
    gy = torch.randn(M, N, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)

    def run():
        y = nf4lora.matmul_4bit(x, packed, state, bias)
        gx = torch.ops.nf4lora.matmul_4bit_t(gy, packed.view(-1), state.absmax, state.blocksize,
                                             state.quant_type, list(state.shape), state.nested_absmax,
                                             state.nested_code, state.offset, state.nested_blocksize)
        return y, gx

    y1, gx1 = at_threads(1, run)
    y2, gx2 = at_threads(2, run)
    assert same_bits(y1, y2)
    assert same_bits(gx1, gx2)


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_optimizer_step_same_bits_on_1_and_2_threads(optim_bits):
    g = torch.Generator().manual_seed(5)
    p0 = torch.randn(300_001, generator=g)
    grads = [torch.randn(300_001, generator=g) for _ in range(3)]

    def run():
        p = torch.nn.Parameter(p0.clone())
        opt = nf4lora.optim.AdamW([p], lr=1e-2, optim_bits=optim_bits)
        for grad in grads:
            p.grad = grad.clone()
            opt.step()
        return p.detach()

    assert same_bits(at_threads(1, run), at_threads(2, run))
