"""The guided sampler through the real executor (inference mode, checkpoint-loaded weights)."""
from __future__ import annotations

import math

import pytest
import torch

from support import host as hosts
from support.graphs import sd15_graph


def run_sampler(host, ckpt, **kw):
    g = sd15_graph(ckpt, decode=False, **kw)
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return host.run(g)["sampler"]


def test_recorded_maps_equal_explicit_computation(host):
    patch = hosts.pack_module("nodes.attention_patch")
    capture = hosts.pack_module("attention.capture")
    import comfy.ldm.modules.attention as comfy_attention
    torch.manual_seed(0)
    B, heads, d, T, h, w = 2, 4, 8, 77, 4, 6
    q, k, v = torch.randn(2 * B, h * w, heads * d), torch.randn(2 * B, T, heads * d), torch.randn(2 * B, T, heads * d)
    wanted, other = capture.GuidanceCapture(level=1), capture.GuidanceCapture(level=2)
    extra = {"original_shape": [2 * B, 4, 8, 12], "activations_shape": [2 * B, 320, h, w], "cond_or_uncond": [1, 0],
             "n_heads": heads, "attn_precision": None, "block": ("input", 4), "block_index": 0,
             patch.CAPTURES_KEY: [wanted, other]}
    out = patch.AttentionCapturePatch()(q, k, v, extra)
    # explicit per-head softmax(q k^T / sqrt(d)) of the cond chunk (the second one), mean over heads
    qc = q[B:].reshape(B, h * w, heads, d).permute(0, 2, 1, 3)
    kc = k[B:].reshape(B, T, heads, d).permute(0, 2, 1, 3)
    explicit = torch.softmax(qc @ kc.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1)
    assert len(wanted.probs) == 1 and not other.probs
    torch.testing.assert_close(wanted.probs[0], explicit, rtol=1e-5, atol=1e-6)
    assert wanted.size == (h, w)
    assert torch.equal(out, comfy_attention.optimized_attention(q, k, v, heads))


def test_nothing_guided_is_bit_identical_to_stock_ksampler(host, mini_ckpt):
    stock = run_sampler(host, mini_ckpt, sampler="KSampler", steps=3, seed=7)[0]["samples"]
    latent, rec = run_sampler(host, mini_ckpt, steps=3, seed=7, guided_steps=0)
    assert torch.equal(stock, latent["samples"])
    assert [s.step for s in rec.steps] == [0, 1, 2] and all(s.iterations == 0 for s in rec.steps)
    # record-only patch on the stock KSampler: same latent, maps recorded
    g = sd15_graph(mini_ckpt, sampler="KSampler", steps=3, seed=7, decode=False)
    g["rec"] = {"class_type": "AStarAttentionRecorder",
                "inputs": {"model": ["ckpt", 0], "concepts": "cat, frog", "attention_resolution": "1/16"}}
    g["sampler"]["inputs"]["model"] = ["rec", 0]
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    out = host.run(g)
    assert torch.equal(stock, out["sampler"][0]["samples"])
    recording = out["rec"][1][-1]  # the patched model's runs: one here
    maps = recording.maps()
    assert maps.shape[:4] == (3, 4, 1, 2)  # steps, mini's 4 layers at 1/16, batch, concepts
    assert recording.words == ["cat", "frog"] and torch.isfinite(maps).all() and maps.max() > 0


@pytest.mark.parametrize("which", ["mini", "full"])
def test_one_guided_step_lowers_the_loss(host, request, which):
    """Refinement capped at one iteration: forward, update, forward again at the same sigma."""
    ckpt = request.getfixturevalue(f"{which}_ckpt")
    size, resolution = (64, "1/16") if which == "mini" else (128, "1/32")
    for mode in ("astar", "attend_excite"):
        _, rec = run_sampler(host, ckpt, steps=2, guided_steps=1, size=size, resolution=resolution, batch=2,
                             mode=mode, step_size=0.5, refine="on", refine_thresholds="0:1.0", max_refine_iters=1)
        trace = rec.steps[0].trace
        assert trace.shape == (2, 2), trace
        assert torch.isfinite(trace).all()
        assert (trace[1] < trace[0]).all(), f"{which} {mode}: loss before/after one step {trace.tolist()}"
    if which == "full":  # 1/32 of the image side on the exact SD1.5 layout: A&E's 16x16 layers at 512 px
        assert rec.layers == [("input", 7, 0), ("input", 8, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0)]


def _cross_attention_block_keys(unet):
    import comfy.ldm.modules.attention as comfy_attention
    keys = []
    for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
        for i, block in enumerate(blocks):
            if any(isinstance(m, comfy_attention.SpatialTransformer) for m in block):
                keys.append((name, i))
    return keys


def _euler(x, denoised, s, s_next, state):
    return x + (x - denoised) / s * (s_next - s)


