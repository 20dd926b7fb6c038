"""QuantState's bitsandbytes state-dict form: exact keys and JSON bytes, round trips through
safetensors, and loud, specific errors for every kind of malformed dict."""
import json

import pytest
import torch

import nf4lora
from nf4lora import QuantState

PREFIX = "model.layers.0.mlp.down_proj.weight."


def make_state(double_quant=True, quant_type="nf4", shape=(8, 192), dtype=torch.bfloat16):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
    return nf4lora.quantize_4bit(x, 64, quant_type, double_quant=double_quant)


def test_to_dict_has_exactly_bitsandbytes_keys_and_json():
    packed, state = make_state()
    d = state.to_dict("weight.")
    assert sorted(d) == sorted(["weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"])
    blob = bytes(d["weight.quant_state.bitsandbytes__nf4"].tolist()).decode()
    offset = state.offset.item()
    assert blob == ('{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [8, 192], '
                    f'"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": {offset!r}}}')
    assert d["weight.absmax"].dtype == torch.uint8 and d["weight.quant_map"].dtype == torch.float32
    assert d["weight.nested_quant_map"].data_ptr() != state.nested_code.data_ptr()  # not shared

    _, plain = make_state(double_quant=False, quant_type="fp4", shape=(4, 64), dtype=torch.float32)
    d = plain.to_dict("w.")
    assert sorted(d) == ["w.absmax", "w.quant_map", "w.quant_state.bitsandbytes__fp4"]
    assert bytes(d["w.quant_state.bitsandbytes__fp4"].tolist()).decode() == \
        '{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [4, 64]}'


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_round_trip_through_safetensors(tmp_path, double_quant, quant_type):
    from safetensors.torch import load_file, save_file

    packed, state = make_state(double_quant, quant_type)
    sd = {PREFIX[:-1]: packed, **state.to_dict(PREFIX)}
    save_file(sd, str(tmp_path / "w.safetensors"))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    back = QuantState.from_dict(loaded, PREFIX)
    assert back.shape == state.shape and back.dtype == state.dtype and back.nested == double_quant
    assert torch.equal(nf4lora.dequantize_4bit(loaded[PREFIX[:-1]], back),
                       nf4lora.dequantize_4bit(packed, state))


def test_from_dict_moves_to_device_and_ignores_other_keys():
    packed, state = make_state()
    d = {"other.weight": torch.zeros(3), **state.to_dict(PREFIX), **make_state()[1].to_dict("x.")}
    back = QuantState.from_dict(d, PREFIX, device="cpu")
    assert back.device.type == "cpu" and torch.equal(back.absmax, state.absmax)


def _mutated(mutate):
    _, state = make_state()
    d = state.to_dict(PREFIX)
    mutate(d)
    return d


