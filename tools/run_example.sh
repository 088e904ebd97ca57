#!/usr/bin/env bash
# The main job: set-up (tools/setup.sh, idempotent) + an example workflow of this pack run headless on a
# real ComfyUI server; every output image is downloaded into ./out/. Arguments go to tools/run_example.py:
#   bash tools/run_example.sh                                   # astar_sd15 on a random-weight model (noise images)
#   bash tools/run_example.sh --ckpt v1-5-pruned-emaonly.safetensors   # or a path to a checkpoint file
#   bash tools/run_example.sh --workflow example_workflows/astar_vs_plain.json
#   bash tools/run_example.sh --steps 20 --guidance-end 0.3   # guide steps i < 0.3 * 20 (the first 6)
# With your own ComfyUI: COMFYUI_ROOT=/path/to/ComfyUI ASTAR_PYTHON=/path/to/its/python bash tools/run_example.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/host_python.sh"
exec "$PY" "$PACK_DIR/tools/run_example.py" --skip-setup "$@"
