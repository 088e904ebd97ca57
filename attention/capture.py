"""Collectors for the text-attention probabilities seen during model forward passes.

The UNet's cross-attention patch and the joint-attention hook hand every selected layer's or block's
cond-branch probabilities [B, h*w, T] to the sinks (AttentionSink) that are active in that pass. One
collector object per sampling run or guidance pass; nothing global.
"""
from __future__ import annotations

import torch

from .maps import concept_maps, excluded_token_columns, fold_repeated_context, token_softmax
from .recording import AttentionRecording, StepRecord


class StopForward(BaseException):
    """Private control flow of the lean guidance pass: raised by the attention patch once every
    active collector is `complete`, caught by GuidancePasses.run. Nothing after the last recorded
    layer can change the guidance loss, so the rest of the UNet forward (and so its backward) is
    never run. Never escapes a guidance pass. A BaseException, so that a wrapper's
    `except Exception` (an out-of-memory fallback, say) cannot swallow it."""


class AttentionSink:
    """What a reader hands probabilities to; every collector is one.

    level: UNet passes: the downsample level of the layers it takes (2 = 1/32 of the image side); joint
        passes hand it every read block whatever its level.
    uuids: the ComfyUI cond uuids of the prompt whose cond chunks it takes; None = every cond chunk.
    complete: True once it has every layer it needs; when every sink of a pass is complete the reader
        raises StopForward (a lean guidance pass).
    record(key, probs, size, step): layer or block `key`'s probabilities [B, h*w, T] (B = one cond chunk's
        batch; head-mean softmax of the image queries over the text keys; differentiable in a guidance
        pass) on the (h, w) grid `size`, in the pass of sampler step `step` (None: not an A-STAR step)."""

    level: int | None = None
    uuids = None
    complete = False

    def record(self, key, probs: torch.Tensor, size: tuple[int, int], step) -> None:
        raise NotImplementedError


class GuidanceCapture(AttentionSink):
    """Differentiable probabilities of one guidance forward pass (A&E's aggregation: mean over
    heads and layers of the raw probabilities, token softmax afterwards).

    stop_after: the layer keys (in recording order) after which this pass may stop; None runs the
    whole UNet. uuids: the conditioning entries (ComfyUI cond uuids) that carry the prompt, None = all
    cond entries. n_tokens: the conditioning's own context length, to fold a context ComfyUI repeated
    to batch it with a longer one. excluded: token columns left out of the token softmax."""

    def __init__(self, level: int, stop_after: tuple | None = None, uuids=None, n_tokens: int | None = None,
                 excluded: tuple[int, ...] | None = None):
        self.level = level  # downsample level of the layers to collect (2 = 1/32 of the image side)
        self.uuids = uuids
        self.n_tokens = n_tokens
        self.excluded = excluded
        self.probs: list[torch.Tensor] = []  # each [B, h*w, T]
        self.keys: list = []  # layer key of each entry of probs
        self.size: tuple[int, int] | None = None
        self.stop_after = tuple(stop_after) if stop_after else None

    def record(self, key, probs: torch.Tensor, size: tuple[int, int], step) -> None:
        """probs [B, h*w, T] of layer `key` at spatial size (h, w)."""
        if self.size is not None and size != self.size:
            raise ValueError(f"selected layers or blocks differ in map size: {self.size} and {size}")
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
            raise LookupError("no selected attention layer or block ran in this pass")
        mean = torch.stack(self.probs).mean(0)
        soft = token_softmax(mean, _excluded(self.excluded, mean.shape[-1]))
        return concept_maps(soft, token_groups, *self.size)


def _excluded(excluded, n_tokens: int) -> tuple[int, ...]:
    """The given columns, or A&E's default (each chunk's start token and the last column)."""
    return tuple(excluded) if excluded is not None else excluded_token_columns(n_tokens)


