#!/usr/bin/env bash
# The GPU check, one command (docs/gpu-check.md): proves and times the pack on CUDA through ComfyUI's executor.
#
#   bash tools/gpu_check.sh              # a CUDA machine: results in benchmarks/results/gpu-*.json, exit 1 on a FAIL
#   bash tools/gpu_check.sh --dry-run    # any machine, on CPU at tiny sizes (CI runs it: tests/host/test_gpu_check.py)
#
# On the project's GPU machine (no internet) it installs the wheels and unpacks the ComfyUI trees that
# tools/prepare_gpu_carry.sh put in .gpu-carry/ (carried with the run), then runs tools/gpu_check.py on ComfyUI
# 0.3.75 and 0.19.3. On your own GPU: COMFYUI_ROOT=/path/to/ComfyUI ASTAR_PYTHON=/path/to/its/python
# bash tools/gpu_check.sh (no .gpu-carry needed). Extra arguments go to tools/gpu_check.py.
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PACK_DIR"

if [[ " $* " == *" --dry-run "* ]]; then
  if [ -z "${COMFYUI_ROOT:-}" ]; then
    source "$PACK_DIR/tools/host_python.sh"  # tools/setup.sh's host (idempotent set-up)
  else
    PY="${ASTAR_PYTHON:-python3}"
  fi
  exec "$PY" tools/gpu_check.py "$@"
fi

CARRY="${ASTAR_GPU_CARRY:-$PACK_DIR/.gpu-carry}"
WORK="${ASTAR_GPU_WORK:-/tmp/astar-gpu-check}"
PY="${ASTAR_PYTHON:-python3}"
mkdir -p "$WORK"
t0=$SECONDS
roots=()
if [ -z "${COMFYUI_ROOT:-}" ]; then
  if [ ! -d "$CARRY/wheels" ]; then
    echo "[gpu_check] no $CARRY: run tools/prepare_gpu_carry.sh (and carry .gpu-carry), or set COMFYUI_ROOT" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$CARRY"/wheels/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  for v in 0.3.75 0.19.3; do
    if [ ! -f "$WORK/ComfyUI-$v/main.py" ]; then tar xJf "$CARRY/ComfyUI-$v.tar.xz" -C "$WORK"; fi
    roots+=("$WORK/ComfyUI-$v")
  done
else
  roots=("$COMFYUI_ROOT")
fi
# The check's own model cache: its GPU-drawn models differ in bytes from the CPU-built test models.
export ASTAR_TEST_MODELS="${ASTAR_TEST_MODELS:-$WORK/models}"
echo "[gpu_check] set-up took $((SECONDS - t0)) s" >&2
exec "$PY" tools/gpu_check.py --comfy "${roots[@]}" "$@"
