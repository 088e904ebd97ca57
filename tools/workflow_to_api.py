#!/usr/bin/env python3
"""Convert a ComfyUI workflow in the UI (LiteGraph) format to the API ("prompt") format.

The UI format is what the frontend saves and what ``example_workflows/*.json`` hold: ``nodes``
with ``widgets_values`` (a list in widget order) and ``links`` ``[id, from_node, from_slot,
to_node, to_slot, type]``. The server only runs the API format: ``{node_id: {"class_type",
"inputs": {name: value | [from_node_id, output_index]}}}``. The frontend converts on "Queue";
this module does the same for headless runs, using the node definitions of ``/object_info``
(from a running server, or a JSON file saved from it).

What it does, as the frontend (1.32) does:

* widget values are matched to the definition's widget inputs in ``input_order``
  (INT, FLOAT, STRING, BOOLEAN and COMBO inputs without ``forceInput``); the extra
  "control after generate" entry (``fixed``/``increment``/``decrement``/``randomize``) that
  follows a seed-like INT (``control_after_generate``, or an INT named ``seed``/``noise_seed``)
  and the upload button value after an image/video/audio upload combo are skipped;
* a widget converted to an input (its slot has ``"widget": {"name": ...}`` and a link) takes the
  link; a link from a ``PrimitiveNode`` gives that node's value;
* ``Reroute`` nodes are followed, ``Note``/``MarkdownNote`` and other frontend-only nodes are
  dropped;
* bypassed nodes (mode 4) are dropped and each link through one is passed on to the bypassed
  node's input of the same type (the input at the output's index if it fits, else the first
  input of that type); muted nodes (mode 2) are dropped with every input that links to them;
* a node type that is not in ``object_info`` raises :class:`UnknownNodeTypes` naming every
  missing type (install the custom nodes that provide them).

Usage::

    python tools/workflow_to_api.py example_workflows/astar_sd15.json --url http://127.0.0.1:8188
    python tools/workflow_to_api.py WORKFLOW.json --object-info object_info.json -o prompt.json
    python tools/workflow_to_api.py WORKFLOW.json --url URL --queue       # convert and queue it

    from workflow_to_api import convert
    prompt = convert(json.load(open(path)), object_info)
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

__all__ = ["convert", "validate", "missing_required_inputs", "fetch_object_info", "widget_inputs",
           "ConversionError", "UnknownNodeTypes",
           "CONTROL_VALUES", "MODE_ALWAYS", "MODE_NEVER", "MODE_BYPASS"]

MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
# Values of the frontend's "control after generate" widget (and the legacy booleans).
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap", True, False}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload", "upload")
SEED_NAMES = ("seed", "noise_seed")
# Combo inputs naming model files: a workflow names the user's files, which a given host may lack.
MODEL_FILE_INPUTS = ("ckpt_name", "lora_name", "control_net_name", "vae_name", "unet_name", "clip_name",
                     "clip_name1", "clip_name2", "clip_name3", "model_name", "upscale_model_name", "image")
# Nodes that exist only in the frontend: never sent to the server.
REROUTE_TYPES = {"Reroute"}
PRIMITIVE_TYPES = {"PrimitiveNode"}
FRONTEND_ONLY_TYPES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "Label (rgthree)",
                       "Fast Groups Bypasser (rgthree)", "Fast Groups Muter (rgthree)"}


class ConversionError(ValueError):
    """The workflow cannot be converted (bad structure, a value missing, a dangling link)."""


class UnknownNodeTypes(ConversionError):
    """Node types the server does not know (custom nodes not installed)."""

    def __init__(self, missing: dict[str, list[str]]):
        self.missing = missing
        listing = "; ".join(f"{t} (node{'s' if len(ids) > 1 else ''} {', '.join(ids)})"
                            for t, ids in sorted(missing.items()))
        super().__init__(f"unknown node type{'s' if len(missing) > 1 else ''}: {listing}. The server's "
                         "/object_info has no such node: install the custom nodes that provide "
                         f"{'them' if len(missing) > 1 else 'it'}, then restart ComfyUI.")


# ------------------------------------------------------------------------------------------------
# Node definitions
# ------------------------------------------------------------------------------------------------

def _input_specs(definition: dict) -> list[tuple[str, Any, dict]]:
    """(name, type, options) of every required and optional input, in the definition's order."""
    inputs = definition.get("input", {}) or {}
    order = definition.get("input_order") or {}
    out = []
    for section in ("required", "optional"):
        specs = inputs.get(section) or {}
        names = order.get(section) or list(specs)
        for name in names:
            spec = specs.get(name)
            if spec is None:
                continue
            if not isinstance(spec, (list, tuple)) or not spec:
                spec = [spec]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, spec[0], opts))
    return out


