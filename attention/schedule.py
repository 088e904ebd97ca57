"""When to guide, how far to move, and when to refine: Attend-and-Excite's schedule, stated in
fractions of the sampled steps so that changing the step count keeps its meaning.

A step is placed by its position in the sampled schedule: step i of n has position i; a solver
with its own time grid (dpm_fast, dpm_adaptive) has fractional positions (schedule_position).
A&E at 50 steps: guide positions 0-24 (window 0 to 0.5), refine at 0, 10, 20 (fractions 0, 0.2, 0.4).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

# A&E: at 0, 10 and 20 of 50 steps, refine until the weakest concept's smoothed peak reaches the value.
AE_REFINEMENT_POINTS = MappingProxyType({0.0: 0.05, 0.2: 0.5, 0.4: 0.8})
THRESHOLDS_FORMAT = ("comma-separated fraction:threshold pairs, fractions of the sampled steps in [0, 1), "
                     "e.g. '0:0.05, 0.2:0.5, 0.4:0.8' (A&E's steps 0, 10, 20 of 50)")


def in_window(position: float, n_steps: int, start: float, end: float) -> bool:
    """Whether the step at `position` (0-based, of n_steps) is guided: start*n <= position < end*n."""
    return start * n_steps <= position < end * n_steps


def step_size_at(scale: float, position: float, n_steps: int, first: float = 1.0, last: float = 0.5) -> float:
    """A&E's step size: scale * sqrt(linspace(first, last, n_steps)[i]), continued to fractional positions."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if first < 0 or last < 0:
        raise ValueError(f"first and last must be >= 0 (they go under a square root), got {first}, {last}")
    if n_steps == 1:
        return scale * math.sqrt(first)
    return scale * math.sqrt(first + (last - first) * position / (n_steps - 1))


def schedule_position(sigma: float, sigmas: Sequence[float]) -> float:
    """Fractional index of `sigma` in a descending schedule, interpolated in log sigma (linearly into 0).

    An exact schedule value gives its index (the first of equal values); a sigma above the first
    gives 0, below the last gives len(sigmas) - 1."""
    values = [float(s) for s in sigmas]
    for i, s in enumerate(values):
        if sigma == s:
            return float(i)
    if sigma >= values[0]:
        return 0.0
    for i in range(len(values) - 1):
        hi, lo = values[i], values[i + 1]
        if hi > sigma > lo:
            if lo > 0:
                return i + (math.log(hi) - math.log(sigma)) / (math.log(hi) - math.log(lo))
            return i + (hi - sigma) / hi
    return float(len(values) - 1)


def refinement_threshold(position: float, previous_position: float | None, n_steps: int,
                         points: Mapping[float, float]) -> float | None:
    """The threshold to refine at, for the guided step at `position` whose previous guided step was at
    previous_position (None for the first): a point f applies at the first step with position >= f*n
    (so at step ceil(f*n) when positions are whole). The highest such threshold when several apply."""
    hits = [t for f, t in points.items()
            if position >= f * n_steps and (previous_position is None or previous_position < f * n_steps)]
    return max(hits) if hits else None


def parse_thresholds(text: str) -> MappingProxyType:
    """Parse "0:0.05, 0.2:0.5, 0.4:0.8" into an immutable {fraction: threshold} mapping.

    Fractions of the sampled steps in [0, 1), thresholds in [0, 1]; blank text means no refinement.
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
            raise ValueError(f"refinement point {point} is not a fraction of the steps in [0, 1) in {text!r}: "
                             f"expected {THRESHOLDS_FORMAT}")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"refinement threshold {value} at {point} is outside [0, 1] in {text!r}")
        if point in thresholds:
            raise ValueError(f"refinement point {point} appears twice in {text!r}")
        thresholds[point] = value
    return MappingProxyType(dict(sorted(thresholds.items())))
