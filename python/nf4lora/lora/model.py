"""Model-level LoRA: get_lora_model (inject adapters in place, optionally quantizing the base as it
goes, freeze the rest), named adapters (add_adapter / set_adapter / delete_adapter /
disable_adapters), trainable_parameters, merge_adapter / unmerge_adapter and merge_and_unload.
Reference: PEFT's LoraModel / PeftModel behaviour (PEFT 0.21).
Every name check happens before the model is touched, so a bad config leaves it unchanged.
Tested by tests/test_lora.py."""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
from typing import Iterator, Optional

import torch
from torch import nn

from .loftq import loftq_init, pissa_init
from ..quant import Linear4bit
from .config import ALL_LINEAR, LoraConfig, name_matches
from .layer import LoraLinear, ModulesToSave

log = logging.getLogger(__name__)
_ADAPTERS = "_nf4lora_adapters"  # model attribute: {adapter name: LoraConfig}
_ACTIVE = "_nf4lora_active"
QUANTIZE = (None, "nf4", "fp4")


# ---- finding modules ------------------------------------------------------------------------


def _walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every submodule, not descending into LoRA / modules_to_save wrappers."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        yield full, child
        if not isinstance(child, (LoraLinear, ModulesToSave)):
            yield from _walk(child, full)


def _output_heads(model: nn.Module) -> set[str]:
    heads = {"lm_head"}
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, m in _walk(model):
        if m is head or (isinstance(m, ModulesToSave) and m.original_module is head and head is not None):
            heads.add(name)
    return heads


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, Linear4bit, LoraLinear))


def _unknown(entry: str, names: list[str], what: str) -> ValueError:
    pool = sorted(set(names) | {n.rpartition(".")[2] for n in names})
    close = difflib.get_close_matches(entry, pool, n=5, cutoff=0.5)
    hint = f"; close matches: {close}" if close else ""
    return ValueError(f"{what} entry {entry!r} matches no module of this model{hint}")


