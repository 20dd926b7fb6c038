"""Fuzz tests (hypothesis) of the entry points that take external data or arbitrary arguments:
QuantState.from_dict and Linear4bit.load_state_dict on mutated bitsandbytes state dicts (missing
keys, wrong dtypes and lengths, broken or hostile JSON, absurd shapes), and the native ops on
random shapes, dtypes, strides, block sizes and mismatched arguments. The property everywhere:
a clear ValueError/TypeError (RuntimeError from torch's load_state_dict wrapper), or a result that
is right — never a crash, a hang or a silently wrong answer. CI draws a few dozen examples per
test; `pytest tests/test_fuzz.py --fuzz-examples 5000` (or NF4LORA_FUZZ_EXAMPLES) runs longer."""
import copy
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nf4lora
from nf4lora import Linear4bit, QuantState

from . import reference as ref

EXAMPLES = int(os.environ.get("NF4LORA_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CLEAR = (ValueError, TypeError)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STATE_KEY = "weight.quant_state.bitsandbytes__"

def ref_dequantize(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """tests/reference.py's dequantization of (packed, state), nested absmax decoded there too."""
    absmax = state.absmax
    if state.nested:
        absmax = ref.nested_absmax(state.absmax, state.nested_absmax, state.nested_code, state.offset,
                                   state.nested_blocksize)
    flat = packed.contiguous().reshape(-1).view(torch.uint8)
    return ref.dequantize_4bit(flat, absmax, state.blocksize, state.quant_type, state.shape, dtype)


# ---- mutated state dicts ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
shapes = st.lists(st.integers(-3, 2**40), min_size=0, max_size=3) | json_values


def valid_state_dict(qt: str, dq: bool, blocksize: int, n_out: int, n_in: int) -> dict:
    torch.manual_seed(n_out * 131 + n_in)
    lin = torch.nn.Linear(n_in, n_out, bias=True)
    layer = Linear4bit.from_linear(lin, quant_type=qt, blocksize=blocksize, double_quant=dq)
    return {k: v.clone() for k, v in layer.state_dict().items()}


@st.composite
def mutated_state_dicts(draw):
    qt = draw(st.sampled_from(["nf4", "fp4"]))
    dq = draw(st.booleans())
    bs = draw(st.sampled_from([32, 64, 256]))
    n_out, n_in = draw(st.integers(1, 9)), draw(st.integers(1, 70))
    sd = valid_state_dict(qt, dq, bs, n_out, n_in)
    state_key = STATE_KEY + qt
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["drop", "dtype", "length", "not_tensor", "json_field", "json_bytes",
                                     "json_drop", "extra_key", "rename_state"]))
        keys = sorted(sd)
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        if kind == "drop":
            del sd[key]
        elif kind == "dtype" and isinstance(sd[key], torch.Tensor):
            sd[key] = sd[key].to(draw(st.sampled_from([torch.float32, torch.uint8, torch.int64, torch.float16])))
        elif kind == "length" and isinstance(sd[key], torch.Tensor):
            t = sd[key].reshape(-1)
            cut = draw(st.integers(0, t.numel() + 3))
            sd[key] = t[:cut] if cut <= t.numel() else torch.cat([t, t[: cut - t.numel()]])
        elif kind == "not_tensor":
            sd[key] = draw(st.sampled_from([None, 3, "x", [1, 2]]))
        elif kind in ("json_field", "json_drop") and state_key in sd and isinstance(sd[state_key], torch.Tensor):
            blob = sd[state_key]
            if blob.dtype != torch.uint8:  # an earlier "dtype" mutation: no JSON bytes to edit
                continue
            try:  # reshape: a 0-d tensor's tolist() is an int, and bytes(int) is that many zeros
                meta = json.loads(bytes(blob.reshape(-1).tolist()).decode())
            except ValueError:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
                continue
            if not isinstance(meta, dict) or not meta:
                continue
            field = draw(st.sampled_from(sorted(meta) + ["shape", "blocksize", "nested_offset"]))
            if kind == "json_drop":
                meta.pop(field, None)
            else:
                meta[field] = draw(shapes if field == "shape" else json_values)
            try:
                blob = json.dumps(meta).encode()
            except (ValueError, TypeError):
                continue
            sd[state_key] = torch.tensor(list(blob), dtype=torch.uint8)
        elif kind == "json_bytes":
            sd[state_key] = torch.tensor(draw(st.lists(st.integers(0, 255), max_size=40)), dtype=torch.uint8)
        elif kind == "extra_key":
            sd["weight." + draw(st.sampled_from(["absmax2", "quant_state.bitsandbytes__fp4",
                                                 "quant_state.bitsandbytes__int8"]))] = torch.zeros(3, dtype=torch.uint8)
        elif kind == "rename_state" and state_key in sd:
            sd[STATE_KEY + draw(st.sampled_from(["nf4", "fp4", "nf8", ""]))] = sd.pop(state_key)
    return sd, (n_out, n_in)


@FUZZ
@given(mutated_state_dicts())
def test_from_dict_rejects_or_gives_a_usable_state(case):
    sd, _ = case
    try:
        state = QuantState.from_dict(sd, "weight.")
    except CLEAR:
        return
    # Accepted: it must be self-consistent, so a packed buffer of its size dequantizes to the
    # reference's values without touching memory outside it.
    packed = sd.get("weight")
    if not isinstance(packed, torch.Tensor) or packed.numel() * packed.element_size() != state.packed_nbytes:
        packed = torch.zeros(state.packed_nbytes, dtype=torch.uint8)
    got = nf4lora.dequantize_4bit(packed.contiguous(), state, dtype=torch.float32)
    assert got.shape == state.shape
    torch.testing.assert_close(got, ref_dequantize(packed, state, torch.float32), rtol=0, atol=0, equal_nan=True)


@FUZZ
@given(mutated_state_dicts())
def test_linear4bit_load_state_dict_rejects_cleanly(case):
    sd, (n_out, n_in) = case
    layer = Linear4bit(n_in, n_out, bias=True, quant_type="nf4")
    before = copy.deepcopy(layer.state_dict())
    try:
        layer.load_state_dict(sd)
    except (RuntimeError, *CLEAR):
        after = layer.state_dict()
        # The weight and its state are replaced only when they loaded completely.
        weight_ok = "weight" in after and after["weight"].shape == before["weight"].shape
        assert weight_ok
        return
    x = torch.randn(2, n_in)
    y = layer(x)
    assert y.shape == (2, n_out) and torch.isfinite(y).all()


def test_absurd_shapes_are_rejected_without_allocating():
    sd = valid_state_dict("nf4", True, 64, 4, 64)
    meta = json.loads(bytes(sd[STATE_KEY + "nf4"].tolist()).decode())
    for shape in ([2**40, 2**40], [2**23, 2**23], [-1, 64], [2**63, 2], [1.5, 2], [True, 64]):
        meta["shape"] = shape
        sd[STATE_KEY + "nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
        with pytest.raises(CLEAR):
            QuantState.from_dict(sd, "weight.")


# ---- native ops on random arguments ----------------------------------------------------------

@st.composite
def tensors(draw):
    dims = draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    base = torch.randn(*[d * 2 + 1 for d in dims]) * draw(st.sampled_from([1e-3, 1.0, 300.0]))
    view = base[tuple(slice(0, d) for d in dims)]  # a non-contiguous view whenever dims > 1
    if draw(st.booleans()) and view.dim() >= 2:
        view = view.transpose(0, -1)
    if draw(st.booleans()):
        view = base[tuple(slice(0, 2 * d, 2) for d in dims)]  # strided
    return view.to(dtype)


@FUZZ
@given(tensors(), st.one_of(st.sampled_from([32, 64, 128, 4096]), st.integers(-5, 5000)),
       st.sampled_from(["nf4", "fp4", "NF4", "int4"]), st.booleans())
def test_quantize_random_views_blocksizes_and_types(x, blocksize, qt, dq):
    valid = blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096) and qt in ("nf4", "fp4") and x.numel() > 0
    if not valid:
        with pytest.raises(CLEAR):
            nf4lora.quantize_4bit(x, blocksize=blocksize, quant_type=qt, double_quant=dq)
        return
    packed, state = nf4lora.quantize_4bit(x, blocksize=blocksize, quant_type=qt, double_quant=dq)
    packed_c, state_c = nf4lora.quantize_4bit(x.contiguous(), blocksize=blocksize, quant_type=qt, double_quant=dq)
    assert torch.equal(packed, packed_c) and torch.equal(state.absmax, state_c.absmax)
    out = nf4lora.dequantize_4bit(packed, state)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, ref_dequantize(packed, state, x.dtype))


