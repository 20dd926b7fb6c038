"""Calibration: the CPU dispatch choices of ops/dispatch.py, measured on the running machine.

What is measured (a second or two in all; interleaved rounds, the minimum of each):
- cpu_gemm_fp32: the 4-bit product at M = 256 on a 1024 x 1024 bf16 weight, dequantize + bf16 GEMM
  against dequantize in fp32 + fp32 GEMM (chosen only if at least 5% faster): oneDNN's bf16 GEMM
  is 2x slower than fp32 on some CPUs without AMX and 5x faster on others;
- cpu_fused_max_rows / cpu_fused_t_max_rows: the fused kernel against dequantize + dense GEMM for
  M in 1, 2, 4, 8 on a 2048 x 2048 weight, each direction; the limit is the largest M up to which
  the fused kernel wins at every measured M;
- cpu_matmul_variant: every kernel variant this machine runs (but the scalar reference) on the
  fused products at M = 1, forward and transposed, 2048 x 2048; another variant than
  best_cpu_variant() only if at least 5% faster (AVX512_BF16 beats AVX512 on some CPUs, not others);
- cpu_grain_kib: the least packed weight a thread gets before a second one is woken, among
  16/64/256/1024 KiB, on M = 1 products of 128 KiB, 512 KiB and 2 MiB weights, each call right
  after a small torch op (as in a model: torch's OpenMP workers were just busy); each weight's
  times relative to the default's, summed; another grain only if at least 5% better. Measured
  only with more than one thread.
These two run first: the crossovers are measured with the variant and grain chosen.
- cpu_attention: forward + backward of bf16 attention at SmolLM2-135M's heads (9 query, 3 key/value
  heads of 64, 2 x 128 tokens, causal + padding mask) by each route of ops/attention.py; the
  fastest, if at least 5% faster than "sdpa" (transformers' own), else "sdpa".

The result is cached as JSON under the user's cache directory (NF4LORA_CACHE_DIR, else
$XDG_CACHE_HOME/nf4lora, else ~/.cache/nf4lora), one file per machine key: CPU model and flags,
thread count, torch and nf4lora versions, the build. The file is written atomically; one that is
corrupt, written for another key (foreign) or by another calibration version (stale) is ignored
with a warning and measured anew. NF4LORA_CALIBRATE=0 turns measuring off (the kernels' own limit
of 8 rows, torch's own bf16 GEMMs and transformers' sdpa attention); NF4LORA_CALIBRATE=force measures even when cached.
Shown by ``nf4lora tune``. Tested by tests/test_calibrate.py."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..files import write_atomic
from .attention import ROUTES, attend, sample_inputs
from .dispatch import DEFAULT_GRAIN_KIB, DISPATCH, FUSED_KERNEL_MAX_ROWS, MAX_GRAIN_KIB
from .native import BUILD_INFO, best_cpu_variant, cpu_variant_forced, cpu_variants

VERSION = 3  # 3: cpu_matmul_variant, cpu_grain_kib and cpu_attention added
ROWS = (1, 2, 4, 8)
GRAINS_KIB = (16, 64, 256, 1024)
DEFAULTS = {"cpu_fused_max_rows": FUSED_KERNEL_MAX_ROWS, "cpu_fused_t_max_rows": FUSED_KERNEL_MAX_ROWS,
            "cpu_gemm_fp32": False, "cpu_matmul_variant": best_cpu_variant(), "cpu_grain_kib": DEFAULT_GRAIN_KIB,
            "cpu_attention": "sdpa"}


def _check_choice(name: str, value) -> None:
    """ValueError unless `value` is a valid choice for `name` on this machine."""
    default = DEFAULTS[name]
    if type(value) is not type(default):
        raise ValueError(f"choice {name}={value!r} has the wrong type")
    if name in ("cpu_fused_max_rows", "cpu_fused_t_max_rows") and not 0 <= value <= FUSED_KERNEL_MAX_ROWS:
        raise ValueError(f"choice {name}={value!r} is out of range")
    if name == "cpu_grain_kib" and not 1 <= value <= MAX_GRAIN_KIB:
        raise ValueError(f"choice {name}={value!r} is out of range")
    if name == "cpu_matmul_variant" and value not in cpu_variants(supported_only=True):
        raise ValueError(f"choice {name}={value!r} is not a variant this machine runs")
    if name == "cpu_attention" and value not in ROUTES:
        raise ValueError(f"choice {name}={value!r} is out of range")


@dataclasses.dataclass
class Calibration:
    choices: dict            # DEFAULTS' keys -> chosen value
    measurements: dict       # what was timed, in ms (empty when not measured)
    key: dict                # the machine key it was measured for
    source: str              # "measured", "cache" or "default (NF4LORA_CALIBRATE=0)"
    path: Optional[str] = None
    seconds: float = 0.0     # how long measuring took


def cache_dir() -> Path:
    if os.environ.get("NF4LORA_CACHE_DIR"):
        return Path(os.environ["NF4LORA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nf4lora"


def cpu_model_and_flags() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("model name", "Processor", "CPU part") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = value.strip()
                if model and flags and name == "":
                    break
    except OSError:
        pass
    return model, flags


def machine_key() -> dict:
    from ..version import __version__
    model, flags = cpu_model_and_flags()
    return {"cpu": model, "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "nf4lora": __version__,
            "build": BUILD_INFO}


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / f"calibration-{digest}.json"


def _read(path: Path, key: dict) -> Optional[Calibration]:
    """The cached calibration at `path`, or None (with a warning saying why it was not used)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("version") != VERSION:
            warnings.warn(f"nf4lora: ignoring the calibration cache {path}: written by calibration version "
                          f"{data.get('version')!r}, this is {VERSION} (stale); measuring again", RuntimeWarning)
            return None
        if data.get("key") != key:
            warnings.warn(f"nf4lora: ignoring the calibration cache {path}: it was measured for another machine "
                          f"or setup ({data.get('key')!r}, this is {key!r}); measuring again", RuntimeWarning)
            return None
        choices = data["choices"]
        for name in DEFAULTS:
            _check_choice(name, choices[name])
        return Calibration({k: choices[k] for k in DEFAULTS}, dict(data.get("measurements", {})), key,
                           "cache", str(path), float(data.get("seconds", 0.0)))
    except (ValueError, KeyError, TypeError, OSError) as exc:
        warnings.warn(f"nf4lora: ignoring the corrupt calibration cache {path} ({exc}); measuring again",
                      RuntimeWarning)
        return None


