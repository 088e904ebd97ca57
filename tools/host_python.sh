# Sourced by tools/test.sh and tools/run_example.sh: sets PACK_DIR and PY, the Python of the ComfyUI host.
# Default: tools/setup.sh's own host (set up first, idempotent). With your own ComfyUI:
# COMFYUI_ROOT=/path/to/ComfyUI ASTAR_PYTHON=/path/to/its/python (set-up is skipped).
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${COMFYUI_ROOT:-}" ]; then
  bash "$PACK_DIR/tools/setup.sh"
  PY="${ASTAR_HOME:-$HOME/.cache/astar-comfyui}/venv/bin/python"
else
  PY="${ASTAR_PYTHON:-python3}"
fi