@FUZZ
@given(st.integers(0, 5), st.integers(0, 70), st.integers(1, 40), st.sampled_from(DTYPES),
       st.sampled_from(DTYPES), st.integers(-2, 2), st.booleans())
def test_matmul_random_shapes_and_mismatches(m, k, n, x_dtype, bias_dtype, k_error, with_bias):
    w = torch.randn(n, max(k, 1))
    packed, state = nf4lora.quantize_4bit(w, blocksize=64, double_quant=True)
    K = w.shape[1]
    x = torch.randn(m, max(K + k_error, 0)).to(x_dtype)
    k_error = x.shape[1] - K
    bias = torch.randn(n).to(bias_dtype) if with_bias else None
    if k_error != 0 or (with_bias and bias_dtype != x_dtype):
        with pytest.raises(CLEAR):
            nf4lora.matmul_4bit(x, packed, state, bias)
        return
    y = nf4lora.matmul_4bit(x, packed, state, bias)
    assert y.shape == (m, n) and y.dtype == x_dtype
    assert_within_2x_of_torch(y, x, nf4lora.dequantize_4bit(packed, state, dtype=torch.float32), bias)


def assert_within_2x_of_torch(y, x, w32, bias=None):
    """The 2x error rule: the kernel's largest error against a float64 reference (same x, same
    dequantized W, same bias) is at most twice that of torch's F.linear in x's dtype, plus one unit
    of rounding of the products' absolute sum (so that an exact torch result does not demand an
    exact kernel when the summation order differs)."""
    if y.numel() == 0:
        return
    w64 = w32.double()
    expected = x.double() @ w64.T + (0 if bias is None else bias.double())
    torch_y = torch.nn.functional.linear(x, w32.to(x.dtype), bias)
    err = (y.double() - expected).abs().max().item()
    err_torch = (torch_y.double() - expected).abs().max().item()
    scale = (x.double().abs() @ w64.abs().T).max().item() + (0 if bias is None else bias.double().abs().max().item())
    floor = torch.finfo(x.dtype).eps * scale
    assert err <= 2 * err_torch + floor, (f"{x.dtype} M={x.shape[0]} K={x.shape[1]} N={w32.shape[0]}: max error "
                                          f"{err:.3g} > 2 x torch's {err_torch:.3g} + {floor:.3g}")


