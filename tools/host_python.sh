# Sourced by tools/test.sh and tools/run_example.sh: sets PACK_DIR, the hosts' paths (tools/hosts.sh) and
# PY, the Python of the ComfyUI host. Default: tools/setup.sh's hosts (set up first, idempotent) and the
# oldest one's Python. With your own ComfyUI: COMFYUI_ROOT=/path/to/ComfyUI ASTAR_PYTHON=/path/to/its/python
# (set-up is skipped).
source "$(dirname "${BASH_SOURCE[0]}")/hosts.sh"
if [ -z "${COMFYUI_ROOT:-}" ]; then
  bash "$PACK_DIR/tools/setup.sh"
  PY="$OLDEST_VENV/bin/python"
else
  PY="${ASTAR_PYTHON:-python3}"
fi
