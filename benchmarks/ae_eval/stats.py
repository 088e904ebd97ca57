"""Means and 95 % confidence intervals of the metrics per category and method.

The unit of the interval is the prompt: each prompt's images (its seeds) are averaged first, then
the mean over prompts and its Student-t interval (mean +- t(0.975, n-1) * sd / sqrt(n), sd with
n-1) are taken. Seeds of one prompt are not independent samples of the prompt set; treating every
image as one would make the interval too narrow. The mean over prompts equals A&E's mean over all
images when every prompt has the same number of seeds."""
from __future__ import annotations

import math
from collections import defaultdict

from scipy import stats as scipy_stats

METRICS = ("clip_full", "clip_min", "blip_text")
LEVEL = 0.95


def interval(values: list[float]) -> dict:
    """{"mean", "low", "high", "n"}; low = high = mean when n < 2 (no spread to measure)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = scipy_stats.t.ppf(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def prompt_means(scores: list[dict], metric: str) -> dict[tuple, float]:
    """{(category, method, prompt): mean over that prompt's images}."""
    groups = defaultdict(list)
    for s in scores:
        groups[(s["category"], s["method"], s["prompt"])].append(s[metric])
    return {k: sum(v) / len(v) for k, v in groups.items()}


def summary(scores: list[dict]) -> dict[str, dict[tuple, dict]]:
    """{metric: {(category, method): interval over that category's prompts}}."""
    out = {}
    for metric in METRICS:
        per_cell = defaultdict(list)
        for (category, method, _), value in prompt_means(scores, metric).items():
            per_cell[(category, method)].append(value)
        out[metric] = {cell: interval(values) for cell, values in sorted(per_cell.items())}
    return out
