"""SD2.x through the real executor, on the random-weight SD2.1 768-v checkpoint (v-prediction, OpenCLIP-H
text encoder whose tokenizer pads with 0 instead of its end token).

A&E cuts SD 2.1's token softmax at the end token (attention_maps[:, :, 1:last_idx]), so the padding
columns take no share of the attention; the pack does the same when every encoder pads with another
id than its end token. Maps here are at 1/16 of the image side (4x4 at 64 px)."""
from __future__ import annotations

import math

import pytest
import torch

from support import host as hosts
from support.graphs import sd15_graph

PROMPT = "a cat and a frog"
CAT, FROG, END = 2, 5, 6  # token positions in PROMPT (start token at 0; one token per word)
SIZE, RESOLUTION, MAP_SIDE = 64, "1/16", 4


def encode(host, ckpt, text=PROMPT):
    """The PromptTokens A-STAR Text Encode stores in the conditioning of `text`."""
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
         "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["ckpt", 1], "text": text}},
         "out": {"class_type": "PreviewAny", "inputs": {"source": ["pos", 0]}}}
    (conditioning,) = host.run(g)["pos"]
    return conditioning[0][1][hosts.pack_module("nodes.prompt").PROMPT_KEY]


def sampler_graph(ckpt, **kw):
    g = sd15_graph(ckpt, decode=False, size=SIZE, resolution=RESOLUTION, **kw)
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return g


def run_sampler(host, ckpt, **kw):
    return host.run(sampler_graph(ckpt, **kw))["sampler"]


def test_sd2_concepts_and_the_end_token_cut(host, sd21_ckpt, mini_ckpt):
    tokens_mod = hosts.pack_module("attention.tokens")
    prompt = encode(host, sd21_ckpt)
    ids = prompt.ids["h"]  # OpenCLIP-H: start 49406, the five words, end 49407, then pads of id 0
    assert set(prompt.ids) == {"h"} and len(ids) == 77
    assert ids[0] == 49406 and ids[END] == 49407 and ids[END + 1:] == [0] * (77 - END - 1)
    assert prompt.locate(tokens_mod.parse_concepts("cat, frog")) == [[CAT], [FROG]]
    assert prompt.locate(tokens_mod.parse_concepts("frog, a#2")) == [[FROG], [4]]
    with pytest.raises(ValueError, match=r"'dog' is not in the prompt.*1:a.*2:cat.*5:frog") as err:
        prompt.locate(tokens_mod.parse_concepts("cat, dog"))
    assert "7:" not in str(err.value)  # the padding is not listed as prompt tokens
    # the same error from the sampler, before any sampling
    with pytest.raises(hosts.GraphError, match="'dog' is not in the prompt"):
        run_sampler(host, sd21_ckpt, concepts="cat, dog", steps=1)

    # the start token and every column from the end token on; SD1.5's CLIP-L (pads with its end token)
    # keeps A&E's default: the start token and the last column only
    assert set(prompt.excluded_columns(77)) == {0} | set(range(6, 77))
    assert encode(host, mini_ckpt).excluded_columns(77) == (0, 76)


# ------------------------------------------------------------------------------------------------
# maps against an explicit computation from q and k captured in front of the pack's patch
# ------------------------------------------------------------------------------------------------

class _CaptureQK(hosts.Attn2ReplaceNode):
    """Test-only node: an attn2 replace on every cross-attention layer that keeps q and k of each call
    (with its sigma and batch order) and computes ComfyUI's attention. Applied before the A-STAR node,
    which chains to it, so it sees exactly the q and k A-STAR sees."""

    calls: list = []

    def replace(self, q, k, v, extra, **kwargs):
        import comfy.ldm.modules.attention as comfy_attention
        type(self).calls.append({"key": (*extra["block"], extra["block_index"]), "q": q.detach().clone(),
                                 "k": k.detach().clone(), "order": list(extra["cond_or_uncond"]),
                                 "sigma": float(extra["sigmas"].reshape(-1)[0]), "heads": extra["n_heads"],
                                 "size": tuple(extra["activations_shape"][-2:])})
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"])


def _cond_probs(call):
    """Head-mean softmax(q k^T / sqrt(d)) of the cond chunk of one captured call: [1, h*w, 77]."""
    chunk = call["order"].index(0)
    size = call["q"].shape[0] // len(call["order"])
    q, k = call["q"][chunk * size:(chunk + 1) * size].float(), call["k"][chunk * size:(chunk + 1) * size].float()
    heads = call["heads"]
    d = q.shape[-1] // heads
    qh = q.reshape(q.shape[0], -1, heads, d).transpose(1, 2)
    kh = k.reshape(k.shape[0], -1, heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1).mean(1)


def _ae_maps(probs, last_idx):
    """A&E for SD 2.1: softmax(100 * probs[..., 1:last_idx]) (last_idx = the end token's position), the
    cat and frog columns as [1, 2, side, side]."""
    soft = torch.softmax(100 * probs[..., 1:last_idx], dim=-1)
    return soft[..., [CAT - 1, FROG - 1]].transpose(1, 2).reshape(1, 2, MAP_SIDE, MAP_SIDE)


