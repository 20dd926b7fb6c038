"""nf4lora plan: the expected peak memory per device of a QLoRA fine-tune (NF4 + double
quantization base, LoRA r on every linear of the decoder, AdamW), from the model's shape alone.
Pure Python (no torch). Validated against measured peaks by bench/bench_plan.py and
tests/test_plan.py.

Notation: L layers, h hidden, i intermediate, kvd = kv_heads * head_dim, nh heads, V vocabulary,
N devices, T = batch * seq tokens per device per micro-batch, P4 = weights of the 4-bit linears
= L (2 h^2 + 2 h kvd + 3 h i), A = LoRA parameters = L r (4h + 2kvd ... summed in + out over the 7
linears) = L r (2h + 2(h + kvd) + 2h + 3(h + i)), A_l = A / L. With --fsdp, "/N" applies (FSDP
shards dim 0 of every parameter), else N only splits the batch (DDP: everything replicated).

  base (4-bit)      P4/2 codes + P4/64 absmax (8-bit)  [/N]  + P4/16384 * 4 nested absmax
                    + 7 L * 1092 code tables and offset (replicated)
  dense             2 (V h (embeddings) + V h (head unless tied) + (2L + 1) h (norms))  [/N]  (bf16)
  gathered (fsdp)   2 layers' 4-bit codes + absmax and adapters, whole (FSDP2 prefetches the next
                    layer while one computes), + the whole dense root (embeddings, head, final norm:
                    the root's parameters stay gathered for the step)
  adapters          4 A params + 4 A grads  [/N]  (fp32)
  optimizer         AdamW 32-bit: 8 A;  8-bit: 2 A + 4 A / 256 (absmax per 256)  [/N]
                    (paged state may be evicted to host memory under pressure; counted resident)
  activations       without checkpointing: L (T a + 2 A_l) with, per token and layer,
                    a = 16 h + 8 i + 4 kvd + 4 nh + 14 r + 8 bytes (bf16 autocast; measured with
                    torch's saved-tensor hooks on the nf4lora trainer, sdpa attention: no seq^2
                    term), 2 A_l = the bf16 copies of the layer's adapters saved for backward;
                    with checkpointing: L T 2h (each layer's input) + T a + 2 A_l (one layer
                    recomputed at a time)
  loss head         14 T V: bf16 logits (2V) + their fp32 copy (4V) + fp32 log-softmax (4V, saved) in
                    forward, then the saved 4V + fp32 gradients of the log-softmax and of the logits
                    (4V + 4V) in backward (transformers' loss). The trainer's own head under bf16
                    autocast (train/head_loss.py, chunked over the vocabulary) keeps one bf16 [T, V]
                    buffer instead, so for nf4lora finetune this row is an upper bound (not yet
                    modelled precisely)
  workspace         T (4 h + 4 i): an allowance for backward's transient gradient buffers of one
                    layer (an estimate; small next to the rest in every measured configuration)

Not modelled: the trainer's fp32-GEMM route on CPUs without AMX (nf4lora.matmul.cpu_gemm_in_fp32:
fp32 attention and LoRA products keep fp32 copies for backward, the fused head needs ~3.3 T V;
measured 666 MiB against 431 planned for the first configuration of bench/bench_plan.py).

peak = sum of the rows. It fits when peak <= device memory (minus nothing: leave your own margin
for the CUDA context, ~0.5 GB, and allocator fragmentation)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

GiB = 1024 ** 3

# hidden, intermediate, layers, heads, kv_heads, vocab, tied embeddings (public configs)
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama-2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "llama-65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=64, vocab_size=32000, tie_word_embeddings=False),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}
OPTIMS = ("paged_adamw_8bit", "paged_adamw_32bit", "adamw", "paged_adamw")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: Optional[int] = None

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "ModelShape":
        try:
            h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(hidden=h, intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]),
                       heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                       vocab=int(cfg["vocab_size"]), tied=bool(cfg.get("tie_word_embeddings", False)),
                       head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None)
        except KeyError as exc:
            raise ValueError(f"model config: missing {exc.args[0]!r} (a Llama-style config.json is needed)") from None

    @property
    def kvd(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def qd(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of the 7 linears of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return [(h, self.qd), (h, self.kvd), (h, self.kvd), (self.qd, h), (h, i), (h, i), (i, h)]


def resolve_model(model: str) -> ModelShape:
    """A preset name, a config.json path, or a folder holding one."""
    key = model.lower()
    if key in PRESETS:
        return ModelShape.from_config(PRESETS[key])
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ValueError(f"model: {model!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / folder")
    with open(path) as f:
        return ModelShape.from_config(json.load(f))


def parse_size(text: str) -> int:
    """'24GiB', '80GB', '24G', '1.5 TiB', or bytes."""
    t = text.strip().replace(" ", "")
    units = {"TIB": 1024 ** 4, "GIB": GiB, "MIB": 1024 ** 2, "TB": 10 ** 12, "GB": 10 ** 9, "MB": 10 ** 6,
             "T": 1024 ** 4, "G": GiB, "M": 1024 ** 2, "B": 1}
    for unit, mult in units.items():
        if t.upper().endswith(unit):
            try:
                return int(float(t[:-len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"device memory: cannot read {text!r} (e.g. 24GiB, 80GB)") from None


def plan(shape: ModelShape, devices: int = 1, seq: int = 2048, batch: int = 1, fsdp: bool = False,
         gradient_checkpointing: bool = False, optim: str = "paged_adamw_8bit", lora_r: int = 16,
         device_memory: Optional[int] = None) -> dict[str, Any]:
    """Peak bytes per device by component (the module docstring's formulas); batch is sequences per
    device per micro-batch."""
    for name, v in (("devices", devices), ("seq", seq), ("batch", batch), ("lora_r", lora_r)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if optim not in OPTIMS:
        raise ValueError(f"optim must be one of {', '.join(OPTIMS)}, got {optim!r}")
    s, L, h, i, V, r = shape, shape.layers, shape.hidden, shape.intermediate, shape.vocab, lora_r
    n = devices if fsdp else 1
    lin = s.linears()
    p4_layer = sum(a * b for a, b in lin)
    p4 = L * p4_layer
    a_layer = r * sum(a + b for a, b in lin)
    adapters = L * a_layer
    layer_4bit = p4_layer / 2 + p4_layer / 64
    tokens = batch * seq

    base = p4 / 2 / n + p4 / 64 / n + p4 / 16384 * 4 + 7 * L * 1092
    dense_full = 2 * (V * h * (1 if s.tied else 2) + (2 * L + 1) * h)
    dense = dense_full / n
    gathered = (2 * (layer_4bit + 4 * a_layer) + dense_full) if fsdp and devices > 1 else 0.0
    adapter_bytes = 8 * adapters / n
    per_param = 8.0 if optim in ("adamw", "paged_adamw", "paged_adamw_32bit") else 2 + 4 / 256
    optimizer = per_param * adapters / n
    per_token = 16 * h + 8 * i + 4 * s.kvd + 4 * s.heads + 14 * r + 8
    if gradient_checkpointing:
        activations = L * tokens * 2 * h + tokens * per_token + 2 * a_layer
    else:
        activations = L * (tokens * per_token + 2 * a_layer)
    loss_head = tokens * V * 14
    workspace = tokens * (4 * h + 4 * i)
    parts = {"base_4bit": base, "dense": dense, "gathered": gathered, "adapters": adapter_bytes,
             "optimizer": optimizer, "activations": activations, "loss_head": loss_head, "workspace": workspace}
    parts = {k: int(math.ceil(v)) for k, v in parts.items()}
    total = sum(parts.values())
    return {"model": dataclasses.asdict(shape), "devices": devices, "seq": seq, "batch": batch, "fsdp": fsdp,
            "gradient_checkpointing": gradient_checkpointing, "optim": optim, "lora_r": r,
            "params_4bit": p4, "lora_params": adapters, "parts": parts, "peak_bytes": total,
            "device_memory": device_memory, "fits": None if device_memory is None else total <= device_memory}


_LABELS = {"base_4bit": "4-bit base (shard)", "dense": "dense (embeddings, head, norms)",
           "gathered": "all-gathered layers + root", "adapters": "LoRA adapters + grads (fp32)",
           "optimizer": "optimizer state", "activations": "activations", "loss_head": "loss head (logits)",
           "workspace": "backward workspace"}


def format_plan(p: dict[str, Any]) -> str:
    m = p["model"]
    lines = [f"model: {m['layers']} layers, hidden {m['hidden']}, intermediate {m['intermediate']}, "
             f"vocab {m['vocab']}; {p['params_4bit'] / 1e9:.2f}B 4-bit weights, "
             f"{p['lora_params'] / 1e6:.1f}M LoRA params (r {p['lora_r']})",
             f"{p['devices']} device(s), {'FSDP' if p['fsdp'] else 'replicated (DDP)'}, seq {p['seq']}, "
             f"batch {p['batch']} per device, {p['optim']}, gradient checkpointing "
             f"{'on' if p['gradient_checkpointing'] else 'off'}", "peak memory per device:"]
    for k, v in p["parts"].items():
        if v:
            lines.append(f"  {_LABELS[k]:34} {v / GiB:9.2f} GiB")
    lines.append(f"  {'total':34} {p['peak_bytes'] / GiB:9.2f} GiB")
    if p["device_memory"] is not None:
        verdict = "fits" if p["fits"] else "does NOT fit"
        lines.append(f"{verdict} in {p['device_memory'] / GiB:.2f} GiB per device")
    return "\n".join(lines)
