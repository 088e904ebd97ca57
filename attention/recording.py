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
    losses: name -> [B] float32, e.g. "segregation", "retention", "attend_excite", "total".
            Filled for guided steps by the guidance pass (values before that step's update).
    iterations: gradient steps taken at this step (0 when not guided, >1 with refinement).
    trace:  [F, B] total loss at each forward pass of a guided step (None when not guided).
    """

    step: int
    sigma: float
    maps: torch.Tensor
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

    def maps(self) -> torch.Tensor:
        """[S, L, B, C, h, w] over the recorded steps, in step order."""
        if not self.steps:
            raise ValueError("nothing was recorded: the sampler has not run with this recording yet")
        return torch.stack([s.maps for s in sorted(self.steps, key=lambda s: s.step)])