def _plan(model: nn.Module, config: LoraConfig, adapter_name: str):
    """(targets [(name, module)], modules_to_save [(name, module)]) or ValueError; touches nothing."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string without dots, got {adapter_name!r}")
    modules = list(_walk(model))
    names = [n for n, _ in modules]
    heads = _output_heads(model)
    spec = config.target_modules
    if spec == ALL_LINEAR:
        targets = [(n, m) for n, m in modules if _is_linear(m) and n not in heads]
    else:
        targets = [(n, m) for n, m in modules if name_matches(n, spec)]
        if isinstance(spec, str):
            if not targets:
                raise ValueError(f"target_modules regex {spec!r} matches no module of this model")
        else:
            for entry in spec:
                if not any(name_matches(n, [entry]) for n in names):
                    raise _unknown(entry, names, "target_modules")
        # PEFT refuses to adapt a module type it has no layer for; so do we, naming it.
        other = [(n, type(m).__name__) for n, m in targets if not _is_linear(m)]
        if other:
            raise ValueError(f"target_modules {spec!r} match {len(other)} modules that are not linear, e.g. "
                             f"{other[:3]}; LoRA supports nn.Linear and Linear4bit")
    if config.exclude_modules is not None:
        if not isinstance(config.exclude_modules, str):
            for entry in config.exclude_modules:
                if not any(name_matches(n, [entry]) for n in names):
                    raise _unknown(entry, names, "exclude_modules")
        targets = [(n, m) for n, m in targets if not name_matches(n, config.exclude_modules)]
    if not targets:
        raise ValueError("no module left to adapt after exclude_modules")
    for n, m in targets:
        if isinstance(m, LoraLinear) and adapter_name in m.lora_A:
            raise ValueError(f"{n} already has an adapter named {adapter_name!r}")
        if config.rank_for(n) > min(m.in_features, m.out_features) and config.init in ("loftq", "pissa"):
            raise ValueError(f"{n}: r={config.rank_for(n)} exceeds min(in, out) of the layer")
    saves = []
    target_names = {n for n, _ in targets}
    for entry in config.modules_to_save or []:
        found = [(n, m) for n, m in modules if name_matches(n, [entry])]
        if not found:
            raise _unknown(entry, names, "modules_to_save")
        for n, m in found:
            if n in target_names:
                raise ValueError(f"{n} is both a LoRA target and in modules_to_save")
            if any(n.startswith(s + ".") for s, _ in saves) or any(s == n for s, _ in saves):
                continue
            if isinstance(m, ModulesToSave):
                if adapter_name in m.modules_to_save:
                    raise ValueError(f"{n} already has a saved copy for adapter {adapter_name!r}")
            elif isinstance(m, (Linear4bit, LoraLinear)):
                raise ValueError(f"modules_to_save entry {entry!r} is a {type(m).__name__}; only float "
                                 "modules can be trained in full")
            saves.append((n, m))
    return targets, saves


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, m in _walk(model):
        if isinstance(m, LoraLinear):
            yield name, m


def _adapters(model: nn.Module) -> dict:
    configs = getattr(model, _ADAPTERS, None)
    if not configs:
        raise ValueError("this model has no LoRA adapters (use get_lora_model or load_adapter first)")
    return configs


def _check_quantize(quantize) -> None:
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None, 'nf4' or 'fp4', got {quantize!r}")


# ---- injection --------------------------------------------------------------------------------


@dataclasses.dataclass
class _QuantOptions:
    quant_type: Optional[str]
    compute_dtype: Optional[torch.dtype]
    blocksize: int
    double_quant: bool

    def linear4bit(self, dense: nn.Linear) -> Linear4bit:
        return Linear4bit.from_linear(dense, self.quant_type, self.blocksize, self.double_quant,
                                      self.compute_dtype)


def _check_inits(config: LoraConfig, targets, quantize) -> None:
    if config.init == "loftq" and quantize is None:
        raise ValueError("init='loftq' chooses the quantized base itself: call get_lora_model on the dense "
                         "model with quantize='nf4' (or 'fp4')")
    if config.init in ("loftq", "pissa"):
        for n, m in targets:
            if not isinstance(m, nn.Linear):
                raise ValueError(f"init={config.init!r} needs the dense weight, but {n} is a {type(m).__name__}: "
                                 "start from the unquantized model and pass quantize='nf4'")


@torch.no_grad()
def _wrap(name: str, module: nn.Module, config: LoraConfig, adapter_name: str, quant: _QuantOptions,
          adapter_dtype: Optional[torch.dtype]) -> nn.Module:
    r, alpha, s = config.rank_for(name), config.alpha_for(name), config.scaling_for(name)
    args = (adapter_name, r, alpha, config.lora_dropout, config.use_rslora, config.init, adapter_dtype,
            config.use_dora)
    if isinstance(module, LoraLinear):
        module.add_adapter(*args)
        return module
    A = B = None
    errors = None
    base = module
    if config.init == "loftq":
        res = loftq_init(module.weight, r, s, config.loftq_iter, quant.quant_type, quant.blocksize,
                         quant.double_quant)
        base = quant.linear4bit(module)
        base.set_quantized(res.packed, res.state)
        A, B, errors = res.A, res.B, (res.error_before, res.error_after)
        log.info("LoftQ %s: relative error %.4f (plain %s) -> %.4f", name, res.error_before,
                 quant.quant_type, res.error_after)
    elif config.init == "pissa":
        A, B, residual = pissa_init(module.weight, r, s)
        module.weight.data = residual.to(module.weight.dtype)
        if quant.quant_type is not None:
            base = quant.linear4bit(module)
    elif quant.quant_type is not None and isinstance(module, nn.Linear):
        base = quant.linear4bit(module)
    layer = LoraLinear(base, *args)
    layer.train(module.training)  # a model in eval mode stays there (no lora_dropout after load_adapter)
    if A is not None:
        layer.lora_A[adapter_name].weight.copy_(A)
        layer.lora_B[adapter_name].weight.copy_(B)
        if config.use_dora:
            layer.reset_magnitude(adapter_name)  # from the base and A, B as LoftQ/PiSSA left them
    if errors is not None:
        layer.loftq_errors = {adapter_name: errors}
    return layer


def _inject(model, config, adapter_name, targets, saves, quant, adapter_dtype) -> None:
    for name, module in targets:
        new = _wrap(name, module, config, adapter_name, quant, adapter_dtype)
        if new is not module:
            _set_module(model, name, new)
    for name, module in saves:
        if isinstance(module, ModulesToSave):
            module.add_adapter(adapter_name)
        else:
            _set_module(model, name, ModulesToSave(module, adapter_name))


def get_lora_model(model: nn.Module, config: LoraConfig, quantize: Optional[str] = None,
                   adapter_name: str = "default", *, compute_dtype: Optional[torch.dtype] = torch.bfloat16,
                   adapter_dtype: Optional[torch.dtype] = torch.float32, blocksize: int = 64,
                   double_quant: bool = True) -> nn.Module:
    """Injects adapter `adapter_name` into the modules `config` targets, in place, makes it the
    active and only trainable part (plus modules_to_save and the biases config.bias names), and
    returns the model.

    quantize="nf4"/"fp4" also turns every nn.Linear except the output head and modules_to_save
    into a Linear4bit (blocksize, double_quant, compute_dtype), one layer at a time; that is the
    path for init="loftq"/"pissa", which start from the dense weight. Raises ValueError before
    touching the model for unknown names (with close matches), bad r/alpha/dropout, etc."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    if getattr(model, _ADAPTERS, None):
        raise ValueError(f"the model already has LoRA adapters {sorted(getattr(model, _ADAPTERS))}; "
                         "use add_adapter(model, name, config) for another one")
    _check_quantize(quantize)
    targets, saves = _plan(model, config, adapter_name)
    _check_inits(config, targets, quantize)
    quant = _QuantOptions(quantize, compute_dtype, blocksize, double_quant)
    _inject(model, config, adapter_name, targets, saves, quant, adapter_dtype)
    if quantize is not None:
        keep = _output_heads(model)
        for name, m in list(_walk(model)):
            if isinstance(m, nn.Linear) and name not in keep:
                _set_module(model, name, quant.linear4bit(m))
    return _activate(model, config, adapter_name)


