"""export_gguf: a merged (dense) transformers Llama-architecture model written as a GGUF file that
llama.cpp loads, with the gguf package's GGUFWriter. The metadata (architecture hyperparameters,
tokenizer, chat template) is copied from a GGUF of the same model: the source the model was loaded
from (the default SmolLM2 GGUF) or any GGUF with the same tensor names and shapes. Tensor names
come from transformers' own GGUF name map (the inverse of what load_model reads); q_proj / k_proj
rows get llama.cpp's head permutation (transformers undoes it on load). 1-D tensors stay F32 as
llama.cpp's converter keeps them. Written atomically (temp name, fsync, rename).
Tested by tests/test_gguf_export.py (llama-cpp-python's greedy tokens and logits, nl.load_model)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

GGUF_TYPES = ("f16", "bf16", "q8_0")
SUPPORTED_ARCHS = ("llama",)
# Written by GGUFWriter itself or set here for the new file, never copied from the source.
_SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute for attn_q / attn_k rows (HF's rotary layout ->
    GGUF's interleaved one); transformers' LlamaTensorProcessor reverses it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(w: np.ndarray, gguf_type: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype for GGUFWriter.add_tensor) of an fp32 array in the export type."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants
    if w.ndim < 2:
        return w.astype(np.float32), None
    if gguf_type == "q8_0" and w.shape[-1] % 32 == 0:
        return quants.quantize(w, T.Q8_0), T.Q8_0
    if gguf_type == "bf16":
        return quants.quantize(w, T.BF16), T.BF16
    return w.astype(np.float16), None  # f16, and q8_0 rows that are not a multiple of its block of 32


def _file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType
    return int({"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
                "q8_0": LlamaFileType.MOSTLY_Q8_0}[gguf_type])


def _copy_metadata(reader: Any, writer: Any) -> None:
    for key, field in reader.fields.items():
        if key.startswith(_SKIPPED_KEYS):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def export_gguf(model: nn.Module, path: Union[str, os.PathLike], metadata_gguf: Union[str, os.PathLike],
                gguf_type: str = "f16") -> Path:
    """Writes `model` (a dense transformers causal LM, e.g. nl.merge_and_unload's result) to `path`
    as GGUF in gguf_type ("f16", "bf16" or "q8_0"), with the metadata and tokenizer of the GGUF file
    `metadata_gguf` (which must describe the same architecture, tensor names and shapes: the file
    the model was loaded from, typically). Returns the path. Raises ValueError for other
    architectures, 4-bit or LoRA layers still in the model, or a metadata file of another shape."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"gguf_type must be one of {list(GGUF_TYPES)}, got {gguf_type!r}")
    try:
        import gguf
        from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, get_gguf_hf_weights_map
    except ImportError as exc:
        raise ImportError("GGUF export needs gguf and transformers: pip install 'nf4lora[hf]'") from exc
    from ..lora import LoraLinear
    from ..quant import Linear4bit
    leftover = [n for n, m in model.named_modules() if isinstance(m, (Linear4bit, LoraLinear))]
    if leftover:
        raise ValueError(f"model: {len(leftover)} layers are still 4-bit or LoRA (e.g. {leftover[0]}); "
                         "pass nl.merge_and_unload(model) (a dense model)")
    metadata_gguf = Path(metadata_gguf)
    if not metadata_gguf.is_file():
        raise ValueError(f"metadata_gguf: {metadata_gguf} is not a file")
    reader = gguf.GGUFReader(str(metadata_gguf))
    arch = str(reader.fields["general.architecture"].contents())
    config = model.config
    if arch not in SUPPORTED_ARCHS or config.model_type != arch:
        raise ValueError(f"GGUF export supports {list(SUPPORTED_ARCHS)} models with a GGUF of the same "
                         f"architecture; got a {config.model_type!r} model and a {arch!r} GGUF ({metadata_gguf})")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    state = model.state_dict()
    names = get_gguf_hf_weights_map(model, LlamaTensorProcessor(config=config.to_dict()))
    expected = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # numpy order
    tied = bool(getattr(config, "tie_word_embeddings", False))

    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    for gguf_name, hf_name in names.items():
        if hf_name not in state or (gguf_name == "output.weight" and tied):
            continue
        w = state[hf_name].detach().to(torch.float32).cpu().numpy()
        if gguf_name not in expected:
            raise ValueError(f"metadata_gguf: {metadata_gguf} has no tensor {gguf_name} (the model's {hf_name}); "
                             "give the GGUF of this model")
        if w.shape != expected[gguf_name]:
            raise ValueError(f"metadata_gguf: {gguf_name} is {list(expected[gguf_name])} in {metadata_gguf} but "
                             f"{list(w.shape)} in the model ({hf_name}); give the GGUF of this model")
        if ".attn_q." in gguf_name:
            w = _permute(w, n_head)
        elif ".attn_k." in gguf_name:
            w = _permute(w, n_kv)
        tensors[gguf_name] = _encode(np.ascontiguousarray(w), gguf_type)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"the model has no weights for {len(missing)} tensors of {metadata_gguf}, "
                         f"e.g. {missing[:3]}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_metadata(reader, writer)
        writer.add_file_type(_file_type(gguf_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for t in reader.tensors:  # the source's order
            data, raw_dtype = tensors[t.name]
            writer.add_tensor(t.name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def source_gguf(source: Union[str, os.PathLike, None], metadata: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The GGUF whose metadata an export of a model loaded from `source` copies: `metadata` when
    given, else the source itself when it is a GGUF (None: the default SmolLM2 GGUF). A transformers
    folder has no GGUF tokenizer metadata: ValueError saying what to pass."""
    if metadata is not None:
        return Path(metadata)
    if source is None:
        from .models import default_model_path
        return default_model_path()
    p = Path(source)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    raise ValueError(f"GGUF export of {p}: a transformers folder has no GGUF tokenizer metadata to copy. "
                     "Pass --gguf-metadata FILE.gguf (a GGUF of the same base model, e.g. made by llama.cpp's "
                     "convert_hf_to_gguf.py), or write the merged bf16 checkpoint (--format bf16) and convert "
                     "it with convert_hf_to_gguf.py")