def test_sd2_maps_use_only_the_real_tokens(host, sd21_ckpt, monkeypatch):
    hosts.full_guidance_passes(monkeypatch)  # a lean pass stops before the recorder below sees its last layer
    host.nodes.NODE_CLASS_MAPPINGS["AStarTestCaptureQK"] = _CaptureQK
    g = sampler_graph(sd21_ckpt, steps=2, guided_steps=1, step_size=20.0, smoothing=False, seed=5)
    g["qk"] = {"class_type": "AStarTestCaptureQK", "inputs": {"model": ["ckpt", 0]}}
    g["sampler"]["inputs"]["model"] = ["qk", 0]
    _CaptureQK.calls = []
    _, rec = host.run(g, fresh=True)["sampler"]
    calls = [c for c in _CaptureQK.calls if c["size"] == (MAP_SIDE, MAP_SIDE)]
    layers = rec.layers
    assert layers == [("input", 4, 0), ("input", 5, 0), ("output", 6, 0), ("output", 7, 0), ("output", 8, 0)]
    assert [(s.step, s.iterations) for s in rec.steps] == [(0, 1), (1, 0)]  # step 0 guided, once

    # the guidance pass of step 0 (cond only) and the sampler's own passes (cond and uncond)
    guidance = [c for c in calls if c["order"] == [0]]
    sampling = [c for c in calls if sorted(c["order"]) == [0, 1]]
    assert [c["key"] for c in guidance] == layers and len(sampling) == 2 * len(layers)
    assert len({c["sigma"] for c in guidance}) == 1 and guidance[0]["sigma"] == sampling[0]["sigma"]
    mean = torch.stack([_cond_probs(c) for c in guidance]).mean(0)  # A&E: mean over layers, then softmax
    explicit = _ae_maps(mean, END)
    torch.testing.assert_close(rec.steps[0].loss_maps, explicit, rtol=1e-4, atol=1e-6)
    # the padding columns would take a share of the softmax (A&E's SD1.5 slice 1:-1): another result
    assert not torch.allclose(_ae_maps(mean, -1), explicit, rtol=1e-2, atol=1e-3)

    for step in (0, 1):
        per_layer = sampling[step * len(layers):(step + 1) * len(layers)]
        assert [c["key"] for c in per_layer] == layers
        expected = torch.stack([_ae_maps(_cond_probs(c), END) for c in per_layer])
        torch.testing.assert_close(rec.steps[step].maps, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# guidance
# ------------------------------------------------------------------------------------------------

def test_sd2_one_guided_step_lowers_the_loss(host, sd21_ckpt):
    """Refinement capped at one iteration: forward, update, forward again at the same sigma. Step size 20
    (A&E's); the loss falls by at least 0.1 % (about 0.5 % for astar here: random weights give nearly flat
    attention), far above float32 noise."""
    for mode in ("astar", "attend_excite"):
        _, rec = run_sampler(host, sd21_ckpt, steps=2, guided_steps=1, batch=2, mode=mode, step_size=20.0,
                             refine="on", refine_thresholds="0:1.0", max_refine_iters=1)
        trace = rec.steps[0].trace
        assert trace.shape == (2, 2) and torch.isfinite(trace).all(), trace
        assert (trace[1] < trace[0] * (1 - 1e-3)).all(), f"{mode}: loss before/after one step {trace.tolist()}"


def test_sd2_guided_sampling(host, sd21_ckpt):
    """3 steps, the first 2 guided. Step size 0 is the stock KSampler's run, bit for bit; with a step size
    (200: random weights give nearly flat attention), the loss measured at the second guided step (before
    its update) is at least 0.1 % below the unguided run's there, for every sample: the update of the
    first step carried over through the sampler's step."""
    common = {"steps": 3, "seed": 11, "batch": 2, "cfg": 7.5}
    stock = run_sampler(host, sd21_ckpt, sampler="KSampler", **common)[0]["samples"]
    still, rec0 = run_sampler(host, sd21_ckpt, guided_steps=2, step_size=0.0, **common)
    assert torch.equal(still["samples"], stock)
    guided, rec = run_sampler(host, sd21_ckpt, guided_steps=2, step_size=200.0, **common)
    assert torch.isfinite(guided["samples"]).all() and not torch.equal(guided["samples"], stock)
    assert [s.iterations for s in rec.steps] == [1, 1, 0]
    # the first guided step sees the same latent in both runs
    torch.testing.assert_close(rec.steps[0].losses["total"], rec0.steps[0].losses["total"])
    before, after = rec0.steps[1].losses["total"], rec.steps[1].losses["total"]
    assert (after < before * (1 - 1e-3)).all(), f"loss at the second guided step: unguided {before.tolist()}, guided {after.tolist()}"
