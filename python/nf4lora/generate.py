"""Greedy and sampled decoding for `nf4lora generate`: a plain loop of the model's own forward with
its KV cache, one token per step, instead of transformers' generate(), whose per-step machinery
(logits processors, stopping criteria, input preparation, cache bookkeeping) costs as much as the
135M model's forward on a CPU. For a transformers Llama (the default SmolLM2 model) the steps after
the prompt run through _LlamaStep: the same operations over the model's own submodules with a
preallocated KV cache, without transformers' per-layer machinery; with plain 4-bit projections,
through _NativeLlamaStep, whose layers' 4-bit part is native (ops/decode.py) with the same
roundings. The forward calls, their inputs
and the token choice are generate()'s, so the tokens are the same: tests/test_generate.py compares
the logits of every step with generate(output_logits=True), bit for bit; bench/bench_generate.py
measures the speed."""
from __future__ import annotations

import inspect
import platform
import sys
import weakref
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# Set to False to decode every architecture through the model's own forward (bench A/B, tests).
LLAMA_DECODE_STEP = True
# Set to False to run _LlamaStep's Python layers even where the native step applies (A/B).
NATIVE_DECODE_STEP = True


class _LlamaStep:
    """One decode step of a transformers Llama (LlamaForCausalLM, sdpa attention, default RoPE),
    run directly over the model's own submodules: the same operations in the same order as
    LlamaModel.forward + sdpa_attention_forward for one new token with no padding mask, without
    transformers' per-call machinery (kwargs decorators, mask creation, DynamicCache bookkeeping,
    output classes). Keys and values live in a preallocated cache (static: no torch.cat per step),
    filled from the prompt's DynamicCache. The projections are whatever modules the model holds
    (Linear4bit, LoRA layers, nn.Linear), called as the model would. tests/test_generate.py checks
    its logits against the model's forward, bit for bit."""

    def __init__(self, model: nn.Module, cache: Any, prompt_len: int, max_len: int) -> None:
        inner = model.model
        self.model, self.inner, self.layers = model, inner, list(inner.layers[: model.config.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.head_dim = attn.head_dim
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        for i in range(len(self.layers)):
            k, v = cache.layers[i].keys, cache.layers[i].values
            if k.shape[0] != 1 or k.shape[2] != prompt_len:
                raise ValueError("unexpected KV cache layout")
            kk = k.new_empty(1, k.shape[1], max_len, k.shape[3])
            vv = v.new_empty(1, v.shape[1], max_len, v.shape[3])
            kk[:, :, :prompt_len] = k
            vv[:, :, :prompt_len] = v
            self.keys.append(kk)
            self.values.append(vv)

    @staticmethod
    def supports(model: nn.Module, cache: Any) -> bool:
        """Only the plain transformers Llama, where this step is the model's own computation."""
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        if (not LLAMA_DECODE_STEP or type(model).__name__ != "LlamaForCausalLM" or inner is None
                or type(inner).__name__ != "LlamaModel" or config is None):
            return False
        if getattr(config, "_attn_implementation", None) != "sdpa":
            return False
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default" or getattr(inner.rotary_emb, "rope_type", "default") != "default":
            return False
        layers = getattr(inner, "layers", [])
        if (not layers or any(type(layer).__name__ != "LlamaDecoderLayer" for layer in layers)
                or type(model).forward.__module__ != type(inner).forward.__module__):
            return False
        cache_layers = getattr(cache, "layers", None)
        return (cache_layers is not None and len(cache_layers) >= config.num_hidden_layers
                and all(isinstance(getattr(c, "keys", None), Tensor) for c in cache_layers[: config.num_hidden_layers]))

    def __call__(self, token: int, pos: int) -> Tensor:
        """The logits [1, 1, vocab] for `token` at position `pos` (the cache holds 0..pos-1)."""
        device = self.keys[0].device
        h = self.inner.embed_tokens(torch.tensor([[token]], device=device))
        cos, sin = self.inner.rotary_emb(h, position_ids=torch.tensor([[pos]], device=device))
        hd, end = self.head_dim, pos + 1
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            residual = h
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, 1, -1, hd).transpose(1, 2)
            k = attn.k_proj(x).view(1, 1, -1, hd).transpose(1, 2)
            v = attn.v_proj(x).view(1, 1, -1, hd).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            kc, vc = self.keys[i], self.values[i]
            kc[:, :, pos:end] = k
            vc[:, :, pos:end] = v
            o = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=None, dropout_p=0.0,
                                               scale=attn.scaling, is_causal=False,
                                               enable_gqa=attn.num_key_value_groups > 1)
            o = o.transpose(1, 2).contiguous().reshape(1, 1, -1).contiguous()
            h = residual + attn.o_proj(o)
            residual = h
            h = residual + layer.mlp(layer.post_attention_layernorm(h))
        h = self.inner.norm(h)
        return self.model.lm_head(h[:, -1:, :])


