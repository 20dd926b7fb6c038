"""save_adapter / load_adapter in PEFT's on-disk format: adapter_config.json (LoraConfig.to_dict)
+ adapter_model.safetensors with keys base_model.model.<module>.lora_A.weight [r, in] and
.lora_B.weight [out, r], for DoRA .lora_magnitude_vector [out] (PEFT 0.21's key: no ".weight";
adapter_config.json says "use_dora": true), and PEFT's keys for modules_to_save and trained biases.
Files are written atomically (temp name, fsync, rename); loading checks the safetensors file,
every key, shape and dtype before it touches the model. Reference: PEFT 0.21.2's save_pretrained / load_adapter.
Tested by tests/test_peft_compat.py (real PEFT both ways) and tests/test_lora.py."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..files import write_temp
from .config import ALL_LINEAR, LoraConfig
from .layer import LoraLinear, ModulesToSave
from .model import (_ACTIVE, _ADAPTERS, _QuantOptions, _adapters, _check_not_merged, _inject,
                         _is_trainable, _plan, _walk, delete_adapter, set_adapter)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAGNITUDE = "lora_magnitude_vector"  # DoRA's key suffix in PEFT's files (its module's ".weight" dropped)
_CHECKSUM_KEY = "nf4lora_sha256"  # safetensors metadata; PEFT ignores it, we verify it when present
# safetensors metadata of a LoftQ / PiSSA adapter: {"init", "loftq_iter"} of the base it was trained on
# (adapter_config.json says init_lora_weights=true, so that PEFT does not redo the init on load)
BASE_INIT_KEY = "nf4lora_base_init"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _adapter_state(model: nn.Module, name: str, bias: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for mname, m in _walk(model):
        if isinstance(m, LoraLinear) and name in m.lora_A:
            out[f"{PREFIX}{mname}.lora_A.weight"] = m.lora_A[name].weight
            out[f"{PREFIX}{mname}.lora_B.weight"] = m.lora_B[name].weight
            if name in m.lora_magnitude_vector:
                out[f"{PREFIX}{mname}.{MAGNITUDE}"] = m.lora_magnitude_vector[name].weight
            if bias == "lora_only" and m.base_layer.bias is not None:
                out[f"{PREFIX}{mname}.base_layer.bias"] = m.base_layer.bias
        elif isinstance(m, ModulesToSave) and name in m.modules_to_save:
            for key, t in m.modules_to_save[name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{mname}.{key}"] = t
    if bias == "all":
        for pname, p in model.named_parameters():
            if (pname.endswith("bias") and ".lora_" not in pname and "original_module." not in pname
                    and "modules_to_save." not in pname):
                out[PREFIX + pname] = p
    return {k: t.detach().cpu().contiguous() for k, t in out.items()}


def save_adapter(model: nn.Module, save_directory: Union[str, os.PathLike],
                 adapter_name: Optional[str] = None) -> Path:
    """Writes adapter `adapter_name` (default: the active one) to save_directory as PEFT does;
    returns the directory. A failed save leaves any adapter already there intact (both files are
    written and fsynced under temp names before either is renamed over the old one)."""
    configs = _adapters(model)
    name = adapter_name or getattr(model, _ACTIVE)
    if name not in configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(configs)}")
    config = configs[name]
    tensors = _adapter_state(model, name, config.bias)
    targets = config.target_modules
    if targets == ALL_LINEAR:  # PEFT saves the expanded list too: the file then names its modules
        targets = sorted(n for n, m in _walk(model) if isinstance(m, LoraLinear) and name in m.lora_A)
    base_name = config.base_model_name_or_path
    if base_name is None:
        base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    # init_lora_weights=True: the init only matters when the adapter is created; PEFT would re-run a
    # LoftQ/PiSSA init on load (rewriting the base), which must not happen for a trained adapter.
    meta = dataclasses.replace(config, target_modules=targets, init="kaiming",
                               base_model_name_or_path=base_name).to_dict()
    from safetensors.torch import save as st_save
    metadata = {"format": "pt", _CHECKSUM_KEY: _checksum(tensors)}
    if config.init in ("loftq", "pissa"):  # the base it needs is rebuilt from this (adapter_base.py)
        metadata[BASE_INIT_KEY] = json.dumps({"init": config.init, "loftq_iter": config.loftq_iter})
    blob = st_save(tensors, metadata=metadata)
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_weights = write_temp(directory / WEIGHTS_NAME, blob)
    try:
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        tmp_config = write_temp(directory / CONFIG_NAME, text.encode())
    except BaseException:
        os.unlink(tmp_weights)
        raise
    os.replace(tmp_weights, directory / WEIGHTS_NAME)
    os.replace(tmp_config, directory / CONFIG_NAME)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    # Temp files of earlier saves that were killed mid-write (tests/test_crash_safety.py).
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        for stale in directory.glob(f".{name}.*.tmp"):
            stale.unlink(missing_ok=True)
    return directory


def read_adapter(directory: Union[str, os.PathLike]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, tensors) of a PEFT adapter directory; ValueError for anything unreadable."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise ValueError(f"{directory} has no {CONFIG_NAME}")
    if not weights_path.is_file():
        pickle = (directory / "adapter_model.bin").exists()
        other = " (only adapter_model.bin, a pickle, which nf4lora does not load)" if pickle else ""
        raise ValueError(f"{directory} has no {WEIGHTS_NAME}{other}")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from None
    config = LoraConfig.from_dict(raw)
    from safetensors import safe_open
    try:
        tensors = {}
        with safe_open(str(weights_path), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types (SafetensorError, OSError)
        raise ValueError(f"{weights_path} is not a valid safetensors file (truncated or tampered?): {exc}") from None
    expected = metadata.get(_CHECKSUM_KEY)
    if expected is not None and expected != _checksum(tensors):
        raise ValueError(f"{weights_path}: the tensor data does not match the checksum it was saved with "
                         "(the file was modified or corrupted)")
    return config, tensors


def _expected_keys(model: nn.Module, config: LoraConfig, targets, saves) -> dict[str, tuple[tuple, object]]:
    """{key: (shape, (module, attribute) to load into or None for LoRA A/B)}."""
    expected = {}
    for name, m in targets:
        r = config.rank_for(name)
        expected[f"{PREFIX}{name}.lora_A.weight"] = ((r, m.in_features), None)
        expected[f"{PREFIX}{name}.lora_B.weight"] = ((m.out_features, r), None)
        if config.use_dora:
            expected[f"{PREFIX}{name}.{MAGNITUDE}"] = ((m.out_features,), None)
    for name, m in saves:
        module = m.original_module if isinstance(m, ModulesToSave) else m
        for key, t in module.state_dict().items():
            expected[f"{PREFIX}{name}.{key}"] = (tuple(t.shape), None)
    return expected


def _bias_target(model: nn.Module, key: str, config: LoraConfig, target_names: set[str]):
    """The bias parameter a trained-bias key names, or None if the config does not train it."""
    if config.bias == "none" or not key.endswith(".bias"):
        return None
    path = key[len(PREFIX):]
    owner = path[: -len(".bias")]
    plain = owner[: -len(".base_layer")] if owner.endswith(".base_layer") else owner
    if config.bias == "lora_only" and plain not in target_names:
        return None
    try:
        module = model.get_submodule(plain)
    except AttributeError:
        return None
    if isinstance(module, LoraLinear):
        module = module.base_layer
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


@torch.no_grad()
def load_adapter(model: nn.Module, directory: Union[str, os.PathLike], adapter_name: str = "default",
                 is_trainable: bool = False, adapter_dtype: Optional[torch.dtype] = torch.float32) -> nn.Module:
    """Loads a PEFT LoRA adapter (ours or PEFT's) into `model` and returns it.

    A plain model gets the adapter injected where its config says (and active; trainable only
    with is_trainable=True); a model that already has adapters gets it as another named adapter
    (inactive until set_adapter). Every key, shape and dtype is checked against the model first;
    on any mismatch (missing or unexpected keys, wrong shapes, a config naming modules this model
    lacks, a truncated or tampered file) ValueError is raised and the model is left unchanged."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    configs = getattr(model, _ADAPTERS, None) or {}
    if adapter_name in configs:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    _check_not_merged(model)
    config, tensors = read_adapter(directory)
    config = dataclasses.replace(config, init="kaiming")  # the weights come from the file
    targets, saves = _plan(model, config, adapter_name)
    expected = _expected_keys(model, config, targets, saves)
    target_names = {n for n, _ in targets}
    biases = {}
    problems = []
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            problems.append(f"{key!r} lacks PEFT's {PREFIX!r} prefix")
        elif key in expected:
            shape = expected[key][0]
            if tuple(t.shape) != shape:
                problems.append(f"{key!r} has shape {list(t.shape)}, this model needs {list(shape)}")
            elif not t.is_floating_point():
                problems.append(f"{key!r} has dtype {t.dtype}, expected a float dtype")
        else:
            bias = _bias_target(model, key, config, target_names)
            if bias is None:
                problems.append(f"unexpected key {key!r} (not an adapter of this model under this config)")
            elif tuple(t.shape) != tuple(bias.shape):
                problems.append(f"{key!r} has shape {list(t.shape)}, this model needs {list(bias.shape)}")
            else:
                biases[key] = bias
    missing = [k for k in expected if k not in tensors]
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
    if not config.use_dora and any(k.endswith("." + MAGNITUDE) for k in tensors):
        problems.append(f"the file has DoRA magnitudes ({MAGNITUDE}) but the config does not set use_dora")
    if problems:
        raise ValueError(f"cannot load the adapter in {directory}: " + "; ".join(problems[:8])
                         + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))

    first = not configs
    previous_active = getattr(model, _ACTIVE, None)
    trainable = is_trainable if first else _is_trainable(model)
    if first:
        setattr(model, _ADAPTERS, {})
        setattr(model, _ACTIVE, None)
    getattr(model, _ADAPTERS)[adapter_name] = config
    try:
        _inject(model, config, adapter_name, targets, saves, _QuantOptions(None, None, 64, True), adapter_dtype)
        for name, m in _walk(model):
            if isinstance(m, LoraLinear) and name in target_names:
                m.lora_A[adapter_name].weight.copy_(tensors[f"{PREFIX}{name}.lora_A.weight"])
                m.lora_B[adapter_name].weight.copy_(tensors[f"{PREFIX}{name}.lora_B.weight"])
                if config.use_dora:
                    m.lora_magnitude_vector[adapter_name].weight.copy_(tensors[f"{PREFIX}{name}.{MAGNITUDE}"])
            elif isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save:
                prefix = f"{PREFIX}{name}."
                sd = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
                m.modules_to_save[adapter_name].load_state_dict(sd, strict=True)
    except BaseException:
        delete_adapter(model, adapter_name)  # unwraps what was wrapped: the model as it was
        raise
    for key, bias in biases.items():
        bias.copy_(tensors[key])
    set_adapter(model, adapter_name if first else previous_active, trainable=trainable)
    return model