def _dpmpp_2m(x, denoised, s, s_next, state):
    """DPM-Solver++(2M) in sigma form: exponential integrator on the denoised prediction, second
    order from the previous step's prediction (the history a restart would lose)."""
    t, t_next = -torch.log(s), -torch.log(s_next) if s_next > 0 else None
    if s_next == 0:
        out = denoised
    else:
        h = t_next - t
        d = denoised
        if "old" in state:
            r = (t - state["t_old"]) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * state["old"]
        out = (s_next / s) * x - torch.expm1(-h) * d
    state["old"], state["t_old"] = denoised, t
    return out


def _euler_ancestral(x, denoised, s, s_next, state):
    """eta 1: step down to sigma_down deterministically, then add sigma_up of fresh noise from the host's
    own noise source for the run's seed (ComfyUI's default_noise_sampler: how it seeds differs by version)."""
    up = torch.minimum(s_next, (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
    down = (s_next ** 2 - up ** 2) ** 0.5
    x = x + (x - denoised) / s * (down - s)
    if s_next > 0:
        x = x + state["noise"](s, s_next) * up
    return x


def _heun(x, denoised, s, s_next, state):
    """Heun (second order): an Euler step, then the mean of the slopes at both ends, the second from a model
    call at the Euler step's latent (never guided: it is not a step's state); Euler on the step to 0."""
    d = (x - denoised) / s
    x_euler = x + d * (s_next - s)
    if s_next == 0:
        return x_euler
    d_next = (x_euler - state["denoise"](x_euler, s_next)) / s_next
    return x + (d + d_next) / 2 * (s_next - s)


def _dpmpp_2m_sde(x, denoised, s, s_next, state):
    """DPM-Solver++(2M) SDE, midpoint form, eta 1, on an eps model (half log-SNR = -log sigma, alpha = 1): the
    exponential integrator with the previous prediction as second order, plus Brownian noise over the step
    from the host's BrownianTreeNoiseSampler for the run's seed."""
    if s_next == 0:
        out = denoised
    else:
        h = torch.log(s) - torch.log(s_next)
        decay = (-2 * h).expm1().neg()
        out = s_next / s * torch.exp(-h) * x + decay * denoised
        if state.get("old") is not None:
            out = out + 0.5 * decay * (h / state["h_last"]) * (denoised - state["old"])
        out = out + state["brownian"](s, s_next) * s_next * decay.sqrt()
        state["h_last"] = h
    state["old"] = denoised
    return out


REFERENCE_STEPS = {"euler": _euler, "dpmpp_2m": _dpmpp_2m, "euler_ancestral": _euler_ancestral, "heun": _heun,
                   "dpmpp_2m_sde": _dpmpp_2m_sde}


@pytest.mark.parametrize("sampler_name", list(REFERENCE_STEPS))
def test_guided_sampler_equals_a_reference_loop(host, mini_ckpt, sampler_name):
    """The A-STAR KSampler equals a loop written here: at each guided step, the latent the sampler
    holds is updated by -alpha_t * grad_z L (z = x / sqrt(1 + sigma^2)) before that step's model
    call, and the sampler continues from it with its own history (dpmpp_2m), noise (ancestral, the SDE
    sampler's Brownian noise) and second-order calls (heun), which are never guided."""
    steps, guided, cfg, seed, step_size = 4, 3, 7.5, 3, 400.0
    latent, rec = run_sampler(host, mini_ckpt, steps=steps, guided_steps=guided, cfg=cfg, seed=seed,
                              step_size=step_size, size=64, resolution="1/16", sampler_name=sampler_name)
    assert [s.iterations for s in rec.steps] == [1] * guided + [0] * (steps - guided)

    import comfy.ldm.modules.attention as comfy_attention
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import folder_paths
    guidance = hosts.pack_module("attention.guidance")
    losses = hosts.pack_module("attention.losses")
    maps_mod = hosts.pack_module("attention.maps")

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        folder_paths.get_full_path("checkpoints", mini_ckpt), output_vae=False, output_clip=True)
    comfy.model_management.load_models_gpu([model])
    base = model.model
    base.requires_grad_(False)

    def encode(text):
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0]

    cond, uncond = encode("a cat and a frog"), encode("")
    store = []

    def record(q, k, v, extra):
        latent_h, act_h = extra["original_shape"][2], extra["activations_shape"][2]
        if latent_h // act_h == 2:  # 1/16 of the image side = latent / 2
            heads = extra["n_heads"]
            d = q.shape[-1] // heads
            qh = q.reshape(q.shape[0], -1, heads, d).transpose(1, 2).float()
            kh = k.reshape(k.shape[0], -1, heads, d).transpose(1, 2).float()
            store.append(torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1))
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"])

    options = {"patches_replace": {"attn2": {key: record for key in _cross_attention_block_keys(base.diffusion_model)}}}
    config = guidance.GuidanceConfig(mode="astar", scale=step_size)
    sigmas = comfy.samplers.calculate_sigmas(base.model_sampling, "normal", steps)
    alphas = [step_size * math.sqrt(a) for a in torch.linspace(1.0, 0.5, steps).tolist()]
    x = comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), seed) * torch.sqrt(1.0 + sigmas[0] ** 2)
    from comfy.k_diffusion.sampling import BrownianTreeNoiseSampler, default_noise_sampler

    def denoise(latent, sigma):  # the CFG prediction, as the sampler's model calls give it
        s = sigma.reshape(1)
        den_c, den_u = base.apply_model(latent, s, c_crossattn=cond), base.apply_model(latent, s, c_crossattn=uncond)
        return den_u + cfg * (den_c - den_u)
    state = {"noise": default_noise_sampler(x, seed=seed), "denoise": denoise,
             "brownian": BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seed, cpu=True)}
    masks = None
    ref_losses = []
    for i in range(steps):
        s = sigmas[i].reshape(1)
        if i < guided:
            c = torch.sqrt(1.0 + s ** 2)
            z = (x / c).detach().requires_grad_(True)
            store.clear()
            with torch.enable_grad():
                base.apply_model(z * c, s, c_crossattn=cond, transformer_options=options)
                probs = torch.stack(store).mean(0)  # [1, 16, 77]: mean over layers (and heads above)
                soft = torch.softmax(probs[..., 1:-1] * 100, dim=-1)  # A&E: drop SOT and last, x100
                maps = soft[..., [2 - 1, 5 - 1]].transpose(1, 2).reshape(1, 2, 4, 4)  # cat at 2, frog at 5
                total = guidance.guidance_losses(maps, masks, config)["total"]
                (grad,) = torch.autograd.grad(total.sum(), z)
            ref_losses.append(float(total.detach()))
            masks = losses.binarize(maps_mod.gaussian_smooth(maps.detach()), "fraction", 0.5)
            x = ((z - alphas[i] * grad) * c).detach()
        with torch.no_grad():
            den_c = base.apply_model(x, s, c_crossattn=cond)
            den_u = base.apply_model(x, s, c_crossattn=uncond)
            denoised = den_u + cfg * (den_c - den_u)
            x = REFERENCE_STEPS[sampler_name](x, denoised, sigmas[i], sigmas[i + 1], state)
    expected = base.process_latent_out(x)
    got_losses = [float(r.losses["total"]) for r in rec.steps[:guided]]
    assert got_losses == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(latent["samples"], expected, rtol=1e-3, atol=1e-3)
    unguided = run_sampler(host, mini_ckpt, steps=steps, guided_steps=0, cfg=cfg, seed=seed, size=64,
                           sampler_name=sampler_name)[0]["samples"]
    # the updates are far larger than the tolerance, so a misplaced or missing update would show
    assert float((latent["samples"] - unguided).abs().max()) > 5e-2, float((latent["samples"] - unguided).abs().max())


