"""LoraConfig: the LoRA hyperparameters, validated on construction, with to_dict()/from_dict()
in the fields of PEFT's adapter_config.json; and the module-name rules PEFT uses for
target_modules / exclude_modules / rank_pattern / alpha_pattern (list = full name or dotted
suffix, string = regex that must match the whole name). Reference: peft/tuners/lora/config.py,
peft/tuners/tuners_utils.py (check_target_module_exists), peft/utils/other.py (get_pattern_key).
Tested by tests/test_lora.py and tests/test_peft_compat.py."""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Any, Mapping, Optional, Sequence, Union

INITS = ("kaiming", "gaussian", "loftq", "pissa")
BIASES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"

# PEFT config fields whose non-default value means a feature we do not implement: loading such
# an adapter would give silently different outputs, so it is refused by name.
_UNSUPPORTED = {
    "lora_bias": False, "fan_in_fan_out": False, "layers_to_transform": None,
    "layers_pattern": None, "layer_replication": None, "use_qalora": False,
    "trainable_token_indices": None, "target_parameters": None, "alora_invocation_tokens": None,
    "use_bdlora": None,
}
_EMPTY = (None, [], {}, "")


@dataclasses.dataclass
class LoraConfig:
    """LoRA hyperparameters (PEFT's names; `init` is PEFT's init_lora_weights).

    r: rank; lora_alpha: scaling numerator, scaling = lora_alpha / r (/ sqrt(r) with
    use_rslora); lora_dropout in [0, 1) on the adapter's input; target_modules: a list of module
    names or dotted suffixes, a regex string that must match a whole name, or "all-linear"
    (every linear except the output head); exclude_modules: the same forms, removed from the
    targets; init: "kaiming" (A kaiming-uniform a=sqrt(5), B = 0), "gaussian" (A ~ N(0, 1/r),
    B = 0), "loftq" or "pissa" (from the dense weight, see loftq.py); loftq_iter: LoftQ's
    alternations; modules_to_save: modules trained in full beside the adapter;
    rank_pattern / alpha_pattern: {regex or name: r / alpha} overrides per module;
    bias: "none", "all" or "lora_only" (which existing biases train); use_dora: DoRA
    (weight-decomposed LoRA, PEFT's use_dora; see layer.py): a trainable magnitude per output
    row rescales the normalised direction W + scaling * B A."""

    r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    target_modules: Union[str, Sequence[str]] = ALL_LINEAR
    exclude_modules: Union[str, Sequence[str], None] = None
    use_rslora: bool = False
    init: str = "kaiming"
    modules_to_save: Optional[Sequence[str]] = None
    rank_pattern: Optional[Mapping[str, int]] = None
    alpha_pattern: Optional[Mapping[str, float]] = None
    bias: str = "none"
    loftq_iter: int = 1
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    use_dora: bool = False

    def __post_init__(self) -> None:
        _check_rank(self.r, "r")
        _check_alpha(self.lora_alpha, "lora_alpha")
        if (isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, numbers.Real)
                or not 0.0 <= float(self.lora_dropout) < 1.0):
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        self.lora_dropout = float(self.lora_dropout)
        self.target_modules = _check_names(self.target_modules, "target_modules", allow_none=False)
        self.exclude_modules = _check_names(self.exclude_modules, "exclude_modules", allow_none=True)
        if self.exclude_modules == ALL_LINEAR:
            raise ValueError("exclude_modules cannot be 'all-linear'")
        if not isinstance(self.use_rslora, bool):
            raise TypeError(f"use_rslora must be a bool, got {type(self.use_rslora).__name__}")
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"use_dora must be a bool, got {type(self.use_dora).__name__}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {list(INITS)}, got {self.init!r}")
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {list(BIASES)}, got {self.bias!r}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save) or None
        self.rank_pattern = _check_pattern(self.rank_pattern, "rank_pattern", _check_rank)
        self.alpha_pattern = _check_pattern(self.alpha_pattern, "alpha_pattern", _check_alpha)
        _check_rank(self.loftq_iter, "loftq_iter")

    # ---- per-module values ------------------------------------------------------------------

    def rank_for(self, name: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, name), self.r)

    def alpha_for(self, name: str) -> float:
        return self.alpha_pattern.get(_pattern_key(self.alpha_pattern, name), self.lora_alpha)

    def scaling_for(self, name: str) -> float:
        r = self.rank_for(name)
        alpha = self.alpha_for(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ---- PEFT's adapter_config.json -----------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """PEFT's adapter_config.json fields (peft_type "LORA"); from_dict reads them back."""
        init = True if self.init == "kaiming" else self.init
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return {
            "peft_type": "LORA", "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path, "revision": None,
            "inference_mode": True, "r": self.r, "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout, "target_modules": targets,
            "exclude_modules": (self.exclude_modules if isinstance(self.exclude_modules, (str, type(None)))
                                else list(self.exclude_modules)),
            "use_rslora": self.use_rslora, "init_lora_weights": init,
            "loftq_config": {"loftq_bits": 4, "loftq_iter": self.loftq_iter} if self.init == "loftq" else {},
            "modules_to_save": self.modules_to_save, "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern), "bias": self.bias, "use_dora": self.use_dora,
            **_UNSUPPORTED,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        """Reads a PEFT adapter_config.json dict. Unknown fields are ignored (PEFT adds fields
        every release); fields that switch on a feature nf4lora lacks (lora_bias,
        layers_to_transform, ...) raise ValueError naming them."""
        if not isinstance(d, Mapping):
            raise TypeError(f"expected a dict (adapter_config.json), got {type(d).__name__}")
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"peft_type is {peft_type!r}; only 'LORA' adapters are supported")
        for key, default in _UNSUPPORTED.items():
            value = d.get(key, default)
            if value != default and value not in _EMPTY:
                raise ValueError(f"the adapter config sets {key}={value!r}, which nf4lora does not support")
        if d.get("target_modules") is None:
            raise ValueError("the adapter config has no target_modules (PEFT's per-architecture defaults "
                             "are not supported: list the modules)")
        init = d.get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith("pissa_niter_"):
            init = "pissa"
        if init is True:
            init = "kaiming"
        elif init not in ("gaussian", "loftq", "pissa"):
            raise ValueError(f"init_lora_weights={init!r} is not supported (True, 'gaussian', 'loftq', 'pissa')")
        loftq = d.get("loftq_config") or {}
        if loftq.get("loftq_bits", 4) != 4:
            raise ValueError(f"loftq_config.loftq_bits={loftq['loftq_bits']}: only 4-bit LoftQ is supported")
        return cls(r=d.get("r", 8), lora_alpha=d.get("lora_alpha", 8), lora_dropout=d.get("lora_dropout", 0.0),
                   target_modules=d["target_modules"], exclude_modules=d.get("exclude_modules"),
                   use_rslora=d.get("use_rslora", False), init=init,
                   modules_to_save=d.get("modules_to_save"), rank_pattern=d.get("rank_pattern"),
                   alpha_pattern=d.get("alpha_pattern"), bias=d.get("bias", "none"),
                   loftq_iter=loftq.get("loftq_iter", 1), task_type=d.get("task_type"),
                   base_model_name_or_path=d.get("base_model_name_or_path"),
                   use_dora=False if d.get("use_dora") is None else d["use_dora"])


# ---- name rules -----------------------------------------------------------------------------


def name_matches(name: str, spec: Union[str, Sequence[str], None]) -> bool:
    """PEFT's rule: a string is a regex over the whole name; a list entry matches the full name
    or a dotted suffix of it."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def _pattern_key(patterns: Mapping[str, Any], name: str) -> Optional[str]:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _check_rank(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _check_alpha(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value}")


