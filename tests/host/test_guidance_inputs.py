"""What the guidance pass reads and sees, checked against computations written here:
- a concatenated context (ConditioningConcat) is read as it is, never folded as a repetition;
- with a denoise mask and Differential Diffusion, the guidance pass sees exactly the latent of the
  sampler's own model call at that step;
- a patched model shared by two samplers records two runs; stacking two A-STAR patches is refused.
Python-level runs on the mini checkpoint (in inference mode, as ComfyUI's executor runs nodes)."""
from __future__ import annotations

import math

import pytest
import torch

from support import host as hosts

PROMPT = "a cat and a frog"
CAT, FROG = 2, 5  # token positions in PROMPT


@pytest.fixture(scope="module")
def loaded(host, mini_ckpt):
    import comfy.sd
    import folder_paths
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path("checkpoints", mini_ckpt), output_vae=False, output_clip=True)
    return model, clip


def _encode(clip, text, astar=True):
    prompt = hosts.pack_module("nodes.prompt")
    tokens = clip.tokenize(text)
    cond = clip.encode_from_tokens_scheduled(tokens)
    if astar:
        cond = [[c, {**d, prompt.PROMPT_KEY: prompt.PromptTokens(text, tokens, clip.tokenizer)}] for c, d in cond]
    return cond


def _cross_attention_recorder(model, store):
    """A model clone whose every cross-attention layer records (q, k, heads) and attends as ComfyUI does;
    A-STAR, applied after it, chains to it."""
    import comfy.ldm.modules.attention as comfy_attention
    patched = model.clone()
    patch = hosts.pack_module("nodes.attention_patch")

    def record(q, k, v, extra, **kwargs):
        store.append((q.detach().clone(), k.detach().clone(), extra["n_heads"],
                      tuple(extra["original_shape"][2:]), tuple(extra["activations_shape"][2:])))
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"])

    for name, block_id, index in patch.cross_attention_keys(patched):
        patched.set_model_attn2_replace(record, name, block_id, index)
    return patched


def _sample(model, positive, negative, steps=2, size=64, seed=0, denoise_mask=None, **guidance):
    import comfy.sample
    build = hosts.pack_module("nodes.guidance_inputs").build_guidance
    patched, runs = build(model, "cat, frog", "1/16", positive=positive, **guidance)
    latent = torch.zeros(1, 4, size // 8, size // 8)
    with torch.inference_mode():
        out = comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, seed), steps, 5.0, "euler", "normal",
                                  positive, negative, latent, noise_mask=denoise_mask, seed=seed)
    return out, runs


def test_concatenated_context_maps_equal_an_explicit_computation(host, loaded, monkeypatch):
    """ConditioningConcat makes one 154-token context that the model attends over: the maps are the
    softmax over those 154 keys, A&E's token softmax over them (chunk starts 0, 77 and the last column
    left out), never a fold of the two halves as if the prompt were repeated."""
    model, clip = loaded
    hosts.full_guidance_passes(monkeypatch)  # a lean pass stops before the recorder below sees its last layer
    positive = _encode(clip, PROMPT)
    other = _encode(clip, "a photo of a dog in the rain", astar=False)
    concat = [[torch.cat([positive[0][0], other[0][0]], dim=1), positive[0][1]]]  # as ConditioningConcat does
    store = []
    _, runs = _sample(_cross_attention_recorder(model, store), concat, _encode(clip, "", astar=False),
                      guidance_end=0.5, step_size=20.0, smoothing=False)
    first = runs[-1].steps[0]
    # the first guidance pass: cond only (batch 1), the layers at 1/16 of the image side (latent / 2)
    layers = [(q, k, h) for q, k, h, lat, act in store if q.shape[0] == 1 and lat[0] // act[0] == 2]
    layers = layers[:len(runs[-1].layers)]
    assert all(k.shape[1] == 154 for _, k, _ in layers)
    probs = []
    for q, k, heads in layers:
        d = q.shape[-1] // heads
        qh = q.float().reshape(1, -1, heads, d).transpose(1, 2)
        kh = k.float().reshape(1, -1, heads, d).transpose(1, 2)
        probs.append(torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1))
    mean = torch.stack(probs).mean(0)  # [1, 64, 154]
    keep = [c for c in range(154) if c not in (0, 77, 153)]
    soft = torch.softmax(mean[..., keep] * 100, dim=-1)
    side = int(math.isqrt(mean.shape[1]))
    expected = soft[..., [keep.index(CAT), keep.index(FROG)]].transpose(1, 2).reshape(1, 2, side, side)
    torch.testing.assert_close(first.loss_maps, expected, rtol=1e-4, atol=1e-6)
    # the old fold (the two halves summed as copies of one prompt) is far from it
    folded = mean.unflatten(-1, (2, 77)).sum(-2)
    folded_soft = torch.softmax(folded[..., 1:76] * 100, dim=-1)[..., [CAT - 1, FROG - 1]]
    assert (folded_soft.transpose(1, 2).reshape(1, 2, side, side) - expected).abs().max() > 1e-3


