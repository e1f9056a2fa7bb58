#!/usr/bin/env bash
# The GPU check of the vLLM engine, prepared for a CUDA host (not run yet: no GPU was lent to the
# sessions that wrote it; README "Performance" says so until it has run).
#
#   benchmarks/gpu/run.sh [MODEL_DIR]     # MODEL_DIR: real deepseek-llm weights; default a 7B-shaped random model
#
# Needs the project installed with the CUDA builds (the image, or
#   make install PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cu128" VLLM_SPEC="vllm==0.32.0").
# Writes benchmarks/results/gpu/{peer.json,tests.txt}; each step's exit status is in status.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/gpu}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT"
: > "$OUT/status.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

MODEL=${1:-}
if [ -z "$MODEL" ]; then
  MODEL="$WORK/deepseek-llm-7b-shape"
  "$PY" benchmarks/gpu/make_7b_shape.py "$MODEL"; echo "make_7b_shape $?" >> "$OUT/status.txt"
fi

# 1. The engines' tests with CUDA visible: the contract suite (native, remote, vllm) and the vLLM
#    gRPC end-to-end tests, plus every GPU-marked test.
timeout 1500 "$PY" -m pytest -q -p no:cacheprovider tests/unit/engine tests/e2e/test_vllm_engine_e2e.py \
  -m "vllm or gpu or not slow" 2>&1 | tee "$OUT/tests.txt" | tail -5
echo "tests ${PIPESTATUS[0]}" >> "$OUT/status.txt"

# 2. The peer bench on the 7B shape in bf16: 64 streams, chunked prefill capped at 512 tokens a step.
timeout 2400 "$PY" -m loraserve bench peer --base "$MODEL" --requests 64 --new-tokens 128 --adapters 8 --rank 16 \
  --repeats 3 --long-prefill-token-threshold 512 --json "$OUT/peer.json" 2>&1 | tee "$OUT/peer.txt" | tail -25
echo "peer ${PIPESTATUS[0]}" >> "$OUT/status.txt"
cat "$OUT/status.txt"
