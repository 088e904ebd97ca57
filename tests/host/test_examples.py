"""example_workflows/*.json: converted with the server's /object_info and run through the server on
the random-weight test models; plus unit tests of the converter (tools/workflow_to_api.py)."""
from __future__ import annotations

import io
import json

import pytest

from support import host as hosts
from tools.run_example import (MINI_CONTROLNET, MINI_LORA, adapt_prompt, guidance_window, main as run_example_main,
                               output_files, texts, view_url)
from tools.workflow_to_api import (MODEL_FILE_INPUTS, ConversionError, UnknownNodeTypes, convert,
                                   missing_required_inputs, validate, widget_inputs)

EXAMPLES_DIR = hosts.PACK_DIR / "example_workflows"
EXAMPLES = sorted(p.stem for p in EXAMPLES_DIR.glob("*.json"))
EXPECTED = {"astar_sd15", "astar_vs_plain", "astar_lora", "astar_controlnet", "astar_sdxl", "astar_custom_sampler",
            "astar_apply_ksampler_advanced", "record_only", "astar_flux", "astar_sd35"}
# Flux.1 / SD3.5 / Chroma examples: run headless on the random DiT models in tests/host/test_joint_attention.py and
# tests/host/test_joint_families.py, tests/host/test_qwen_image.py, tests/host/test_zimage.py
DIT_EXAMPLES = ("astar_flux", "astar_sd35", "astar_chroma", "astar_flux2_klein", "astar_qwen_image", "astar_zimage")
GUIDING = ("AStarKSampler", "AStarApply")  # the nodes with the guidance window
# The examples' window is 0 to 0.5 of the model's noise schedule. Of 4 steps it guides steps 0 and 1: with the
# "normal" scheduler step i sits at i/3 (0 and 1/3 < 0.5 <= 2/3); astar_custom_sampler's karras sigmas (14.6, 3.2,
# 0.45, 0.03 on SD1.5's schedule) put two states above the sigma at 0.5 (1.6). (3 steps would guide only step 0.)
SIZE, STEPS, GUIDED = 64, 4, 2
CONCEPTS = 2  # "cat, frog" in every example
TIMELINE_CELL = 64  # pixels per recorded step in the overlay's timeline (nodes/overlay.py)
# The overlay's IMAGE outputs, by index: (name, images per run, square at the run's size?)
OVERLAY_OUTPUTS = {0: ("heatmaps", CONCEPTS, True), 1: ("combined", 1, True), 2: ("timeline", 1, False),
                   3: ("overlap", CONCEPTS * (CONCEPTS - 1) // 2, True), 4: ("loss_plot", 1, False)}


def load(name: str) -> dict:
    return json.loads((EXAMPLES_DIR / f"{name}.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------------
# The examples on the real server
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def object_info(server, test_models):
    """Read after the test models exist: /object_info lists the model files as combo options."""
    return server.get("/object_info")


@pytest.fixture(scope="module")
def test_models(mini_ckpt):
    """The random-weight LoRA and ControlNet for the mini layout, in the folders the server reads."""
    from support import models
    m = hosts.models_dir()
    models.build_sd15_lora(m / "loras" / MINI_LORA, layout="mini", seed=0)
    models.build_sd15_controlnet(m / "controlnet" / MINI_CONTROLNET, layout="mini", seed=0)
    return {"ckpt": mini_ckpt, "lora": MINI_LORA, "controlnet": MINI_CONTROLNET}


def test_every_example_is_there_with_a_thumbnail():
    assert EXPECTED <= set(EXAMPLES), f"missing examples: {EXPECTED - set(EXAMPLES)}"
    for name in EXAMPLES:
        wf = load(name)
        assert wf.get("version") == 0.4 and wf["nodes"] and isinstance(wf["links"], list), name
        thumb = EXAMPLES_DIR / f"{name}.png"
        assert thumb.exists(), f"{name}: no thumbnail {thumb.name}"
        data = thumb.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000, f"{thumb.name}: not a PNG under 200 KB"
        # The templates dialog of ComfyUI's frontend (1.32) asks for <name>.jpg: ship both.
        jpg = (EXAMPLES_DIR / f"{name}.jpg").read_bytes()
        assert jpg[:3] == b"\xff\xd8\xff" and len(jpg) < 200_000, f"{name}.jpg: not a JPEG under 200 KB"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_converts_and_validates(object_info, name):
    """Every node type known to the server, every required input set, links of fitting types,
    every combo value one the server offers (model file names aside), numbers in range."""
    prompt = convert(load(name), object_info)
    assert not missing_required_inputs(prompt, object_info)
    assert validate(prompt, object_info, ignore_values=MODEL_FILE_INPUTS) == []
    kinds = {e["class_type"] for e in prompt.values()}
    assert kinds & {*GUIDING, "AStarAttentionRecorder"}, kinds
    assert "AStarAttentionOverlay" in kinds and "AStarTextEncode" in kinds
    for e in prompt.values():
        if e["class_type"] in (*GUIDING, "AStarAttentionRecorder"):
            assert e["inputs"]["concepts"] == "cat, frog"
        if e["class_type"] in GUIDING:  # A&E's defaults: the noisier half of the schedule, refinement as the mode says
            assert (e["inputs"]["guidance_start"], e["inputs"]["guidance_end"], e["inputs"]["refine"],
                    e["inputs"]["refine_thresholds"]) == (0.0, 0.5, "auto", "0:0.05, 0.2:0.5, 0.4:0.8"), e
        if e["class_type"] == "AStarTextEncode":
            assert e["inputs"]["text"] == "a cat and a frog"


def _by_type(prompt) -> dict[str, list[dict]]:
    by_type = {}
    for e in prompt.values():
        by_type.setdefault(e["class_type"], []).append(e["inputs"])
    return by_type


def test_sd15_example_settings(object_info):
    """astar_sd15 keeps the paper's set-up: 512 px, 50 steps with the "normal" scheduler, of which the window
    0 to 0.5 of the noise schedule guides the first 25 (steps 0-24: i/49 < 0.5), attention at 1/32, mode astar."""
    by_type = _by_type(convert(load("astar_sd15"), object_info))
    ks = by_type["AStarKSampler"][0]
    assert (ks["steps"], ks["guidance_start"], ks["guidance_end"], ks["attention_resolution"], ks["mode"]) == \
        (50, 0.0, 0.5, "1/32", "astar")
    assert guidance_window(ks).endswith("(25 of 50 guided: steps 0-24)")
    assert by_type["EmptyLatentImage"][0]["width"] == by_type["EmptyLatentImage"][0]["height"] == 512
    assert by_type["CheckpointLoaderSimple"][0]["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
    assert len(by_type["SaveImage"]) == 1  # the image; the overlay shows its pictures itself


def test_apply_examples_wire_the_patched_model_into_stock_samplers(object_info):
    """astar_apply_ksampler_advanced: A-STAR Apply's MODEL runs in the stock KSamplerAdvanced over its whole
    schedule (50 steps, 0 to 10000, noise added, none left over), the overlay reads the Apply's runs.
    astar_custom_sampler: A-STAR Apply -> CFGGuider -> SamplerCustomAdvanced, 50 karras sigmas."""
    prompt = convert(load("astar_apply_ksampler_advanced"), object_info)
    apply_id = next(nid for nid, e in prompt.items() if e["class_type"] == "AStarApply")
    ksa = next(e["inputs"] for e in prompt.values() if e["class_type"] == "KSamplerAdvanced")
    assert ksa["model"] == [apply_id, 0]
    assert (ksa["steps"], ksa["start_at_step"], ksa["end_at_step"], ksa["add_noise"],
            ksa["return_with_leftover_noise"]) == (50, 0, 10000, "enable", "disable")
    overlay = next(e["inputs"] for e in prompt.values() if e["class_type"] == "AStarAttentionOverlay")
    assert overlay["attention"] == [apply_id, 1] and overlay["run"] == -1
    assert prompt[overlay["image"][0]]["inputs"]["samples"][0] == next(
        nid for nid, e in prompt.items() if e["class_type"] == "KSamplerAdvanced"), "the overlay must follow the sampler"

    prompt = convert(load("astar_custom_sampler"), object_info)
    assert "AStarGuider" not in {e["class_type"] for e in prompt.values()}
    apply_id = next(nid for nid, e in prompt.items() if e["class_type"] == "AStarApply")
    guider_id = next(nid for nid, e in prompt.items() if e["class_type"] == "CFGGuider")
    assert prompt[guider_id]["inputs"]["model"] == [apply_id, 0]
    sca = next(e["inputs"] for e in prompt.values() if e["class_type"] == "SamplerCustomAdvanced")
    assert sca["guider"] == [guider_id, 0]
    assert {prompt[sca[k][0]]["class_type"] for k in ("noise", "sampler", "sigmas", "latent_image")} == \
        {"RandomNoise", "KSamplerSelect", "BasicScheduler", "EmptyLatentImage"}
    assert _by_type(prompt)["BasicScheduler"][0]["steps"] == 50


def test_sdxl_example_settings(object_info):
    """The SDXL example keeps SDXL's set-up: the base checkpoint at 1024 px, attention at 1/32."""
    prompt = convert(load("astar_sdxl"), object_info)
    by_type = {e["class_type"]: e["inputs"] for e in prompt.values()}
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    assert by_type["EmptyLatentImage"]["width"] == by_type["EmptyLatentImage"]["height"] == 1024
    assert by_type["AStarKSampler"]["attention_resolution"] == "1/32"


def _image_size(server, img) -> tuple[int, int]:
    from PIL import Image
    data = server.get(view_url(img), raw=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data)).size


def _pixels(server, img):
    from PIL import Image
    return Image.open(io.BytesIO(server.get(view_url(img), raw=True))).convert("RGB").tobytes()


def _origin(prompt, nid, name):
    link = prompt[nid]["inputs"][name]
    return prompt[link[0]]["class_type"], link[1]


def _check_picture(what, count, square, sizes, size, steps, where):
    assert len(sizes) == count, f"{where}: {what}: {len(sizes)} images, expected {count}"
    if square:
        assert sizes == [(size, size)] * count, f"{where}: {what} sizes {sizes}"
    elif what == "timeline":
        assert sizes[0][0] == steps * TIMELINE_CELL and sizes[0][1] >= CONCEPTS * TIMELINE_CELL, sizes
    else:
        assert sizes[0][0] >= 100 and sizes[0][1] >= 100, sizes


def _check_outputs(server, prompt, entry, name, size, steps):
    """Every image node saved what it should: the decoded image at the latent's size; the overlay shows, in
    its node, its heatmaps (one per concept), combined and overlap images at that size, a timeline one
    cell per step and the loss plot, in its outputs' order, and its text report, which names both
    concepts (any Save Image on an overlay output saves that output's pictures). Returns the report texts."""
    files = output_files(entry)
    by_node = {}
    for img in files:
        by_node.setdefault(img["node"], []).append(img)
    overlays = [nid for nid, e in prompt.items() if e["class_type"] == "AStarAttentionOverlay"]
    image_nodes = [nid for nid, e in prompt.items() if e["class_type"] in ("SaveImage", "PreviewImage")]
    assert set(by_node) == set(image_nodes) | set(overlays), \
        f"image nodes without output: {set(image_nodes) | set(overlays) - set(by_node)}"
    for nid in overlays:
        sizes = [_image_size(server, img) for img in by_node[nid]]
        assert all(img["type"] == "temp" for img in by_node[nid]), by_node[nid]  # previews, as Preview Image's
        for slot, (what, count, square) in OVERLAY_OUTPUTS.items():
            _check_picture(what, count, square, sizes[:count], size, steps, f"{name} overlay {nid}")
            sizes = sizes[count:]
        assert not sizes, f"{name} overlay {nid}: {len(sizes)} pictures more than its outputs"
    for nid in image_nodes:
        origin, slot = _origin(prompt, nid, "images")
        sizes = [_image_size(server, img) for img in by_node[nid]]
        if origin == "AStarAttentionOverlay":
            _check_picture(*OVERLAY_OUTPUTS[slot], sizes, size, steps, f"{name} node {nid}")
        else:  # the decoded image, or the ControlNet hint drawn at the latent's size
            assert origin in ("VAEDecode", "MaskToImage"), origin
            assert sizes == [(size, size)], f"{name} node {nid}: sizes {sizes}"
    reports = texts(entry)
    assert set(reports) == set(overlays), reports
    assert all("cat" in t and "frog" in t for t in reports.values()), reports
    return by_node, image_nodes, reports


def _guided_in_reports(prompt, reports) -> dict[str, int]:
    """{report node: guided steps it expects}: the runs of a Recorder have none, the others GUIDED."""
    out = {}
    for nid in reports:  # each overlay's own report
        origin = prompt[prompt[nid]["inputs"]["attention"][0]]["class_type"]
        out[nid] = 0 if origin == "AStarAttentionRecorder" else GUIDED
    return out


@pytest.mark.parametrize("name", [e for e in EXAMPLES if e not in DIT_EXAMPLES])
def test_example_runs(server, object_info, test_models, name):
    """The example, with the test models and a small size, runs through the server and every
    image node saves what it should (SDXL's graph on the mini SD1.5 model here; on an SDXL
    checkpoint in test_sdxl_example_runs_on_sdxl)."""
    prompt = adapt_prompt(convert(load(name), object_info), ckpt=test_models["ckpt"], lora=test_models["lora"],
                          controlnet=test_models["controlnet"], size=SIZE, steps=STEPS,
                          attention_resolution="1/16", seed=1000 + EXAMPLES.index(name))  # no cached results
    assert validate(prompt, object_info) == []
    entry = server.run(prompt, timeout=600)
    by_node, image_nodes, reports = _check_outputs(server, prompt, entry, name, SIZE, STEPS)
    # The workflow's own window (0 to 0.5) at 4 steps: each overlay report says how many steps were guided
    # (astar_vs_plain: none on the recorded plain run; its A-STAR image differing from the plain one below).
    expected = _guided_in_reports(prompt, reports)
    assert len(expected) == sum(e["class_type"] == "AStarAttentionOverlay" for e in prompt.values()), reports
    for nid, guided in expected.items():
        assert f"{STEPS} steps ({guided} guided)" in reports[nid], reports[nid][:400]
    if name == "astar_vs_plain":
        decoded = {prompt[nid]["_meta"]["title"]: _pixels(server, by_node[nid][0]) for nid in image_nodes
                   if _origin(prompt, nid, "images")[0] == "VAEDecode"}
        assert len(decoded) == 2 and len(set(decoded.values())) == 2, "A-STAR should change the plain image"


SDXL_CKPT = "astar-test-sdxl.safetensors"
SDXL_SIZE = 128  # latent 16x16: the example's 1/32 layers read 4x4 maps
SDXL_LAYERS_AT_1_32 = 60  # transformer layers at 1/32: input 7, 8 (2 x 10), middle (10), output 0-2 (3 x 10)


@pytest.fixture
def sdxl_server(work_dir):
    """A server of its own for the SDXL example, stopped right after it. A process that has loaded a
    7 GB model keeps most of that memory after unloading it, and the rest of the session needs it
    (24 GB machine). With COMFYUI_URL set, that server is used."""
    d = work_dir / "sdxl-server"
    d.mkdir(exist_ok=True)
    srv = hosts.ServerHost(d)
    yield srv
    srv.stop()


@pytest.mark.sdxl
def test_sdxl_example_runs_on_sdxl(object_info, sdxl_server):
    """The SDXL example, unchanged but for the checkpoint, size, steps and seed, on a random-weight
    SDXL base checkpoint (exact layout, 6.9 GB fp16, built once and cached) through a server.
    Servers store UNet weights in fp16 (--fp16-unet; tests/support/host.py), so the loaded SDXL
    holds about 7 GB instead of 14 GB. The overlay's report proves what ran: 60 recorded layers at
    1/32 (SDXL's 32x32-at-1024 px layers), which no SD1.5 layout has."""
    from support import models
    models.build_sdxl_checkpoint(hosts.models_dir() / "checkpoints" / SDXL_CKPT, seed=0)
    prompt = adapt_prompt(convert(load("astar_sdxl"), object_info), ckpt=SDXL_CKPT, size=SDXL_SIZE, steps=STEPS,
                          seed=7)
    assert next(e for e in prompt.values() if e["class_type"] == "AStarKSampler")["inputs"][
        "attention_resolution"] == "1/32"
    assert validate(prompt, sdxl_server.get("/object_info")) == []  # the file is listed there
    entry = sdxl_server.run(prompt, timeout=900)
    _, _, reports = _check_outputs(sdxl_server, prompt, entry, "astar_sdxl", SDXL_SIZE, STEPS)
    assert reports, "the SDXL example shows the overlay's report"
    for text in reports.values():
        assert f"from {SDXL_LAYERS_AT_1_32} recorded layers" in text and f"({GUIDED} guided)" in text, text


# ------------------------------------------------------------------------------------------------
# Converter unit tests (no server)
# ------------------------------------------------------------------------------------------------

OI = {
    "Loader": {"input": {"required": {"ckpt_name": [["a.safetensors", "b.safetensors"], {}]}},
               "input_order": {"required": ["ckpt_name"]}, "output": ["MODEL", "CLIP"],
               "output_name": ["MODEL", "CLIP"], "display_name": "Load"},
    "Lora": {"input": {"required": {"model": ["MODEL", {}], "clip": ["CLIP", {}],
                                    "lora_name": [["l.safetensors"], {}], "strength": ["FLOAT", {"default": 1.0}]}},
             "input_order": {"required": ["model", "clip", "lora_name", "strength"]},
             "output": ["MODEL", "CLIP"], "output_name": ["MODEL", "CLIP"]},
    "Encode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP", {}]}},
               "input_order": {"required": ["text", "clip"]}, "output": ["CONDITIONING"]},
    "Sampler": {"input": {"required": {"model": ["MODEL", {}], "seed": ["INT", {"control_after_generate": True}],
                                       "steps": ["INT", {"default": 20, "min": 1, "max": 100}],
                                       "sampler_name": ["COMBO", {"options": ["euler", "ddim"]}],
                                       "positive": ["CONDITIONING", {}], "denoise": ["FLOAT", {"default": 1.0}]},
                          "optional": {"mask": ["MASK", {}], "extra": ["INT", {"forceInput": True}]}},
                "input_order": {"required": ["model", "seed", "steps", "sampler_name", "positive", "denoise"],
                                "optional": ["mask", "extra"]},
                "output": ["LATENT"]},
    "Noise": {"input": {"required": {"noise_seed": ["INT", {}], "flag": ["BOOLEAN", {}]}},
              "input_order": {"required": ["noise_seed", "flag"]}, "output": ["NOISE"]},
}


