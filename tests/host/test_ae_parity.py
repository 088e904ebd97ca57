"""A&E mode is A&E: the pack's attend_excite mode against diffusers' StableDiffusionAttendAndExcitePipeline.

One random-weight UNet in both worlds: the suite's mini SD1.5 checkpoint as ComfyUI loads it, and a
diffusers UNet2DConditionModel of the same layout holding the same tensors (keys mapped with ComfyUI's
own comfy.utils.unet_to_diffusers). One text embedding for both: ComfyUI's CLIP encoding of
"a cat and a frog" (A-STAR Text Encode), concept tokens cat = 2, frog = 5.

The pack runs as users run it: CheckpointLoaderSimple -> A-STAR Apply (attend_excite, A&E's window,
step size 20, smoothing, refinement with A&E's thresholds, cap 20) -> stock KSamplerAdvanced, 50 steps of
ComfyUI's ddim_uniform schedule, stopped after the first (end_at_step 1), cfg 1. A spy around
nodes.sampling_wrapper.guided_step records the latent it is given, every latent a guidance pass is run
from, every gradient taken, and the result. diffusers runs its own __call__ from that latent (50 steps,
guidance_scale 1, the same thresholds), stopped by its callback after step 0; wrappers around its
_compute_loss and _update_latent record every loss and gradient, a hook on its UNet every input.

Same time: ComfyUI's ddim_uniform schedule starts at the sigma of training timestep 981; the test
asserts that the UNet of the pack's guidance passes is called with timestep 981 and with the latent
z = x / sqrt(1 + sigma^2) the pack guides, that this is the first timestep of diffusers' DDIM scheduler
with SD1.5's configuration (50 steps, leading spacing, steps_offset 1: 981, as PNDM, which A&E used),
and that the two schedules' sigmas for it agree.

Configurations made to match, and why:
- Layers: A&E reads every cross-attention layer whose map has attention_res x attention_res pixels
  (16x16: SD1.5's 1/32 layers at 512 px, the 8x8 middle block excluded by its size). The mini layout has
  two levels (latent, latent/2), so at 128 px its latent-side layers (input 1, output 2, 3; the pack's
  "1/8" resolution) are 16x16 and the middle block (8x8) is again excluded by size: the same rule on the
  same 16x16 size, with a block to leave out. The exact layout would cost minutes on CPU.
- Refinement threshold: with random weights A&E's loss hardly moves (about 0.979, -1e-4 per update),
  so the real 0.05 would run every refinement to its cap of 20 in both worlds, where stopping one update
  early or late cannot show. The threshold at step 0 is therefore chosen from a first diffusers run
  without refinement: from its loss L0 and gradient g, one update lowers the loss by about
  d = 20 * |g|^2, and the threshold 1 - (L0 - 1.5 d) lies midway between the losses after the first and
  the second update. A&E's loop tests the loss of the latent *before* each update, so it takes
  3 refinement updates and the regular one: 4 in all (3 if it stopped one update early, 5 if late).
  The test asserts that the losses stay far (many loss tolerances) from the threshold on both sides.

Tolerances (float32 on CPU; ComfyUI and diffusers order the attention math differently, so bit equality
is not expected): every loss within 1e-6 (about 1e-6 relative, at 0.98), the gradient of every update
within 1e-4 of its largest entry, the latent of every forward and the updated latent within 1e-5 (entries
are O(1)); iteration and forward counts exactly. Measured on the reference host: losses equal to the
last bit, gradients within 1e-9 (largest entry 8e-4), latents within 2.4e-7 (one float32 ulp at 3.4).
The guidance moves the latent by 0.06, and each update lowers the loss by 1e-4: a loop that stops one
update early or late, another smoothing, token softmax or layer set, or another step size fails here.
The two UNets themselves agree within 1e-4 on one forward pass.
"""
from __future__ import annotations

import math

import pytest
import torch

from support import host as hosts
from support.graphs import guidance_settings

diffusers = pytest.importorskip("diffusers", reason="diffusers is a test extra: pip install -r benchmarks/requirements.txt")

