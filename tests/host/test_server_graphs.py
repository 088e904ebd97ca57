"""A-STAR with a LoRA and a ControlNet in one graph, through the server."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from support import host as hosts
from support.graphs import sd15_graph

LORA = "astar-test-lora-mini.safetensors"
CONTROLNET = "astar-test-controlnet-mini.safetensors"


@pytest.fixture(scope="module")
def lora_and_controlnet(host):
    from support.models import build_sd15_controlnet, build_sd15_lora
    build_sd15_lora(hosts.models_dir() / "loras" / LORA, layout="mini", seed=1)
    build_sd15_controlnet(hosts.models_dir() / "controlnet" / CONTROLNET, layout="mini", seed=2)
    return LORA, CONTROLNET


def _image(server, entry, node="save"):
    meta = entry["outputs"][node]["images"][0]
    png = server.get(f"/view?filename={meta['filename']}&type=output&subfolder={meta['subfolder']}", raw=True)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def test_lora_and_controlnet_with_astar_ksampler(server, mini_ckpt, lora_and_controlnet):
    lora, controlnet = lora_and_controlnet
    plain = _image(server, server.run(sd15_graph(mini_ckpt, steps=3, guided_steps=2, seed=5)))
    g = sd15_graph(mini_ckpt, steps=3, guided_steps=2, seed=5)
    g["lora"] = {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": lora,
                                                         "strength_model": 1.0, "strength_clip": 1.0}}
    g["pos"]["inputs"]["clip"] = ["lora", 1]
    g["neg"]["inputs"]["clip"] = ["lora", 1]
    g["cn"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}}
    g["hint"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xFF8000}}
    g["apply"] = {"class_type": "ControlNetApplyAdvanced",
                  "inputs": {"positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cn", 0],
                             "image": ["hint", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    g["sampler"]["inputs"].update({"model": ["lora", 0], "positive": ["apply", 0], "negative": ["apply", 1]})
    g["report"] = {"class_type": "AStarAttentionOverlay",
                   "inputs": {"attention": ["sampler", 1], "image": ["decode", 0], "step_start": 0, "step_end": -1,
                              "layers": "", "normalization": "per_concept", "colormap": "jet", "opacity": 0.5}}
    g["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["report", 5]}}
    entry = server.run(g)
    image = _image(server, entry)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert np.abs(image - plain).max() > 0, "LoRA + ControlNet changed nothing"
    report = " ".join(str(t) for t in entry["outputs"]["show"]["text"])
    assert "segregation" in report and "cat" in report and "frog" in report, report[:2000]
