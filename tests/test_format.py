"""The one format header (cpp/include/nf4lora/format.h, read through nf4lora._C) against the
literal tables of DESIGN.md, bitsandbytes' published map checksums, and bitsandbytes itself."""
import hashlib

import pytest
import torch

import nf4lora
from nf4lora.ops.native import _C

from . import reference as ref


def test_nf4_codebook_is_the_literal_table():
    assert nf4lora.codebook("nf4").tolist() == torch.tensor(ref.NF4_LITERAL).tolist()
    assert torch.equal(nf4lora.codebook("nf4"), ref.codebook("nf4"))


def test_fp4_codebook_is_the_literal_table_in_bit_order():
    got = nf4lora.codebook("fp4")
    want = ref.codebook("fp4")
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert got[8].item() == 0.0 and not torch.signbit(got[8])  # +0.0, as bitsandbytes stores it


def test_thresholds_are_fp32_midpoints_in_ascending_order():
    for qt, code in (("nf4", _C.QUANT_TYPE_NF4), ("fp4", _C.QUANT_TYPE_FP4)):
        mids, order = ref.bounds(qt)
        assert _C.thresholds(code) == mids.tolist()
        if qt == "fp4":
            assert _C.fp4_ascending() == order.tolist()


@pytest.mark.parametrize("signed,digest", [(True, "e732639a65f497b4"), (False, "305f002cc11278fb")])
def test_dynamic_maps_match_bitsandbytes_checksums(signed, digest):
    m = nf4lora.dynamic_map(signed)
    assert m.numel() == 256 and torch.all(m[1:] > m[:-1])
    assert hashlib.sha256(m.numpy().tobytes()).hexdigest().startswith(digest)


def test_tables_equal_bitsandbytes_when_installed():
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    for qt in ("nf4", "fp4"):
        assert torch.equal(nf4lora.codebook(qt).view(torch.int32),
                           F.get_4bit_type(qt, device="cpu").view(torch.int32))
    for signed in (True, False):
        assert torch.equal(nf4lora.dynamic_map(signed), F.create_dynamic_map(signed=signed))


def test_constants_and_build_info():
    assert (_C.MIN_BLOCKSIZE, _C.MAX_BLOCKSIZE, _C.DEFAULT_BLOCKSIZE, _C.NESTED_BLOCKSIZE) == (32, 4096, 64, 256)
    assert "CPU variants" in nf4lora.BUILD_INFO and "CUDA" in nf4lora.BUILD_INFO
    assert "ref" in nf4lora.cpu_variants()
    assert nf4lora.active_cpu_variant() in nf4lora.cpu_variants()


def test_cpu_variant_override_and_errors():
    for v in nf4lora.cpu_variants():
        with nf4lora.use_cpu_variant(v):
            assert nf4lora.active_cpu_variant() == v
    with pytest.raises(ValueError, match="unknown CPU variant"):
        nf4lora.set_cpu_variant("sse9")
    for v in set(nf4lora.cpu_variants(False)) - set(nf4lora.cpu_variants(True)):
        with pytest.raises(ValueError, match="not supported"):
            nf4lora.set_cpu_variant(v)