PROMPT = "a cat and a frog"
CONCEPTS = "cat, frog"
TOKENS = [2, 5]  # positions of "cat" and "frog" in the prompt's tokens (0 is the start token)
SIZE = 128  # px: latent 16x16
RESOLUTION, ATTN_RES, LAYERS = "1/8", 16, [("input", 1, 0), ("output", 2, 0), ("output", 3, 0)]
STEPS, FIRST_TIMESTEP, SCHEDULER = 50, 981, "ddim_uniform"
SEED = 5
SCALE = 20.0  # A&E's scale_factor: step size 20 * sqrt(linspace(1, 0.5, 50)[0]) = 20 at step 0
LOSS_ATOL, GRAD_RTOL, LATENT_ATOL, UNET_ATOL = 1e-6, 1e-4, 1e-5, 1e-4


class _StopAfterFirstStep(Exception):
    pass


def diffusers_unet(model_patcher):
    """A diffusers UNet2DConditionModel with the layout and the very weights of a ComfyUI SD1.x UNet."""
    import comfy.utils
    cfg = model_patcher.model.model_config.unet_config
    levels = len(cfg["channel_mult"])
    depth = cfg["num_res_blocks"][0]
    # Cross-attention in every block of every level, one transformer each (the mini layout): diffusers'
    # CrossAttn blocks throughout.
    assert cfg["num_res_blocks"] == [depth] * levels and cfg["transformer_depth"] == [1] * (levels * depth), cfg
    assert cfg["transformer_depth_output"] == [1] * (levels * (depth + 1)) and cfg["transformer_depth_middle"] == 1
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 8, in_channels=4, out_channels=4, layers_per_block=depth,
        block_out_channels=tuple(cfg["model_channels"] * m for m in cfg["channel_mult"]),
        down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
        cross_attention_dim=cfg["context_dim"], attention_head_dim=cfg["num_heads"])  # SD1.x: heads, not dim
    to_comfy = comfy.utils.unet_to_diffusers(cfg)  # diffusers key -> ComfyUI key
    comfy_weights = model_patcher.model.diffusion_model.state_dict()
    unet.load_state_dict({k: comfy_weights[to_comfy[k]].clone() for k in unet.state_dict()}, strict=True)
    return unet.eval().requires_grad_(False)


def sd15_scheduler():
    """SD1.5's scheduler configuration (DDIM; its first timestep at 50 steps is PNDM's: 981)."""
    return diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                                   set_alpha_to_one=False)


def run_diffusers(unet, cond, z, thresholds, scale_factor=SCALE):
    """diffusers' A&E pipeline from latent z for its first step of 50 (step size scale_factor there); returns
    what it did at that step."""
    pipe = diffusers.StableDiffusionAttendAndExcitePipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=sd15_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    log = {"losses": [], "grads": [], "step_sizes": [], "inputs": [], "timesteps": []}
    compute_loss, update_latent = pipe._compute_loss, pipe._update_latent

    def logged_loss(max_attention_per_index):
        loss = compute_loss(max_attention_per_index)
        log["losses"].append(float(torch.as_tensor(loss).detach()))
        return loss

    def logged_update(latents, loss, step_size):
        latents.register_hook(lambda g: log["grads"].append(g.detach().clone()))
        log["step_sizes"].append(float(step_size))
        return update_latent(latents, loss, step_size)

    def on_unet_call(module, args, kwargs):
        log["inputs"].append(args[0].detach().clone())
        log["timesteps"].append(int(args[1]))

    def stop(step, timestep, latents):
        raise _StopAfterFirstStep

    pipe._compute_loss, pipe._update_latent = logged_loss, logged_update
    hook = unet.register_forward_pre_hook(on_unet_call, with_kwargs=True)
    try:
        pipe(prompt=None, prompt_embeds=cond, token_indices=TOKENS, height=SIZE, width=SIZE, num_inference_steps=STEPS,
             guidance_scale=1.0, latents=z.clone(), attn_res=(ATTN_RES, ATTN_RES), thresholds=thresholds,
             scale_factor=scale_factor,
             output_type="latent", callback=stop)
        raise AssertionError("diffusers' callback never ran")
    except _StopAfterFirstStep:
        pass
    finally:
        hook.remove()
    log["layers"] = {where: len(maps) for where, maps in pipe.attention_store.attention_store.items()}
    log["updated"] = log["inputs"][-1]  # the normal pass after the guidance runs on the updated latent
    return log


