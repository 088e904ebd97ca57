#!/usr/bin/env bash
# Set-up (idempotent) + the whole test suite on the real ComfyUI host. Extra arguments go to pytest.
# With your own ComfyUI: COMFYUI_ROOT=/path/to/ComfyUI ASTAR_PYTHON=/path/to/its/python tools/test.sh
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASTAR_HOME="${ASTAR_HOME:-$HOME/.cache/astar-comfyui}"
if [ -z "${COMFYUI_ROOT:-}" ]; then
  bash "$PACK_DIR/tools/setup.sh"
  PY="$ASTAR_HOME/venv/bin/python"
else
  PY="${ASTAR_PYTHON:-python3}"
  "$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q pytest
fi
cd "$PACK_DIR"
exec "$PY" -m pytest "$@"
