"""Registry metadata: the LICENSE matches pyproject.toml, [tool.comfy] is filled in, and
requires-comfyui starts at the oldest ComfyUI the compatibility table (docs/compatibility.md) reports a
run on, with no upper bound (newer versions are followed by capability; CI tests the newest one at hand)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_license_file_is_mit_and_matches_pyproject():
    project = pyproject()["project"]
    assert project["license"] == {"file": "LICENSE"}
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License") and "Permission is hereby granted, free of charge" in text
    assert "License :: OSI Approved :: MIT License" in project["classifiers"]


def test_tool_comfy_fields():
    comfy = pyproject()["tool"]["comfy"]
    assert {"PublisherId", "DisplayName", "Icon", "includes", "requires-comfyui"} <= set(comfy)
    assert comfy["PublisherId"] and comfy["DisplayName"]
    urls = pyproject()["project"]["urls"]
    assert {"Repository", "Documentation", "Bug Tracker"} <= set(urls)


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def test_requires_comfyui_starts_at_the_oldest_tested():
    """Its lower bound is the oldest ComfyUI the compatibility table reports a run on; no upper bound."""
    spec = pyproject()["tool"]["comfy"]["requires-comfyui"]
    match = re.fullmatch(r">=([\d.]+)", spec)
    assert match, f"requires-comfyui {spec!r}: expected '>=<oldest tested>' alone"
    low = match.group(1)
    text = (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")
    section = text.split("\n## ", 1)[0]  # the table before the first subsection
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")][1:]  # after the header
    ran = [cells[1].split()[0] for cells in rows if "passed" in cells[-2]]
    assert ran, "the compatibility table reports no run"
    assert low == min(ran, key=_version)