def _activate(model: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    setattr(model, _ADAPTERS, {adapter_name: config})
    set_adapter(model, adapter_name)
    return model


class LayerwiseInjection:
    """get_lora_model for a loader that fills an empty (meta-device) model one tensor at a time,
    as load_model(lora=...) does: the plan and every check run on the empty model, each target is
    wrapped by wrap() as soon as its dense weight has arrived (LoftQ and PiSSA start from it, so
    no more than one dense layer is alive at any time), and finish() makes the adapter active and
    the only trainable part. Same adapters, same quantized bases as get_lora_model(dense model,
    config, quantize) (tests/test_loading.py)."""

    def __init__(self, model: nn.Module, config: LoraConfig, quantize: Optional[str],
                 adapter_name: str = "default", *, compute_dtype: Optional[torch.dtype] = torch.bfloat16,
                 adapter_dtype: Optional[torch.dtype] = torch.float32, blocksize: int = 64,
                 double_quant: bool = True) -> None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
        _check_quantize(quantize)
        targets, self._saves = _plan(model, config, adapter_name)
        _check_inits(config, targets, quantize)
        self.targets = {n for n, _ in targets}
        self.init = config.init
        self.keep_dense = {n for n, _ in self._saves}  # modules_to_save are trained in full
        self._config, self._adapter_name, self._adapter_dtype = config, adapter_name, adapter_dtype
        self._quant = _QuantOptions(quantize, compute_dtype, blocksize, double_quant)
        self._wrapped: set[str] = set()

    def wrap(self, name: str, dense: nn.Linear) -> nn.Module:
        """The LoRA layer (over a Linear4bit when quantizing) for target `name`, from its dense layer."""
        if name not in self.targets or name in self._wrapped:
            raise ValueError(f"{name} is not a LoRA target still waiting for its weight")
        self._wrapped.add(name)
        return _wrap(name, dense, self._config, self._adapter_name, self._quant, self._adapter_dtype)

    def finish(self, model: nn.Module) -> nn.Module:
        missing = sorted(self.targets - self._wrapped)
        if missing:
            raise ValueError(f"{len(missing)} LoRA targets never received their weight, e.g. {missing[:3]}")
        _inject(model, self._config, self._adapter_name, [], self._saves, self._quant, self._adapter_dtype)
        return _activate(model, self._config, self._adapter_name)


def add_adapter(model: nn.Module, adapter_name: str, config: LoraConfig,
                adapter_dtype: Optional[torch.dtype] = torch.float32) -> nn.Module:
    """Adds another named adapter (inactive and frozen until set_adapter). The base is not changed,
    so init must be "kaiming" or "gaussian"."""
    configs = _adapters(model)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists")
    if config.init in ("loftq", "pissa"):
        raise ValueError(f"init={config.init!r} rewrites the base weight, which other adapters share: "
                         "only the first adapter (get_lora_model) may use it")
    _check_not_merged(model)
    targets, saves = _plan(model, config, adapter_name)
    trainable = _is_trainable(model)
    _inject(model, config, adapter_name, targets, saves, _QuantOptions(None, None, 64, True), adapter_dtype)
    configs[adapter_name] = config
    set_adapter(model, getattr(model, _ACTIVE), trainable=trainable)
    return model


def _check_not_merged(model: nn.Module) -> None:
    if any(layer.merged_adapters for _, layer in _lora_layers(model)):
        raise ValueError("an adapter is merged into the base: unmerge_adapter(model) first")


def _is_trainable(model: nn.Module) -> bool:
    return any(p.requires_grad for _, layer in _lora_layers(model) for p in layer.lora_A.parameters())


def set_adapter(model: nn.Module, adapter_name: str, trainable: bool = True) -> None:
    """Makes `adapter_name` the active adapter of every layer that has it (layers without it run
    their base alone) and, with trainable=True, its parameters the only trainable ones."""
    configs = _adapters(model)
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(configs)}")
    _check_not_merged(model)
    for _, m in _walk(model):
        if isinstance(m, (LoraLinear, ModulesToSave)):
            has = adapter_name in (m.lora_A if isinstance(m, LoraLinear) else m.modules_to_save)
            m.active_adapter = adapter_name if has else None
    setattr(model, _ACTIVE, adapter_name)
    _set_trainable(model, configs[adapter_name].bias, trainable)


