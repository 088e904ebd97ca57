"""What users see of the nodes: categories, search aliases, folded advanced inputs (where the ComfyUI
version can fold them), the empty `concepts` default, texts that say true things (the refused samplers),
and errors that name the widget (never an internal field) and list a combo's options. Errors are
tried as a new user would: API-format prompts through the executor, on the mini SD1.5 checkpoint."""
from __future__ import annotations

import dataclasses
import inspect
import math
import re

import pytest

from support import host as hosts
from support.graphs import sd15_graph

SEED = 7400  # added to every seed here: no graph of another test file is served from the executor's cache
NODES = ("AStarTextEncode", "AStarApply", "AStarKSampler", "AStarAttentionRecorder", "AStarAttentionOverlay")
CATEGORIES = {"AStarApply": "model_patches/astar", "AStarAttentionRecorder": "model_patches/astar",
              "AStarKSampler": "sampling", "AStarTextEncode": "conditioning", "AStarAttentionOverlay": "image/astar"}
# Inputs a first-time user needs; every other guidance input has the papers' default and folds away.
MAIN_GUIDANCE = {"model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative",
                 "latent_image", "denoise", "concepts", "mode", "guidance_start", "guidance_end", "step_size"}


def node_info(host, node):
    """What /object_info serves for the node."""
    return host.nodes.NODE_CLASS_MAPPINGS[node].GET_NODE_INFO_V1()


def inputs_of(info) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def host_can_fold() -> bool:
    from comfy_api.latest import io
    return "advanced" in inspect.signature(io.Float.Input.__init__).parameters


def host_has_aliases() -> bool:
    from comfy_api.latest import io
    return "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}


def run_error(host, g) -> hosts.GraphError:
    with pytest.raises(hosts.GraphError) as info:
        host.run(g)
    return info.value


def graph(ckpt, **kw):
    kw["seed"] = SEED + kw.get("seed", 0)
    kw.setdefault("steps", 1)
    kw.setdefault("guided_steps", 1)
    g = sd15_graph(ckpt, decode=False, **kw)
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return g


# ------------------------------------------------------------------------------------------------
# the schemas
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("node", NODES)
def test_category_and_search_aliases(host, node):
    info = node_info(host, node)
    assert info["category"] == CATEGORIES[node]
    if host_has_aliases():
        assert "astar" in info["search_aliases"], info.get("search_aliases")
    else:
        assert not info.get("search_aliases")


@pytest.mark.parametrize("node", ["AStarKSampler", "AStarApply"])
def test_advanced_inputs_fold_where_the_host_can(host, node):
    inputs = inputs_of(node_info(host, node))
    folded = {name for name, spec in inputs.items() if len(spec) > 1 and spec[1].get("advanced")}
    if host_can_fold():
        assert set(inputs) - folded == MAIN_GUIDANCE & set(inputs), folded
        assert {"attention_resolution", "joint_blocks", "single_pass", "layout_masks"} <= folded
    else:  # 0.3.75: the plain list, every input shown
        assert not folded


def test_overlay_folds_its_view_settings_and_is_an_output_node(host):
    info = node_info(host, "AStarAttentionOverlay")
    assert info["output_node"] is True
    inputs = inputs_of(info)
    folded = {name for name, spec in inputs.items() if len(spec) > 1 and spec[1].get("advanced")}
    assert folded == ({"step_start", "step_end", "layers", "normalization", "colormap", "opacity"}
                      if host_can_fold() else set())


@pytest.mark.parametrize("node", ["AStarKSampler", "AStarApply", "AStarAttentionRecorder"])
def test_concepts_are_empty_by_default_with_a_placeholder(host, node):
    spec = inputs_of(node_info(host, node))["concepts"][1]
    assert spec["default"] == "" and "cat, frog" in spec["placeholder"], spec


def refused_samplers() -> set[str]:
    """The KSampler samplers the pack refuses while guiding, found by asking its state prediction about each
    of ComfyUI's (on SD1.5's schedule, 4 "normal" steps, default options)."""
    import comfy.model_sampling
    import comfy.samplers
    steps = hosts.pack_module("nodes.sampler_steps")

    class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    sampling = Sampling(None)
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 4)
    refused = set()
    for name in comfy.samplers.KSampler.SAMPLERS:
        try:
            steps.predict_states(steps.function_name(comfy.samplers.sampler_object(name).sampler_function), sigmas,
                                 {}, sampling)
        except steps.StatesUnknown:
            refused.add(name)
    return refused


def test_texts_name_exactly_the_refused_samplers(host):
    """The texts that list the samplers refused while guiding name every KSampler sampler the prediction
    refuses and no other (the other names they give, SamplerLCMUpscale and s_churn, are not KSampler
    samplers)."""
    import comfy.samplers
    refused = refused_samplers()
    assert refused, "the prediction refuses no sampler: the texts would have nothing to name"
    ksampler = node_info(host, "AStarKSampler")
    texts = {"KSampler description": ksampler["description"],
             "sampler_name tooltip": inputs_of(ksampler)["sampler_name"][1]["tooltip"],
             "Apply description": node_info(host, "AStarApply")["description"]}
    for where, text in texts.items():
        listed = re.search(r"every sampler except (.*?): those are refused", text)
        assert listed, (where, text)
        named = set(re.findall(r"[a-z0-9_]+", listed.group(1))) & set(comfy.samplers.KSampler.SAMPLERS)
        assert named == refused, (where, named ^ refused, text)