def _set_json(d, **changes):
    key = PREFIX + "quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(d[key].tolist()))
    for k, v in changes.items():
        if v is None:
            meta.pop(k)
        else:
            meta[k] = v
    d[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


BAD_DICTS = [
    (lambda d: d.pop(PREFIX + "quant_state.bitsandbytes__nf4"), ValueError, "expected exactly one key"),
    (lambda d: d.update({PREFIX + "quant_state.bitsandbytes__fp4": d[PREFIX + "quant_state.bitsandbytes__nf4"]}),
     ValueError, "expected exactly one key"),
    (lambda d: d.pop(PREFIX + "absmax"), ValueError, "missing key .*absmax"),
    (lambda d: d.pop(PREFIX + "quant_map"), ValueError, "missing key .*quant_map"),
    (lambda d: d.pop(PREFIX + "nested_quant_map"), ValueError, "missing key .*nested_quant_map"),
    (lambda d: d.pop(PREFIX + "nested_absmax"), ValueError, "present but .*nested_absmax is missing"),
    (lambda d: d.update({PREFIX + "quant_state.bitsandbytes__nf4": torch.tensor(list(b"{not json"), dtype=torch.uint8)}),
     ValueError, "valid UTF-8 JSON"),
    (lambda d: d.update({PREFIX + "quant_state.bitsandbytes__nf4": torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)}),
     ValueError, "JSON must be an object"),
    (lambda d: d.update({PREFIX + "quant_state.bitsandbytes__nf4": torch.tensor([0xff, 0xfe], dtype=torch.uint8)}),
     ValueError, "valid UTF-8 JSON"),
    (lambda d: d.update({PREFIX + "quant_state.bitsandbytes__nf4": torch.zeros(3)}), ValueError, "1-D uint8"),
    (lambda d: _set_json(d, quant_type="fp4"), ValueError, "does not match the key"),
    (lambda d: _set_json(d, blocksize=48), ValueError, "power of two"),
    (lambda d: _set_json(d, blocksize="64"), ValueError, "'blocksize' has the wrong type"),
    (lambda d: _set_json(d, blocksize=None), ValueError, "no field 'blocksize'"),
    (lambda d: _set_json(d, dtype="float64"), ValueError, "dtype must be one of"),
    (lambda d: _set_json(d, shape=[8, -192]), ValueError, "non-negative ints"),
    (lambda d: _set_json(d, shape=[8, 1.5]), ValueError, "non-negative ints"),
    (lambda d: _set_json(d, shape=[1 << 40, 1 << 40]), ValueError, "beyond any real tensor"),
    (lambda d: _set_json(d, shape=[16, 192]), ValueError, "absmax' must have 48 elements, got 24"),
    (lambda d: _set_json(d, nested_offset=float("nan")), ValueError, "nested_offset must be finite"),
    (lambda d: _set_json(d, nested_offset="0.5"), ValueError, "'nested_offset' has the wrong type"),
    (lambda d: _set_json(d, nested_blocksize=100), ValueError, "nested_blocksize must be a power of two"),
    (lambda d: _set_json(d, nested_dtype="float16"), ValueError, "nested_dtype must be 'float32'"),
    (lambda d: d.update({PREFIX + "absmax": d[PREFIX + "absmax"].float()}), TypeError, "absmax' must have dtype torch.uint8"),
    (lambda d: d.update({PREFIX + "absmax": d[PREFIX + "absmax"][:-1]}), ValueError, "absmax' must have 24 elements"),
    (lambda d: d.update({PREFIX + "nested_absmax": torch.zeros(2)}), ValueError, "nested_absmax' must have 1 elements"),
    (lambda d: d.update({PREFIX + "nested_quant_map": torch.zeros(255)}), ValueError, "must have 256 elements"),
    (lambda d: d.update({PREFIX + "quant_map": nf4lora.codebook("fp4")}), ValueError, "not the standard nf4 codebook"),
    (lambda d: d.update({PREFIX + "quant_map": torch.zeros(16, dtype=torch.float16)}), TypeError, "quant_map' must have dtype"),
    (lambda d: d.update({PREFIX + "absmax": [1, 2, 3]}), TypeError, "must be a tensor"),
]


@pytest.mark.parametrize("mutate,exc,match", BAD_DICTS)
def test_from_dict_rejects_malformed_state(mutate, exc, match):
    d = _mutated(mutate)
    with pytest.raises(exc, match=match):
        QuantState.from_dict(d, PREFIX)


def test_from_dict_unknown_type_suffix():
    _, state = make_state()
    d = state.to_dict(PREFIX)
    d[PREFIX + "quant_state.bitsandbytes__int4"] = d.pop(PREFIX + "quant_state.bitsandbytes__nf4")
    with pytest.raises(ValueError, match="unknown quantization type 'int4'"):
        QuantState.from_dict(d, PREFIX)


def test_to_moves_every_tensor():
    _, state = make_state()
    meta = state.to("meta")
    assert all(t.device.type == "meta" for t in (meta.absmax, meta.code, meta.offset,
                                                  meta.nested_absmax, meta.nested_code))
    assert state.absmax.device.type == "cpu"  # the original is untouched
