"""How the pack's inputs look in ComfyUI, across versions: keyword arguments of the V3 schema that only
newer ComfyUIs accept are passed where the running one accepts them (capability, not version), and
combo values are checked against their options (API prompts can send others past ComfyUI 0.3.75)."""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io


def fold_advanced(inputs: list, names) -> list:
    """The inputs, those named folded among the node's advanced inputs where ComfyUI can fold them
    (0.19: an Input's `advanced` flag); elsewhere (0.3.75, no such flag) shown as any other."""
    for spec in inputs:
        if spec.id in names and hasattr(spec, "advanced"):
            spec.advanced = True
    return inputs


def schema(**fields) -> io.Schema:
    """io.Schema(**fields), leaving out search_aliases where the running ComfyUI's Schema has no such field."""
    known = {f.name for f in dataclasses.fields(io.Schema)}
    if "search_aliases" not in known:
        fields.pop("search_aliases", None)
    return io.Schema(**fields)


def check_options(inputs, values: dict) -> None:
    """Raises an error naming the widget and listing its options for a combo value outside them."""
    for spec in inputs:
        if isinstance(spec, io.Combo.Input) and spec.id in values and values[spec.id] not in spec.options:
            raise ValueError(f"{spec.id}: {values[spec.id]!r} is not one of its options: "
                             f"{', '.join(map(str, spec.options))}")