@FUZZ
@given(st.integers(1, 300), st.sampled_from(DTYPES), st.sampled_from(DTYPES + [torch.int32, torch.uint8]),
       st.integers(-1, 1))
def test_dequantize_out_mismatches(n, dtype, out_dtype, size_error):
    packed, state = nf4lora.quantize_4bit(torch.randn(n).to(dtype), blocksize=32)
    out = torch.empty(n + size_error, dtype=out_dtype)
    if size_error != 0 or out_dtype not in DTYPES:
        with pytest.raises(CLEAR):
            nf4lora.dequantize_4bit(packed, state, out=out)
        return
    nf4lora.dequantize_4bit(packed, state, out=out)
    assert torch.equal(out, nf4lora.dequantize_4bit(packed, state, dtype=out_dtype))


# ---- PEFT adapter files from strangers --------------------------------------------------------

def _adapter_dir(tmp_path_factory):
    from torch import nn
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16))
    model = nf4lora.get_lora_model(base, nf4lora.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    directory = tmp_path_factory.mktemp("adapter")
    nf4lora.save_adapter(model, directory)
    return directory


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory):
    directory = _adapter_dir(tmp_path_factory)
    return {name: (directory / name).read_bytes() for name in ("adapter_model.safetensors", "adapter_config.json")}