def run_pack(host, monkeypatch, ckpt, threshold, c_in):
    """The pack's first guided step of a 50-step run, through the executor; returns what guided_step did,
    in the diffusers latent z = x * c_in. (The pack takes the step on ComfyUI's x = z / c_in with step
    size alpha / c_in^2, the same update: latents are multiplied, gradients divided, by c_in here.)"""
    wrapper = hosts.pack_module("nodes.sampling_wrapper")
    real_guided_step = wrapper.guided_step
    log = {"inputs": [], "grads": []}

    def spy(x, maps_fn, step_size, prev_masks, config, refine_threshold=None, **kwargs):
        def recorded_maps_fn(latent):
            log["inputs"].append(latent.detach().clone() * c_in)
            if latent.requires_grad:
                latent.register_hook(lambda g: log["grads"].append(g.detach().clone() / c_in))
            return maps_fn(latent)

        result = real_guided_step(x, recorded_maps_fn, step_size, prev_masks, config,
                                  refine_threshold=refine_threshold, **kwargs)
        log.update(z=x.detach().clone() * c_in, step_size=step_size * c_in ** 2, config=config,
                   threshold=refine_threshold, result=result, latent=result.latent * c_in)
        return result

    monkeypatch.setattr(wrapper, "guided_step", spy)
    graph = base_graph(ckpt)
    graph["latent"] = {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}}
    settings = guidance_settings(CONCEPTS, RESOLUTION, "attend_excite", refine="auto",
                                 refine_thresholds=f"0:{threshold!r}, 0.2:0.5, 0.4:0.8")
    settings.update(guidance_start=0.0, guidance_end=0.5)  # A&E's 25 of 50; only step 0 runs here
    graph["apply"] = {"class_type": "AStarApply", "inputs": {"model": ["ckpt", 0], **settings}}
    graph["sampler"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["apply", 0], "add_noise": "enable", "noise_seed": SEED, "steps": STEPS, "cfg": 1.0,
        "sampler_name": "euler", "scheduler": SCHEDULER, "positive": ["pos", 0], "negative": ["neg", 0],
        "latent_image": ["latent", 0], "start_at_step": 0, "end_at_step": 1, "return_with_leftover_noise": "enable"}}
    graph["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    out = host.run(graph)
    log["layers"] = out["apply"][1][-1].layers
    return log


def base_graph(ckpt):
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["ckpt", 1], "text": PROMPT}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["pos", 0]}},  # an output, so the graph runs
    }