def _write(path: Path, cal: Calibration) -> None:
    """Atomically (files.write_atomic); a cache that cannot be written only costs a re-measure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"version": VERSION, "key": cal.key, "choices": cal.choices,
                                       "measurements": cal.measurements, "seconds": round(cal.seconds, 3),
                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1).encode())
    except OSError as exc:
        warnings.warn(f"nf4lora: could not write the calibration cache {path} ({exc})", RuntimeWarning)


def _best_ms(fns: dict[str, Callable[[], Any]], rounds: int, reps: int) -> dict[str, float]:
    """Minimum per-call time of each function over interleaved rounds, in ms."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()  # warm-up: scratch buffers, page faults, oneDNN primitives
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3 / reps)
    return best


def measure(rounds: int = 2) -> Calibration:
    """Runs the measurements (a second or two) and returns the choices; caches nothing."""
    from . import cpu
    from .library import quantize_4bit, quantize_blockwise_8bit
    from .native import dynamic_map
    from .weight import Weight4bit
    t_start = time.perf_counter()
    g = torch.Generator().manual_seed(0)

    def weight(n: int, k: int) -> Weight4bit:
        w = torch.randn(n, k, generator=g) * 0.02
        packed, absmax = quantize_4bit(w, 64, "nf4")
        offset = absmax.mean()
        qabs, nested = quantize_blockwise_8bit(absmax - offset, dynamic_map(True), 256)
        return Weight4bit(packed.view(-1), qabs, 64, "nf4", (n, k), torch.float32, nested,
                          dynamic_map(True), offset, 256)

    results: dict[str, Any] = {}
    choices = dict(DEFAULTS)
    with torch.no_grad():
        w2048 = weight(2048, 2048)
        x1, g1 = torch.randn(1, 2048, generator=g).bfloat16(), torch.randn(1, 2048, generator=g).bfloat16()

        def products(**forced):
            def run():
                with DISPATCH.override(cpu_fused_max_rows=1, cpu_fused_t_max_rows=1, **forced):
                    cpu.matmul(x1, w2048, None)
                    cpu.matmul_t(g1, w2048)
            return run
        if cpu_variant_forced():
            results["variant"] = "not measured: a CPU variant is forced (nf4lora.set_cpu_variant)"
        else:
            names = [v for v in cpu_variants(supported_only=True) if v != "ref"]
            if len(names) > 1:
                t = _best_ms({v: products(cpu_matmul_variant=v) for v in names}, rounds + 1, 4)
                results["variant_M1_2048x2048_fwd_plus_t_ms"] = {k: round(v, 4) for k, v in t.items()}
                fastest = min(t, key=t.get)
                if t[fastest] < 0.95 * t[choices["cpu_matmul_variant"]]:
                    choices["cpu_matmul_variant"] = fastest
        variant = choices["cpu_matmul_variant"]

        if torch.get_num_threads() > 1:
            a, b = torch.randn(64, 256, generator=g), torch.randn(256, 256, generator=g)
            shapes = {"128KiB": weight(512, 512), "512KiB": weight(1024, 1024), "2MiB": w2048}
            rel = {grain: 0.0 for grain in GRAINS_KIB}
            per_shape = {}
            for label, ws in shapes.items():
                xs, gs = torch.randn(1, ws.shape[1], generator=g).bfloat16(), torch.randn(1, ws.shape[0], generator=g).bfloat16()
                fns = {}
                for grain in GRAINS_KIB:
                    def run(grain=grain, ws=ws, xs=xs, gs=gs):
                        with DISPATCH.override(cpu_fused_max_rows=1, cpu_fused_t_max_rows=1,
                                               cpu_matmul_variant=variant, cpu_grain_kib=grain):
                            torch.mm(a, b)
                            cpu.matmul(xs, ws, None)
                            torch.mm(a, b)
                            cpu.matmul_t(gs, ws)
                    fns[grain] = run
                t = _best_ms(fns, rounds + 1, 4)
                per_shape[label] = {str(k): round(v, 4) for k, v in t.items()}
                for grain in GRAINS_KIB:
                    rel[grain] += t[grain] / t[DEFAULT_GRAIN_KIB]
            results["grain_M1_ms_after_torch_mm"] = per_shape
            best = min(rel, key=rel.get)
            if rel[best] < 0.95 * rel[DEFAULT_GRAIN_KIB]:
                choices["cpu_grain_kib"] = best
        else:
            results["grain"] = "not measured: one thread"
        native = {"cpu_matmul_variant": variant, "cpu_grain_kib": choices["cpu_grain_kib"]}

        w = weight(1024, 1024)
        x = torch.randn(256, 1024, generator=g).bfloat16()
        routes = {}
        for fp32 in (False, True):
            def run(fp32=fp32):
                with DISPATCH.override(cpu_fused_max_rows=0, cpu_gemm_fp32=fp32, **native):
                    return cpu.matmul(x, w, None)
            routes["fp32" if fp32 else "bf16"] = run
        t = _best_ms(routes, rounds, 2)
        results["gemm_M256_1024x1024_ms"] = {k: round(v, 4) for k, v in t.items()}
        choices["cpu_gemm_fp32"] = t["fp32"] < 0.95 * t["bf16"]

        for direction, field in (("forward", "cpu_fused_max_rows"), ("transposed", "cpu_fused_t_max_rows")):
            product = cpu.matmul if direction == "forward" else (lambda inp, w, _: cpu.matmul_t(inp, w))
            limit, winning, times = 0, True, {}
            for M in ROWS:
                inp = torch.randn(M, 2048, generator=g).bfloat16()
                fns = {}
                for route, rows in (("fused", FUSED_KERNEL_MAX_ROWS), ("scratch", 0)):
                    def run(rows=rows, inp=inp):
                        with DISPATCH.override(**{field: rows}, cpu_gemm_fp32=choices["cpu_gemm_fp32"], **native):
                            return product(inp, w2048, None)
                    fns[route] = run
                tm = _best_ms(fns, rounds, 2)
                times[f"M{M}"] = {k: round(v, 4) for k, v in tm.items()}
                winning = winning and tm["fused"] <= tm["scratch"]
                if winning:
                    limit = M
            results[f"{direction}_2048x2048_ms"] = times
            choices[field] = limit
    q, k, v, mask = sample_inputs(g)
    grad = torch.randn(q.shape, generator=g).bfloat16()

    def attention(route):
        def run():
            out = attend(q, k, v, mask, q.shape[-1] ** -0.5, 0.0, False, route)
            q.grad = k.grad = v.grad = None
            out.backward(grad)
        return run
    # forward + backward even when the first use that measures is under no_grad (an evaluation)
    # or autocast
    with torch.enable_grad(), torch.autocast("cpu", enabled=False):
        t = _best_ms({route: attention(route) for route in ROUTES}, max(rounds, 3), 2)
    results["attention_fwd_bwd_2x9x128x64_ms"] = {k: round(v, 4) for k, v in t.items()}
    fastest = min(t, key=t.get)
    choices["cpu_attention"] = fastest if t[fastest] < 0.95 * t["sdpa"] else "sdpa"
    return Calibration(choices, results, machine_key(), "measured", None, time.perf_counter() - t_start)


def load_or_measure(force: bool = False) -> Calibration:
    """The calibration for this machine: from the cache, else measured now and cached."""
    key = machine_key()
    path = cache_path(key)
    if not force:
        cached = _read(path, key)
        if cached is not None:
            return cached
    cal = measure()
    cal.path = str(path)
    _write(path, cal)
    return cal


def current() -> Calibration:
    """What DISPATCH uses: as NF4LORA_CALIBRATE says (unset or 1: cached or measured; 0: the
    defaults; force: measured again)."""
    mode = os.environ.get("NF4LORA_CALIBRATE", "1").strip().lower()
    if mode in ("0", "off", "false"):
        return Calibration(dict(DEFAULTS), {}, machine_key(), "default (NF4LORA_CALIBRATE=0)")
    if mode not in ("1", "on", "true", "force", ""):
        raise ValueError(f"NF4LORA_CALIBRATE must be 1, 0 or force, got {mode!r}")
    return load_or_measure(force=mode == "force")


def calibrate(force: bool = False) -> Calibration:
    """Measures (or reads from the cache) and installs the choices in DISPATCH; returns them."""
    cal = load_or_measure(force=force)
    DISPATCH.calibration = cal
    return cal
