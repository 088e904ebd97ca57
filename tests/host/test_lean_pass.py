"""The lean guidance pass (attention/capture.py GuidancePasses): the UNet forward stops right after the
last recorded cross-attention layer, and loss, gradient and sampled latent stay exactly those of the
full pass. Through the real executor (inference mode, checkpoint-loaded weights), mini and exact SD1.5."""
from __future__ import annotations

import pytest
import torch

from support import host as hosts
from support.graphs import sd15_graph

# Layers read at each test's resolution, in the order the UNet runs them; the pass stops after the last.
EXPECTED_LAYERS = {
    # mini (two levels) at 1/16 = latent/2: input 3, middle, output 0 and 1; output 2, 3 and out skipped
    "mini": (("input", 3, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)),
    # SD1.5 at 1/32 = latent/4: input 7, 8 and output 3, 4, 5; output 6-11 and out skipped
    "full": (("input", 7, 0), ("input", 8, 0), ("output", 3, 0), ("output", 4, 0), ("output", 5, 0)),
}
SETTINGS = {"mini": {"size": 64, "resolution": "1/16"}, "full": {"size": 128, "resolution": "1/32"}}


def run_sampler(host, ckpt, unet_dtype=None, fresh=False, **kw):
    """The sampler's outputs; fresh: every node runs again (no cached result). unet_dtype: load the UNet
    with UNETLoader at that weight_dtype (e.g. fp8_e4m3fn), the rest from the checkpoint."""
    g = sd15_graph(ckpt, decode=False, **kw)
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    if unet_dtype:
        g["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": ckpt, "weight_dtype": unet_dtype}}
        g["sampler"]["inputs"]["model"] = ["unet", 0]
    return host.run(g, fresh=fresh)["sampler"]


@pytest.fixture
def owners(monkeypatch):
    """Every AStarSampling the nodes build, and every GuidancePasses of their runs."""
    inputs = hosts.pack_module("nodes.guidance_inputs")
    guided = hosts.pack_module("nodes.sampling_wrapper")
    capture = hosts.pack_module("attention.capture")
    built, passes = [], []

    class Sampling(inputs.AStarSampling):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    class Passes(capture.GuidancePasses):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            passes.append(self)

    monkeypatch.setattr(inputs, "AStarSampling", Sampling)
    monkeypatch.setattr(guided, "GuidancePasses", Passes)
    return built, passes


@pytest.fixture
def spies(monkeypatch, owners):
    """Records every GuidancePasses of the runs (owners), and at each guided step the loss and gradient
    w.r.t. the latent of a full pass and of a lean pass from the same latent (then guides as usual)."""
    guided = hosts.pack_module("nodes.sampling_wrapper")
    guidance = hosts.pack_module("attention.guidance")
    _, passes = owners
    steps = []

    real_guided_step = guided.guided_step

    def loss_and_grad(z, maps_fn, prev_masks, config, lean):
        passes[-1].lean = lean
        try:
            with torch.inference_mode(False), torch.enable_grad():
                leaf = z.detach().clone().requires_grad_(True)
                maps = maps_fn(leaf)
                loss = guidance.guidance_losses(maps, prev_masks, config)["total"]
                (grad,) = torch.autograd.grad(loss.sum(), leaf)
            return loss.detach(), grad, passes[-1].lean_passes
        finally:
            passes[-1].lean = True

    def spy(z, maps_fn, step_size, prev_masks, config, **kw):
        full = loss_and_grad(z, maps_fn, prev_masks, config, lean=False)
        lean = loss_and_grad(z, maps_fn, prev_masks, config, lean=True)
        steps.append({"step": len(steps), "full": full, "lean": lean})
        return real_guided_step(z, maps_fn, step_size, prev_masks, config, **kw)

    monkeypatch.setattr(guided, "guided_step", spy)
    return passes, steps


@pytest.mark.parametrize("which", ["mini", "full"])
def test_truncated_pass_is_exact(host, request, spies, which):
    ckpt = request.getfixturevalue(f"{which}_ckpt")
    passes, steps = spies
    kw = dict(SETTINGS[which], steps=3, guided_steps=2, seed=3, batch=2, step_size=20.0)
    for mode in ("astar", "attend_excite"):
        passes.clear(), steps.clear()
        run_sampler(host, ckpt, mode=mode, **kw)
        (run,) = passes
        assert run.layers == EXPECTED_LAYERS[which], run.layers
        assert len(steps) == 2 and [s["step"] for s in steps] == [0, 1]
        for s in steps:
            (loss_f, grad_f, lean_before), (loss_l, grad_l, lean_after) = s["full"], s["lean"]
            assert lean_after == lean_before + 1, "the truncated pass did not stop early"
            assert torch.isfinite(grad_f).all() and grad_f.abs().max() > 0
            # Same subgraph, same kernels: bitwise equal in practice; 1e-6 is the contract.
            torch.testing.assert_close(loss_l, loss_f, rtol=0, atol=1e-6)
            torch.testing.assert_close(grad_l, grad_f, rtol=0, atol=1e-6)
        # The sampler's own passes: step 0 learned nothing new (the spy's full pass taught the layers),
        # so every real guidance pass was lean.
        assert run.full_passes == 2 and run.lean_passes == 4, (run.full_passes, run.lean_passes)


