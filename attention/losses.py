"""A-STAR's segregation and retention losses (ICCV 2023, Eqs. 2-3) and the Attend-and-Excite loss.

Every loss takes concept maps [B, C, h, w] (non-negative, usually in [0, 1]) and returns one value
per sample, [B], so a batch of independent images is guided independently.
"""
from __future__ import annotations

import torch

from .maps import gaussian_smooth

# Keeps the overlap ratio defined for two all-zero maps, far below any real map's mass.
OVERLAP_EPS = 1e-8
OTSU_BINS = 256
BINARIZATION_METHODS = ("fraction", "otsu")


def soft_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Soft intersection over sum: sum_ij min(a, b) / (sum_ij (a + b) + eps).

    a, b: [..., h, w] (broadcastable). Returns [...]: reduced over the last two dims.
    0 for disjoint maps, 0.5 for identical ones.
    """
    intersection = torch.minimum(a, b).sum(dim=(-2, -1))
    total = (a + b).sum(dim=(-2, -1))
    return intersection / (total + OVERLAP_EPS)


def _concept_pairs(n_concepts: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (first, second) of all unordered concept pairs, each [C*(C-1)/2]."""
    pairs = torch.triu_indices(n_concepts, n_concepts, offset=1, device=device)
    return pairs[0], pairs[1]


def segregation_loss(maps: torch.Tensor) -> torch.Tensor:
    """A-STAR Eq. 2: sum over unordered concept pairs of soft_overlap(A^m, A^n).

    maps: [B, C, h, w]. Returns [B]; 0 when C < 2. Each pair contributes at most 0.5.
    """
    if maps.shape[1] < 2:
        return maps.new_zeros(maps.shape[0])
    first, second = _concept_pairs(maps.shape[1], maps.device)
    return soft_overlap(maps[:, first], maps[:, second]).sum(dim=1)


def pair_overlap(maps: torch.Tensor) -> torch.Tensor:
    """Mean over unordered concept pairs of 2 * soft_overlap: 1 for identical maps, 0 for disjoint.

    maps: [B, C, h, w]. Returns [B]; 0 when C < 2. A-STAR's refinement measure uses 1 - this.
    """
    if maps.shape[1] < 2:
        return maps.new_zeros(maps.shape[0])
    first, second = _concept_pairs(maps.shape[1], maps.device)
    return 2.0 * soft_overlap(maps[:, first], maps[:, second]).mean(dim=1)


def _otsu_masks(values: torch.Tensor) -> torch.Tensor:
    """Otsu's foreground per row. values: [N, P] finite. Returns bool [N, P].

    Histogram of OTSU_BINS bins between each row's min and max; the split after bin k that
    maximises the between-class variance w0 w1 (mu0 - mu1)^2 puts bins > k in the foreground.
    A constant row is all foreground.
    """
    low = values.amin(dim=1, keepdim=True)
    span = values.amax(dim=1, keepdim=True) - low
    constant = span <= 0
    scaled = (values - low) / torch.where(constant, torch.ones_like(span), span)
    bins = (scaled * OTSU_BINS).long().clamp(0, OTSU_BINS - 1)
    counts = torch.zeros(values.shape[0], OTSU_BINS, dtype=values.dtype, device=values.device)
    counts.scatter_add_(1, bins, torch.ones_like(values))
    sums = torch.zeros_like(counts).scatter_add_(1, bins, values)
    # Split after bin k for k = 0 .. OTSU_BINS-2: class 0 is bins <= k.
    count0 = counts.cumsum(dim=1)[:, :-1]
    sum0 = sums.cumsum(dim=1)[:, :-1]
    n_total = counts.sum(dim=1, keepdim=True)
    count1 = n_total - count0
    sum1 = sums.sum(dim=1, keepdim=True) - sum0
    valid = (count0 > 0) & (count1 > 0)
    mean0 = sum0 / count0.clamp_min(1)
    mean1 = sum1 / count1.clamp_min(1)
    between = (count0 * count1 / n_total**2) * (mean0 - mean1) ** 2
    between = torch.where(valid, between, torch.full_like(between, -1.0))
    split = between.argmax(dim=1, keepdim=True)
    return (bins > split) | constant


def binarize(maps: torch.Tensor, method: str = "fraction", fraction: float = 0.5) -> torch.Tensor:
    """High-activation masks B^m of A-STAR's retention loss (detached).

    maps: [B, C, h, w]. Returns float [B, C, h, w] of 0/1.
    method "fraction": A >= fraction * max(A) per map. "otsu": Otsu's threshold per map (256-bin
    histogram between the map's min and max; a constant map is all ones). Non-finite pixels are 0;
    a map without finite pixels gives an all-zero mask (retention then skips that concept).
    """
    if method not in BINARIZATION_METHODS:
        raise ValueError(f"unknown binarization method {method!r}: valid methods are {BINARIZATION_METHODS}")
    values = maps.detach().float()
    finite = torch.isfinite(values)
    values = torch.where(finite, values, torch.zeros_like(values))
    if method == "fraction":
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        peak = values.amax(dim=(-2, -1), keepdim=True)
        foreground = values >= fraction * peak
    else:
        rows = values.flatten(-2).flatten(0, 1)
        foreground = _otsu_masks(rows).view_as(values)
    return (foreground & finite).to(maps.dtype)


def retention_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """A-STAR Eq. 3: sum over concepts of 1 - soft_overlap(A^m, B^m).

    maps: [B, C, h, w]; masks: [B, C, h, w] or broadcastable (e.g. [1, C, h, w]), treated as
    constants. Returns [B]. Concepts whose mask is all zero are skipped (contribute 0). With maps in
    [0, 1] and binary masks the per-concept value cannot go below 0.5.
    """
    masks = masks.detach().to(maps.dtype)
    per_concept = 1.0 - soft_overlap(maps, masks)
    has_mask = (masks.sum(dim=(-2, -1)) > 0).expand_as(per_concept)
    return torch.where(has_mask, per_concept, torch.zeros_like(per_concept)).sum(dim=1)


def attend_excite_loss(maps: torch.Tensor, smooth: bool = True) -> torch.Tensor:
    """Attend-and-Excite's loss: max over concepts of max(0, 1 - max_ij G(A^m)).

    maps: [B, C, h, w]; G is gaussian_smooth when smooth, else the identity. Returns [B]
    (0 when C == 0). Drives the most neglected concept's peak attention up.
    """
    if maps.shape[1] == 0:
        return maps.new_zeros(maps.shape[0])
    smoothed = gaussian_smooth(maps) if smooth else maps
    peaks = smoothed.amax(dim=(-2, -1))
    return (1.0 - peaks).clamp_min(0.0).amax(dim=1)
