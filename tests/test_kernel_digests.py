"""The fused CPU kernels' outputs, bit for bit, against digests recorded from the build that set
them: a guard on "the same bits" (greedy decoding's tokens depend on them, and the equality tests
elsewhere compare paths built on the same kernels, so a change of rounding inside a kernel would
pass those). Forward and transposed products at M = 1, 3 and 8 over NF4/FP4, blocksizes 64 and 128,
double-quantized and plain scales, bf16 and fp32, for each variant this machine runs whose
arithmetic is plain IEEE fp32 (scalar reference, AVX2, AVX-512: the same bits on any x86 CPU that
runs them). AVX512-BF16 is not pinned: its vdpbf16ps rounding is the CPU's (not specified to be
the same across vendors).

A failure means a kernel's outputs changed. If that is intended, say why in docs/decisions.md and
record the new digests: `PYTHONPATH=python python tests/test_kernel_digests.py` prints them."""
from __future__ import annotations

import hashlib

import pytest
import torch

import nf4lora
from nf4lora.ops import DISPATCH

DIGESTS = {  # recorded 2026-12-05 (issue 15's kernel rework, checked bit-equal to the build before it)
    "ref": "c42128b8f74cbf27837bedd6fee90009e283cd714e6d5884ffaadbee4913d7aa",
    "avx2": "d8c8e5103abd5acd09a4682703f6f6e1b2eed0cecdd567bd30711f8c2d9a812a",
    "avx512": "cb7d59a157816a7a546ae0a37e5690262d8460338e6982a963765a4de0f256eb",
}


def outputs_digest(variant: str) -> str:
    h = hashlib.sha256()
    g = torch.Generator().manual_seed(0)
    with nf4lora.use_cpu_variant(variant), DISPATCH.override(cpu_fused_max_rows=8, cpu_fused_t_max_rows=8):
        for N, K in ((96, 576), (40, 1536), (24, 4160)):
            w = torch.randn(N, K, generator=g) * 0.05
            for qt in ("nf4", "fp4"):
                for blocksize in (64, 128):
                    if K % blocksize:
                        continue
                    for dq in (True, False):
                        packed, state = nf4lora.quantize_4bit(w, blocksize, qt, double_quant=dq)
                        nested = ((state.nested_absmax, state.nested_code, state.offset) if state.nested
                                  else (None, None, None))
                        for dtype in (torch.bfloat16, torch.float32):
                            for M in (1, 3, 8):
                                x = torch.randn(M, K, generator=g).to(dtype)
                                gy = torch.randn(M, N, generator=g).to(dtype)
                                y = nf4lora.matmul_4bit(x, packed, state)
                                gx = torch.ops.nf4lora.matmul_4bit_t(
                                    gy, packed.view(-1), state.absmax, state.blocksize, state.quant_type,
                                    list(state.shape), *nested, state.nested_blocksize)
                                for t in (y, gx):
                                    h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _runs(variant: str) -> bool:
    from nf4lora.ops.native import cpu_variants
    return variant in cpu_variants(supported_only=True)


@pytest.mark.parametrize("variant", sorted(DIGESTS))
def test_kernel_outputs_are_the_recorded_bits(variant):
    if not _runs(variant):
        pytest.skip(f"this machine does not run the {variant} kernels")
    assert outputs_digest(variant) == DIGESTS[variant], (
        f"the {variant} kernels' outputs changed (see this file's docstring)")


if __name__ == "__main__":
    for v in DIGESTS:
        print(f'    "{v}": "{outputs_digest(v) if _runs(v) else "(not run here)"}",')
