"""A-STAR with a LoRA and a ControlNet; A-STAR Apply in the stock sampler nodes (through the server)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from support import host as hosts
from support.graphs import guidance_settings, sd15_graph

LORA = "astar-test-lora-mini.safetensors"
CONTROLNET = "astar-test-controlnet-mini.safetensors"


@pytest.fixture(scope="module")
def lora_and_controlnet(host):
    from support.models import build_sd15_controlnet, build_sd15_lora
    build_sd15_lora(hosts.models_dir() / "loras" / LORA, layout="mini", seed=1)
    build_sd15_controlnet(hosts.models_dir() / "controlnet" / CONTROLNET, layout="mini", seed=2)
    return LORA, CONTROLNET


def _overlay(attention, image=("decode", 0)):
    """A-STAR Attention Overlay of a recording (the latest run of a patched model) over the decoded image."""
    return {"class_type": "AStarAttentionOverlay",
            "inputs": {"attention": attention, "image": list(image), "run": -1, "step_start": 0, "step_end": -1,
                       "layers": "", "normalization": "per_concept", "colormap": "jet", "opacity": 0.5}}


def _image(server, entry, node="save"):
    meta = entry["outputs"][node]["images"][0]
    png = server.get(f"/view?filename={meta['filename']}&type=output&subfolder={meta['subfolder']}", raw=True)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def test_lora_and_controlnet_with_astar_ksampler(server, mini_ckpt, lora_and_controlnet):
    """The LoRA + ControlNet + A-STAR graph runs through the server and reports both concepts; that the
    guidance pass computes with the LoRA's weights and the ControlNet's residuals is proven by the two
    equivalence tests below."""
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
    g["report"] = _overlay(["sampler", 1])
    g["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["report", 5]}}
    entry = server.run(g)
    image = _image(server, entry)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    assert np.abs(image - plain).max() > 0, "LoRA + ControlNet changed nothing"
    report = " ".join(str(t) for t in entry["outputs"]["show"]["text"])
    assert "segregation" in report and "cat" in report and "frog" in report, report[:2000]


def _merged_lora_checkpoint(ckpt_path, lora_path, strength, out_path):
    """The checkpoint with the LoRA's UNet modules merged into its weights (support.models.merge_lora);
    the kohya names are mapped to the checkpoint's keys with ComfyUI's UNet name table."""
    import comfy.utils
    import safetensors.torch
    from support.models import merge_lora, sd15_unet_config
    prefix = "model.diffusion_model."
    ldm_to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(sd15_unet_config("mini")).items()}

    def lora_name(key):
        if not key.startswith(prefix):
            return None
        name = ldm_to_diffusers.get(key[len(prefix):], key[len(prefix):])
        return "lora_unet_" + name[: -len(".weight")].replace(".", "_")

    merged, count = merge_lora(safetensors.torch.load_file(str(ckpt_path)),
                               safetensors.torch.load_file(str(lora_path)), strength, lora_name)
    safetensors.torch.save_file(merged, str(out_path))
    return count


def test_a_lora_reaches_the_guidance_pass(host, mini_ckpt, lora_and_controlnet):
    """LoraLoaderModelOnly before A-STAR KSampler (UNet, kohya LoRA on every attention and feed-forward
    layer): the guidance pass's losses and the guided latent equal those of a checkpoint with the LoRA
    merged into its weights here, and differ from the base model's."""
    lora, _ = lora_and_controlnet
    merged_name = "astar-test-sd15-mini-lora-merged.safetensors"
    merged_path = hosts.models_dir() / "checkpoints" / merged_name
    strength = 1.0
    count = _merged_lora_checkpoint(hosts.models_dir() / "checkpoints" / mini_ckpt,
                                    hosts.models_dir() / "loras" / lora, strength, merged_path)
    assert count > 50
    try:
        def run(ckpt, with_lora):
            g = sd15_graph(ckpt, steps=3, guided_steps=2, seed=7, step_size=200.0, decode=False)
            if with_lora:
                g["lora"] = {"class_type": "LoraLoaderModelOnly",
                             "inputs": {"model": ["ckpt", 0], "lora_name": lora, "strength_model": strength}}
                g["sampler"]["inputs"]["model"] = ["lora", 0]
            g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
            latent, rec = host.run(g)["sampler"]
            return latent["samples"], torch.stack([s.losses["total"] for s in rec.steps[:2]])

        base, base_losses = run(mini_ckpt, False)
        with_lora, lora_losses = run(mini_ckpt, True)
        merged, merged_losses = run(merged_name, False)
    finally:
        merged_path.unlink(missing_ok=True)
    torch.testing.assert_close(lora_losses, merged_losses, rtol=1e-4, atol=1e-6)
    assert ((lora_losses - base_losses).abs() > 2e-3 * base_losses.abs()).all()  # 20x the tolerance
    torch.testing.assert_close(with_lora, merged, rtol=1e-3, atol=1e-3)
    assert float((with_lora - base).abs().max()) > 1e-1


