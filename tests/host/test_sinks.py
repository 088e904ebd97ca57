"""The one rule both readers (UNet patch, joint-attention override) follow to hand a batched call's
probabilities to the sinks of a pass (nodes/transformer_options.py's hand_to_sinks): only cond chunks,
only the chunks of the sink's own prompt (ConditioningCombine batches other prompts' chunks into the same
call), the mean over them, each chunk computed once; the pass stops when every sink of it is complete."""
from __future__ import annotations

import pytest
import torch

from support import host as hosts


class Sink:
    level, complete = None, False

    def __init__(self, uuids=None, complete=False):
        self.uuids, self.complete, self.records = uuids, complete, []

    def record(self, key, probs, size, step):
        self.records.append((key, probs, size, step))


def test_each_sink_gets_the_mean_of_its_prompts_cond_chunks_and_a_complete_pass_stops(host):
    options_mod = hosts.pack_module("nodes.transformer_options")
    stop = hosts.pack_module("attention.capture").StopForward
    # one call batching 5 chunks: uncond (prompt a), cond a, cond b, cond a (an area entry), uncond (b)
    chunks = [1, 0, 0, 0, 1]
    uuids = ["a", "a", "b", "a", "b"]
    probs = [torch.full((1, 4, 3), float(10 ** j)) for j in range(5)]
    asked = []

    def chunk_probs(j):
        asked.append(j)
        return probs[j]

    only_a, only_b, every = Sink(frozenset({"a"})), Sink(frozenset({"b"})), Sink(None)
    options = {"cond_or_uncond": chunks, "uuids": uuids, options_mod.STEP_KEY: 7}
    sinks = [only_a, only_b, every]
    options_mod.hand_to_sinks(sinks, sinks, options, ("input", 7, 0), (2, 2), chunk_probs)
    # prompt a's cond chunks are 1 and 3 (values 10 and 1000), b's is 2 (value 100)
    assert [r[1][0, 0, 0].item() for r in only_a.records] == [505.0]
    assert [r[1][0, 0, 0].item() for r in only_b.records] == [100.0]
    assert [r[1][0, 0, 0].item() for r in every.records] == [370.0]
    assert only_a.records[0][0] == ("input", 7, 0) and only_a.records[0][2:] == ((2, 2), 7)
    assert sorted(asked) == [1, 2, 3], asked  # uncond chunks never computed, each cond chunk once

    # a sink of another level (not among the receivers) still holds the pass open until it is complete
    receivers = [Sink(None, complete=True)]
    options_mod.hand_to_sinks(receivers + [Sink(None)], receivers, options, "k", (2, 2), chunk_probs)
    with pytest.raises(stop):
        options_mod.hand_to_sinks(receivers + [Sink(None, complete=True)], receivers, options, "k", (2, 2),
                                  chunk_probs)


def test_a_pass_outside_an_astar_run_places_its_step_by_sigma(host):
    options_mod = hosts.pack_module("nodes.transformer_options")
    schedule = torch.tensor([14.6, 7.0, 3.0, 0.0])
    assert options_mod.step_of({"sample_sigmas": schedule, "sigmas": torch.tensor([3.0, 3.0])}) == 2
    assert options_mod.step_of({"sample_sigmas": schedule, "sigmas": torch.tensor([5.0])}) is None
    assert options_mod.step_of({options_mod.STEP_KEY: 1, "sample_sigmas": schedule,
                                "sigmas": torch.tensor([3.0])}) == 1
