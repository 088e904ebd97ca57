"""What A-STAR puts into a forward pass's transformer_options, and how its readers hand what they read
to the sinks found there.

The sampling wrapper (sampling_wrapper.py) marks a pass it wants read with CAPTURES_KEY (the sinks,
attention/capture.py's AttentionSink) and STEP_KEY (the sampler step the pass belongs to). The readers
(attention_patch.py for UNet cross-attention, joint_attention.py for joint attention) find the sinks
there; a pass without sinks is never touched. Both readers pick the chunks of a batched call and stop a
lean pass the same way: hand_to_sinks.
"""
from __future__ import annotations

import torch

from ..attention.capture import StopForward

CAPTURES_KEY = "astar_captures"  # the sinks active in this pass
STEP_KEY = "astar_step"  # index of the sampler step this pass belongs to
PASS_KEY = "astar_joint_pass"  # joint models: the pass's token layout (joint_attention.JointPass)
OVERRIDE_KEY = "optimized_attention_override"  # ComfyUI's own key, where joint attention is read


def step_of(options) -> int | None:
    """Index of the current sampler step: the one the sampling wrapper set, else (a pass outside an
    A-STAR run) the position of the current sigma in the run's schedule, None when it is not in it."""
    if STEP_KEY in options:
        return options[STEP_KEY]
    schedule = options.get("sample_sigmas")
    sigma = options.get("sigmas")
    if schedule is None or sigma is None:
        return None
    hits = torch.isclose(schedule.float().cpu(), sigma.detach().float().cpu().reshape(-1)[:1], rtol=1e-5, atol=0.0)
    idx = torch.nonzero(hits)
    return int(idx[0]) if len(idx) else None


def hand_to_sinks(sinks, receivers, options, key, size, chunk_probs) -> None:
    """Give each of `receivers` (some of the pass's `sinks`) layer `key`'s probabilities: the mean of
    chunk_probs(j) [B, n_img, T] over the batch chunks j that are cond chunks of the sink's prompt
    (ComfyUI batches cond and uncond, and Combine'd prompts, into one call: cond_or_uncond and uuids
    say which chunk is which). Each chunk is computed once, only when some sink wants it. Then, when
    every sink of the pass is complete (a lean guidance pass has read its last layer), stop the pass:
    nothing later in the forward can change the loss."""
    chunks = options.get("cond_or_uncond") or [0]
    uuids = options.get("uuids")
    step = step_of(options)
    computed = {}
    for sink in receivers:
        picked = [j for j, kind in enumerate(chunks) if kind == 0 and
                  (sink.uuids is None or uuids is None or uuids[j] in sink.uuids)]
        if not picked:
            continue
        for j in picked:
            if j not in computed:
                computed[j] = chunk_probs(j)
        probs = [computed[j] for j in picked]
        sink.record(key, probs[0] if len(probs) == 1 else torch.stack(probs).mean(0), size, step)
    if all(sink.complete for sink in sinks):
        raise StopForward
