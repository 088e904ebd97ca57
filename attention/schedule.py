"""When to guide, how far to move, and when to refine: Attend-and-Excite's schedule, on the clock of
the model's noise levels, so that every sampler run of one model agrees on it.

A state at noise level sigma has the place f(sigma) in [0, 1] of the model's full noise schedule that
ComfyUI's ConditioningSetTimestepRange uses: model_sampling.percent_to_sigma(f) = sigma (0 = pure noise,
1 = clean). guidance_start/end, the step-size schedule and the refinement points are fractions on that
clock, whatever part of the schedule a sampler run covers (hires fix, img2img, a KSamplerAdvanced
segment, a refiner). A full txt2img run with the "normal" scheduler places its step i of n at
f = i / (n - 1), so A&E's window 0-0.5 guides its first 25 of 50 steps, refines at 0, 10 and 20
(points 0, 0.2, 0.4) and steps with A&E's step sizes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

# A&E: at 0, 10 and 20 of 50 steps, refine until the weakest concept's smoothed peak reaches the value.
AE_REFINEMENT_POINTS = MappingProxyType({0.0: 0.05, 0.2: 0.5, 0.4: 0.8})
THRESHOLDS_FORMAT = ("comma-separated fraction:threshold pairs, fractions of the model's noise schedule in [0, 1), "
                     "e.g. '0:0.05, 0.2:0.5, 0.4:0.8' (A&E's steps 0, 10, 20 of 50)")
# a point or bound within this of a state's fraction is on it: sigmas come as float32 from the model's
# float32 sigma table, and at a high shift (Flux at 2048 px: shift 3.2, near the noisy end) one float32 step
# of sigma moves the fraction by up to about 2e-6; steps are 1e-3 apart at the most (1000 steps)
FRACTION_TOLERANCE = 1e-5


def in_window(fraction: float, start: float, end: float) -> bool:
    """Whether a state at place `fraction` of the noise schedule (schedule_fraction) is guided: start <= f < end,
    and every state from start on when end is 1 (the clean end of the clock). A state within
    FRACTION_TOLERANCE of a bound is on it: the scheduler puts states on round fractions (step 5 of 10 at
    0.5) and the sampler holds their sigmas in float32 (up to about 2e-6 off in fraction at high shifts)."""
    return start - FRACTION_TOLERANCE <= fraction and (fraction < end - FRACTION_TOLERANCE or end >= 1.0)


def schedule_fraction(sigma: float, percent_to_sigma: Callable[[float], float], iterations: int = 60) -> float:
    """f(sigma): the fraction of the model's noise schedule at which its noise level is sigma, by bisection
    of the decreasing percent_to_sigma on (0, 1) (its ends are special values in ComfyUI). 0 above the
    schedule's first sigma, 1 at 0."""
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if float(percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def step_size_at(scale: float, fraction: float, first: float = 1.0, last: float = 0.5) -> float:
    """A&E's step size on the noise clock: scale * sqrt(first + (last - first) * f); at f = i / (n - 1)
    (step i of a full n-step "normal" run) A&E's scale * sqrt(linspace(first, last, n)[i])."""
    if first < 0 or last < 0:
        raise ValueError(f"first and last must be >= 0 (they go under a square root), got {first}, {last}")
    fraction = min(max(fraction, 0.0), 1.0)
    return scale * math.sqrt(first + (last - first) * fraction)


def refinement_threshold(fraction: float, previous_fraction: float, points: Mapping[float, float]) -> float | None:
    """The threshold to refine at, for the state at `fraction` whose preceding state in the schedule was at
    previous_fraction: a point p applies at the first state at or past it, previous < p <= fraction. The
    highest such threshold when several apply."""
    hits = [t for p, t in points.items()
            if previous_fraction < p - FRACTION_TOLERANCE and p <= fraction + FRACTION_TOLERANCE]
    return max(hits) if hits else None


def previous_fractions(fractions: Sequence[float]) -> list[float]:
    """For each state of a run (their fractions, in order), the fraction of the state before it; before
    the run's first state, one step of the run earlier (extrapolated), so that a run starting mid-schedule
    (img2img; a second KSamplerAdvanced segment of another model) does not take a point that an earlier run
    already passed; a run of one state has no step to go by and takes every point up to it."""
    if not fractions:
        return []
    if len(fractions) == 1:  # no gap to go by: taken as before the schedule's start (nothing passed yet)
        return [-FRACTION_TOLERANCE * 2]
    return [fractions[0] - max(fractions[1] - fractions[0], FRACTION_TOLERANCE * 2), *fractions[:-1]]


def parse_thresholds(text: str) -> MappingProxyType:
    """Parse "0:0.05, 0.2:0.5, 0.4:0.8" into an immutable {fraction: threshold} mapping.

    Fractions of the model's noise schedule in [0, 1), thresholds in [0, 1]; blank text means no refinement.
    Raises ValueError showing the expected format on anything else."""
    thresholds: dict[float, float] = {}
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        point_text, sep, value_text = item.partition(":")
        try:
            if not sep:
                raise ValueError
            point, value = float(point_text.strip()), float(value_text.strip())
        except ValueError:
            raise ValueError(
                f"cannot read {item!r} in refinement thresholds {text!r}: expected {THRESHOLDS_FORMAT}"
            ) from None
        if not 0.0 <= point < 1.0:
            raise ValueError(f"refinement point {point} is not a fraction of the noise schedule in [0, 1) in {text!r}: "
                             f"expected {THRESHOLDS_FORMAT}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"refinement threshold {value} at {point} is outside [0, 1] in {text!r}")
        if point in thresholds:
            raise ValueError(f"refinement point {point} appears twice in {text!r}")
        thresholds[point] = value
    return MappingProxyType(dict(sorted(thresholds.items())))