def test_guidance_pass_sees_the_latent_of_the_model_call_with_differential_diffusion(host, loaded):
    """Inpainting with a soft mask and Differential Diffusion (a denoise_mask_function): at each guided
    step the guidance pass's UNet input equals the cond half of the sampler's own model call at that
    step (step size 0: the update is zero, so the two must see one latent)."""
    model, clip = loaded
    differential = host.nodes.NODE_CLASS_MAPPINGS["DifferentialDiffusion"]
    model = differential.execute(model).args[0]
    inputs = []

    def unet_wrapper(apply_model, args):
        inputs.append((args["input"].detach().clone(), list(args["cond_or_uncond"])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = model.clone()
    model.set_model_unet_function_wrapper(unet_wrapper)
    mask = torch.linspace(0, 1, 8).view(1, 1, 8).expand(1, 8, 8).contiguous()  # soft, left to right
    _sample(model, _encode(clip, PROMPT), _encode(clip, "", astar=False), steps=3, denoise_mask=mask,
            guidance_end=0.9, step_size=0.0)
    guidance = [x for x, kinds in inputs if kinds == [0] and x.shape[0] == 1]
    sampler_calls = [(x, kinds) for x, kinds in inputs if len(kinds) == 2]
    assert len(guidance) >= 2 and len(sampler_calls) == 3
    for step in range(2):
        x, kinds = sampler_calls[step]
        cond_half = x.chunk(2)[kinds.index(0)]
        assert torch.equal(guidance[step], cond_half), f"step {step}: the guidance pass saw another latent"


def test_two_samplers_sharing_a_patched_model_record_two_runs(host, loaded):
    import comfy.sample
    model, clip = loaded
    positive, negative = _encode(clip, PROMPT), _encode(clip, "", astar=False)
    build = hosts.pack_module("nodes.guidance_inputs").build_guidance
    patched, runs = build(model, "cat, frog", "1/16", positive=positive, guidance_end=0.5, step_size=20.0)
    for steps in (2, 4):  # "normal": states at i/(steps-1); the window 0-0.5 guides 1 of 2 and 2 of 4
        latent = torch.zeros(1, 4, 8, 8)
        with torch.inference_mode():
            comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 0), steps, 5.0, "euler", "normal",
                                positive, negative, latent, seed=0)
    assert [len(r.steps) for r in runs] == [2, 4]  # one recording per run, in order, none mixed
    assert [sum(s.iterations > 0 for s in r.steps) for r in runs] == [1, 2]


def test_stacking_two_astar_patches_is_refused(host, loaded):
    model, clip = loaded
    build = hosts.pack_module("nodes.guidance_inputs").build_guidance
    patched, _ = build(model, "cat, frog", "1/16", guidance_end=0.5)
    with pytest.raises(ValueError, match="already applied to this model.*once"):
        build(patched, "cat", "1/16", guidance_end=0.5)
    build(model, "cat", "1/16")  # the unpatched model is untouched


def test_overlay_shows_the_maps_the_loss_saw_by_default(host, loaded):
    """The overlay's default maps and its report's peaks are the maps as the loss saw them (layer mean,
    token softmax, smoothing; at guided steps those of the guidance pass), not a mean of per-layer maps."""
    import re
    model, clip = loaded
    _, runs = _sample(model, _encode(clip, PROMPT), _encode(clip, "", astar=False), guidance_end=0.5, step_size=20.0)
    overlay = host.nodes.NODE_CLASS_MAPPINGS["AStarAttentionOverlay"]
    image = torch.rand(1, 64, 64, 3)
    report = overlay.execute(attention=runs, image=image).args[-1]
    rows = [line.split() for line in report.splitlines() if re.match(r"\s*\d+\s", line)]
    peaks = torch.tensor([[float(v) for v in row[-2:]] for row in rows])  # peak cat, peak frog per step
    rec = runs[-1]
    seen = torch.stack([s.loss_maps[0].flatten(1).amax(-1) for s in rec.steps])
    per_layer = torch.stack([s.maps[:, 0].mean(0).flatten(1).amax(-1) for s in rec.steps])
    torch.testing.assert_close(peaks, seen, atol=6e-5, rtol=0)  # printed with 4 decimals
    assert (per_layer - seen).abs().max() > 1e-3  # the other view really differs
    layered = overlay.execute(attention=runs, image=image, layers="all").args[-1]
    assert "; 4 layers;" in layered and "from 4 recorded layers" in report
