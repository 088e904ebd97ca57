# Sourced by tools/setup.sh and tools/host_python.sh: where the set-up's two ComfyUI hosts live.
# Both are cached in $ASTAR_HOME (default ~/.cache/astar-comfyui), outside the work tree.
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASTAR_HOME="${ASTAR_HOME:-$HOME/.cache/astar-comfyui}"

# The oldest ComfyUI the pack supports (pyproject.toml's requires-comfyui), from a registry wheel.
OLDEST_VERSION="0.3.75"
OLDEST_ROOT="$ASTAR_HOME/ComfyUI"
OLDEST_VENV="$ASTAR_HOME/venv"

# The newest ComfyUI at hand: a source archive beside the checkout (../shared, as CI has it; a user's
# own clone has none, and its pass is skipped). ASTAR_COMFYUI_ARCHIVE names another copy of it.
NEWEST_VERSION="0.19.3"
NEWEST_ARCHIVE="${ASTAR_COMFYUI_ARCHIVE:-$(dirname "$PACK_DIR")/shared/comfyui/ComfyUI-$NEWEST_VERSION.tar.gz}"
NEWEST_ROOT="$ASTAR_HOME/ComfyUI-$NEWEST_VERSION"
NEWEST_VENV="$ASTAR_HOME/venv-$NEWEST_VERSION"
