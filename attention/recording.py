"""What a sampling run recorded: per-step concept attention maps and per-step losses.

Shared by the guided sampler, the record-only patch and the overlay node. Plain data, torch only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepRecord:
    """One denoising step.

    step:   index of the step among the steps actually run (0-based).
    sigma:  the step's noise level.
    maps:   [L, B, C, h, w] float32 concept maps of each recorded layer, after the token softmax
            (each pixel sums to <= 1 over concepts), before smoothing, on the cond branch.
    loss_maps: [B, C, h, w] float32 the maps as the guidance loss sees them: mean over the layers,
            then token softmax, then smoothing when on; at a guided step, those of its guidance pass
            (before the step's update). None when not recorded.
    losses: name -> [B] float32, e.g. "segregation", "retention", "attend_excite", "total".
            Filled for guided steps by the guidance pass (values before that step's update).
    iterations: gradient steps taken at this step (0 when not guided, >1 with refinement).
    trace:  [F, B] total loss at each forward pass of a guided step (None when not guided).
    """

    step: int
    sigma: float
    maps: torch.Tensor
    loss_maps: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    iterations: int = 0
    trace: torch.Tensor | None = None


@dataclass
class AttentionRecording:
    """All steps of one run. words[c] labels concept c of every map; layers[l] names layer l as
    ComfyUI's (block, block_id, transformer_index) key."""

    words: list[str]
    layers: list[tuple] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)

    def loss_view(self) -> "AttentionRecording":
        """The same run with one pseudo-layer per step: the maps as the loss saw them."""
        if any(s.loss_maps is None for s in self.steps):
            raise ValueError("this recording has no maps as the loss saw them; show its layers instead")
        steps = [StepRecord(step=s.step, sigma=s.sigma, maps=s.loss_maps.unsqueeze(0), loss_maps=s.loss_maps,
                            losses=s.losses, iterations=s.iterations, trace=s.trace) for s in self.steps]
        return AttentionRecording(words=list(self.words), layers=[("as the loss saw them", len(self.layers))],
                                  steps=steps)

    def maps(self) -> torch.Tensor:
        """[S, L, B, C, h, w] over the recorded steps, in step order."""
        if not self.steps:
            raise ValueError("nothing was recorded: the sampler has not run with this recording yet")
        return torch.stack([s.maps for s in sorted(self.steps, key=lambda s: s.step)])


class RecordedRuns(list):
    """The recordings of the sampler runs of one patched model, oldest first; only the last
    MAX_RUNS are kept (a patched model served from ComfyUI's cache records every later run too)."""

    MAX_RUNS = 8

    def append(self, recording: AttentionRecording) -> None:
        super().append(recording)
        del self[:-self.MAX_RUNS]
