"""Peak memory of `AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
quantization_config=nf4lora.hf.NF4Config())` against the dense-first route it replaced
(from_pretrained in bf16, then nl.quantize_model) and nl.load_model, on a random Llama written by
tests/tiny_lm.py's save_tiny_model with larger dimensions (an fp32 safetensors checkpoint, as
save_pretrained writes it).

Each route runs in a fresh process: imports, a warm-up load of a tiny model by the same route
(the lazily imported modeling code and kernels are not the load's memory), then the load while a
thread samples RssAnon (/proc/self/status) every millisecond. The figure is the anonymous memory's
peak above its level before the load. Anonymous, because transformers reads the checkpoint
through a read-only mmap: its pages (the whole file once read) count in VmRSS/VmHWM as clean
page cache the kernel can drop, not as memory the load holds; VmHWM above the baseline is printed
too. The children run with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns freed large blocks
at once (otherwise its dynamic threshold keeps freed memory in the heap and RssAnon shows that
instead of what is live).

    python bench/bench_hf_load.py               # hidden 1024, 8 layers: 0.12B params, 0.5 GB fp32
    python bench/bench_hf_load.py --layers 4    # the size tests/test_hf.py uses
    python bench/bench_hf_load.py --quick       # CI smoke run (2 layers of hidden 256)"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from timing import proc_status  # bench/timing.py (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
ROUTES = ("nf4config", "dense-first", "load_model")


def _load(route: str, folder: str):
    import torch
    import transformers
    import nf4lora as nl
    if route == "nf4config":
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                                 quantization_config=nl.hf.NF4Config())
    if route == "dense-first":  # what NF4Quantizer did before it quantized tensor by tensor
        dense = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        return nl.quantize_model(dense)
    if route == "load_model":
        return nl.load_model(folder, compute_dtype=torch.bfloat16)[0]
    raise ValueError(f"unknown route {route!r}")


def child(route: str, folder: str) -> None:
    """In a fresh process: warm-up, baseline, the load under the sampler; one JSON line."""
    import gc
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    sys.path.insert(0, str(ROOT))
    from tests.tiny_lm import save_tiny_model
    with tempfile.TemporaryDirectory() as d:
        save_tiny_model(Path(d))
        _load(route, d)
    gc.collect()
    base_anon, base_rss = proc_status("RssAnon"), proc_status("VmRSS")
    peak, stop = [base_anon], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc_status("RssAnon"))
            time.sleep(0.001)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    model = _load(route, folder)
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], proc_status("RssAnon"))
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    largest = max(m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features"))
    print(json.dumps({"route": route, "load_s": dt, "anon_peak": peak[0] - base_anon,
                      "anon_after": proc_status("RssAnon") - base_anon, "hwm": proc_status("VmHWM") - base_rss,
                      "model_bytes": model_bytes, "largest_linear_numel": largest,
                      "params": sum(p.numel() for p in model.parameters() if p.dtype.is_floating_point)}))


def write_checkpoint(folder: Path, hidden: int, inter: int, layers: int, heads: int, kv_heads: int) -> dict:
    """The random fp32 Llama (vocab 259) and its sizes: dense bf16 bytes of all weights."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny_lm import save_tiny_model
    save_tiny_model(folder, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv_heads)
    from safetensors import safe_open
    numel = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                n = 1
                for d in s.get_slice(k).get_shape():
                    n *= d
                numel += n
    return {"numel": numel, "bf16_bytes": 2 * numel,
            "file_bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors"))}


def measure(route: str, folder: Path) -> dict:
    """Runs `route` on the checkpoint in `folder` in a fresh process; its JSON report."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([sys.executable, __file__, "--child", route, str(folder)], capture_output=True,
                         text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{route} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--routes", default=",".join(ROUTES))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smoke run (CI): 2 layers of hidden 256")
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    if a.quick:
        a.hidden, a.inter, a.layers, a.heads, a.kv_heads = 256, 512, 2, 4, 2
    sys.path.insert(0, str(ROOT / "bench"))
    from timing import machine_header
    print(machine_header())
    folder = Path(tempfile.mkdtemp(prefix="nf4lora-hfload-"))
    try:
        sizes = write_checkpoint(folder, a.hidden, a.inter, a.layers, a.heads, a.kv_heads)
        print(f"# checkpoint: Llama hidden {a.hidden}, intermediate {a.inter}, {a.layers} layers: "
              f"{sizes['numel'] / 1e6:.1f}M params, {sizes['file_bytes'] / 1e6:.0f} MB fp32 safetensors, "
              f"{sizes['bf16_bytes'] / 1e6:.0f} MB dense in bf16")
        print(f"{'route':<12} {'load s':>7} {'anon peak MB':>13} {'anon after MB':>14} {'VmHWM+ MB':>10} "
              f"{'model MB':>9}")
        peaks = {}
        for route in a.routes.split(","):
            r = measure(route, folder)
            peaks[route] = r["anon_peak"]
            print(f"{route:<12} {r['load_s']:>7.2f} {r['anon_peak'] / 1e6:>13.1f} {r['anon_after'] / 1e6:>14.1f} "
                  f"{r['hwm'] / 1e6:>10.1f} {r['model_bytes'] / 1e6:>9.1f}", flush=True)
        if "nf4config" in peaks and "dense-first" in peaks:
            print(f"# NF4Config's peak is {peaks['nf4config'] / peaks['dense-first']:.2f}x the dense-first route's")
        print("# anon peak: anonymous memory above the level before the load (what the load holds); VmHWM+ "
              "also counts the checkpoint's mmapped file pages")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
