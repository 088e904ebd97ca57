"""Write the English locale (locales/en/nodeDefs.json, locales/en/main.json) from the pack's live node
schemas, as ComfyUI's /object_info gives them to the frontend, and list what the hand-written
translations (locales/<lang>/) lack.

Run it with the host's Python after changing a node's name, description, inputs, outputs, tooltips or
category, then translate what it lists:
    ~/.cache/astar-comfyui/venv/bin/python tools/make_locales.py           # or COMFYUI_ROOT=/path/to/ComfyUI
    ~/.cache/astar-comfyui/venv/bin/python tools/make_locales.py --check   # write nothing; exit 1 if stale

The files follow the frontend's keys: nodeDefs.<NodeId>.display_name / description /
inputs.<input>.name / .tooltip / outputs.<index>.name / .tooltip, and main.json's
nodeCategories.<segment of the category path>."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
LOCALES = PACK_DIR / "locales"
DEFAULT_ROOT = Path(os.environ.get("ASTAR_HOME", Path.home() / ".cache" / "astar-comfyui")) / "ComfyUI"


def live_node_infos(comfy_root: Path) -> dict[str, dict]:
    """{node id: the node's /object_info entry} for every node of the pack, loaded by ComfyUI's own
    custom-node loader."""
    sys.path.insert(0, str(comfy_root))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # reading schemas needs no device
    import nodes
    if not asyncio.run(nodes.load_custom_node(str(PACK_DIR))):
        raise SystemExit("the pack failed to load into ComfyUI (see the log above)")
    module = f"custom_nodes.{PACK_DIR.name}"
    return {node_id: cls.GET_NODE_INFO_V1() for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", None) == module}


def english_locale(infos: dict[str, dict]) -> tuple[dict, dict]:
    """(nodeDefs, main) for English: the schemas' own texts."""
    defs, categories = {}, {}
    for node_id, info in infos.items():
        inputs = {}
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                entry = {"name": options.get("display_name") or name}
                if options.get("tooltip"):
                    entry["tooltip"] = options["tooltip"]
                inputs[name] = entry
                if options.get("control_after_generate"):  # the frontend adds this widget after the seed
                    inputs["control_after_generate"] = {"name": "control after generate"}
        outputs = {}
        tooltips = info.get("output_tooltips") or []
        for i, name in enumerate(info["output_name"]):
            outputs[str(i)] = {"name": name}
            if i < len(tooltips) and tooltips[i]:
                outputs[str(i)]["tooltip"] = tooltips[i]
        defs[node_id] = {"display_name": info["display_name"], "description": info["description"],
                         "inputs": inputs, "outputs": outputs}
        for segment in info["category"].split("/"):
            categories[segment] = segment
    return defs, {"nodeCategories": categories}


def key_paths(tree, prefix=()) -> set[tuple[str, ...]]:
    """Every leaf's key path of a nested dict."""
    if not isinstance(tree, dict):
        return {prefix}
    return set().union(*(key_paths(v, prefix + (k,)) for k, v in tree.items())) if tree else set()


def translation_gaps(english: dict, other: dict) -> tuple[list[str], list[str]]:
    """(keys the translation lacks, keys it has that English has not), as dotted paths."""
    a, b = key_paths(english), key_paths(other)
    return sorted(".".join(k) for k in a - b), sorted(".".join(k) for k in b - a)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_ROOT", str(DEFAULT_ROOT)),
                    help="ComfyUI's folder (default: $COMFYUI_ROOT or tools/setup.sh's host)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 when a file is stale")
    args = ap.parse_args()
    defs, main_json = english_locale(live_node_infos(Path(args.comfyui)))
    stale = False
    for name, data in (("nodeDefs.json", defs), ("main.json", main_json)):
        path = LOCALES / "en" / name
        current = json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
        if current != data:
            stale = True
            print(f"{path.relative_to(PACK_DIR)}: {'stale' if args.check else 'written'}")
            if not args.check:
                write_json(path, data)
        for lang_dir in sorted(p for p in LOCALES.iterdir() if p.is_dir() and p.name != "en"):
            other = lang_dir / name
            missing, extra = translation_gaps(data, json.loads(other.read_text(encoding="utf-8"))
                                              if other.exists() else {})
            for key in missing:
                print(f"{other.relative_to(PACK_DIR)}: translate {key}")
            for key in extra:
                print(f"{other.relative_to(PACK_DIR)}: remove {key} (no longer in the schema)")
            stale = stale or bool(missing or extra)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
