"""Collectors for cross-attention probabilities seen during UNet forward passes.

The attention patch hands every selected layer's cond-branch probabilities to the collectors that
are active in that pass. One collector object per sampling run or guidance pass; nothing global.
"""
from __future__ import annotations

import torch

from .maps import concept_maps, excluded_token_columns, fold_repeated_context, token_softmax
from .recording import AttentionRecording, StepRecord


class StopForward(Exception):
    """Private control flow of the lean guidance pass: raised by the attention patch once every
    active collector is `complete`, caught by GuidancePasses.run. Nothing after the last recorded
    layer can change the guidance loss, so the rest of the UNet forward (and so its backward) is
    never run. Never escapes a guidance pass."""


class GuidanceCapture:
    """Differentiable probabilities of one guidance forward pass (A&E's aggregation: mean over
    heads and layers of the raw probabilities, token softmax afterwards).

    stop_after: the layer keys (in recording order) after which this pass may stop; None runs the
    whole UNet. uuids: the conditioning entries (ComfyUI cond uuids) that carry the prompt, None = all
    cond entries. n_tokens: the prompt's token count, to fold a repeated context."""

    def __init__(self, level: int, stop_after: tuple | None = None, uuids=None, n_tokens: int | None = None):
        self.level = level  # downsample level of the layers to collect (2 = 1/32 of the image side)
        self.uuids = uuids
        self.n_tokens = n_tokens
        self.probs: list[torch.Tensor] = []  # each [B, h*w, T]
        self.keys: list = []  # layer key of each entry of probs
        self.size: tuple[int, int] | None = None
        self.stop_after = tuple(stop_after) if stop_after else None

    def record(self, key, probs: torch.Tensor, size: tuple[int, int], step) -> None:
        """probs [B, h*w, T] of layer `key` at spatial size (h, w)."""
        if self.size is not None and size != self.size:
            raise ValueError(f"selected layers differ in size: {self.size} and {size}")
        self.size = size
        self.probs.append(fold_repeated_context(probs, self.n_tokens))
        self.keys.append(key)

    @property
    def complete(self) -> bool:
        """True once exactly the layers of stop_after were recorded, in order."""
        return self.stop_after is not None and len(self.keys) == len(self.stop_after) \
            and tuple(self.keys) == self.stop_after

    def concept_maps(self, token_groups) -> torch.Tensor:
        """[B, C, h, w] concept maps of this pass."""
        if not self.probs:
            raise LookupError("no cross-attention layer of the selected resolution ran")
        mean = torch.stack(self.probs).mean(0)
        soft = token_softmax(mean, excluded_token_columns(mean.shape[-1]))
        return concept_maps(soft, token_groups, *self.size)


class GuidancePasses:
    """The guidance passes of one sampling run, made lean: the run's first pass runs the whole UNet
    and learns which selected layers ran, in order; every later pass stops the forward right after
    the last of them (StopForward), so neither the forward nor the backward touches the layers after
    it (SD1.5 at 1/32: output blocks 6-11 and the output convolution). Maps, loss and gradient are
    those of the full pass. A pass whose recorded layers differ from the learned ones (a patch that
    changes activation sizes at some steps, e.g. Deep Shrink) never completes, runs in full and is
    learned from instead. full_passes and lean_passes count the passes of each kind."""

    enabled = True  # class switch: False runs every pass in full (tests compare the two)

    def __init__(self, level: int, uuids=None, n_tokens: int | None = None):
        self.level = level
        self.uuids = uuids
        self.n_tokens = n_tokens
        self.layers: tuple | None = None
        self.full_passes = 0
        self.lean_passes = 0

    def capture(self) -> GuidanceCapture:
        return GuidanceCapture(self.level, stop_after=self.layers if self.enabled else None,
                               uuids=self.uuids, n_tokens=self.n_tokens)

    def run(self, capture: GuidanceCapture, forward) -> None:
        """Run forward() (a UNet pass with `capture` active), stopped early once `capture` completes."""
        try:
            forward()
        except StopForward:
            self.lean_passes += 1
            return
        self.full_passes += 1
        self.layers = tuple(capture.keys) or None


class RunCapture:
    """Detached per-layer concept maps of the sampler's own passes, one set per denoising step.

    Only the first pass of a step is kept (second-order samplers evaluate a step twice)."""

    def __init__(self, level: int, words: list[str], token_groups: list[list[int]], uuids=None,
                 n_tokens: int | None = None):
        self.level = level
        self.uuids = uuids  # as in GuidanceCapture
        self.n_tokens = n_tokens
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
            probs = fold_repeated_context(probs.detach().float(), self.n_tokens)
            soft = token_softmax(probs, excluded_token_columns(probs.shape[-1]))
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
