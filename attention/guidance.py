"""One guided denoising step: A-STAR (segregation + retention) or Attend-and-Excite.

The sampler supplies maps_fn(z) -> concept maps [B, C, h', w'] (a UNet pass on the conditional
branch, attention recorded and token-softmaxed); this module differentiates the loss through it
and moves the latent: z <- z - alpha_t * grad_z L (A&E's update, no normalisation). Torch only.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from .losses import (
    BINARIZATION_METHODS,
    attend_excite_loss,
    binarize,
    pair_overlap,
    retention_loss,
    segregation_loss,
)
from .maps import gaussian_smooth, resize_mask
from .schedule import AE_REFINEMENT_POINTS

GUIDANCE_MODES = ("astar", "attend_excite")
LOSS_NAMES = ("segregation", "retention", "attend_excite", "total")


def _require_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"GuidanceConfig.{name} must be one of {choices}, got {value!r}")


def _require_number(name: str, value, minimum: float, maximum: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"GuidanceConfig.{name} must be a finite number, got {value!r}")
    if not minimum <= value <= maximum:
        raise ValueError(f"GuidanceConfig.{name} must be in [{minimum}, {maximum}], got {value!r}")


def _require_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"GuidanceConfig.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"GuidanceConfig.{name} must be >= {minimum}, got {value!r}")


def _require_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"GuidanceConfig.{name} must be True or False, got {value!r}")


def _frozen_points(value) -> MappingProxyType:
    """Validated, immutable copy of a {fraction of the noise schedule: threshold} mapping."""
    if not isinstance(value, Mapping):
        raise ValueError(f"GuidanceConfig.refine_points must be a mapping fraction -> threshold, got {value!r}")
    for point, threshold in value.items():
        if isinstance(point, bool) or not isinstance(point, numbers.Real) or not 0 <= point < 1:
            raise ValueError(f"GuidanceConfig.refine_points keys must be fractions of the noise schedule in [0, 1), got {point!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 <= threshold <= 1:
            raise ValueError(
                f"GuidanceConfig.refine_points values must be numbers in [0, 1], got {threshold!r} at {point}"
            )
    return MappingProxyType({float(p): float(t) for p, t in sorted(value.items())})


@dataclass(frozen=True)
class GuidanceConfig:
    """Settings of the guidance; validated on construction (ValueError naming the field).

    mode: "astar" (segregation + retention) or "attend_excite" (A&E's max-peak loss).
    segregation_weight, retention_weight: weights of A-STAR's two terms (paper: 1 and 1).
    start, end: the guidance window, as fractions f of the model's noise schedule (0 = pure noise;
    attention/schedule.py): a state at f is guided when start <= f < end (A&E: 0 and 0.5, its 25 of
    50 "normal" steps, which sit at f = i/49).
    scale: step-size scale, alpha = scale * sqrt(1 - f / 2) at f (A&E: 20; over 50 "normal" steps
    A&E's sqrt(linspace(1, 0.5, 50)[i])).
    refine: iterative refinement at refine_points ({fraction of the noise schedule: threshold}, applied
    at the first state at or past each; A&E's steps 0, 10, 20 of 50 are 0, 0.2, 0.4), at most
    max_refine_iters gradient steps each.
    binarization, fraction: how retention masks are made (see losses.binarize).
    smooth: A&E's 3x3 Gaussian on the maps before every loss.
    """

    mode: str = "astar"
    segregation_weight: float = 1.0
    retention_weight: float = 1.0
    start: float = 0.0
    end: float = 0.5
    scale: float = 20.0
    refine: bool = False
    refine_points: Mapping[float, float] = field(default_factory=lambda: AE_REFINEMENT_POINTS)
    max_refine_iters: int = 20
    binarization: str = "fraction"
    fraction: float = 0.5
    smooth: bool = True

    def __post_init__(self) -> None:
        _require_choice("mode", self.mode, GUIDANCE_MODES)
        _require_number("segregation_weight", self.segregation_weight, 0.0)
        _require_number("retention_weight", self.retention_weight, 0.0)
        _require_number("start", self.start, 0.0, 1.0)
        _require_number("end", self.end, 0.0, 1.0)
        if self.end < self.start:
            raise ValueError(f"GuidanceConfig.end ({self.end}) is before GuidanceConfig.start ({self.start}): "
                             "the guided steps are those at start <= f < end of the noise schedule")
        _require_number("scale", self.scale, 0.0)
        _require_bool("refine", self.refine)
        # A plain dict passed in is copied and frozen, so the config stays immutable.
        object.__setattr__(self, "refine_points", _frozen_points(self.refine_points))
        _require_count("max_refine_iters", self.max_refine_iters, 0)
        _require_choice("binarization", self.binarization, BINARIZATION_METHODS)
        _require_number("fraction", self.fraction, 0.0, 1.0)
        if self.fraction == 0:
            raise ValueError("GuidanceConfig.fraction must be > 0 (0 would mark every pixel), got 0")
        _require_bool("smooth", self.smooth)

    @property
    def moves(self) -> bool:
        """Whether a guided step can change the latent at all."""
        nothing_to_minimise = self.mode == "astar" and not (self.segregation_weight or self.retention_weight)
        return self.scale > 0 and not nothing_to_minimise


def _smoothed(maps: torch.Tensor, config: GuidanceConfig) -> torch.Tensor:
    return gaussian_smooth(maps) if config.smooth else maps


def guidance_losses(
    maps: torch.Tensor, prev_masks: torch.Tensor | None, config: GuidanceConfig
) -> dict[str, torch.Tensor]:
    """All losses of one forward, each [B], keyed "segregation", "retention", "attend_excite", "total".

    maps: [B, C, h, w] token-softmaxed concept maps (smoothed here when config.smooth).
    prev_masks: [B or 1, C, h, w] retention masks B_t from the previous step, or None (first guided
    step: retention is 0). "total" is what is minimised: w_seg * segregation + w_ret * retention
    in astar mode, attend_excite in attend_excite mode; the others are diagnostics.
    """
    # float32: half-precision sums over a map lose the eps of soft_overlap and small overlaps.
    maps = maps.float()
    smoothed = _smoothed(maps, config)
    segregation = segregation_loss(smoothed)
    if prev_masks is None:
        retention = maps.new_zeros(maps.shape[0])
    else:
        retention = retention_loss(smoothed, prev_masks)
    attend_excite = attend_excite_loss(smoothed, smooth=False)
    if config.mode == "attend_excite":
        total = attend_excite
    else:
        # Zero-weight terms are left out rather than multiplied by 0, so a NaN there cannot leak.
        total = maps.new_zeros(maps.shape[0])
        if config.segregation_weight:
            total = total + config.segregation_weight * segregation
        if config.retention_weight:
            total = total + config.retention_weight * retention
    return {"segregation": segregation, "retention": retention, "attend_excite": attend_excite, "total": total}


def refinement_measure(maps: torch.Tensor, config: GuidanceConfig) -> torch.Tensor:
    """How well the concepts are separated/present, [B]; refinement runs while it is < threshold.

    maps: [B, C, h, w]. attend_excite: 1 - attend_excite_loss, the weakest concept's smoothed peak
    (clamped at 1). astar with C >= 2: 1 - pair_overlap of the (smoothed) maps; with C < 2 it falls
    back to the attend_excite measure.
    """
    maps = maps.float()
    if config.mode == "astar" and maps.shape[1] >= 2:
        return 1.0 - pair_overlap(_smoothed(maps, config))
    return 1.0 - attend_excite_loss(maps, smooth=config.smooth)


@dataclass
class GuidedStep:
    """Result of guided_step.

    latent: [B, 4, h, w] updated latent, detached, same dtype and device as the input.
    masks: [B, C, h', w'] binarised (smoothed) maps of the last forward: next step's prev_masks.
    losses: name -> [B], detached, at the latent before any update at this step.
    iterations: gradient steps taken (refinement steps + the regular one; 0 when nothing moved).
    skipped: bool [B], True where an update was skipped for a non-finite loss or gradient.
    maps: [B, C, h', w'] detached, unsmoothed maps at the latent before any update at this step.
    trace: [F, B] total loss at each of the step's F forward passes, in order (refinement progress).
    """

    latent: torch.Tensor
    masks: torch.Tensor
    losses: dict[str, torch.Tensor]
    iterations: int
    skipped: torch.Tensor
    maps: torch.Tensor
    trace: torch.Tensor


def _retention_masks(
    maps: torch.Tensor,
    prev_masks: torch.Tensor | None,
    layout_masks: Mapping[int, torch.Tensor] | None,
) -> torch.Tensor | None:
    """prev_masks [B or 1, C, h, w] with the user's layout masks replacing their concepts.

    Without prev_masks the other concepts get all-zero masks, which retention_loss skips.
    Layout masks [B or 1, h, w] or [h, w] of another resolution are area-resized to the maps'.
    """
    if not layout_masks:
        return prev_masks
    batch, n_concepts, height, width = maps.shape
    if prev_masks is None:
        masks = maps.new_zeros(batch, n_concepts, height, width)
    else:
        masks = prev_masks.detach().to(maps.dtype).expand(batch, n_concepts, height, width).clone()
    for concept, layout in layout_masks.items():
        if not 0 <= concept < n_concepts:
            raise ValueError(f"layout mask for concept {concept}, but there are only {n_concepts} concepts")
        if layout.dim() == 2:
            layout = layout.unsqueeze(0)
        if tuple(layout.shape[-2:]) != (height, width):
            layout = resize_mask(layout, height, width)
        masks[:, concept] = layout.detach().to(device=maps.device, dtype=maps.dtype)
    return masks


NO_GRADIENT_PATH = (
    "the attention maps do not depend on the latent: the model's forward has no gradient path (a layer computes "
    "without autograd, e.g. fp8 matrix multiplication), so the guidance step cannot be taken. Load the model in "
    "another weight dtype (Load Diffusion Model: weight_dtype 'default'), or set the step size to 0")


def _descend(
    leaf: torch.Tensor, total: torch.Tensor, step_size: float, active: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One gradient step z - step_size * grad for the active samples whose loss and gradient are finite.

    leaf: [B, ...] latent the forward was run from (requires grad); total: [B] loss; active: bool [B].
    Returns (new latent [B, ...] detached, bool [B] of active samples skipped as non-finite).
    """
    finite_loss = torch.isfinite(total.detach())
    if total.requires_grad:
        # Non-finite samples are masked out of the sum; samples are independent, so the rest stay clean.
        objective = torch.where(finite_loss, total, torch.zeros_like(total)).sum()
        (grad,) = torch.autograd.grad(objective, leaf, allow_unused=True)
    else:
        grad = None
    if grad is None:
        if total.requires_grad:  # the loss depends on something that requires grad, but not on the latent
            raise ValueError(NO_GRADIENT_PATH)
        grad = torch.zeros_like(leaf)  # a loss legitimately constant (one concept, no retention yet)
    finite_grad = torch.isfinite(grad).flatten(1).all(dim=1)
    apply = active & finite_loss & finite_grad
    start = leaf.detach()
    stepped = (start.float() - step_size * grad.float()).to(start.dtype)
    latent = torch.where(apply.view(-1, *([1] * (start.dim() - 1))), stepped, start)
    return latent, active & ~(finite_loss & finite_grad)


def guided_step(
    z: torch.Tensor,
    maps_fn: Callable[[torch.Tensor], torch.Tensor],
    step_size: float,
    prev_masks: torch.Tensor | None,
    config: GuidanceConfig,
    refine_threshold: float | None = None,
    layout_masks: Mapping[int, torch.Tensor] | None = None,
    check_interrupt: Callable[[], None] | None = None,
    label: str = "this step",
) -> GuidedStep:
    """Guide the latent of one denoising step.

    z: [B, 4, h, w] UNet input latent z_t. maps_fn(z) -> differentiable concept maps [B, C, h', w']
    (token-softmaxed, unsmoothed). prev_masks: [B or 1, C, h', w'] from the previous step's
    GuidedStep.masks, or None. layout_masks: {concept index: [B or 1, h', w']} user masks that
    replace B_t for those concepts at every step. check_interrupt() is called before every forward
    and may raise to stop.

    With refine_threshold (and config.refine), first A&E's iterative refinement on the samples whose
    refinement_measure is below it: gradient steps while the measure *before* each step is below
    the threshold (so one more step is taken after reaching it, as A&E's loop does), at most
    config.max_refine_iters; then one regular step on all samples from a fresh forward.
    Non-finite samples are left unchanged, flagged in skipped, and reported with warnings.warn
    (label names the step). A step that should move (step_size > 0) raises ValueError (NO_GRADIENT_PATH)
    when the maps do not depend on z, or the loss depends on something else that requires grad but not on
    z: never a silent zero step. A loss that is constant by construction (one concept at the first step,
    astar mode) is a no-op.
    """
    if not (math.isfinite(step_size) and step_size >= 0):
        raise ValueError(f"step_size must be a finite number >= 0, got {step_size!r}")
    # ComfyUI samples under torch.inference_mode(); gradients need it off, and plain clones of the
    # inputs, because inference tensors can neither require grad nor be saved for backward.
    with torch.inference_mode(False):
        if prev_masks is not None:
            prev_masks = prev_masks.clone()
        threshold = refine_threshold if config.refine else None
        return _guided_step(z.clone(), maps_fn, step_size, prev_masks, config, threshold, layout_masks,
                            check_interrupt, label)


def _guided_step(
    start: torch.Tensor,
    maps_fn: Callable[[torch.Tensor], torch.Tensor],
    step_size: float,
    prev_masks: torch.Tensor | None,
    config: GuidanceConfig,
    threshold: float | None,
    layout_masks: Mapping[int, torch.Tensor] | None,
    check_interrupt: Callable[[], None] | None,
    label: str,
) -> GuidedStep:
    """guided_step's body, run outside inference mode; start is a plain (non-inference) copy of z."""
    start = start.detach()
    moves = step_size > 0 and config.moves

    def forward(latent: torch.Tensor):
        if check_interrupt is not None:
            check_interrupt()
        if moves:
            leaf = latent.detach().requires_grad_(True)
            with torch.enable_grad():
                maps = maps_fn(leaf)
                if not maps.requires_grad:
                    raise ValueError(NO_GRADIENT_PATH)
                losses = guidance_losses(maps, _retention_masks(maps, prev_masks, layout_masks), config)
        else:
            leaf = latent
            with torch.no_grad():
                maps = maps_fn(leaf)
                losses = guidance_losses(maps, _retention_masks(maps, prev_masks, layout_masks), config)
        return leaf, maps, losses

    leaf, maps, losses = forward(start)
    trace = [losses["total"].detach()]
    entry_maps = maps.detach()
    entry_losses = {name: value.detach() for name, value in losses.items()}
    skipped = torch.zeros(start.shape[0], dtype=torch.bool, device=start.device)
    iterations = 0
    latent = start

    if moves:
        if threshold is not None:
            with torch.no_grad():
                refining = (refinement_measure(maps.detach(), config) < threshold) & ~skipped
            while refining.any() and iterations < config.max_refine_iters:
                # A&E's loop tests the measure of the latent before each update: a sample stops after the
                # update that follows the first latent reaching the threshold.
                latent, bad = _descend(leaf, losses["total"], step_size, refining)
                skipped |= bad
                iterations += 1
                with torch.no_grad():
                    refining &= (refinement_measure(maps.detach(), config) < threshold) & ~skipped
                leaf, maps, losses = forward(latent)
                trace.append(losses["total"].detach())
        everyone = torch.ones_like(skipped)
        latent, bad = _descend(leaf, losses["total"], step_size, everyone)
        skipped |= bad
        iterations += 1

    if skipped.any():
        samples = skipped.nonzero().flatten().tolist()
        warnings.warn(
            f"guidance at {label}: non-finite loss or gradient for batch sample(s) {samples}; "
            "their latent was left unguided at this step. Try a smaller scale or other attention layers.",
            RuntimeWarning,
            stacklevel=3,  # point at guided_step's caller
        )
    masks = binarize(_smoothed(maps.detach(), config), config.binarization, config.fraction)
    return GuidedStep(
        latent=latent.detach(),
        masks=masks,
        losses=entry_losses,
        iterations=iterations,
        skipped=skipped,
        maps=entry_maps,
        trace=torch.stack(trace),
    )