# (pixels, latent side): even, and odd sides whose activations the UNet rounds up (17 -> 9 -> 5 -> 3)
@pytest.mark.parametrize("which, size", [("mini", 64), ("mini", 72), ("full", 128), ("full", 136), ("full", 200)])
def test_planned_layers_are_those_a_full_pass_reads(host, request, owners, monkeypatch, which, size):
    """The layers known from the UNet's structure, where a run's first pass stops, are exactly those a
    full pass records at that latent size; a fresh run then runs no full pass at all."""
    ckpt = request.getfixturevalue(f"{which}_ckpt")
    built, passes = owners
    kw = dict(SETTINGS[which], size=size, steps=2, guided_steps=2, seed=7)
    with monkeypatch.context() as full:
        hosts.full_guidance_passes(full)
        run_sampler(host, ckpt, fresh=True, **kw)
    (full,) = passes
    assert full.full_passes == 2 and full.lean_passes == 0
    learned = full.layers
    latent = (size // 8, size // 8)
    assert built[-1].reader.planned_layers(latent) == learned, (built[-1].reader.planned_layers(latent), learned)
    if size == SETTINGS[which]["size"]:
        assert learned == EXPECTED_LAYERS[which]
    passes.clear()
    run_sampler(host, ckpt, fresh=True, **{**kw, "seed": 8})
    (lean,) = passes
    assert lean.full_passes == 0 and lean.lean_passes == 2 and lean.layers == learned


@pytest.mark.parametrize("which", ["mini", "full"])
def test_truncation_leaves_the_sampled_latent_unchanged(host, request, monkeypatch, which):
    """End to end: the same graph with every guidance pass in full and with lean passes (refinement on,
    so several passes per step) gives the same latent and the same loss trace."""
    ckpt = request.getfixturevalue(f"{which}_ckpt")
    kw = dict(SETTINGS[which], steps=3, guided_steps=2, seed=5, refine="on", refine_thresholds="0:1.0",
              max_refine_iters=2)
    hosts.full_guidance_passes(monkeypatch)
    full_latent, full_rec = run_sampler(host, ckpt, fresh=True, **kw)
    monkeypatch.undo()
    lean_latent, lean_rec = run_sampler(host, ckpt, fresh=True, **kw)  # not ComfyUI's cached result
    assert torch.equal(lean_latent["samples"], full_latent["samples"])
    assert [s.trace.tolist() for s in lean_rec.steps if s.trace is not None] == \
        [s.trace.tolist() for s in full_rec.steps if s.trace is not None]


def test_cast_weights_are_recast_not_kept(host, mini_ckpt, monkeypatch):
    """UNet weights stored in fp8 (UNETLoader's weight_dtype) are cast to the compute dtype at every
    layer call (ComfyUI's manual cast; lowvram offloading casts the same way). The guidance pass hands
    autograd those casts; it keeps references to the weights instead and casts again at backward, and
    the sampled latent is bitwise that of keeping the copies."""
    guided = hosts.pack_module("nodes.sampling_wrapper")
    real_policy = guided.saved_tensor_policy
    policies, settings = [], {"keep_casts": False}

    def policy(recast_weight_casts, copy_others, **kwargs):
        assert recast_weight_casts, "the fp8 model's weight casts were not detected"
        p = real_policy(recast_weight_casts and not settings["keep_casts"], copy_others, **kwargs)
        policies.append(p)
        return p

    monkeypatch.setattr(guided, "saved_tensor_policy", policy)
    kw = dict(size=64, resolution="1/16", steps=3, guided_steps=2, seed=11, unet_dtype="fp8_e4m3fn")
    recast_latent, _ = run_sampler(host, mini_ckpt, fresh=True, **kw)
    recast = [p.stats for p in policies]
    settings["keep_casts"] = True
    kept_latent, _ = run_sampler(host, mini_ckpt, fresh=True, **kw)
    assert torch.equal(recast_latent["samples"], kept_latent["samples"])
    assert len(recast) == 2  # one guidance pass per guided step
    for stats in recast:
        # fp32 casts of the weights of every layer up to the last read one; the activations kept at
        # 64 px are far smaller than those weights
        assert stats.recast_count > 50 and stats.recast_bytes > 4 * stats.kept_bytes, stats


class _RecordCalls(hosts.Attn2ReplaceNode):
    """Test-only node: an attn2 replace on every cross-attention layer that records (layer, batch order)
    of each call and computes ComfyUI's attention; applied before the pack's patch, which chains to it."""

    calls: list = []

    def replace(self, q, k, v, extra, **kwargs):
        import comfy.ldm.modules.attention as comfy_attention
        type(self).calls.append(((*extra["block"], extra["block_index"]), list(extra["cond_or_uncond"])))
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"])


def test_a_chained_replace_is_not_called_at_the_last_read_layer_of_a_lean_pass(host, mini_ckpt):
    """A lean pass stops inside the last read layer's patch, after taking its maps and before calling the
    replace it chains to: that replace sees the guidance pass's layers before the last read one, and
    every layer in the sampler's own calls."""
    host.nodes.NODE_CLASS_MAPPINGS["AStarTestRecordCalls"] = _RecordCalls
    g = sd15_graph(mini_ckpt, steps=2, guided_steps=1, seed=4, **SETTINGS["mini"])
    g["record"] = {"class_type": "AStarTestRecordCalls", "inputs": {"model": ["ckpt", 0]}}
    g["sampler"]["inputs"]["model"] = ["record", 0]
    _RecordCalls.calls = []
    host.run(g, fresh=True)
    sampling = [key for key, order in _RecordCalls.calls if sorted(order) == [0, 1]]  # cond + uncond batch
    guidance = [key for key, order in _RecordCalls.calls if order == [0]]  # the guidance pass: cond only
    every_layer = list(dict.fromkeys(sampling))  # in the order one forward runs them
    assert sampling == every_layer * 2  # two steps, every layer each
    last_read = EXPECTED_LAYERS["mini"][-1]
    assert guidance == every_layer[:every_layer.index(last_read)], (guidance, every_layer)