def _set_trainable(model: nn.Module, bias: str, trainable: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    if not trainable:
        return
    for name, m in _walk(model):
        if isinstance(m, LoraLinear) and m.active_adapter is not None:
            for p in (m.lora_A[m.active_adapter].weight, m.lora_B[m.active_adapter].weight):
                p.requires_grad_(True)
            if m.active_adapter in m.lora_magnitude_vector:
                m.lora_magnitude_vector[m.active_adapter].weight.requires_grad_(True)
            if bias == "lora_only" and m.base_layer.bias is not None:
                m.base_layer.bias.requires_grad_(True)
        elif isinstance(m, ModulesToSave) and m.active_adapter is not None:
            for p in m.modules_to_save[m.active_adapter].parameters():
                p.requires_grad_(True)
    if bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".original_module." not in f".{name}" and ".lora_" not in name:
                p.requires_grad_(True)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes adapter `adapter_name` from every layer (it must not be merged). Layers left with
    no adapter are unwrapped, so deleting the last adapter gives back the plain model."""
    configs = _adapters(model)
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(configs)}")
    unwrap = []
    for name, m in _walk(model):
        if isinstance(m, LoraLinear) and adapter_name in m.lora_A:
            m.delete_adapter(adapter_name)
            if not m.lora_A:
                unwrap.append((name, m.base_layer))
        elif isinstance(m, ModulesToSave) and adapter_name in m.modules_to_save:
            m.delete_adapter(adapter_name)
            if not len(m.modules_to_save):
                unwrap.append((name, m.original_module))
    for name, base in unwrap:
        _set_module(model, name, base)
    del configs[adapter_name]
    if not configs:
        for attr in (_ADAPTERS, _ACTIVE):
            if hasattr(model, attr):
                delattr(model, attr)
    elif getattr(model, _ACTIVE, None) == adapter_name:
        set_adapter(model, next(iter(configs)))


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, _ADAPTERS, None) or {})


def active_adapter(model: nn.Module) -> Optional[str]:
    return getattr(model, _ACTIVE, None)


def adapter_config(model: nn.Module, adapter_name: Optional[str] = None) -> LoraConfig:
    configs = _adapters(model)
    name = adapter_name or getattr(model, _ACTIVE)
    if name not in configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(configs)}")
    return configs[name]


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes its base alone (bit for bit the base model, unless
    bias="all"/"lora_only" trained the biases). Merged adapters are unmerged for the block and
    merged again after it."""
    _adapters(model)
    wrappers = [m for _, m in _walk(model) if isinstance(m, (LoraLinear, ModulesToSave))]
    remerge = [(m, m.merged_adapters[0], m.is_4bit) for m in wrappers
               if isinstance(m, LoraLinear) and m.merged_adapters]
    for m, _, _ in remerge:
        m.unmerge()
    for m in wrappers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in wrappers:
            m.disabled = False
        for m, name, is_4bit in remerge:
            m.merge(name, merge_into_4bit=is_4bit)


# ---- reporting --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainableParameters:
    """Counts of parameters; a 4-bit weight counts its out * in elements, not its packed bytes."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(1, self.total)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    trainable = total = 0
    packed = {id(m.weight): m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit)}
    for p in model.parameters():
        n = packed.get(id(p), p.numel())
        total += n
        if p.requires_grad:
            trainable += n
    return TrainableParameters(trainable, total)


# ---- merging ----------------------------------------------------------------------------------


def merge_adapter(model: nn.Module, merge_into_4bit: bool = False) -> dict[str, float]:
    """Folds the active adapter into the base weights, in place (forward then computes the base
    alone). Float bases: W + s.B.A in fp32 (DoRA: c.(W + s.B.A), c = m / ||W + s.B.A||_row), rounded once; unmerge restores the saved original
    exactly. 4-bit bases need merge_into_4bit=True: W is dequantized, s.B.A added, the sum
    requantized (lossy); the original packed bytes are kept and restored by unmerge. Returns
    {module name: relative Frobenius error of the requantized merged weight} for 4-bit layers."""
    _adapters(model)
    layers = [(n, m) for n, m in _lora_layers(model) if m.active_adapter is not None]
    if any(m.merged_adapters for _, m in layers):
        raise ValueError("an adapter is already merged; unmerge_adapter(model) first")
    bad = [n for n, m in layers if m.is_4bit and not merge_into_4bit]
    if bad:
        raise ValueError(f"{len(bad)} layers (e.g. {bad[0]}) have a 4-bit base: merging requantizes them "
                         "(lossy); pass merge_into_4bit=True, or use merge_and_unload for a dense model")
    report = {}
    for name, m in layers:
        err = m.merge(m.active_adapter, merge_into_4bit=merge_into_4bit)
        if err is not None:
            report[name] = err
    if report:
        log.info("merged into 4-bit: worst added relative error %.3g", max(report.values()))
    return report


def unmerge_adapter(model: nn.Module) -> None:
    """Restores the bases saved by merge_adapter, bit for bit."""
    _adapters(model)
    for _, m in _lora_layers(model):
        m.unmerge()


@torch.no_grad()
def merge_and_unload(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Returns the model (changed in place) as plain nn.Linear layers: 4-bit bases dequantized
    (also those without an adapter), the active adapter folded in (in fp32, rounded once),
    modules_to_save replaced by their trained copy, the LoRA bookkeeping removed. By default
    each layer keeps its dtype (a 4-bit base its original one), as PEFT's merge_and_unload does;
    with `dtype` the whole model is cast to it (so it runs as one dtype)."""
    if dtype is not None and not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    _adapters(model)
    replacements = []
    for name, m in _walk(model):
        if isinstance(m, LoraLinear):
            m.unmerge()
            base = m.base_layer
            w = base.dequantize(torch.float32) if m.is_4bit else base.weight.detach().float()
            if m.active_adapter is not None:
                w = m.merged_weight(m.active_adapter, w)
            out_dtype = dtype or (base.weight_dtype if m.is_4bit else base.weight.dtype)
            replacements.append((name, _dense(w, base.bias, out_dtype)))
        elif isinstance(m, ModulesToSave):
            replacements.append((name, m.active_module))
        elif isinstance(m, Linear4bit):
            replacements.append((name, _dense(m.dequantize(torch.float32), m.bias, dtype or m.weight_dtype)))
    for name, new in replacements:
        _set_module(model, name, new)
    for attr in (_ADAPTERS, _ACTIVE):
        if hasattr(model, attr):
            delattr(model, attr)
    if dtype is not None:
        model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _dense(w: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> nn.Linear:
    # built on the meta device: no random init of a weight that is overwritten at once
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta", dtype=dtype)
    layer = layer.to_empty(device=w.device)
    layer.weight.copy_(w)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer
