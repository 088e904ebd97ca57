#!/usr/bin/env bash
# Set-up (idempotent) + the whole test suite on the set-up's ComfyUI hosts (tools/hosts.sh), one pass each:
#   pass 1/2  ComfyUI 0.3.75, the oldest supported: every test
#   pass 2/2  ComfyUI 0.19.3, when its archive is beside the checkout (../shared, as CI has it): every test
#             but the SDXL ones and those the host cannot change (-m 'not sdxl and not host_independent',
#             joined to yours: -m "(yours) and not sdxl and not host_independent"); else skipped
# Extra arguments go to pytest in both passes. Exit status: 0 when every pass that ran passed, else the
# first failing pass's pytest status; "no tests ran" (pytest's 5) fails too, except in pass 2 when its marker
# deselected every test (tools/test.sh tests/unit: those run in pass 1 only). The last lines repeat both
# passes' pytest summaries.
# With your own ComfyUI, one pass against it (no set-up):
#   COMFYUI_ROOT=/path/to/ComfyUI ASTAR_PYTHON=/path/to/its/python tools/test.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/host_python.sh"
cd "$PACK_DIR"
if [ -n "${COMFYUI_ROOT:-}" ]; then
  "$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q pytest
  exec "$PY" -m pytest "$@"
fi

# Ctrl-C stops the whole run (pytest's own status 2 also means a collection error: the next pass still runs).
trap 'echo "[test] interrupted" >&2; exit 130' INT
LOGS="$(mktemp -d)"
trap 'rm -rf "$LOGS"' EXIT
REPORT=()
STATUS=0

run_pass() {  # run_pass N VERSION ROOT PYTHON PYTEST_ARGS...
  local n="$1" version="$2" root="$3" py="$4" rc summary
  shift 4
  echo "[test] pass $n/2: ComfyUI $version ($root): pytest ${*@Q}" >&2
  set +e
  COMFYUI_ROOT="$root" ASTAR_PYTHON="$py" PYTHONUNBUFFERED=1 "$py" -m pytest "$@" 2>&1 | tee "$LOGS/$n"
  rc="${PIPESTATUS[0]}"
  set -e
  summary="$(grep -E '(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s' "$LOGS/$n" | tail -n 1 \
             | sed -E 's/^=+ //; s/ =+$//' || true)"
  if [ "$rc" = 5 ] && [ "$n" = 2 ] && [[ "$summary" == *deselected* ]]; then
    rc="0: every selected test is SDXL or host-independent, run in pass 1 only"  # e.g. tools/test.sh tests/unit
  elif [ "$rc" = 5 ]; then rc="5: no tests ran, a failure"; fi
  REPORT+=("pass $n/2: ComfyUI $version: ${summary:-no pytest summary} (pytest exit $rc)")
  if [ "${rc%%:*}" != 0 ] && [ "$STATUS" = 0 ]; then STATUS="${rc%%:*}"; fi
}

run_pass 1 "$OLDEST_VERSION" "$OLDEST_ROOT" "$OLDEST_VENV/bin/python" "$@"

if [ -f "$NEWEST_ARCHIVE" ]; then
  # The SDXL tests (about 6 GB each, the slowest) and the host-independent ones run in pass 1 only: both
  # passes stay inside CI's time.
  newest_args=() marker=""
  while [ $# -gt 0 ]; do
    case "$1" in
      -m) marker="${2:-}"; [ $# -gt 1 ] && shift ;;
      -m?*) marker="${1#-m}" ;;
      *) newest_args+=("$1") ;;
    esac
    shift
  done
  run_pass 2 "$NEWEST_VERSION" "$NEWEST_ROOT" "$NEWEST_VENV/bin/python" "${newest_args[@]}" \
    -m "${marker:+($marker) and }not sdxl and not host_independent"
else
  REPORT+=("pass 2/2: ComfyUI $NEWEST_VERSION skipped: no archive at $NEWEST_ARCHIVE (CI has it in ../shared; ASTAR_COMFYUI_ARCHIVE names another copy)")
fi

for line in "${REPORT[@]}"; do echo "[test] $line" >&2; done
exit "$STATUS"
