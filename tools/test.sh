#!/usr/bin/env bash
# Set-up (idempotent) + the whole test suite on the real ComfyUI host. Extra arguments go to pytest.
# With your own ComfyUI: COMFYUI_ROOT=/path/to/ComfyUI ASTAR_PYTHON=/path/to/its/python tools/test.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/host_python.sh"
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q pytest
cd "$PACK_DIR"
exec "$PY" -m pytest "$@"