@FUZZ
@given(data=st.data())
def test_load_adapter_from_damaged_files(adapter_files, tmp_path_factory, data):
    from torch import nn
    files = dict(adapter_files)
    target = data.draw(st.sampled_from(sorted(files)))
    blob = bytearray(files[target])
    how = data.draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    elif how == "append":
        blob += bytes(data.draw(st.lists(st.integers(0, 255), min_size=1, max_size=64)))
    else:
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i:i + 8] = bytes(data.draw(st.lists(st.integers(0, 255), min_size=8, max_size=8)))
    files[target] = bytes(blob)
    directory = tmp_path_factory.mktemp("damaged")
    for name, content in files.items():
        (directory / name).write_bytes(content)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        loaded = nf4lora.load_adapter(model, directory)
    except CLEAR:
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before), \
            "a refused adapter changed the model"
        return
    # Accepted (e.g. a flipped bit inside a JSON string that still parses the same way, or in a
    # PEFT-format file's tensor data without our checksum): the model must work.
    y = loaded(torch.randn(3, 32))
    assert y.shape == (3, 16)


# ---- model folders from strangers: damaged safetensors ----------------------------------------

@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    from .tiny_lm import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


@settings(FUZZ, max_examples=max(5, EXAMPLES // 4))  # each example loads a model: fewer of them
@given(data=st.data())
def test_load_model_from_damaged_safetensors(tiny_model_folder, tmp_path_factory, data):
    import shutil
    folder = tmp_path_factory.mktemp("damaged_model")
    for f in tiny_model_folder.iterdir():
        shutil.copy(f, folder / f.name)
    weights = folder / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    header = int.from_bytes(blob[:8], "little") + 8
    how = data.draw(st.sampled_from(["truncate", "flip_header", "flip_data", "header_length"]))
    if how == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    elif how == "flip_header":
        i = data.draw(st.integers(8, header - 1))
        blob[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "flip_data":
        i = data.draw(st.integers(header, len(blob) - 1))
        blob[i] ^= 1 << data.draw(st.integers(0, 7))
    else:
        blob[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    weights.write_bytes(bytes(blob))
    try:
        model, _ = nf4lora.load_model(folder)
    except CLEAR:
        return
    # Accepted: a flipped bit in tensor data is just another weight value (safetensors has no
    # checksum), or one in the JSON header that still parses to the same layout. The model works.
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape[:2] == (1, 3)


# ---- GGUF files from strangers: damaged headers, metadata and tensor data ---------------------

class _GGUFBlob:
    """The tiny GGUF's bytes and where its tensor data starts (a short repr: hypothesis prints the
    arguments of a failing example, and 280 kB of bytes made that report fail with a warning)."""

    def __init__(self, data: bytes, data_start: int):
        self.data, self.data_start = data, data_start

    def __repr__(self) -> str:
        return f"<tiny GGUF: {len(self.data)} bytes, tensor data from {self.data_start}>"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from .tiny_lm import save_tiny_gguf
    path = save_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    import gguf
    return _GGUFBlob(path.read_bytes(), gguf.GGUFReader(str(path)).data_offset)


@settings(FUZZ, max_examples=max(10, EXAMPLES // 2))
@given(how=st.sampled_from(["truncate", "flip_header", "word_header", "flip_data"]), where=st.integers(0, 2**31),
       bit=st.integers(0, 7), word=st.integers(0, 2**64 - 1))
def test_load_model_from_damaged_gguf(tiny_gguf, tmp_path_factory, how, where, bit, word):
    """Our loader (nf4lora.loading.gguf, then the gguf package and transformers under a ValueError
    wrapper) must turn every damage into a ValueError, or load a model that runs. (Every example
    draws the same four values, whatever the damage: interactive draws of a varying count made
    hypothesis report its generation as flaky past ~500 examples.)"""
    blob, data_start = bytearray(tiny_gguf.data), tiny_gguf.data_start
    if how == "truncate":
        del blob[where % len(blob):]
    elif how == "flip_header":
        blob[where % data_start] ^= 1 << bit
    elif how == "word_header":  # a count, length, type or offset replaced by an arbitrary 64-bit word
        i = where % (data_start - 7)
        blob[i:i + 8] = word.to_bytes(8, "little")
    else:
        blob[data_start + where % (len(blob) - data_start)] ^= 1 << bit
    path = tmp_path_factory.mktemp("damaged_gguf") / "model.gguf"
    path.write_bytes(bytes(blob))
    try:
        model, _ = nf4lora.load_model(path)
    except ValueError as exc:
        assert str(exc).startswith("source:"), f"a ValueError that does not name the source: {exc}"
        return
    # Accepted: a flipped bit in tensor data is another weight value (GGUF has no checksum), or one
    # in metadata that still parses to a usable model. The model runs.
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert out.shape[:2] == (1, 3)
