"""Graphs built from methods.json and the example workflows, checked against a server's /object_info."""
from __future__ import annotations

import pytest

from benchmarks.ae_eval import graphs

from .conftest import SMALL

JOB = {"method": "m", "prompt": "a lion and a blue clock", "concepts": ["lion", "clock"], "slug": "a_lion",
       "seed": 7}


def classes(graph):
    return sorted(n["class_type"] for n in graph.values())


def node(graph, class_type):
    (found,) = [n for n in graph.values() if n["class_type"] == class_type]
    return found


def test_plain_is_the_stock_ksampler_without_the_recorder(object_info):
    t = graphs.method_template("plain", graphs.load_methods()["plain"], object_info, overlays=False)
    g = graphs.job_graph(t, JOB, SMALL)
    assert classes(g) == sorted(["CheckpointLoaderSimple", "AStarTextEncode", "CLIPTextEncode", "EmptyLatentImage",
                                 "KSampler", "VAEDecode", "SaveImage"])
    loader = next(k for k, n in g.items() if n["class_type"] == "CheckpointLoaderSimple")
    assert node(g, "KSampler")["inputs"]["model"] == [loader, 0]
    assert node(g, "KSampler")["inputs"]["seed"] == 7 and node(g, "KSampler")["inputs"]["steps"] == 3
    assert node(g, "AStarTextEncode")["inputs"]["text"] == JOB["prompt"]
    assert node(g, "EmptyLatentImage")["inputs"] == {"width": 64, "height": 64, "batch_size": 1}
    graphs.check_graph(g, object_info, "plain")
    with_overlays = graphs.method_template("plain", graphs.load_methods()["plain"], object_info, overlays=True)
    assert {"AStarAttentionRecorder", "AStarAttentionOverlay"} <= set(classes(with_overlays["graph"]))


@pytest.mark.parametrize("method, mode", [("astar", "astar"), ("attend_excite", "attend_excite")])
def test_guided_methods_set_their_mode_and_the_job(object_info, method, mode):
    t = graphs.method_template(method, graphs.load_methods()[method], object_info, overlays=False)
    g = graphs.job_graph(t, JOB, SMALL)
    sampler = node(g, "AStarKSampler")["inputs"]
    assert (sampler["mode"], sampler["concepts"], sampler["seed"]) == (mode, "lion, clock", 7)
    assert (sampler["guidance_end"], sampler["attention_resolution"]) == (0.5, "1/16")
    assert "AStarAttentionOverlay" not in classes(g)
    assert g[t["image_node"]]["class_type"] == "SaveImage"
    graphs.check_graph(g, object_info, method)


@pytest.mark.parametrize("inputs, message", [
    ({"AStarKSampler": {"guided_stepz": 3}}, r"AStarKSampler\.guided_stepz.*its inputs are: .*concepts"),
    ({"NoSuchNode": {"x": 1}}, "does not have: install or update"),
    ({"KSamplerAdvanced": {"cfg": 1}}, "its workflow has no such node"),
])
def test_a_method_naming_what_the_server_lacks_is_refused(object_info, inputs, message):
    method = {"workflow": "astar_sd15", "inputs": inputs}
    with pytest.raises(graphs.MethodError, match=message):
        graphs.method_template("custom", method, object_info, overlays=False)


def test_a_setting_no_graph_has_is_refused(object_info):
    t = {"x": graphs.method_template("plain", graphs.load_methods()["plain"], object_info, overlays=False)}
    graphs.check_settings({"inputs": {"cfg": 5.0}}, t)
    with pytest.raises(graphs.MethodError, match="no node of any method's graph has an input 'guidance_scale'"):
        graphs.check_settings({"inputs": {"guidance_scale": 5.0}}, t)


def test_a_value_out_of_range_is_reported_before_sending(object_info):
    t = graphs.method_template("astar", graphs.load_methods()["astar"], object_info, overlays=False)
    g = graphs.job_graph(t, JOB, {"size": 64, "inputs": {"steps": -1}})
    with pytest.raises(graphs.MethodError, match="steps = -1 is outside"):
        graphs.check_graph(g, object_info, "astar")
