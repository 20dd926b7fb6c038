#!/usr/bin/env bash
# gpu_lora_check.sh — LoRA on one GPU machine (H100/H200 class, ~4 minutes): builds nf4lora with CUDA
# for the local arch, runs the CUDA-marked LoRA tests (fused 4-bit LoRA vs the unfused composition,
# a quantized Llama trained/merged/saved on the GPU) and bench/bench_lora.py on the GPU.
# Writes ${OUT:-bench/out}/lora_*.log. Usage: bash bench/gpu_lora_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
CC="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
time NF4LORA_CUDA=ON "$PY" -m pip install -q --no-build-isolation --no-deps \
  "--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=${CC:-90}" . >"$OUT/lora_build.log" 2>&1 \
  || { tail -30 "$OUT/lora_build.log"; exit 1; }
cd "$OUT"  # import the installed package, not python/
"$PY" -c 'import nf4lora, torch; print(nf4lora.BUILD_INFO, torch.__version__, torch.cuda.get_device_name())'
timeout 240 "$PY" -m pytest "$OLDPWD/tests/test_lora.py" -q -p no:cacheprovider -m cuda -rs 2>&1 | tee lora_tests.log | tail -15
for args in "--m 512" "--m 2048" "--n 11008 --k 4096 --m 2048"; do
  timeout 120 "$PY" "$OLDPWD/bench/bench_lora.py" --device cuda --no-peft --iters 20 $args 2>&1 | tee -a lora_bench.log | tail -6
done
