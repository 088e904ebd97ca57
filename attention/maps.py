"""From attention activations to per-concept attention maps.

The chain is: head_mean_probs (q, k -> attention probabilities over text tokens) -> token_softmax
(Attend-and-Excite's renormalisation over the real prompt tokens) -> concept_maps (one spatial map
per concept) -> gaussian_smooth (optional, A&E's 3x3 smoothing). Torch only, no ComfyUI.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# CLIP's context length: prompts longer than this are encoded as concatenated 77-token chunks.
CLIP_CHUNK_TOKENS = 77


def head_mean_probs(q: torch.Tensor, k: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Attention probabilities averaged over heads.

    q: [B, Nq, n_heads*d] queries (image pixels); k: [B or 1, Nk, n_heads*d] keys (text tokens).
    Returns [B, Nq, Nk] float32: softmax(q k^T / sqrt(d)) per head, then the mean over heads.
    Computed in float32 whatever the input dtype (fp16 logits lose the small differences the
    token softmax later amplifies by 100). Differentiable with respect to q (and k).
    """
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [B, N, heads*d], got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k inner sizes differ: {q.shape[-1]} vs {k.shape[-1]}")
    if n_heads < 1 or q.shape[-1] % n_heads:
        raise ValueError(f"inner size {q.shape[-1]} is not divisible by n_heads={n_heads}")
    if k.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"k batch must be 1 or {q.shape[0]} (the q batch), got {k.shape[0]}")
    head_dim = q.shape[-1] // n_heads
    # [B, N, H*d] -> [B, H, N, d]
    q_heads = q.float().unflatten(-1, (n_heads, head_dim)).transpose(1, 2)
    k_heads = k.float().unflatten(-1, (n_heads, head_dim)).transpose(1, 2)
    logits = torch.matmul(q_heads, k_heads.transpose(-1, -2)) * (head_dim ** -0.5)
    return logits.softmax(dim=-1).mean(dim=1)


def excluded_token_columns(n_tokens: int, chunk: int = CLIP_CHUNK_TOKENS) -> tuple[int, ...]:
    """Token columns the token softmax ignores: the start-of-text column of every `chunk`-token
    chunk (0, 77, 154, ...) and the last column (n_tokens - 1). Sorted, without duplicates."""
    if n_tokens < 1 or chunk < 1:
        raise ValueError(f"n_tokens and chunk must be >= 1, got n_tokens={n_tokens}, chunk={chunk}")
    return tuple(sorted(set(range(0, n_tokens, chunk)) | {n_tokens - 1}))


def token_softmax(probs: torch.Tensor, excluded: Sequence[int], temperature: float = 100.0) -> torch.Tensor:
    """Attend-and-Excite's token renormalisation, without shifting token indices.

    probs: [..., T] attention probabilities over T tokens. Returns [..., T]: softmax over the
    non-excluded columns of probs * temperature; excluded columns are exactly 0. Token i of the
    prompt stays at column i. With T=77 and excluded=(0, 76) this equals A&E's
    softmax(100 * probs[..., 1:-1]) with the dropped columns re-inserted as zeros.
    """
    n_tokens = probs.shape[-1]
    columns = sorted({c % n_tokens for c in excluded}) if n_tokens else []
    if len(columns) >= n_tokens:
        raise ValueError(f"all {n_tokens} token columns are excluded: nothing to normalise over")
    keep = torch.ones(n_tokens, dtype=torch.bool, device=probs.device)
    keep[columns] = False
    # -inf logits give exact zeros after the softmax, the same as dropping the columns.
    logits = (probs * temperature).masked_fill(~keep, float("-inf"))
    return logits.softmax(dim=-1)