@pytest.mark.sdxl
def test_sdxl_concepts_map_through_both_encoders_and_a_guided_step_lowers_the_loss(host):
    from support.models import build_sdxl_model, sdxl_tokenizer
    prompt = hosts.pack_module("nodes.prompt")
    sampler = hosts.pack_module("nodes.guidance_inputs")
    tokens_mod = hosts.pack_module("attention.tokens")
    text = "a photo of a (teddy bear:1.2) and a red car"
    tokenizer = sdxl_tokenizer()
    tokens = tokenizer.tokenize_with_weights(text)
    assert set(tokens) == {"g", "l"}
    pt = prompt.PromptTokens(text, tokens, tokenizer)
    assert pt.locate(tokens_mod.parse_concepts("teddy bear, car")) == [[5, 6], [10]]
    with pytest.raises(ValueError, match="'dog' is not in the prompt.*teddy"):
        pt.locate(tokens_mod.parse_concepts("dog"))

    model = build_sdxl_model(seed=0)
    try:
        _guided_sdxl_step(sampler, prompt, pt, model)
    finally:  # 5 GB: free it for the rest of the session
        import comfy.model_management
        del model
        comfy.model_management.unload_all_models()
        host.collect_garbage()


def _guided_sdxl_step(sampler, prompt, pt, model):
    import comfy.sample
    from support.models import sdxl_conditioning
    positive = sdxl_conditioning(batch=1, seed=1, width=128, height=128)
    positive[0][1][prompt.PROMPT_KEY] = pt
    negative = sdxl_conditioning(batch=1, seed=2, width=128, height=128)
    patched, runs = sampler.build_guidance(model, "teddy bear, car", "1/32", positive=positive, guidance_end=0.5,
                                           step_size=0.5, refine="on", refine_thresholds="0:1.0", max_refine_iters=1)
    latent = torch.zeros(1, 4, 16, 16)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        out = comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 0), 2, 1.0, "euler", "normal",
                                  positive, negative, latent, seed=0)
    assert torch.isfinite(out).all()
    rec = runs[-1]
    blocks = {(b, i) for b, i, _ in rec.layers}
    assert blocks == {("input", 7), ("input", 8), ("middle", 0), ("output", 0), ("output", 1), ("output", 2)}
    assert len(rec.layers) == 60  # 10 transformer blocks each at 1/32 of the image side
    trace = rec.steps[0].trace
    assert (trace[1] < trace[0]).all(), trace.tolist()