def _wf(nodes, links):
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "version": 0.4}


def _node(nid, type_, inputs=(), widgets=(), mode=0, outputs=(), title=None):
    n = {"id": nid, "type": type_, "mode": mode, "inputs": [dict(i) for i in inputs], "outputs": list(outputs),
         "widgets_values": dict(widgets) if isinstance(widgets, dict) else list(widgets), "pos": [0, 0], "size": [100, 100], "flags": {}, "order": nid,
         "properties": {}}
    if title:
        n["title"] = title
    return n


def _basic(sampler_widgets=(7, "fixed", 12, "ddim", 0.5), lora_mode=0, sampler_inputs=None):
    nodes = [
        _node(1, "Loader", widgets=["b.safetensors"], outputs=[{"name": "MODEL", "type": "MODEL"},
                                                                {"name": "CLIP", "type": "CLIP"}]),
        _node(2, "Lora", inputs=[{"name": "model", "type": "MODEL", "link": 1}, {"name": "clip", "type": "CLIP", "link": 2},
                                 {"name": "lora_name", "type": "COMBO", "widget": {"name": "lora_name"}, "link": None}],
              widgets=["l.safetensors", 0.7], mode=lora_mode,
              outputs=[{"name": "MODEL", "type": "MODEL"}, {"name": "CLIP", "type": "CLIP"}]),
        _node(3, "Encode", inputs=[{"name": "clip", "type": "CLIP", "link": 4}], widgets=["a cat"],
              outputs=[{"name": "CONDITIONING", "type": "CONDITIONING"}]),
        _node(4, "Sampler", inputs=sampler_inputs or [{"name": "model", "type": "MODEL", "link": 3},
                                                      {"name": "positive", "type": "CONDITIONING", "link": 5},
                                                      {"name": "mask", "type": "MASK", "link": None}],
              widgets=sampler_widgets, title="My sampler"),
    ]
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 2, 1, "CLIP"], [3, 2, 0, 4, 0, "MODEL"], [4, 2, 1, 3, 0, "CLIP"],
             [5, 3, 0, 4, 1, "CONDITIONING"]]
    return _wf(nodes, links)


