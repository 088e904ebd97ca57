"""API-format graphs for the sweep's jobs, built generically from example workflows.

A method (methods.json) names a workflow and the node inputs it sets. ``method_template`` turns it
into an API graph for one server (converted with that server's /object_info, the method's inputs
set and checked), ``job_graph`` fills in one job: the prompt goes to the node feeding every
sampler's ``positive``; concepts, seed and steps to every input of those names; size to
EmptyLatentImage; the checkpoint to ckpt_name. Graphs are pruned to what their outputs need: the
image only, or the image and every other output for jobs that keep attention overlays."""
from __future__ import annotations

import copy
import json
from pathlib import Path

from tools.workflow_to_api import _input_specs, convert, validate

PACK_DIR = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = PACK_DIR / "example_workflows"
DEFAULT_METHODS = Path(__file__).resolve().parent / "methods.json"
SEED_INPUTS = ("seed", "noise_seed")
LATENT_NODES = ("EmptyLatentImage",)
DECODERS = ("VAEDecode", "VAEDecodeTiled")


class MethodError(ValueError):
    """A method or setting that does not fit the workflow or the server's nodes."""


def load_methods(path: str | Path = DEFAULT_METHODS) -> dict[str, dict]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    methods = {k: v for k, v in data.items() if not k.startswith("_")}
    for name, m in methods.items():
        if not isinstance(m, dict) or not isinstance(m.get("workflow"), str) or \
                not isinstance(m.get("inputs", {}), dict):
            raise MethodError(f"{path}: method {name!r} needs a 'workflow' name and an 'inputs' object "
                              "{node class: {input: value}}")
    return methods


def load_workflow(name: str) -> dict:
    """A workflow by example name (example_workflows/<name>.json) or path."""
    path = Path(name)
    if not path.is_file():
        path = EXAMPLES_DIR / f"{name}.json"
    if not path.is_file():
        raise MethodError(f"no workflow {name!r}: give a name from {EXAMPLES_DIR} or a path to a JSON file")
    return json.loads(path.read_text(encoding="utf-8"))


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def input_names(object_info: dict, class_type: str) -> list[str]:
    return [name for name, _, _ in _input_specs(object_info[class_type])]


def check_inputs(method: str, sets: dict[str, dict], graph: dict, object_info: dict) -> None:
    """Every node class a method sets is in the server's nodes and the method's graph, with that input."""
    present = {n["class_type"] for n in graph.values()}
    for class_type, values in sets.items():
        if class_type not in object_info:
            raise MethodError(f"method {method!r} sets inputs of {class_type}, which this server does not have: "
                              "install or update the custom nodes that provide it, or edit the method")
        if class_type not in present:
            raise MethodError(f"method {method!r} sets inputs of {class_type}, but its workflow has no such node "
                              f"(it has: {', '.join(sorted(present))})")
        known = input_names(object_info, class_type)
        unknown = [k for k in values if k not in known]
        if unknown:
            raise MethodError(f"method {method!r} sets {class_type}.{', '.join(unknown)}, which this server's "
                              f"{class_type} does not have; its inputs are: {', '.join(known)}. Update the method "
                              f"(benchmarks/ae_eval/methods.json or --set)")


def apply_inputs(graph: dict, sets: dict[str, dict]) -> None:
    for node in graph.values():
        node["inputs"].update(sets.get(node["class_type"], {}))


def bypass(graph: dict, class_types, object_info: dict) -> dict:
    """The graph without nodes of these classes: a link from one goes to its input of the same type;
    a link from an output no input matches (e.g. a recording) is removed, so only the nodes that
    prune() drops may use it (check_graph reports any other)."""
    out = copy.deepcopy(graph)
    for nid in [n for n, node in out.items() if node["class_type"] in class_types]:
        node = out.pop(nid)
        definition = object_info[node["class_type"]]
        specs = {name: t for name, t, _ in _input_specs(definition)}
        for other in out.values():
            for name, value in list(other["inputs"].items()):
                if is_link(value) and value[0] == nid:
                    wanted = definition["output"][value[1]]
                    source = next((node["inputs"][k] for k, t in specs.items()
                                   if t == wanted and is_link(node["inputs"].get(k))), None)
                    if source is None:
                        del other["inputs"][name]
                    else:
                        other["inputs"][name] = source
    return out


