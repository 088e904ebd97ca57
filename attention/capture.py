"""Collectors for cross-attention probabilities seen during UNet forward passes.

The attention patch hands every selected layer's cond-branch probabilities to the collectors that
are active in that pass. One collector object per sampling run or guidance pass; nothing global.
"""
from __future__ import annotations

import torch

from .maps import concept_maps, excluded_token_columns, token_softmax
from .recording import AttentionRecording, StepRecord


class GuidanceCapture:
    """Differentiable probabilities of one guidance forward pass (A&E's aggregation: mean over
    heads and layers of the raw probabilities, token softmax afterwards)."""

    def __init__(self, level: int):
        self.level = level  # downsample level of the layers to collect (2 = 1/32 of the image side)
        self.probs: list[torch.Tensor] = []  # each [B, h*w, T]
        self.size: tuple[int, int] | None = None

    def record(self, key, probs: torch.Tensor, size: tuple[int, int], step) -> None:
        """probs [B, h*w, T] of layer `key` at spatial size (h, w)."""
        if self.size is not None and size != self.size:
            raise ValueError(f"selected layers differ in size: {self.size} and {size}")
        self.size = size
        self.probs.append(probs)

    def concept_maps(self, token_groups) -> torch.Tensor:
        """[B, C, h, w] concept maps of this pass."""
        if not self.probs:
            raise LookupError("no cross-attention layer of the selected resolution ran")
        mean = torch.stack(self.probs).mean(0)
        soft = token_softmax(mean, excluded_token_columns(mean.shape[-1]))
        return concept_maps(soft, token_groups, *self.size)


class RunCapture:
    """Detached per-layer concept maps of the sampler's own passes, one set per denoising step.

    Only the first pass of a step is kept (second-order samplers evaluate a step twice)."""

    def __init__(self, level: int, words: list[str], token_groups: list[list[int]]):
        self.level = level
        self.words = list(words)
        self.token_groups = [list(g) for g in token_groups]
        self.steps: dict[int, dict] = {}  # step -> {layer key: [B, C, h, w]}
        self.sigmas: dict[int, float] = {}

    def record(self, key, probs: torch.Tensor, size: tuple[int, int], step) -> None:
        if step is None:
            return
        layers = self.steps.setdefault(step, {})
        if key in layers:
            return
        with torch.no_grad():
            soft = token_softmax(probs.detach().float(), excluded_token_columns(probs.shape[-1]))
            layers[key] = concept_maps(soft, self.token_groups, *size).cpu()

    def to_recording(self, guidance_log: dict[int, dict] | None = None) -> AttentionRecording:
        """guidance_log: step -> {"losses": {name: [B]}, "iterations": int, "sigma": float}."""
        guidance_log = guidance_log or {}
        keys = sorted({k for layers in self.steps.values() for k in layers})
        rec = AttentionRecording(words=self.words, layers=keys)
        for step in sorted(self.steps):
            layers = self.steps[step]
            if set(layers) != set(keys):
                continue  # a pass cut short (interrupt); keep only complete steps
            log = guidance_log.get(step, {})
            rec.steps.append(StepRecord(
                step=step, sigma=float(self.sigmas.get(step, float("nan"))),
                maps=torch.stack([layers[k] for k in keys]),
                losses={n: v.detach().float().cpu() for n, v in log.get("losses", {}).items()},
                iterations=int(log.get("iterations", 0)),
                trace=log["trace"].detach().float().cpu() if "trace" in log else None))
        return rec
