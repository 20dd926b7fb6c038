"""load_model_for_adapter: the base model an adapter was trained on, with the adapter loaded. For
LoftQ / PiSSA adapters that base is not the plain quantized checkpoint (LoftQ picks its own 4-bit
codes, PiSSA quantizes the residual W - s.B.A), so it is rebuilt from the dense source layer by
layer as the fine-tune built it (load_model(..., lora=config), same seed), then the trained A, B
replace the initial ones. Tested by tests/test_adapter_base.py (and the CLI tests)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..lora import delete_adapter, load_adapter, read_adapter
from ..lora.io import BASE_INIT_KEY, WEIGHTS_NAME
from .models import load_model

REBUILT_INITS = ("loftq", "pissa")
# svd_lowrank (layers over 2048 rows/columns) draws random vectors: the fine-tune and every rebuild
# make the base under this seed, so they get the same codes.
BASE_SEED = 0


def adapter_base_init(adapter_dir: Union[str, os.PathLike]) -> Optional[dict[str, Any]]:
    """{"init": "loftq" | "pissa", "loftq_iter": n} for an adapter nf4lora saved over a LoftQ / PiSSA
    base (recorded in its safetensors metadata), else None."""
    from safetensors import safe_open
    path = Path(adapter_dir) / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(BASE_INIT_KEY)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        init, iters = value["init"], value["loftq_iter"]
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{path}: metadata {BASE_INIT_KEY!r} is not valid: {raw[:80]!r}") from None
    if init not in REBUILT_INITS or isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{path}: metadata {BASE_INIT_KEY!r} is not valid: {raw[:80]!r}")
    return {"init": init, "loftq_iter": iters}


def load_base_for_init(source: Union[str, os.PathLike, None], config: Any, quantize: Optional[str] = "nf4",
                       **load_kw: Any) -> tuple[nn.Module, Any]:
    """load_model(source, quantize, lora=config) under BASE_SEED (the RNG state is restored after):
    the model with the initial LoftQ / PiSSA adapter named "default" over its matching base."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASE_SEED)
        return load_model(source, quantize=quantize, lora=config, **load_kw)


def load_model_for_adapter(source: Union[str, os.PathLike, None], adapter_dir: Union[str, os.PathLike],
                           quantize: Optional[str] = "nf4", double_quant: bool = True,
                           compute_dtype: torch.dtype = torch.bfloat16, *, blocksize: int = 64,
                           skip_modules: tuple[str, ...] = ("lm_head",),
                           device: Union[str, torch.device, None] = None) -> tuple[nn.Module, Any]:
    """(model with the adapter of `adapter_dir` loaded and active, tokenizer). A LoftQ / PiSSA
    adapter (saved by nf4lora: see adapter_base_init) gets the base rebuilt from the dense `source`
    as its fine-tune made it; any other adapter goes on load_model(source). The other arguments
    are load_model's."""
    load_kw = dict(double_quant=double_quant, compute_dtype=compute_dtype, blocksize=blocksize,
                   skip_modules=skip_modules, device=device)
    config, _ = read_adapter(adapter_dir)  # checks the files; its init is "kaiming" as saved
    base_init = adapter_base_init(adapter_dir)
    if base_init is not None:
        config = dataclasses.replace(config, init=base_init["init"], loftq_iter=base_init["loftq_iter"])
    if config.init in REBUILT_INITS:
        if quantize is None and config.init == "loftq":
            raise ValueError("a LoftQ adapter was trained on a 4-bit base: load it with quantize='nf4' or 'fp4'")
        model, tok = load_base_for_init(source, config, quantize, **load_kw)
        delete_adapter(model, "default")   # keeps the rebuilt base, drops the initial A, B
    else:
        model, tok = load_model(source, quantize=quantize, **load_kw)
    return load_adapter(model, adapter_dir), tok