def ancestors(graph: dict, roots) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        nid = todo.pop()
        if nid not in seen:
            seen.add(nid)
            todo += [v[0] for v in graph[nid]["inputs"].values() if is_link(v)]
    return seen


def output_nodes(graph: dict, object_info: dict) -> list[str]:
    return sorted(n for n, node in graph.items() if object_info[node["class_type"]].get("output_node"))


def image_node(graph: dict, object_info: dict) -> str:
    """The output node saving the decoded image (the one the metrics score)."""
    found = [n for n in output_nodes(graph, object_info)
             if is_link(graph[n]["inputs"].get("images"))
             and graph[graph[n]["inputs"]["images"][0]]["class_type"] in DECODERS]
    if len(found) != 1:
        raise MethodError(f"the workflow must have exactly one output node saving a decoded image; found "
                          f"{len(found)} ({', '.join(graph[n]['_meta']['title'] for n in found) or 'none'})")
    return found[0]


def prune(graph: dict, keep) -> dict:
    return {n: node for n, node in graph.items() if n in ancestors(graph, keep)}


def positive_encoders(graph: dict) -> list[str]:
    """Nodes whose output feeds a 'positive' input (the prompt's encoder)."""
    return sorted({node["inputs"]["positive"][0] for node in graph.values() if is_link(node["inputs"].get("positive"))})


def method_template(name: str, method: dict, object_info: dict, overlays: bool) -> dict:
    """{"graph", "image_node"} of a method on a server, before any job's values."""
    workflow = load_workflow(method["workflow"])
    graph = workflow if "nodes" not in workflow else convert(workflow, object_info)
    check_inputs(name, method.get("inputs", {}), graph, object_info)
    apply_inputs(graph, method.get("inputs", {}))
    if not overlays:
        graph = bypass(graph, set(method.get("overlay_only", [])), object_info)
    image = image_node(graph, object_info)
    graph = prune(graph, output_nodes(graph, object_info) if overlays else [image])
    if not positive_encoders(graph):
        raise MethodError(f"method {name!r}: its workflow has no sampler with a 'positive' input")
    return {"graph": graph, "image_node": image}


def set_everywhere(graph: dict, name: str, value) -> int:
    """Sets an input on every node that has it; returns how many nodes it set."""
    count = 0
    for node in graph.values():
        if name in node["inputs"] and not is_link(node["inputs"][name]):
            node["inputs"][name] = value
            count += 1
    return count


def job_graph(template: dict, job: dict, settings: dict) -> dict:
    """The API graph of one job: the template with the job's prompt, concepts and seed and the sweep's
    settings (steps, size, ckpt and the other 'input' = value settings on every node having it)."""
    graph = copy.deepcopy(template["graph"])
    for nid in positive_encoders(graph):
        graph[nid]["inputs"]["text"] = job["prompt"]
    set_everywhere(graph, "concepts", ", ".join(job["concepts"]))
    for name in SEED_INPUTS:
        set_everywhere(graph, name, job["seed"])
    for name, value in settings.get("inputs", {}).items():
        set_everywhere(graph, name, value)
    for node in graph.values():
        if node["class_type"] in LATENT_NODES and settings.get("size"):
            node["inputs"].update(width=settings["size"], height=settings["size"], batch_size=1)
        if "filename_prefix" in node["inputs"]:
            node["inputs"]["filename_prefix"] = f"ae_eval/{job['method']}/{job['slug']}_s{job['seed']}"
    return graph


def check_graph(graph: dict, object_info: dict, method: str) -> None:
    problems = validate(graph, object_info)
    if problems:
        raise MethodError(f"method {method!r} does not fit this server:\n  " + "\n  ".join(problems))


def check_settings(settings: dict, templates: dict[str, dict]) -> None:
    """Every 'input' = value setting names an input some method's graph has."""
    for name in settings.get("inputs", {}):
        if not any(name in node["inputs"] for t in templates.values() for node in t["graph"].values()):
            raise MethodError(f"--set {name}=...: no node of any method's graph has an input {name!r}")