class GuidancePasses:
    """The guidance passes of one sampling run, made lean: given the selected layers in the order they
    run (`layers`: known from the model's structure, or learned by a pass that ran in full: the run's
    first when they are not known), a pass stops the forward right after the last of them (StopForward), so
    neither the forward nor the backward touches the layers after it (SD1.5 at 1/32: output blocks 6-11
    and the output convolution). Maps, loss and gradient are
    those of the full pass. A pass whose recorded layers differ from the learned ones (a patch that
    changes activation sizes at some steps, e.g. Deep Shrink) never completes, runs in full and is
    learned from instead. full_passes and lean_passes count the passes of each kind. lean=False runs
    every pass in full."""

    def __init__(self, level: int, uuids=None, n_tokens: int | None = None, excluded=None, lean: bool = True):
        self.level = level
        self.uuids = uuids
        self.n_tokens = n_tokens
        self.excluded = excluded
        self.lean = lean
        self.layers: tuple | None = None
        self.full_passes = 0
        self.lean_passes = 0

    def capture(self) -> GuidanceCapture:
        return GuidanceCapture(self.level, stop_after=self.layers if self.lean else None,
                               uuids=self.uuids, n_tokens=self.n_tokens, excluded=self.excluded)

    def run(self, capture: GuidanceCapture, forward) -> None:
        """Run forward() (a UNet pass with `capture` active), stopped early once `capture` completes."""
        try:
            forward()
        except StopForward:
            self.lean_passes += 1
            return
        self.full_passes += 1
        self.layers = tuple(capture.keys) or None


class RunCapture(AttentionSink):
    """Concept maps of the sampler's own passes, one set per denoising step, kept on the model's
    device during the run (no synchronisation per layer) and moved to the CPU once, by to_recording.

    Per step: the concept maps of each layer (token-softmaxed per layer), and the maps as the guidance
    loss sees them (mean of the layers' probabilities, then token softmax; smoothed by to_recording).
    Only the step being recorded holds its layers' probability sum [B, h*w, T]; once a record of another
    step comes (or to_recording), it is reduced to its [B, C, h, w] maps, so the memory held does not grow
    with the number of steps times h*w*T. The wrapper records only a step's state evaluation, and the
    sampler evaluates its steps' states in order."""

    def __init__(self, level: int, words: list[str], token_groups: list[list[int]], uuids=None,
                 n_tokens: int | None = None, excluded: tuple[int, ...] | None = None):
        self.level = level
        self.uuids = uuids  # as in GuidanceCapture
        self.n_tokens = n_tokens
        self.excluded = excluded
        self.words = list(words)
        self.token_groups = [list(g) for g in token_groups]
        self.steps: dict[int, dict] = {}  # step -> {layer key: [B, C, h, w]}
        self.loss_maps: dict[int, torch.Tensor] = {}  # finished step -> [B, C, h, w], before smoothing
        self.open: list | None = None  # [step, sum of probs [B, h*w, T], number of layers, (h, w)]
        self.sigmas: dict[int, float] = {}

    def record(self, key, probs: torch.Tensor, size: tuple[int, int], step) -> None:
        if step is None:
            return
        if self.open is not None and self.open[0] != step:
            self._close()
        layers = self.steps.setdefault(step, {})
        if key in layers:
            return
        with torch.no_grad():
            probs = fold_repeated_context(probs.detach().float(), self.n_tokens)
            soft = token_softmax(probs, _excluded(self.excluded, probs.shape[-1]))
            layers[key] = concept_maps(soft, self.token_groups, *size)
            if self.open is None or self.open[3] != size:
                self.open = [step, probs.clone(), 1, size]
            else:
                self.open[1] += probs
                self.open[2] += 1

    def _close(self) -> None:
        """Reduce the open step's probability sum to its maps as the loss sees them (before smoothing)."""
        step, total, count, size = self.open
        self.open = None
        mean = total / count
        self.loss_maps[step] = concept_maps(token_softmax(mean, _excluded(self.excluded, mean.shape[-1])),
                                            self.token_groups, *size)

    def to_recording(self, guidance_log: dict[int, dict] | None = None, smooth=lambda m: m) -> AttentionRecording:
        """guidance_log: step -> {"losses": {name: [B]}, "iterations": int, "trace", "maps"}: a guided
        step's maps as its guidance pass saw them (before its update). smooth: the loss's smoothing."""
        if self.open is not None:
            self._close()
        guidance_log = guidance_log or {}
        keys = sorted({k for layers in self.steps.values() for k in layers})
        rec = AttentionRecording(words=self.words, layers=keys)
        for step in sorted(self.steps):
            layers = self.steps[step]
            if set(layers) != set(keys):
                continue  # a pass cut short (interrupt); keep only complete steps
            log = guidance_log.get(step, {})
            seen = smooth(log["maps"]) if "maps" in log else smooth(self.loss_maps[step])
            rec.steps.append(StepRecord(
                step=step, sigma=float(self.sigmas.get(step, float("nan"))),
                maps=torch.stack([layers[k] for k in keys]).cpu(),
                loss_maps=seen.detach().float().cpu(),
                losses={n: v.detach().float().cpu() for n, v in log.get("losses", {}).items()},
                iterations=int(log.get("iterations", 0)),
                trace=log["trace"].detach().float().cpu() if "trace" in log else None))
        return rec
