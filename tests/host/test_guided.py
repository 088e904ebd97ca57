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
    patch = hosts.pack_module("nodes.patch")
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
    recording = out["rec"][1]
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
                             mode=mode, step_size=0.5, refine=True, refine_thresholds="0:1.0", max_refine_iters=1)
        trace = rec.steps[0].trace
        assert trace.shape == (2, 2), trace
        assert torch.isfinite(trace).all()
        assert (trace[1] < trace[0]).all(), f"{which} {mode}: loss before/after one step {trace.tolist()}"
