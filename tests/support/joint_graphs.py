"""Graphs of the joint-attention family tests (Chroma, Flux.2 Klein, Qwen-Image, Z-Image): the family's random
diffusion model through the stock UNETLoader, its test text encoder (the AStarTestClip node), A-STAR Text Encode
and the stock KSampler on the "simple" scheduler; optionally the test hook (AStarTestJointHook) or A-STAR Apply in
front of the sampler. And how a family's class fixture frees its models."""
from __future__ import annotations

from support.graphs import guidance_settings


def joint_graph(model_file, clip, *, text, negative=None, latent="EmptySD3LatentImage", cfg=3.0, hook=False,
                blocks="", capture="", sink="", steps=2, sampler="euler"):
    """negative: a prompt for CLIP Text Encode, or None for ConditioningZeroOut of the positive (distilled
    models at cfg 1). 64 px latents."""
    neg = ({"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}} if negative is None else
           {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": negative}})
    g = {
        "model": {"class_type": "UNETLoader", "inputs": {"unet_name": model_file, "weight_dtype": "default"}},
        "clip": {"class_type": "AStarTestClip", "inputs": {"name": clip}},
        "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": text}},
        "neg": neg,
        "latent": {"class_type": latent, "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    source = ["model", 0]
    if hook:
        g["hook"] = {"class_type": "AStarTestJointHook", "inputs": {"model": source, "blocks": blocks, "capture": capture,
                                                                   "sink": sink, "installs": 1}}
        source = ["hook", 0]
    g["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": source, "seed": 3, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": "simple",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return g


def with_guidance(g, steps, guided_steps, **settings):
    """g with A-STAR Apply in front of its sampler, guiding the first `guided_steps` of `steps`: joint models keep
    attention_resolution's default, and the window is on the "simple" scheduler's clock."""
    inputs = guidance_settings(guided_steps=guided_steps, steps=steps, scheduler="simple",
                               **{"resolution": "1/32", **settings})
    g["apply"] = {"class_type": "AStarApply", "inputs": {"model": g["sampler"]["inputs"]["model"], **inputs}}
    g["sampler"]["inputs"]["model"] = ["apply", 0]
    return g


def release(host, objects, names=()):
    """Drop one family's models before the next family's are built (the machine is small)."""
    import comfy.model_management
    for name in names:
        objects.pop(name, None)
    host.executor.reset()
    comfy.model_management.unload_all_models()
    host.collect_garbage()


def loaded_by_the_stock_loader(host, g, model_class: str, config_class: str | None = None):
    """Runs g afresh; ComfyUI's UNETLoader must have built comfy.model_base.<model_class> (and, when given,
    comfy.supported_models.<config_class>). Returns (the sampler's latent, the ModelPatcher)."""
    import comfy.model_base
    import comfy.supported_models
    outputs = host.run(g, fresh=True)
    model = outputs["model"][0]
    assert type(model.model) is getattr(comfy.model_base, model_class), type(model.model)
    if config_class is not None:
        assert type(model.model.model_config) is getattr(comfy.supported_models, config_class)
    return outputs["sampler"][0]["samples"], model
