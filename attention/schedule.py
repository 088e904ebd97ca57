"""Step sizes and refinement thresholds of the guidance, following Attend-and-Excite's defaults.

Step indices are denoising-step indices (0 = the first, noisiest step), not diffusion timesteps.
"""
from __future__ import annotations

import math
from types import MappingProxyType

# A&E: at steps 0, 10 and 20, refine until the weakest concept's smoothed peak reaches the value.
AE_REFINEMENT_THRESHOLDS = MappingProxyType({0: 0.05, 10: 0.5, 20: 0.8})
THRESHOLDS_FORMAT = "comma-separated step:threshold pairs, e.g. '0:0.05, 10:0.5, 20:0.8'"


def step_sizes(scale: float, num_steps: int, start: float = 1.0, end: float = 0.5) -> tuple[float, ...]:
    """A&E's step-size schedule: alpha_t = scale * sqrt(linspace(start, end, num_steps)[t]).

    Returns num_steps floats (the first is scale * sqrt(start), the last scale * sqrt(end)).
    """
    if num_steps < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}")
    if start < 0 or end < 0:
        raise ValueError(f"start and end must be >= 0 (they go under a square root), got {start}, {end}")
    if num_steps == 1:
        return (scale * math.sqrt(start),)
    fractions = (start + (end - start) * t / (num_steps - 1) for t in range(num_steps))
    return tuple(scale * math.sqrt(f) for f in fractions)


def parse_thresholds(text: str) -> MappingProxyType:
    """Parse "0:0.05, 10:0.5, 20:0.8" into an immutable {step: threshold} mapping.

    Steps are integers >= 0, thresholds numbers in [0, 1]; blank text means no refinement.
    Raises ValueError showing the expected format on anything else.
    """
    thresholds: dict[int, float] = {}
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        step_text, sep, value_text = item.partition(":")
        try:
            if not sep:
                raise ValueError
            step, value = int(step_text.strip()), float(value_text.strip())
        except ValueError:
            raise ValueError(
                f"cannot read {item!r} in refinement thresholds {text!r}: expected {THRESHOLDS_FORMAT}"
            ) from None
        if step < 0:
            raise ValueError(f"refinement step {step} is negative in {text!r}: steps count from 0")
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"refinement threshold {value} for step {step} is outside [0, 1] in {text!r}")
        if step in thresholds:
            raise ValueError(f"refinement step {step} appears twice in {text!r}")
        thresholds[step] = value
    return MappingProxyType(dict(sorted(thresholds.items())))