def test_convert_links_widgets_and_seed_control():
    p = convert(_basic(), OI)
    assert p["1"] == {"class_type": "Loader", "inputs": {"ckpt_name": "b.safetensors"}, "_meta": {"title": "Load"}}
    assert p["2"]["inputs"] == {"model": ["1", 0], "clip": ["1", 1], "lora_name": "l.safetensors", "strength": 0.7}
    assert p["3"]["inputs"] == {"text": "a cat", "clip": ["2", 1]}
    # seed, its "fixed" control entry skipped, steps, sampler, denoise; optional unlinked inputs left out
    assert p["4"]["inputs"] == {"model": ["2", 0], "seed": 7, "steps": 12, "sampler_name": "ddim",
                                "positive": ["3", 0], "denoise": 0.5}
    assert p["4"]["_meta"]["title"] == "My sampler"
    assert validate(p, OI) == []


def test_widget_order_follows_the_definition():
    assert widget_inputs(OI["Sampler"]) == [("seed", 1), ("steps", 0), ("sampler_name", 0), ("denoise", 0)]
    # an INT named noise_seed gets the frontend's control widget even without the option
    assert widget_inputs(OI["Noise"]) == [("noise_seed", 1), ("flag", 0)]
    wf = _wf([_node(1, "Noise", widgets=[5, "randomize", True])], [])
    assert convert(wf, OI)["1"]["inputs"] == {"noise_seed": 5, "flag": True}


