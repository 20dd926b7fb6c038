"""PEFT over nf4lora's Linear4bit: PeftLoraLinear4bit, a PEFT LoRA layer (peft's own lora.Linear:
its adapters, dropout, scaling, save format) whose base is an nf4lora Linear4bit, registered with
PEFT's custom-module API: `register(peft.LoraConfig(...))` then `peft.get_peft_model(model, config)`.
The adapters train and save as PEFT's do (nl.load_adapter reads them); merging into the 4-bit base
is refused here (nl.load_adapter + nl.merge_and_unload gives the dense merged model).
Imported on demand (needs peft). Tested by tests/test_peft_trl.py (against nf4lora's own LoRA, and
TRL's SFTTrainer)."""
from __future__ import annotations

from typing import Any, Optional

from peft.tuners.lora.layer import Linear as _PeftLinear

import nf4lora as nl


class PeftLoraLinear4bit(_PeftLinear):
    """peft.tuners.lora.Linear over an nf4lora Linear4bit base: base_layer(x) (the fused 4-bit
    product) + scaling * lora_B(lora_A(dropout(x))). DoRA and merging are not supported."""

    def __init__(self, base_layer: Any, adapter_name: str, config: Any = None, **kwargs: Any) -> None:
        if not isinstance(base_layer, nl.Linear4bit):
            raise TypeError(f"PeftLoraLinear4bit wraps an nf4lora Linear4bit, got {type(base_layer).__name__}")
        if config is not None and getattr(config, "use_dora", False):
            raise ValueError("PeftLoraLinear4bit: use_dora=True is not supported over nf4lora's Linear4bit")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError("merging a PEFT adapter into an nf4lora 4-bit base is not supported: save the "
                                  "adapter and use nl.load_adapter + nl.merge_and_unload for a dense merged model")

    def unmerge(self) -> None:
        raise NotImplementedError("PeftLoraLinear4bit never merges, so there is nothing to unmerge")


def register(config: Any) -> Any:
    """Registers PeftLoraLinear4bit for nf4lora's Linear4bit in a peft.LoraConfig; returns it."""
    config._register_custom_module({nl.Linear4bit: PeftLoraLinear4bit})
    return config
