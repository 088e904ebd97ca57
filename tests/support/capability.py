"""Skip a test on a ComfyUI that lacks what it tests: a model family or an API that arrived after the
oldest ComfyUI the pack supports. tools/test.sh runs the suite on ComfyUI 0.3.75 and on 0.19.3, so such
a test is reported skipped, with the reason, in the first pass and runs in the second. Decided by
capability (the module or attribute is there), never by version number; the version only goes into the
reason."""
from __future__ import annotations

import importlib
import re

import pytest

from support import host as hosts


def comfy_version() -> str:
    """The version of the ComfyUI under test, read from its comfyui_version.py (not imported)."""
    try:
        text = (hosts.comfy_root() / "comfyui_version.py").read_text(encoding="utf-8")
    except (RuntimeError, OSError):
        return "version unknown"
    found = re.search(r"""__version__\s*=\s*["']([^"']+)""", text)
    return found.group(1) if found else "version unknown"


def require_comfy(module: str, attr: str | None = None, *, what: str):
    """ComfyUI's `module` (its `attr` when given); skips the calling test when this ComfyUI has not got
    it, the reason naming `what` (e.g. "Flux.2 Klein"), the version and the missing name.

    Call it where ComfyUI is importable (in a test or fixture that uses the `host` fixture). Only a
    missing `module` (or a missing package between ComfyUI's top level and it) or a missing `attr`
    skips: an error raised inside a module that is there, or ComfyUI itself not importable, fails."""
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if "." not in missing or not (module == missing or module.startswith(missing + ".")):
            raise
        pytest.skip(f"{what}: this ComfyUI ({comfy_version()}) has no module {missing}")
    if attr is None:
        return found
    if not hasattr(found, attr):
        pytest.skip(f"{what}: this ComfyUI ({comfy_version()}) has no {module}.{attr}")
    return getattr(found, attr)