def test_old_saves_without_the_control_entry():
    p = convert(_basic(sampler_widgets=(7, 12, "ddim", 0.5)), OI)
    assert p["4"]["inputs"]["seed"] == 7 and p["4"]["inputs"]["steps"] == 12 and p["4"]["inputs"]["denoise"] == 0.5


def test_widgets_values_by_name():
    p = convert(_basic(sampler_widgets={"seed": 3, "steps": 4, "sampler_name": "euler", "denoise": 1.0}), OI)
    assert p["4"]["inputs"]["seed"] == 3 and p["4"]["inputs"]["sampler_name"] == "euler"


def test_bypassed_node_passes_its_inputs_through():
    p = convert(_basic(lora_mode=4), OI)
    assert "2" not in p
    assert p["4"]["inputs"]["model"] == ["1", 0]  # MODEL output -> the bypassed node's MODEL input
    assert p["3"]["inputs"]["clip"] == ["1", 1]   # CLIP output (slot 1) -> its CLIP input (slot 1)


def test_muted_node_is_dropped_with_the_inputs_it_fed():
    wf = _basic()
    wf["nodes"][2]["mode"] = 2  # the encoder
    p = convert(wf, OI)
    assert "3" not in p and "positive" not in p["4"]["inputs"]
    assert missing_required_inputs(p, OI) == {"4": ["positive"]}