def _is_widget(type_, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(type_, (list, tuple)) or type_ in WIDGET_TYPES


def _is_combo(type_) -> bool:
    return isinstance(type_, (list, tuple)) or type_ == "COMBO"


def widget_inputs(definition: dict) -> list[tuple[str, int]]:
    """Widget input names in widget order, each with the number of extra frontend-only entries
    that follow its value in ``widgets_values`` (control after generate, upload button)."""
    out = []
    for name, type_, opts in _input_specs(definition):
        if not _is_widget(type_, opts):
            continue
        extra = 0
        control = opts.get("control_after_generate")
        if type_ == "INT" and (control if control is not None else name in SEED_NAMES):
            extra += 1
        elif _is_combo(type_) and control:
            extra += 1
        if _is_combo(type_) and any(opts.get(k) for k in UPLOAD_OPTIONS):
            extra += 1
        out.append((name, extra))
    return out


def _assign_widget_values(node: dict, definition: dict) -> dict[str, Any]:
    """{input name: value} from a node's widgets_values."""
    values = node.get("widgets_values")
    widgets = widget_inputs(definition)
    if values is None:
        return {}
    if isinstance(values, dict):  # some nodes save their widgets by name
        return {name: values[name] for name, _ in widgets if name in values}
    values = list(values)
    out = {}
    full = sum(1 + extra for _, extra in widgets)
    if len(values) >= full:
        # Every extra entry present: take them positionally.
        i = 0
        for name, extra in widgets:
            out[name] = values[i]
            i += 1 + extra
        return out
    # Older saves may lack the control entries: skip an extra entry only when it looks like one.
    i = 0
    for name, extra in widgets:
        if i >= len(values):
            break
        out[name] = values[i]
        i += 1
        for _ in range(extra):
            if i < len(values) and isinstance(values[i], (str, bool)) and \
                    (values[i] in CONTROL_VALUES or values[i] in ("image", "video", "audio")):
                i += 1
    return out


# ------------------------------------------------------------------------------------------------
# Links
# ------------------------------------------------------------------------------------------------

def _links(workflow: dict) -> dict[int, dict]:
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            lid = link.get("id")
            entry = {"origin_id": link.get("origin_id"), "origin_slot": link.get("origin_slot"),
                     "target_id": link.get("target_id"), "target_slot": link.get("target_slot"),
                     "type": link.get("type")}
        else:
            if len(link) < 5:
                raise ConversionError(f"malformed link {link!r}: expected [id, from_node, from_slot, to_node, "
                                      "to_slot, type]")
            lid = link[0]
            entry = {"origin_id": link[1], "origin_slot": link[2], "target_id": link[3], "target_slot": link[4],
                     "type": link[5] if len(link) > 5 else None}
        out[lid] = entry
    return out


def _types_match(a, b) -> bool:
    """The frontend's connection rule: equal, a wildcard, or comma-separated lists that share one."""
    if a in (None, "", "*") or b in (None, "", "*"):
        return True
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return True  # combo values
    sa = {t.strip().upper() for t in str(a).split(",")}
    sb = {t.strip().upper() for t in str(b).split(",")}
    return bool(sa & sb)


class _Resolver:
    _MISSING = object()

    def __init__(self, workflow: dict):
        if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
            raise ConversionError("not a UI-format workflow: expected a JSON object with a 'nodes' list "
                                  "(an API-format prompt needs no conversion)")
        self.nodes = {str(n["id"]): n for n in workflow["nodes"]}
        self.links = _links(workflow)

    def input_link(self, node: dict, slot: int):
        inputs = node.get("inputs") or []
        if not 0 <= slot < len(inputs):
            return None
        lid = inputs[slot].get("link")
        if lid is None:
            return None
        link = self.links.get(lid)
        if link is None:
            raise ConversionError(f"node {node['id']} ({node.get('type')}) input "
                                  f"{inputs[slot].get('name')!r} names link {lid}, which the workflow lacks")
        return link

    def resolve_link(self, link: dict, wanted_type, seen=None):
        """What a link carries after Reroute, PrimitiveNode and bypass: ("link", node_id, slot),
        ("value", v) or None (nothing: a muted origin or an unconnected bypass)."""
        seen = set() if seen is None else seen
        origin = self.nodes.get(str(link["origin_id"]))
        if origin is None:
            raise ConversionError(f"a link comes from node {link['origin_id']}, which the workflow lacks")
        key = (str(origin["id"]), link["origin_slot"])
        if key in seen:
            raise ConversionError(f"circular links through node {origin['id']} ({origin.get('type')})")
        seen.add(key)
        mode = origin.get("mode", MODE_ALWAYS)
        otype = origin.get("type")
        if otype in PRIMITIVE_TYPES:
            values = origin.get("widgets_values") or []
            return ("value", values[0]) if values else None
        if mode == MODE_NEVER:
            return None
        if mode == MODE_BYPASS:
            slot = self._bypass_input(origin, link["origin_slot"], wanted_type)
            if slot is None:
                return None
            upstream = self.input_link(origin, slot)
            return None if upstream is None else self.resolve_link(upstream, wanted_type, seen)
        if otype in REROUTE_TYPES:
            upstream = self.input_link(origin, 0)
            return None if upstream is None else self.resolve_link(upstream, wanted_type, seen)
        return ("link", str(origin["id"]), int(link["origin_slot"]))

    @staticmethod
    def _bypass_input(node: dict, out_slot: int, wanted_type):
        inputs = node.get("inputs") or []
        if not inputs:
            return None
        outputs = node.get("outputs") or []
        out_type = outputs[out_slot].get("type") if 0 <= out_slot < len(outputs) else wanted_type
        if wanted_type in (None, "", "*"):
            return out_slot if len(inputs) > out_slot else 0
        if out_slot < len(inputs) and _types_match(inputs[out_slot].get("type"), out_type) \
                and _types_match(inputs[out_slot].get("type"), wanted_type):
            return out_slot
        for i, inp in enumerate(inputs):
            if inp.get("type") == wanted_type:
                return i
        for i, inp in enumerate(inputs):
            if _types_match(inp.get("type"), out_type) and _types_match(inp.get("type"), wanted_type):
                return i
        return None


# ------------------------------------------------------------------------------------------------
# Conversion
# ------------------------------------------------------------------------------------------------

def convert(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI-format workflow. ``object_info`` is the server's
    ``/object_info`` (all nodes), or a dict holding at least the workflow's node types."""
    res = _Resolver(workflow)
    active = [n for n in workflow["nodes"]
              if n.get("mode", MODE_ALWAYS) not in (MODE_NEVER, MODE_BYPASS)
              and n.get("type") not in FRONTEND_ONLY_TYPES]
    subgraphs = {sg.get("id") for sg in ((workflow.get("definitions") or {}).get("subgraphs") or [])}
    missing: dict[str, list[str]] = {}
    for n in active:
        if n.get("type") not in object_info:
            missing.setdefault(str(n.get("type")), []).append(str(n["id"]))
    if missing:
        sub = [t for t in missing if t in subgraphs]
        if sub:
            raise ConversionError(f"the workflow uses subgraphs ({', '.join(sub)}), which this converter does "
                                  "not flatten: unpack them in the frontend (right click > Unpack Subgraph)")
        raise UnknownNodeTypes(missing)

    prompt: dict[str, dict] = {}
    for node in sorted(active, key=lambda n: (n.get("order", 0), str(n["id"]))):
        nid = str(node["id"])
        ntype = node["type"]
        definition = object_info[ntype]
        widget_values = _assign_widget_values(node, definition)
        slots = {}
        for i, inp in enumerate(node.get("inputs") or []):
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            slots.setdefault(name, (i, inp))
        inputs: dict[str, Any] = {}
        for name, type_, opts in _input_specs(definition):
            value = _Resolver._MISSING
            if name in slots:
                i, inp = slots[name]
                link = res.input_link(node, i)
                if link is not None:
                    wanted = inp.get("type") if not _is_combo(inp.get("type")) else "COMBO"
                    resolved = res.resolve_link(link, wanted)
                    if resolved is not None and resolved[0] == "link":
                        value = [resolved[1], resolved[2]]
                    elif resolved is not None:
                        value = resolved[1]
            if value is _Resolver._MISSING and name in widget_values:
                value = widget_values[name]
            if value is not _Resolver._MISSING:
                inputs[name] = value
        entry = {"class_type": ntype, "inputs": inputs}
        title = node.get("title") or definition.get("display_name") or ntype
        entry["_meta"] = {"title": title}
        prompt[nid] = entry
    # Links into nodes that were dropped (muted) leave dangling references: remove them.
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt


def missing_required_inputs(prompt: dict, object_info: dict) -> dict[str, list[str]]:
    """{node_id: [required input names the prompt lacks]}: a check that needs no execution."""
    out = {}
    for nid, entry in prompt.items():
        definition = object_info.get(entry["class_type"], {})
        required = (definition.get("input") or {}).get("required") or {}
        lacking = [name for name in required if name not in entry["inputs"]]
        if lacking:
            out[nid] = lacking
    return out


def validate(prompt: dict, object_info: dict, ignore_values: tuple[str, ...] = ()) -> list[str]:
    """Problems the server's validation would report, found without running anything: unknown
    node types, missing required inputs, links to absent nodes or outputs, link types that do not
    fit, combo values not offered, numbers out of range. ``ignore_values`` names inputs whose combo
    value is not checked (e.g. "ckpt_name": model files this host lacks). [] when all is well."""
    problems = []
    for nid, entry in prompt.items():
        ctype = entry.get("class_type")
        definition = object_info.get(ctype)
        if definition is None:
            problems.append(f"node {nid}: unknown node type {ctype}")
            continue
        specs = {name: (t, o) for name, t, o in _input_specs(definition)}
        required = (definition.get("input") or {}).get("required") or {}
        for name in required:
            if name not in entry["inputs"]:
                problems.append(f"node {nid} ({ctype}): required input {name!r} is missing")
        for name, value in entry["inputs"].items():
            if name not in specs:
                continue  # frontend-only widgets (e.g. PreviewAny's preview) are ignored by the server
            type_, opts = specs[name]
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
                origin = prompt.get(value[0])
                if origin is None:
                    problems.append(f"node {nid} ({ctype}): input {name!r} links to absent node {value[0]}")
                    continue
                outs = (object_info.get(origin["class_type"]) or {}).get("output") or []
                if value[1] >= len(outs):
                    problems.append(f"node {nid} ({ctype}): input {name!r} links to output {value[1]} of node "
                                    f"{value[0]} ({origin['class_type']}), which has {len(outs)} outputs")
                    continue
                out_type = outs[value[1]]
                in_type = "COMBO" if _is_combo(type_) else type_
                if not _types_match(out_type if not isinstance(out_type, list) else "COMBO", in_type):
                    problems.append(f"node {nid} ({ctype}): input {name!r} ({in_type}) links to a {out_type} output")
                continue
            if _is_combo(type_):
                options = type_ if isinstance(type_, (list, tuple)) else opts.get("options", [])
                if name not in ignore_values and value not in options:
                    problems.append(f"node {nid} ({ctype}): {name} = {value!r} is not one of its options")
            elif type_ in ("INT", "FLOAT"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                        (type_ == "INT" and not float(value).is_integer()):
                    problems.append(f"node {nid} ({ctype}): {name} = {value!r} is not a {type_}")
                    continue
                if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
                    problems.append(f"node {nid} ({ctype}): {name} = {value!r} is outside "
                                    f"[{opts.get('min')}, {opts.get('max')}]")
            elif type_ == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"node {nid} ({ctype}): {name} = {value!r} is not a BOOLEAN")
            elif type_ == "STRING" and not isinstance(value, str):
                problems.append(f"node {nid} ({ctype}): {name} = {value!r} is not a STRING")
    return problems


def fetch_object_info(url: str, timeout: float = 60) -> dict:
    """``/object_info`` of a running server (e.g. http://127.0.0.1:8188)."""
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=timeout) as r:
        return json.loads(r.read())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Convert a ComfyUI UI-format workflow to the API format.")
    ap.add_argument("workflow", help="UI-format workflow JSON (as the frontend saves it)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running ComfyUI server (its /object_info gives the node definitions)")
    src.add_argument("--object-info", help="a JSON file saved from a server's /object_info")
    ap.add_argument("-o", "--output", help="write the API prompt here (default: stdout)")
    ap.add_argument("--check", action="store_true",
                    help="also check the prompt against the definitions (required inputs, link types, combo "
                         "values except model files, ranges); exit 1 on a problem")
    ap.add_argument("--queue", action="store_true", help="also POST it to --url's /prompt and print the prompt id")
    args = ap.parse_args(argv)
    with open(args.workflow, encoding="utf-8") as f:
        workflow = json.load(f)
    if args.url:
        object_info = fetch_object_info(args.url)
    else:
        with open(args.object_info, encoding="utf-8") as f:
            object_info = json.load(f)
    try:
        prompt = convert(workflow, object_info)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        problems = validate(prompt, object_info, ignore_values=MODEL_FILE_INPUTS)
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
        if problems:
            return 1
    text = json.dumps(prompt, indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    elif not args.queue:
        print(text)
    if args.queue:
        if not args.url:
            ap.error("--queue needs --url")
        req = urllib.request.Request(args.url.rstrip("/") + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                print(json.loads(r.read())["prompt_id"])
        except urllib.error.HTTPError as e:
            print(f"error: the server refused the prompt ({e.code}): {e.read().decode(errors='replace')}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