def test_the_encoders_tooltip_names_every_family_it_serves(host):
    tooltip = inputs_of(node_info(host, "AStarTextEncode"))["clip"][1]["tooltip"]
    for family in ("SD1.x", "SDXL", "Flux.1", "SD3", "Chroma", "Flux.2 Klein", "Qwen-Image", "Z-Image"):
        assert family in tooltip, tooltip


# ------------------------------------------------------------------------------------------------
# errors, through the executor
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, expected", [
    ({"step_size": math.nan}, "step_size must be a finite number"),
    ({"guidance_start": 0.8, "guidance_end": 0.2}, "guidance_end (0.2) is before guidance_start (0.8)"),
    ({"mask_fraction": math.nan}, "mask_fraction must be a finite number"),
    ({"segregation_weight": math.nan}, "segregation_weight must be a finite number"),
    ({"refine_thresholds": "0:0.05, 0.2"}, "refine_thresholds: cannot read '0.2'"),
])
def test_config_errors_name_the_widget(host, mini_ckpt, settings, expected):
    err = run_error(host, graph(mini_ckpt, **settings))
    assert expected in str(err) and "GuidanceConfig" not in str(err), str(err)
    assert err.details.get("node_id") == "sampler", err.details


@pytest.mark.parametrize("widget, value, options", [
    ("attention_resolution", "1/7", ["1/32", "1/16", "1/8", "1/64"]),
    ("mode", "astra", ["astar", "attend_excite"]),
    ("binarization", "mean", ["fraction", "otsu"]),
    ("refine", "yes", ["auto", "on", "off"]),
])
def test_a_combo_value_outside_its_options_lists_them(host, mini_ckpt, widget, value, options):
    """ComfyUI 0.3.75 lets such values of V3 combos through its validation; the node refuses them.
    A host that refuses them itself must also name the widget and the options."""
    err = run_error(host, graph(mini_ckpt, **{widget: value}))
    msg = str(err)
    assert widget in msg and value in msg and all(o in msg for o in options), msg
    assert "GuidanceConfig" not in msg and msg.strip("' ") != value, msg


def test_an_overlay_combo_value_outside_its_options_lists_them(host):
    overlay = host.nodes.NODE_CLASS_MAPPINGS["AStarAttentionOverlay"]
    with pytest.raises(ValueError, match=r"colormap: 'rainbow' is not one of its options: .*jet"):
        overlay.execute(attention=None, image=None, colormap="rainbow")


PROMPT_WORDS = "a, cat, and, frog"  # the words of "a cat and a frog", each once


@pytest.mark.parametrize("concepts", ["", " , ", "#2"])
def test_empty_concepts_list_the_prompts_words(host, mini_ckpt, concepts):
    err = run_error(host, graph(mini_ckpt, concepts=concepts))
    assert f"The prompt's words: {PROMPT_WORDS}." in str(err) and "concepts is empty" in str(err), str(err)
    assert err.details.get("node_id") == "sampler", err.details


@pytest.mark.parametrize("node", ["AStarApply", "AStarAttentionRecorder"])
def test_empty_concepts_on_a_model_patch_stop_the_sampler_before_any_guidance(host, mini_ckpt, monkeypatch, node):
    """The patch learns the prompt when a sampler runs it: the stock KSampler stops there, with the words,
    before a single model call."""
    import comfy.samplers
    calls = []
    original = comfy.samplers.calc_cond_batch
    monkeypatch.setattr(comfy.samplers, "calc_cond_batch", lambda *a, **k: calls.append(1) or original(*a, **k))
    g = graph(mini_ckpt, sampler="KSampler", prompt="a red car and a Bear")
    inputs = {"model": ["ckpt", 0], "concepts": "", "attention_resolution": "1/16"}
    if node == "AStarApply":
        inputs.update({k: v for k, v in graph(mini_ckpt)["sampler"]["inputs"].items()
                       if k not in g["sampler"]["inputs"] and k not in inputs})
    g["patch"] = {"class_type": node, "inputs": inputs}
    g["sampler"]["inputs"]["model"] = ["patch", 0]
    err = run_error(host, g)
    assert "The prompt's words: a, red, car, and, Bear." in str(err), str(err)
    assert err.details.get("node_id") == "sampler", err.details
    assert not calls


def test_attention_resolution_on_a_joint_model_is_refused_unless_left_at_its_default(host, mini_ckpt, monkeypatch):
    """attention_resolution does nothing on Flux.1/SD3.5 (they read joint_blocks): another value than its
    default is refused rather than ignored. The mini UNet stands in for a Flux model here; the check comes
    before anything of the family is read."""
    families = hosts.pack_module("nodes.model_family")
    monkeypatch.setattr(hosts.pack_module("nodes.readers"), "joint_family",
                        lambda model: families.JOINT_FAMILY_TABLE["flux"])
    err = run_error(host, graph(mini_ckpt, resolution="1/16", seed=1))
    assert "attention_resolution ('1/16') is for SD1.x/SD2.x/SDXL UNet models" in str(err), str(err)
    assert "joint_blocks" in str(err) and "1/32" in str(err), str(err)