def test_attend_excite_mode_matches_diffusers_first_step(host, mini_ckpt, monkeypatch):
    import comfy.sample
    import comfy.samplers

    loaded = host.run(base_graph(mini_ckpt))
    model = loaded["ckpt"][0]
    cond = loaded["pos"][0][0][0].clone()  # [1, 77, 768]: the one text embedding of both worlds
    unet = diffusers_unet(model)

    # Same network: one forward pass of each UNet.
    probe_x, probe_ctx = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1)), cond
    with torch.no_grad():
        ours = model.model.diffusion_model(probe_x, torch.tensor([FIRST_TIMESTEP]), context=probe_ctx)
        theirs = unet(probe_x, FIRST_TIMESTEP, encoder_hidden_states=probe_ctx).sample
    torch.testing.assert_close(ours, theirs, rtol=0, atol=UNET_ATOL)

    # Same time: ComfyUI's first sigma of 50 ddim_uniform steps is diffusers' first timestep of 50.
    sampling = model.get_model_object("model_sampling")
    sigma = float(comfy.samplers.calculate_sigmas(sampling, SCHEDULER, STEPS)[0])
    scheduler = sd15_scheduler()
    scheduler.set_timesteps(STEPS)
    assert int(scheduler.timesteps[0]) == FIRST_TIMESTEP == int(sampling.timestep(torch.tensor(sigma)))
    alpha_bar = float(scheduler.alphas_cumprod[FIRST_TIMESTEP])
    assert math.sqrt((1 - alpha_bar) / alpha_bar) == pytest.approx(sigma, rel=1e-5)

    # Threshold at step 0 (see the module docstring): from a diffusers run without refinement.
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, SIZE // 8, SIZE // 8), SEED)
    expected_z = noise * sigma / math.sqrt(1 + sigma ** 2)  # KSamplerAdvanced's x = sigma * noise, z = x * c_in
    probe = run_diffusers(unet, cond, expected_z, thresholds={})
    assert len(probe["losses"]) == 1 and len(probe["grads"]) == 1
    first_loss, decrease = probe["losses"][0], SCALE * float(probe["grads"][0].pow(2).sum())
    target = first_loss - 1.5 * decrease  # A&E refines while loss > 1 - threshold
    threshold = 1.0 - target

    unet_calls = []  # (input, timestep) of every call of the ComfyUI UNet that gradients flow through

    def on_comfy_unet_call(module, args, kwargs):
        if args[0].requires_grad:
            unet_calls.append((args[0].detach().clone(), args[1].detach().clone()))

    hook = model.model.diffusion_model.register_forward_pre_hook(on_comfy_unet_call, with_kwargs=True)
    try:
        pack = run_pack(host, monkeypatch, mini_ckpt, threshold, 1.0 / math.sqrt(1 + sigma ** 2))
    finally:
        hook.remove()
    z = pack["z"]
    torch.testing.assert_close(z, expected_z, rtol=1e-6, atol=1e-6)
    # The step size is on the noise clock (docs/schedule.md): timestep 981 lies at f = 1 - 981/999 of SD's
    # schedule, where A&E's rule 20 * sqrt(1 - f / 2) gives 19.91 (A&E's pipeline counts steps: 20 at its step
    # 0). diffusers runs with that size, so everything else is compared like for like.
    fraction = 1 - FIRST_TIMESTEP / 999
    assert pack["step_size"] == pytest.approx(SCALE * math.sqrt(1 - fraction / 2), rel=1e-4)
    theirs = run_diffusers(unet, cond, z, thresholds={0: threshold}, scale_factor=pack["step_size"])
    result = pack["result"]

    # The pack's settings at this step are A&E's.
    config = pack["config"]
    assert (config.mode, config.refine, config.smooth, config.max_refine_iters) == ("attend_excite", True, True, 20)
    assert theirs["step_sizes"][0] == pytest.approx(pack["step_size"], rel=1e-6)
    assert pack["threshold"] == threshold
    # Same layers: A&E keeps its 16x16 cross-attention (1 down, 2 up; the 8x8 middle block left out).
    assert pack["layers"] == LAYERS
    assert theirs["layers"] == {"down": 1, "mid": 0, "up": 2}
    # Same latent and timestep: every UNet call of the pack's guidance passes got its latent at timestep 981.
    assert theirs["timesteps"][0] == FIRST_TIMESTEP
    assert len(unet_calls) == len(pack["inputs"])
    for (x, timestep), latent in zip(unet_calls, pack["inputs"]):
        assert timestep.tolist() == [FIRST_TIMESTEP]
        torch.testing.assert_close(x, latent, rtol=1e-6, atol=1e-6)

    # Same loop: diffusers computes its loss once more at the entry latent when refinement starts (its
    # loop's first forward repeats the step's first one); past that, one loss per forward in both worlds.
    their_losses = theirs["losses"]
    assert their_losses[0] == their_losses[1]
    their_trace = [their_losses[0]] + their_losses[2:]
    our_trace = result.trace[:, 0].tolist()
    updates = len(theirs["grads"])
    assert updates == 4, f"diffusers took {updates} updates (3 refinement + 1 regular expected): {their_losses}"
    assert result.iterations == updates, (result.iterations, our_trace, their_trace)
    assert len(pack["grads"]) == updates and len(pack["inputs"]) == len(our_trace) == len(their_trace) == updates
    # The test can decide the loop's end: every loss is far from the threshold's loss on its side.
    assert their_trace[1] - 10 * LOSS_ATOL > target > their_trace[2] + 10 * LOSS_ATOL, (their_trace, target)

    # Loss before any update, then at each forward: equal within the loss tolerance.
    assert float(result.losses["attend_excite"][0]) == pytest.approx(their_losses[0], abs=LOSS_ATOL)
    assert our_trace == pytest.approx(their_trace, abs=LOSS_ATOL)
    # Gradient of every update (the first from the same latent; later ones from latents that agree).
    for i, (ours_g, theirs_g) in enumerate(zip(pack["grads"], theirs["grads"])):
        scale = float(theirs_g.abs().max())
        assert scale > 0
        torch.testing.assert_close(ours_g, theirs_g, rtol=0, atol=GRAD_RTOL * scale, msg=f"gradient of update {i}")
    # Latent of every forward, and the updated latent the normal pass runs on.
    for i, (ours_z, theirs_z) in enumerate(zip(pack["inputs"], [theirs["inputs"][0]] + theirs["inputs"][2:-1])):
        torch.testing.assert_close(ours_z, theirs_z, rtol=0, atol=LATENT_ATOL, msg=f"latent of forward {i}")
    torch.testing.assert_close(pack["latent"], theirs["updated"], rtol=0, atol=LATENT_ATOL)
    assert float((pack["latent"] - z).abs().max()) > 100 * LATENT_ATOL  # the guidance moved the latent