# Heads whose torch.mv was checked against their own call: {module: ((address, version, threads), equal)}.
_MV_HEAD_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


class _NativeLlamaStep(_LlamaStep):
    """_LlamaStep with the 4-bit part of the layers native (nf4lora/decode.h,
    cpp/src/decode_llama.cpp): between two attentions one native call (without adapters) finishes
    a layer (output projection, residual, norm, MLP, residual) and starts the next (norm, q/k/v,
    rotary embedding, cache write), its products split over one team of threads, with the same
    operations and bf16 roundings as the Python step. The attention is torch's scaled_dot_product_attention over the
    same cache, as in the Python step; the embedding, final norm and head are the model's modules.
    The embedding is a row copy of its weight (nn.Embedding's lookup), the final norm the model's
    module, the head torch.mv where that was checked bit-equal to the module's call (_mv_head).
    So the logits equal the Python step's bit for bit (tests/test_generate.py). Applies on x86
    when the model computes in bf16 on the CPU with LlamaRMSNorm norms, a SiLU MLP, and every
    projection a Linear4bit without bias, bare or under a plain LoRA adapter (LoraLinear, not
    DoRA): with adapters that work runs in shorter segments (ops.decode.LlamaDecoder.segments)
    and each adapter's term is added between them with the torch operations LoraMatmul4bit uses
    for one row (x A^T in fp32, scaled, times B^T in fp32, added into the bf16 output). Otherwise (a
    dense projection, a bias, DoRA, ...) the Python step runs."""

    _PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # ops.decode.PROJECTIONS' modules

    def __init__(self, model: nn.Module, cache: Any, prompt_len: int, max_len: int) -> None:
        super().__init__(model, cache, prompt_len, max_len)
        from .ops.decode import LlamaDecoder

        config, attn = model.config, self.layers[0].self_attn
        # The rotary table of every position, computed once by the model's own rotary embedding
        # (elementwise in position, so each row equals the per-token call's values).
        h0 = self.inner.embed_tokens.weight[:1]
        positions = torch.arange(max_len, device=h0.device)[None]
        cos, sin = self.inner.rotary_emb(h0[None], position_ids=positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()
        self.native = LlamaDecoder(hidden=config.hidden_size, heads=config.num_attention_heads,
                                   kv_heads=config.num_key_value_heads, head_dim=self.head_dim,
                                   intermediate=config.intermediate_size, max_len=max_len,
                                   norm_eps=float(self.layers[0].input_layernorm.variance_epsilon),
                                   layers=self.native_layers())
        self.scaling, self.gqa = attn.scaling, attn.num_key_value_groups > 1
        self.q = self.native.q.view(1, config.num_attention_heads, 1, self.head_dim)  # the rotated query
        self.h = torch.empty(1, 1, config.hidden_size, dtype=torch.bfloat16)  # the residual stream
        self.head_weight = self._mv_head(model.lm_head)
        self.plan = self._plan()

    def native_layers(self) -> list[dict]:
        """Per layer its norm weights, KV caches and seven 4-bit weights, as ops.decode.LlamaDecoder
        takes them."""
        from .ops.decode import PROJECTIONS
        layers = []
        for i, layer in enumerate(self.layers):
            entry = {"input_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight,
                     "k_cache": self.keys[i], "v_cache": self.values[i]}
            for key, name in zip(PROJECTIONS, self._PROJECTIONS):
                entry[key] = _base_4bit(layer.get_submodule(name)).weight4bit()
            layers.append(entry)
        return layers

    @staticmethod
    def _mv_head(head: nn.Module) -> Optional[Tensor]:
        """The head's weight W when torch.mv(W, x) equals head(x) bit for bit on this machine, else
        None. For a bf16 [vocab, hidden] head, mv takes torch's GEMV path (here 1.7 ms against the
        matmul path's 3.7 ms for SmolLM2's 49,152 x 576 head, weights out of cache), and both
        sum each dot product in fp32 in the same order; since that is torch's choice, not ours,
        it is checked once per head and weight version on random inputs over a range of scales,
        and the module's own call is kept wherever they differ."""
        if type(head) is not nn.Linear or head.bias is not None:
            return None
        w = head.weight
        if w.dtype != torch.bfloat16 or w.device.type != "cpu" or not w.is_contiguous():
            return None
        key = (w.data_ptr(), w._version, torch.get_num_threads())
        seen = _MV_HEAD_CHECKED.get(head)
        if seen is None or seen[0] != key:
            g = torch.Generator().manual_seed(0)
            equal = True
            for scale in (0.05, 1.0, 20.0):
                x = (torch.randn(1, 1, w.shape[1], generator=g) * scale).to(torch.bfloat16)
                equal = equal and torch.equal(torch.mv(w, x.view(-1)), head(x).view(-1))
            seen = (key, equal)
            _MV_HEAD_CHECKED[head] = seen
        return w if seen[1] else None

    @classmethod
    def supports_native(cls, model: nn.Module) -> bool:
        """An x86 CPU whose calibration runs one row in the fused kernels; a bf16 CPU model with a
        plain nn.Embedding, a SiLU MLP, LlamaRMSNorm norms and bias-free bf16-compute Linear4bit
        projections everywhere, bare or under a plain LoRA adapter (_lora_terms)."""
        from .ops.dispatch import DISPATCH
        from .quant import Linear4bit

        if not NATIVE_DECODE_STEP or platform.machine().lower() not in ("x86_64", "amd64"):
            return False  # (elsewhere torch's sum order, which the native RMSNorm follows, may differ)
        if DISPATCH.cpu_rows() < 1:
            return False  # one row would not take the fused kernels the native layers run
        config, inner = model.config, model.model
        if getattr(config, "hidden_act", None) != "silu" or getattr(config, "mlp_bias", False):
            return False
        emb = inner.embed_tokens
        if (not isinstance(emb, nn.Embedding) or emb.max_norm is not None or emb.weight.dtype != torch.bfloat16
                or emb.weight.device.type != "cpu"):
            return False
        for layer in inner.layers[: config.num_hidden_layers]:
            if type(layer.mlp).__name__ != "LlamaMLP":
                return False
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                if type(norm).__name__ != "LlamaRMSNorm" or norm.weight.dtype != torch.bfloat16:
                    return False
            for name in cls._PROJECTIONS:
                module = layer.get_submodule(name)
                m = _base_4bit(module)
                if (type(m) is not Linear4bit or m.bias is not None or m.weight.device.type != "cpu"
                        or (m.compute_dtype or torch.bfloat16) != torch.bfloat16):
                    return False
                if m is not module and _lora_terms(module) is None:
                    return False
        return True

    def __call__(self, token: int, pos: int) -> Tensor:
        h, dec = self.h, self.native
        h.view(-1).copy_(self.inner.embed_tokens.weight[token])  # the embedding's lookup, without its call
        cos, sin = self.cos[pos], self.sin[pos]
        for i, runs in enumerate(self.plan, start=-1):
            att = None
            if i >= 0:  # [1, heads, 1, head_dim]: head-major, as the Python step's transpose + reshape
                kc, vc = self.keys[i].narrow(2, 0, pos + 1), self.values[i].narrow(2, 0, pos + 1)
                att = F.scaled_dot_product_attention(self.q, kc, vc, attn_mask=None, dropout_p=0.0,
                                                     scale=self.scaling, is_causal=False,
                                                     enable_gqa=self.gqa).contiguous()
            for first, last, terms in runs:
                dec.segments(i, first, last, att, h, cos, sin, pos)
                widened = {}  # each input in fp32 once (q, k and v share x, as gate and up do)
                for src, out, a32, b32, scaling in terms:
                    xf = widened.get(src)
                    if xf is None:
                        xf = widened[src] = (att.view(1, -1) if src == "att" else getattr(dec, src)).float()
                    out.add_(torch.mm(torch.mm(xf, a32.t()).mul_(scaling), b32.t()))
        h = self.inner.norm(h)
        if self.head_weight is not None:
            return torch.mv(self.head_weight, h.view(-1)).view(1, 1, -1)
        return self.model.lm_head(h)

    # Where each adapter's term enters: after the segment that computes its projection's output.
    _LORA_AFTER = {"o_proj": ("o",), "gate_up": ("gate", "up"), "down": ("down",), "qkv": ("q", "k", "v")}

    def _plan(self) -> list:
        """Per advance from layer i = -1 .. n - 1 (after layer i's attention): [(first segment,
        last segment, [(input, output, A, B, scaling)])], the native runs and the adapter terms
        added after each; without adapters one run of all its segments. Inputs: "x", "m" or "att"
        (the attention output); outputs: the decoder's buffers."""
        from .ops.decode import PROJECTIONS, SEGMENTS
        dec, n = self.native, len(self.layers)
        # Per layer {projection key: (A fp32, B fp32, scaling)} of its LoRA adapter, if any.
        lora = [{key: t for key, name in zip(PROJECTIONS, self._PROJECTIONS)
                 if (t := _lora_terms(layer.get_submodule(name))) is not None} for layer in self.layers]
        source = {"q": "x", "k": "x", "v": "x", "o": "att", "gate": "x", "up": "x", "down": "m"}
        output = {"q": dec.q, "k": dec.k, "v": dec.v, "o": dec.o, "gate": dec.g, "up": dec.u, "down": dec.o}
        plan = []
        for i in range(-1, n):
            segments = (SEGMENTS[:4] if i >= 0 else ()) + (SEGMENTS[4:] if i + 1 < n else ())
            runs, first = [], 0
            for j, seg in enumerate(segments):
                adapters = lora[i + 1 if seg == "qkv" else i] if seg in self._LORA_AFTER else {}
                terms = [(source[key], output[key], *adapters[key]) for key in self._LORA_AFTER.get(seg, ())
                         if key in adapters]
                if terms or j + 1 == len(segments):
                    runs.append((segments[first], seg, terms))
                    first = j + 1
            plan.append(runs)
        return plan


def _base_4bit(module: nn.Module) -> nn.Module:
    """The Linear4bit under a LoRA wrapper, else the module itself."""
    from .lora.layer import LoraLinear
    return module.base_layer if isinstance(module, LoraLinear) else module


def _lora_terms(module: nn.Module) -> Optional[tuple[Tensor, Tensor, float]]:
    """(A, B in fp32, scaling) of the active adapter of a LoraLinear over a Linear4bit whose
    forward at one bf16 row is LoraMatmul4bit's fp32-adapter route (plain LoRA: not disabled,
    merged or DoRA; dropout is off in eval mode); None for anything else."""
    from .lora.layer import LoraLinear
    if not isinstance(module, LoraLinear) or not module.is_4bit or module.disabled or module.merged_adapters:
        return None
    name = module.active_adapter
    if name is None or name not in module.lora_A or name in module.lora_magnitude_vector:
        return None
    a, b = module.lora_A[name].weight.detach(), module.lora_B[name].weight.detach()
    if a.device.type != "cpu" or b.device.type != "cpu":
        return None
    return a.float(), b.float(), float(module.scaling[name])


class _Logits:
    def __init__(self, logits: Tensor) -> None:
        self.logits = logits


def _cache_names(model: nn.Module) -> tuple[str, str]:
    """(forward keyword, output attribute) of the KV cache: transformers 5 renamed past_key_values
    to cache (the old name still works there, with a deprecation warning)."""
    params = inspect.signature(model.forward).parameters
    return ("cache", "cache") if "cache" in params else ("past_key_values", "past_key_values")


def generate_tokens(model: nn.Module, input_ids: Iterable[int], max_new_tokens: int, *,
                    eos_token_id: Any = None, temperature: float = 0.0,
                    generator: Optional[torch.Generator] = None,
                    on_token: Optional[Callable[[int], None]] = None,
                    on_logits: Optional[Callable[[Tensor], None]] = None) -> list[int]:
    """The new token ids (at most max_new_tokens; the loop ends after an end-of-sequence id, which
    is included, as generate() does). temperature 0: greedy (argmax of the fp32 logits, first
    index on ties, as generate()); above 0: sampled from softmax(logits / temperature) with
    `generator`. on_token(id) is called for each token as it is chosen (streaming), on_logits(fp32
    [1, vocab]) with the logits it was chosen from."""
    ids = [int(i) for i in input_ids]
    if not ids:
        raise ValueError("input_ids: empty")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if eos_token_id is None:
        eos_token_id = getattr(model.config, "eos_token_id", None)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    device = next(model.parameters()).device
    cache_kw, cache_attr = _cache_names(model)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    was_training = model.training
    model.eval()
    out_ids: list[int] = []
    try:
        with torch.inference_mode():
            x = torch.tensor([ids], device=device)
            mask = torch.ones(1, len(ids) + max_new_tokens, dtype=torch.long, device=device)
            out = model(input_ids=x, attention_mask=mask[:, :len(ids)], use_cache=True, **keep)
            cache = getattr(out, cache_attr)
            fast = None
            if max_new_tokens > 1 and _LlamaStep.supports(model, cache):
                step_type = _NativeLlamaStep if _NativeLlamaStep.supports_native(model) else _LlamaStep
                fast = step_type(model, cache, len(ids), len(ids) + max_new_tokens)
            for step in range(max_new_tokens):
                logits = out.logits[:, -1].to(dtype=torch.float32)
                if on_logits is not None:
                    on_logits(logits.clone())
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    token = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    token = int(torch.argmax(logits, dim=-1))
                out_ids.append(token)
                if on_token is not None:
                    on_token(token)
                if token in eos or step == max_new_tokens - 1:
                    break
                n = len(ids) + len(out_ids)
                if fast is not None:
                    out = _Logits(fast(token, n - 1))
                    continue
                out = model(input_ids=torch.tensor([[token]], device=device), attention_mask=mask[:, :n],
                            use_cache=True, **{cache_kw: cache}, **keep)
                cache = getattr(out, cache_attr)
    finally:
        model.train(was_training)
    return out_ids
