"""API-format graph builders for the tests."""
from __future__ import annotations


def window_end(guided_steps: int, steps: int, scheduler: str = "normal") -> float:
    """guidance_end that guides exactly the first `guided_steps` of a full `steps`-step run. The window is a
    fraction of the model's noise schedule (percent_to_sigma): ComfyUI's "normal" scheduler places step i at
    i / (steps - 1) of it, "simple" at i / steps. Halfway between the last guided step and the first unguided
    one, so float rounding cannot move it."""
    if not guided_steps:
        return 0.0
    if guided_steps >= steps:
        return 1.0
    return (guided_steps - 0.5) / (steps - 1 if scheduler == "normal" else steps)


def guidance_settings(concepts="cat, frog", resolution="1/16", mode="astar", guided_steps=2, steps=3,
                      step_size=20.0, scheduler="normal", **overrides):
    """Every A-STAR guidance input (A-STAR Apply / KSampler), the first `guided_steps` steps guided."""
    inputs = {"concepts": concepts, "attention_resolution": resolution, "mode": mode, "guidance_start": 0.0,
              "guidance_end": window_end(guided_steps, steps, scheduler), "step_size": step_size,
              "segregation_weight": 1.0,
              "retention_weight": 1.0, "binarization": "fraction", "mask_fraction": 0.5, "smoothing": True,
              "refine": "off", "refine_thresholds": "0:0.05, 0.2:0.5, 0.4:0.8", "max_refine_iters": 20}
    inputs.update(overrides)
    return inputs


def sd15_graph(ckpt, *, sampler="AStarKSampler", prompt="a cat and a frog", negative="", concepts="cat, frog",
               size=64, batch=1, steps=3, seed=0, cfg=7.5, sampler_name="euler", scheduler="normal",
               guided_steps=2, resolution="1/16", mode="astar", step_size=20.0, decode=True, **guidance):
    """Checkpoint -> A-STAR Text Encode -> (A-STAR) KSampler -> VAE Decode -> Save Image."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["ckpt", 1], "text": prompt}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": negative}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": batch}},
    }
    common = {"model": ["ckpt", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
              "scheduler": scheduler, "positive": ["pos", 0], "negative": ["neg", 0],
              "latent_image": ["latent", 0], "denoise": 1.0}
    if sampler == "AStarKSampler":
        common.update(guidance_settings(concepts, resolution, mode, guided_steps, steps, step_size, scheduler,
                                        **guidance))
    g["sampler"] = {"class_type": sampler, "inputs": common}
    if decode:
        g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}}
        g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "astar_test"}}
    return g