def test_widget_converted_to_input_primitive_and_reroute():
    wf = _basic(sampler_inputs=[{"name": "model", "type": "MODEL", "link": 6},
                                {"name": "positive", "type": "CONDITIONING", "link": 5},
                                {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 8},
                                {"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 9}])
    wf["nodes"] += [
        _node(5, "Reroute", inputs=[{"name": "", "type": "*", "link": 3}], outputs=[{"name": "", "type": "MODEL"}]),
        _node(6, "PrimitiveNode", widgets=[1234, "fixed"], outputs=[{"name": "INT", "type": "INT"}]),
        _node(7, "Noise", widgets=[0, "fixed", False], outputs=[{"name": "NOISE", "type": "NOISE"}]),
        _node(8, "Note", widgets=["just a note"]),
        _node(9, "Steps", widgets=[], outputs=[{"name": "INT", "type": "INT"}], mode=0),
    ]
    OI_STEPS = dict(OI, Steps={"input": {"required": {}}, "output": ["INT"]})
    wf["links"] = [l for l in wf["links"] if l[0] != 3] + [
        [3, 2, 0, 5, 0, "MODEL"], [6, 5, 0, 4, 0, "MODEL"], [8, 6, 0, 4, 2, "INT"], [9, 9, 0, 4, 3, "INT"]]
    p = convert(wf, OI_STEPS)
    assert "5" not in p and "6" not in p and "8" not in p  # frontend-only nodes
    assert p["4"]["inputs"]["model"] == ["2", 0]  # through the reroute
    assert p["4"]["inputs"]["seed"] == 1234       # the primitive's value
    assert p["4"]["inputs"]["steps"] == ["9", 0]  # a real node feeding a converted widget
    assert p["4"]["inputs"]["sampler_name"] == "ddim"


def test_unknown_node_types_are_named():
    wf = _basic()
    wf["nodes"].append(_node(9, "SomeCustomNode", widgets=[1]))
    wf["nodes"].append(_node(10, "SomeCustomNode"))
    with pytest.raises(UnknownNodeTypes) as e:
        convert(wf, OI)
    assert e.value.missing == {"SomeCustomNode": ["9", "10"]}
    assert "SomeCustomNode" in str(e.value) and "install" in str(e.value)
    wf["nodes"][-1]["mode"] = wf["nodes"][-2]["mode"] = 2  # muted unknown nodes do not matter
    assert "9" not in convert(wf, OI)


def test_not_a_ui_workflow():
    with pytest.raises(ConversionError, match="UI-format"):
        convert({"1": {"class_type": "Loader", "inputs": {}}}, OI)
    wf = _basic()
    wf["links"] = wf["links"][:-1]
    with pytest.raises(ConversionError, match="link 5"):
        convert(wf, OI)


def test_validate_finds_problems():
    p = convert(_basic(), OI)
    p["4"]["inputs"]["steps"] = 1000
    p["4"]["inputs"]["sampler_name"] = "nope"
    p["4"]["inputs"]["positive"] = ["1", 0]  # a MODEL into CONDITIONING
    problems = validate(p, OI)
    assert any("steps" in x and "outside" in x for x in problems)
    assert any("sampler_name" in x for x in problems)
    assert any("positive" in x and "MODEL" in x for x in problems)


def test_cli_converts_with_saved_object_info(tmp_path, capsys):
    from tools import workflow_to_api
    (tmp_path / "oi.json").write_text(json.dumps(OI))
    (tmp_path / "wf.json").write_text(json.dumps(_basic()))
    assert workflow_to_api.main([str(tmp_path / "wf.json"), "--object-info", str(tmp_path / "oi.json"),
                                 "-o", str(tmp_path / "api.json"), "--check"]) == 0
    assert json.loads((tmp_path / "api.json").read_text())["4"]["inputs"]["seed"] == 7
    wf = _basic()
    wf["nodes"].append(_node(9, "Missing"))
    (tmp_path / "bad.json").write_text(json.dumps(wf))
    assert workflow_to_api.main([str(tmp_path / "bad.json"), "--object-info", str(tmp_path / "oi.json")]) == 2
    assert "Missing" in capsys.readouterr().err


def test_adapt_prompt_scales_sizes_and_steps():
    window = {"guidance_start": 0.0, "guidance_end": 0.5, "attention_resolution": "1/32"}
    prompt = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
              "2": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 192, "height": 224}},
              "3": {"class_type": "MaskComposite", "inputs": {"x": 40, "y": 200, "operation": "add"}},
              "4": {"class_type": "AStarKSampler", "inputs": {"steps": 50, **window}},
              "5": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}},
              "6": {"class_type": "AStarApply", "inputs": dict(window)},
              "7": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["6", 0], "steps": 50}}}
    out = adapt_prompt(prompt, ckpt="mini", size=64, steps=3, attention_resolution="1/16")
    assert out["1"]["inputs"]["width"] == 64 and out["2"]["inputs"]["width"] == 24 and out["3"]["inputs"]["y"] == 25
    # the window is a fraction of the noise schedule: kept, so 0 to 0.5 guides only step 0 of 3 ("normal": step i
    # at i/2; step 1 sits at 0.5, the window's open end), steps 0 and 1 of 4 (i/3), the first 25 of 50 (i/49)
    assert out["4"]["inputs"] == {"steps": 3, "guidance_start": 0.0, "guidance_end": 0.5, "attention_resolution": "1/16"}
    assert guidance_window(out["4"]["inputs"]) == "guidance window 0 to 0.5 of the noise schedule (1 of 3 guided: step 0)"
    assert guidance_window(dict(out["4"]["inputs"], steps=4)).endswith("(2 of 4 guided: steps 0-1)")
    assert guidance_window(dict(out["4"]["inputs"], steps=50, scheduler="normal")).endswith("(25 of 50 guided: steps 0-24)")
    # denoise 0.5 of 20 steps: KSampler runs the last 20 of 40 (step i at (20 + i)/39 > 0.5): a hires-fix pass
    assert guidance_window(dict(out["4"]["inputs"], steps=20, denoise=0.5)).endswith("(0 of 20 guided)")
    assert "depends on where the 'karras' scheduler" in guidance_window(dict(out["4"]["inputs"], scheduler="karras"))
    assert out["6"]["inputs"] == {"guidance_start": 0.0, "guidance_end": 0.5, "attention_resolution": "1/16"}
    assert out["7"]["inputs"]["steps"] == 3
    assert out["5"]["inputs"]["ckpt_name"] == "mini" and prompt["5"]["inputs"]["ckpt_name"] == "x"
    narrow = adapt_prompt(prompt, guidance_start=0.25, guidance_end=0.75)
    for nid in ("4", "6"):
        assert (narrow[nid]["inputs"]["guidance_start"], narrow[nid]["inputs"]["guidance_end"]) == (0.25, 0.75)
    # 0.25 <= i/49 < 0.75: i from 12.25 up (13) to below 36.75 (36)
    assert guidance_window(narrow["4"]["inputs"]).endswith("(24 of 50 guided: steps 13-36)")
    assert guidance_window({"steps": 8, "guidance_start": 0.0, "guidance_end": 0.0}).endswith("(0 of 8 guided)")
    with pytest.raises(ValueError, match="guidance_end is a fraction"):
        adapt_prompt(prompt, guidance_end=25)


def test_run_example_options_for_the_window(capsys):
    """--guidance-end takes a fraction; the removed --guided-steps says what replaced it (before any set-up)."""
    for argv, message in ((["--guidance-end", "2"], "not a fraction"), (["--guidance-start", "x"], "not a number"),
                          (["--guided-steps", "4"], "replaced by --guidance-end")):
        with pytest.raises(SystemExit) as e:
            run_example_main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