def _check_names(spec: Any, what: str, allow_none: bool):
    if spec is None:
        if allow_none:
            return None
        raise ValueError(f"{what} must be given (a list of names, a regex or 'all-linear')")
    if isinstance(spec, str):
        if not spec:
            raise ValueError(f"{what} must not be empty")
        if spec != ALL_LINEAR:
            try:
                re.compile(spec)
            except re.error as exc:
                raise ValueError(f"{what}={spec!r} is not a valid regex: {exc}") from None
        return spec
    if isinstance(spec, (set, frozenset)):
        spec = sorted(spec)
    if not isinstance(spec, (list, tuple)) or not all(isinstance(s, str) and s for s in spec):
        raise TypeError(f"{what} must be a list of non-empty module names or a regex string, got {spec!r}")
    if not spec and not allow_none:
        raise ValueError(f"{what} must not be empty")
    return list(spec) if spec else None


def _check_pattern(pattern: Any, what: str, check) -> dict:
    if pattern is None:
        return {}
    if not isinstance(pattern, Mapping):
        raise TypeError(f"{what} must be a dict {{name or regex: value}}, got {type(pattern).__name__}")
    for key, value in pattern.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{what} keys must be non-empty strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as exc:
            raise ValueError(f"{what} key {key!r} is not a valid regex: {exc}") from None
        check(value, f"{what}[{key!r}]")
    return dict(pattern)