def test_the_guidance_pass_sees_the_controlnet(host, mini_ckpt, lora_and_controlnet):
    """With a ControlNet on the positive, the maps of step 0's guidance pass (its own forward of the prompt's
    branch) equal the maps the sampler's own model call records at step 0 when nothing is guided (ComfyUI's
    call, cond and uncond in one batch, ControlNet residuals added), and differ from the maps without the
    ControlNet: the guidance pass runs the ControlNet as the sampler does."""
    _, controlnet = lora_and_controlnet

    def step0_maps(guided_steps, with_controlnet):
        g = sd15_graph(mini_ckpt, steps=3, guided_steps=guided_steps, seed=9, step_size=0.0, decode=False)
        if with_controlnet:
            g["cn"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}}
            g["hint"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                                "color": 0xFF8000}}
            g["apply"] = {"class_type": "ControlNetApplyAdvanced",
                          "inputs": {"positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cn", 0],
                                     "image": ["hint", 0], "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
            g["sampler"]["inputs"].update({"positive": ["apply", 0], "negative": ["apply", 1]})
        g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
        rec = host.run(g)["sampler"][1]
        assert rec.steps[0].step == 0 and rec.steps[0].iterations == 0
        return rec.steps[0].loss_maps

    from_guidance_pass = step0_maps(1, True)  # step 0 guided (step size 0): the maps of its guidance pass
    from_sampler_call = step0_maps(0, True)  # nothing guided: the maps of the sampler's own call
    without = step0_maps(0, False)
    torch.testing.assert_close(from_guidance_pass, from_sampler_call, rtol=1e-4, atol=1e-6)
    assert float((from_sampler_call - without).abs().max()) > 1e-3  # 300x the tolerance (maps ~0.02)


# ------------------------------------------------------------------------------------------------
# A-STAR Apply: the patched model in the stock sampler nodes
# ------------------------------------------------------------------------------------------------

APPLY_STEPS, APPLY_GUIDED, APPLY_SEED = 3, 2, 31


def _latent(server, entry, node="saved_latent"):
    """The latent a SaveLatent node wrote, read back through /view (works with COMFYUI_URL too)."""
    import safetensors.torch
    meta = entry["outputs"][node]["latents"][0]
    data = server.get(f"/view?filename={meta['filename']}&type={meta.get('type', 'output')}"
                      f"&subfolder={meta['subfolder']}", raw=True)
    return safetensors.torch.load(data)["latent_tensor"]


def _sampler_graph(ckpt, sampler):
    """The mini checkpoint at 64 px, 3 steps, euler/normal, seed 31: `sampler` is "AStarKSampler" (A-STAR
    KSampler, the reference), "KSampler" (stock, no A-STAR), or "Apply+KSampler", "Apply+KSamplerAdvanced",
    "Apply+SamplerCustomAdvanced" (A-STAR Apply -> that stock node). The first 2 steps guided; the latent is
    saved, and an overlay of the sampler's (or the Apply's latest) run reports the steps guided."""
    apply = sampler.startswith("Apply+")
    stock = sampler.split("+")[-1]
    g = sd15_graph(ckpt, sampler="AStarKSampler" if stock == "AStarKSampler" else "KSampler",
                   steps=APPLY_STEPS, guided_steps=APPLY_GUIDED, seed=APPLY_SEED)
    ks = g["sampler"]["inputs"]
    if apply:
        g["apply"] = {"class_type": "AStarApply",
                      "inputs": {"model": ["ckpt", 0], **guidance_settings(guided_steps=APPLY_GUIDED, steps=APPLY_STEPS)}}
        ks["model"] = ["apply", 0]
    if stock == "KSamplerAdvanced":
        g["sampler"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ks["model"], "add_noise": "enable", "noise_seed": ks["seed"], "steps": ks["steps"],
            "cfg": ks["cfg"], "sampler_name": ks["sampler_name"], "scheduler": ks["scheduler"],
            "positive": ks["positive"], "negative": ks["negative"], "latent_image": ks["latent_image"],
            "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    elif stock == "SamplerCustomAdvanced":
        g["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": ks["seed"]}}
        g["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ks["model"], "positive": ks["positive"],
                                                             "negative": ks["negative"], "cfg": ks["cfg"]}}
        g["select"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": ks["sampler_name"]}}
        g["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": ks["scheduler"],
                                                                  "steps": ks["steps"], "denoise": 1.0}}
        g["sampler"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
            "latent_image": ks["latent_image"]}}
    g["saved_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": "astar_apply"}}
    source = ["apply", 1] if apply else (["sampler", 1] if stock == "AStarKSampler" else None)
    if source:
        g["overlay"] = _overlay(source)
        g["report"] = {"class_type": "PreviewAny", "inputs": {"source": ["overlay", 5]}}
    return g


def test_apply_runs_in_the_stock_samplers(server, mini_ckpt):
    """A-STAR Apply's MODEL in the stock KSampler, KSamplerAdvanced (whole schedule) and SamplerCustomAdvanced
    (CFGGuider, same noise seed, sampler, sigmas) gives, bit for bit, the latent of A-STAR KSampler with the
    same settings; the guidance moved it (the stock KSampler's latent differs) and each run's recording,
    read from the Apply's attention output, has the first 2 of 3 steps guided."""
    import torch
    runs = {}
    for sampler in ("AStarKSampler", "KSampler", "Apply+KSampler", "Apply+KSamplerAdvanced",
                    "Apply+SamplerCustomAdvanced"):
        entry = server.run(_sampler_graph(mini_ckpt, sampler))
        report = " ".join(str(t) for t in entry["outputs"].get("report", {}).get("text", []))
        runs[sampler] = (_latent(server, entry), report)
    reference, report = runs.pop("AStarKSampler")
    plain, _ = runs.pop("KSampler")
    assert reference.shape == (1, 4, 8, 8) and torch.isfinite(reference).all()
    assert not torch.equal(reference, plain), "the guidance changed nothing: the comparison would prove nothing"
    assert f"{APPLY_STEPS} steps ({APPLY_GUIDED} guided)" in report, report[:500]
    for sampler, (latent, report) in runs.items():
        assert torch.equal(latent, reference), \
            f"{sampler}: max |diff| {float((latent - reference).abs().max())} from A-STAR KSampler's latent"
        assert f"{APPLY_STEPS} steps ({APPLY_GUIDED} guided)" in report, (sampler, report[:500])