def concept_maps(
    token_probs: torch.Tensor, token_groups: Sequence[Sequence[int]], height: int, width: int
) -> torch.Tensor:
    """One spatial map per concept.

    token_probs: [B, height*width, T], pixels in row-major order. token_groups: C sequences of
    token positions (a multi-token word such as "teddy bear" is one group). Returns
    [B, C, height, width]: concept c's map is the sum over its tokens (after the token softmax the
    sum keeps each pixel <= 1). Repeated positions within a group count once.
    """
    batch, n_pixels, n_tokens = token_probs.shape
    if n_pixels != height * width:
        raise ValueError(f"token_probs has {n_pixels} pixels, expected height*width = {height}*{width}")
    if len(token_groups) == 0:
        return token_probs.new_zeros(batch, 0, height, width)
    per_concept = []
    for index, group in enumerate(token_groups):
        positions = sorted(set(int(p) for p in group))
        if not positions:
            raise ValueError(f"token group {index} is empty: every concept needs at least one token")
        if positions[0] < 0 or positions[-1] >= n_tokens:
            raise ValueError(f"token group {index} has positions {positions} outside 0..{n_tokens - 1}")
        per_concept.append(token_probs[..., positions].sum(dim=-1))
    return torch.stack(per_concept, dim=1).unflatten(-1, (height, width))


def gaussian_taps(kernel_size: int = 3, sigma: float = 0.5, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D taps [kernel_size] of A&E's Gaussian, with its quirk
    exp(-((x - mu) / (2 sigma))^2) instead of exp(-(x - mu)^2 / (2 sigma^2)).
    For (3, 0.5) these are [0.212, 0.576, 0.212]."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    offsets = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    taps = torch.exp(-((offsets / (2 * sigma)) ** 2))
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def gaussian_smooth(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """A&E's smoothing of each map: separable Gaussian (see gaussian_taps), reflect padding.

    maps: [B, C, h, w]. Returns [B, C, h, w]. Maps too small for reflect padding (side <= pad)
    fall back to replicate padding instead of failing.
    """
    batch, channels, height, width = maps.shape
    pad = (kernel_size - 1) // 2
    taps = gaussian_taps(kernel_size, sigma, dtype=maps.dtype, device=maps.device)
    if pad == 0:
        return maps * taps[0]
    mode = "reflect" if min(height, width) > pad else "replicate"
    planes = F.pad(maps.reshape(batch * channels, 1, height, width), (pad, pad, pad, pad), mode=mode)
    planes = F.conv2d(planes, taps.view(1, 1, 1, kernel_size))
    planes = F.conv2d(planes, taps.view(1, 1, kernel_size, 1))
    return planes.reshape(batch, channels, height, width)


def downsample_level(latent_hw: tuple[int, int], activation_hw: tuple[int, int]) -> int:
    """How many times the UNet halved the latent to reach an activation of size activation_hw.

    round(log2(latent / activation)), averaged over height and width, so odd sizes that the UNet
    rounds up (65 -> 33 -> 17) still give the right level (2 here).
    """
    (latent_h, latent_w), (act_h, act_w) = latent_hw, activation_hw
    if min(latent_h, latent_w, act_h, act_w) <= 0:
        raise ValueError(f"sizes must be positive, got latent {latent_hw} and activation {activation_hw}")
    return round(0.5 * (math.log2(latent_h / act_h) + math.log2(latent_w / act_w)))


def resize_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Area-resize a user mask to map resolution.

    mask: [H, W] or [B, H, W]. Returns float32 [1, height, width] or [B, height, width] in [0, 1]:
    each output pixel is the covered fraction of the input mask.
    """
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)
    if mask.dim() != 3:
        raise ValueError(f"mask must be [H, W] or [B, H, W], got shape {tuple(mask.shape)}")
    resized = F.interpolate(mask.float().unsqueeze(1), size=(height, width), mode="area")
    return resized.squeeze(1).clamp(0.0, 1.0)


def fold_repeated_context(probs: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[..., n * n_tokens] -> [..., n_tokens]: sum the copies of a repeated prompt.

    ComfyUI repeats a short cond to the length of a longer one in the same batch (e.g. a 77-token
    positive beside a 154-token negative); the copies have identical keys, so each gets 1/n of the
    attention, and the sum is exactly the probability of the prompt's token."""
    total = probs.shape[-1]
    if not n_tokens or total == n_tokens or total % n_tokens:
        return probs
    return probs.unflatten(-1, (total // n_tokens, n_tokens)).sum(-2)
