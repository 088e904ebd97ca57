"""Pictures of an AttentionRecording: heatmaps, a combined concept overlay, a per-step timeline,
pairwise overlap (what the segregation loss penalises) and a loss plot / table.

Pure torch, plus numpy and PIL for text and the line plot (PIL's built-in default font, no font
file, no matplotlib). No ComfyUI import.

Conventions
- IMAGE: [B, H, W, 3] float32 in 0..1 (ComfyUI's layout).
- Concept maps: [B, C, h, w] float, expected in 0..1 (see normalize_maps); values outside are clamped
  where they are drawn.
- Batch matching: an image batch of 1 is repeated for a recording batch B > 1 and a recording batch
  of 1 is repeated for an image batch > 1; any other mismatch is a ValueError naming both sizes.
- Outputs are float32 on the CPU.
"""
from __future__ import annotations

import math
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..attention.recording import AttentionRecording, StepRecord

# Fixed qualitative palette (RGB 0..255), cycled for more than 10 concepts.
_PALETTE = (
    (230, 25, 75),    # red
    (60, 180, 75),    # green
    (0, 130, 200),    # blue
    (255, 225, 25),   # yellow
    (145, 30, 180),   # purple
    (70, 240, 240),   # cyan
    (245, 130, 48),   # orange
    (240, 50, 230),   # magenta
    (170, 110, 40),   # brown
    (128, 128, 128),  # grey
)

# Colour maps as (position, (r, g, b)) control points in 0..1, linearly interpolated.
_COLORMAPS = MappingProxyType({
    "jet": (
        (0.0, (0.0, 0.0, 0.5)),
        (0.125, (0.0, 0.0, 1.0)),
        (0.375, (0.0, 1.0, 1.0)),
        (0.625, (1.0, 1.0, 0.0)),
        (0.875, (1.0, 0.0, 0.0)),
        (1.0, (0.5, 0.0, 0.0)),
    ),
    "viridis": tuple(
        (i / 8, tuple(c / 255 for c in rgb))
        for i, rgb in enumerate((
            (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
            (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
        ))
    ),
    "inferno": tuple(
        (i / 8, tuple(c / 255 for c in rgb))
        for i, rgb in enumerate((
            (0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
            (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164),
        ))
    ),
    "gray": ((0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))),
})

COLORMAPS = tuple(_COLORMAPS)
NORMALIZATIONS = ("per_concept", "global", "none")

# Order of the usual loss names in plots and tables; other keys follow in first-seen order.
_LOSS_ORDER = ("segregation", "retention", "attend_excite", "total")
_LOSS_COLORS = ((0, 0, 0), (150, 0, 110), (0, 110, 110), (190, 95, 0), (90, 90, 190), (110, 140, 0))

_PAD = 2  # pixels of padding around label text (before label scaling)


# ----------------------------------------------------------------------------------------------
# Colours
# ----------------------------------------------------------------------------------------------
def concept_colors(n: int) -> torch.Tensor:
    """[n, 3] float32 RGB in 0..1: concept c gets palette entry c % 10 (fixed, qualitative)."""
    if n < 0:
        raise ValueError(f"concept_colors: n must be >= 0, got {n}")
    rgb = [_PALETTE[i % len(_PALETTE)] for i in range(n)]
    return torch.tensor(rgb, dtype=torch.float32).reshape(n, 3) / 255.0


def colormap(values: torch.Tensor, name: str) -> torch.Tensor:
    """values [...] (clamped to 0..1, NaN -> 0) -> [..., 3] float32 RGB in 0..1.

    name: one of COLORMAPS ("jet", "viridis", "inferno", "gray"); piecewise-linear interpolation of
    fixed control points, so colormap(0) and colormap(1) are the first and last control colours.
    """
    if name not in _COLORMAPS:
        raise ValueError(f"unknown colour map {name!r}; choose one of {', '.join(COLORMAPS)}")
    v = torch.nan_to_num(values.detach().float(), nan=0.0).clamp(0.0, 1.0)
    pts = _COLORMAPS[name]
    pos = torch.tensor([p for p, _ in pts], dtype=torch.float32, device=v.device)
    col = torch.tensor([c for _, c in pts], dtype=torch.float32, device=v.device)  # [K, 3]
    idx = (torch.searchsorted(pos, v.contiguous(), right=True) - 1).clamp(0, len(pts) - 2)
    p0, p1 = pos[idx], pos[idx + 1]
    t = ((v - p0) / (p1 - p0)).clamp(0.0, 1.0).unsqueeze(-1)
    return col[idx] * (1.0 - t) + col[idx + 1] * t


# ----------------------------------------------------------------------------------------------
# Selecting and shaping maps
# ----------------------------------------------------------------------------------------------
def _sorted_steps(recording: AttentionRecording) -> list[StepRecord]:
    if recording is None or not getattr(recording, "steps", None):
        raise ValueError(
            "the attention recording is empty: no denoising step was recorded. Run the sampler that "
            "fills this recording (A-STAR guided sampler or the record-only patch) before drawing it")
    steps = sorted(recording.steps, key=lambda s: s.step)
    shape = tuple(steps[0].maps.shape)
    if len(shape) != 5:
        raise ValueError(f"recorded maps must be [L, B, C, h, w], got shape {list(shape)} at step {steps[0].step}")
    if shape[0] < 1 or shape[2] < 1:
        raise ValueError(f"recorded maps have {shape[0]} layers and {shape[2]} concepts (shape {list(shape)}); "
                         "record at least one layer and one concept")
    for s in steps[1:]:
        if tuple(s.maps.shape) != shape:
            raise ValueError(
                f"recorded maps change shape between steps ({list(shape)} at step {steps[0].step}, "
                f"{list(s.maps.shape)} at step {s.step}); record one run per recording")
    return steps


def step_indices(recording: AttentionRecording, step_range=(0, None)) -> list[int]:
    """Positions (into the recorded steps, sorted by step) selected by step_range = (start, end):
    start inclusive, end exclusive, None = open end, negatives count from the end (Python slicing),
    but out-of-range or empty selections raise ValueError naming the available range."""
    n = len(_sorted_steps(recording))
    start, end = (tuple(step_range) + (None, None))[:2]
    start = 0 if start is None else int(start)
    end = n if end is None else int(end)
    if not -n <= start < n:
        raise ValueError(
            f"step start {start} is out of range: the recording has {n} steps (indices 0..{n - 1}, "
            f"or -{n}..-1 from the end)")
    if not -n <= end <= n:
        raise ValueError(
            f"step end {end} is out of range: the recording has {n} steps; the end (exclusive) must be "
            f"in 0..{n} or -{n}..-1")
    s0 = start + n if start < 0 else start
    s1 = end + n if end < 0 else end
    if s1 <= s0:
        raise ValueError(
            f"empty step selection {start}:{end} (positions {s0} to {s1 - 1}): the recording has {n} "
            f"steps (indices 0..{n - 1}); choose start < end")
    return list(range(s0, s1))


def layer_indices(recording: AttentionRecording, layers=None) -> list[int]:
    """Layer positions selected by `layers` (iterable of ints, negatives from the end; None = all).
    Duplicates are dropped (keeping the first). Out-of-range indices or an empty list raise."""
    n = _sorted_steps(recording)[0].maps.shape[0]
    if layers is None:
        return list(range(n))
    out: list[int] = []
    for raw in layers:
        i = int(raw)
        if not -n <= i < n:
            names = getattr(recording, "layers", None) or []
            named = "; ".join(f"{k}: {names[k]}" for k in range(min(n, len(names))))
            raise ValueError(
                f"layer index {i} is out of range: the recording has {n} layers (indices 0..{n - 1})"
                + (f" [{named}]" if named else ""))
        i = i + n if i < 0 else i
        if i not in out:
            out.append(i)
    if not out:
        raise ValueError(f"empty layer selection: the recording has {n} layers (indices 0..{n - 1})")
    return out


def select_maps(recording: AttentionRecording, step_range=(0, None), layers=None) -> torch.Tensor:
    """Mean concept maps [B, C, h, w] (float32, CPU) over the selected steps and layers.

    step_range: (start, end) positions into the recorded steps sorted by step index; start inclusive,
        end exclusive (None = to the last), negatives count from the end.
    layers: layer positions (into StepRecord.maps' first axis); None = all.
    """
    steps = _sorted_steps(recording)
    si = step_indices(recording, step_range)
    li = layer_indices(recording, layers)
    stacked = torch.stack([steps[i].maps.detach().float().cpu()[li] for i in si])  # [S', L', B, C, h, w]
    return stacked.mean(dim=(0, 1))


def peak_attention(recording: AttentionRecording, layers=None) -> torch.Tensor:
    """[S, B, C] float32: per recorded step (sorted), the max over pixels of the layer-mean map."""
    steps = _sorted_steps(recording)
    li = layer_indices(recording, layers)
    m = torch.stack([s.maps.detach().float().cpu()[li].mean(0) for s in steps])  # [S, B, C, h, w]
    return m.flatten(-2).amax(-1)


def normalize_maps(maps: torch.Tensor, mode: str) -> torch.Tensor:
    """maps [..., C, h, w] -> same shape, float32 in 0..1.

    per_concept: each [h, w] map divided by its own max (all-zero maps stay zero).
    global:      all concepts of a sample divided by their joint max (keeps relative strength).
    none:        raw values clamped to 0..1 (maps after the token softmax already lie there).
    """
    m = torch.nan_to_num(maps.detach().float(), nan=0.0).clamp_min(0.0)
    if mode == "none":
        return m.clamp(0.0, 1.0)
    if m.dim() < 3:
        raise ValueError(f"normalize_maps needs [..., C, h, w], got shape {list(maps.shape)}")
    if mode == "per_concept":
        peak = m.flatten(-2).amax(-1)[..., None, None]
    elif mode == "global":
        peak = m.flatten(-3).amax(-1)[..., None, None, None]
    else:
        raise ValueError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return torch.where(peak > 0, m / peak.clamp_min(1e-12), torch.zeros_like(m)).clamp(0.0, 1.0)


def upsample(maps: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """maps [..., h, w] -> [..., H, W] float32, bilinear (align_corners=False)."""
    lead = maps.shape[:-2]
    h, w = maps.shape[-2:]
    flat = maps.detach().float().reshape(-1, 1, h, w)
    if (h, w) != (H, W):
        flat = F.interpolate(flat, size=(int(H), int(W)), mode="bilinear", align_corners=False)
    return flat.reshape(*lead, int(H), int(W))


def _match_batch(image: torch.Tensor, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """image [Bi, H, W, c] -> [B, H, W, 3] float32 CPU; maps [Bm, C, h, w] -> [B, C, h, w]."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4:
        raise ValueError(f"image must be [B, H, W, 3], got shape {list(image.shape)}")
    if maps.dim() != 4:
        raise ValueError(f"maps must be [B, C, h, w], got shape {list(maps.shape)}")
    image = image.detach().float().cpu()
    ch = image.shape[-1]
    if ch == 1:
        image = image.expand(-1, -1, -1, 3)
    elif ch >= 3:
        image = image[..., :3]
    else:
        raise ValueError(f"image must have 1, 3 or 4 channels in its last axis, got shape {list(image.shape)}")
    maps = maps.detach().float().cpu()
    bi, bm = image.shape[0], maps.shape[0]
    if bi != bm:
        if bi == 1:
            image = image.expand(bm, -1, -1, -1)
        elif bm == 1:
            maps = maps.expand(bi, -1, -1, -1)
        else:
            raise ValueError(
                f"batch size mismatch: the image batch has {bi} images but the attention recording has "
                f"batch {bm}. Connect the image decoded from the same sampling run (or a single image)")
    return image.clamp(0.0, 1.0).contiguous(), maps.contiguous()


def _words(words, n: int) -> list[str]:
    words = list(words or [])
    return [str(words[i]) if i < len(words) else f"concept {i}" for i in range(n)]


def pair_indices(n: int) -> list[tuple[int, int]]:
    """Unordered concept pairs in the order (0,1), (0,2), ..., (1,2), ..."""
    return [(m, k) for m in range(n) for k in range(m + 1, n)]


# ----------------------------------------------------------------------------------------------
# Text labels (PIL default font, drawn on an opaque strip)
# ----------------------------------------------------------------------------------------------
def _font():
    return ImageFont.load_default()


def _label_scale(H: int, W: int) -> int:
    """Integer upscaling of label strips so text stays readable on large images."""
    return max(1, min(int(H), int(W)) // 256)


def _safe_text(text: str) -> str:
    return str(text).encode("latin-1", "replace").decode("latin-1")


def _line_height(font) -> int:
    l, t, r, b = font.getbbox("Agjy|")
    return int(b - t)


def label_height(scale: int = 1) -> int:
    """Height in pixels of a one-line label strip at the given integer scale."""
    return (_line_height(_font()) + 2 * _PAD) * scale


def _render_lines(lines, scale: int = 1, swatch: bool = False, bg=(0, 0, 0)) -> torch.Tensor:
    """lines: [(text, rgb float 0..1)] -> opaque strip [h, w, 3] float32 (one line per entry)."""
    font = _font()
    lh = _line_height(font)
    top = font.getbbox("Agjy|")[1]
    sw = lh if swatch else 0
    widths = []
    for text, _ in lines:
        l, t, r, b = font.getbbox(_safe_text(text)) if text else (0, 0, 0, 0)
        widths.append(int(r))
    w = max(widths, default=0) + sw + (_PAD if swatch else 0) + 2 * _PAD
    h = len(lines) * lh + (len(lines) + 1) * _PAD
    im = Image.new("RGB", (max(w, 1), max(h, 1)), tuple(int(c) for c in bg))
    draw = ImageDraw.Draw(im)
    for k, (text, rgb) in enumerate(lines):
        color = tuple(int(round(float(c) * 255)) for c in rgb)
        y = _PAD + k * (lh + _PAD)
        x = _PAD
        if swatch:
            draw.rectangle([x, y, x + sw - 1, y + lh - 1], fill=color)
            x += sw + _PAD
        if text:
            draw.text((x, y - top), _safe_text(text), fill=color, font=font)
    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).float() / 255.0
    if scale > 1:
        arr = arr.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    return arr


def label_size(text: str, H: int, W: int) -> tuple[int, int]:
    """(height, width) in pixels of the label strip drawn for `text` on an H x W image; the strip
    sits in the top-left corner (clipped to the image)."""
    strip = _render_lines([(text, (1.0, 1.0, 1.0))], _label_scale(H, W))
    return min(strip.shape[0], int(H)), min(strip.shape[1], int(W))


def _paste(img: torch.Tensor, strip: torch.Tensor, y: int = 0, x: int = 0) -> None:
    """Paste strip [h, w, 3] into img [H, W, 3] at (y, x), clipped; in place."""
    H, W = img.shape[:2]
    h = min(strip.shape[0], H - y)
    w = min(strip.shape[1], W - x)
    if h > 0 and w > 0:
        img[y:y + h, x:x + w] = strip[:h, :w]


# ----------------------------------------------------------------------------------------------
# Image outputs
# ----------------------------------------------------------------------------------------------
def concept_heatmaps(image: torch.Tensor, maps: torch.Tensor, words, colormap_name: str = "jet",
                     opacity: float = 0.5, labels: bool = True) -> torch.Tensor:
    """One heatmap per (sample, concept): [B*C, H, W, 3], sample-major (index b*C + c).

    image [Bi, H, W, 3]; maps [B, C, h, w] in 0..1 (normalise first). Each map is upsampled to H x W,
    coloured with `colormap_name` and blended over the image: out = (1-opacity)*image +
    opacity*colour. With labels, the concept's word is written in the concept's colour on an opaque
    black strip in the top-left corner (size: label_size(word, H, W)).
    """
    image, maps = _match_batch(image, maps)
    B, H, W, _ = image.shape
    C = maps.shape[1]
    op = float(min(max(opacity, 0.0), 1.0))
    heat = colormap(upsample(maps, H, W), colormap_name)  # [B, C, H, W, 3]
    out = (image[:, None] * (1.0 - op) + heat * op).clamp(0.0, 1.0).reshape(B * C, H, W, 3).contiguous()
    if labels and C:
        colors = concept_colors(C)
        scale = _label_scale(H, W)
        strips = [_render_lines([(w, colors[c])], scale) for c, w in enumerate(_words(words, C))]
        for b in range(B):
            for c in range(C):
                _paste(out[b * C + c], strips[c])
    return out


def combined_overlay(image: torch.Tensor, maps: torch.Tensor, opacity: float = 0.5, words=None,
                     labels: bool = True) -> torch.Tensor:
    """All concepts over the image in their own colours: [B, H, W, 3].

    alpha_c = upsampled map_c (clamped to 0..1) * opacity; out = image * (1 - min(1, sum_c alpha_c))
    + sum_c alpha_c * colour_c, clamped to 0..1. Overlapping concepts therefore add their colours
    (e.g. red + green -> yellow). With labels and words, a legend (swatch + word per concept, in the
    concept's colour) is drawn on an opaque strip in the top-left corner.
    """
    image, maps = _match_batch(image, maps)
    B, H, W, _ = image.shape
    C = maps.shape[1]
    op = float(min(max(opacity, 0.0), 1.0))
    colors = concept_colors(C)
    alpha = upsample(maps, H, W).clamp(0.0, 1.0) * op  # [B, C, H, W]
    contrib = torch.einsum("bchw,ck->bhwk", alpha, colors)
    a_tot = alpha.sum(1).clamp(max=1.0).unsqueeze(-1)
    out = (image * (1.0 - a_tot) + contrib).clamp(0.0, 1.0).contiguous()
    if labels and words is not None and C:
        legend = _render_lines(list(zip(_words(words, C), colors)), _label_scale(H, W), swatch=True)
        for b in range(B):
            _paste(out[b], legend)
    return out


def pairwise_overlap(maps: torch.Tensor) -> torch.Tensor:
    """maps [B, C, h, w] -> [B, P, h, w], P = C(C-1)/2 pairs in pair_indices order:
    min(A^m, A^n) per pixel (the numerator the segregation loss sums). P = 0 gives [B, 0, h, w]."""
    if maps.dim() != 4:
        raise ValueError(f"maps must be [B, C, h, w], got shape {list(maps.shape)}")
    pairs = pair_indices(maps.shape[1])
    if not pairs:
        return maps.new_zeros(maps.shape[0], 0, *maps.shape[2:])
    return torch.stack([torch.minimum(maps[:, m], maps[:, n]) for m, n in pairs], dim=1)


def overlap_image(image: torch.Tensor, maps: torch.Tensor, colormap_name: str = "jet",
                  opacity: float = 0.5, words=None, labels: bool = True) -> torch.Tensor:
    """One overlap heatmap per (sample, concept pair): [B*P, H, W, 3], sample-major (b*P + p).

    The overlap min(A^m, A^n) of the (already normalised) maps is coloured with `colormap_name` as
    is (not re-normalised: weak overlap stays dark) and blended like concept_heatmaps; labelled
    "word_m x word_n". With fewer than 2 concepts there is no pair: the image batch is returned
    ([B, H, W, 3]) with the label "no concept pair (needs 2+ concepts)".
    """
    image, maps = _match_batch(image, maps)
    B, H, W, _ = image.shape
    C = maps.shape[1]
    ov = pairwise_overlap(maps.clamp(0.0, 1.0))
    P = ov.shape[1]
    scale = _label_scale(H, W)
    if P == 0:
        out = image.clone()
        if labels:
            strip = _render_lines([("no concept pair (needs 2+ concepts)", (1.0, 1.0, 1.0))], scale)
            for b in range(B):
                _paste(out[b], strip)
        return out
    op = float(min(max(opacity, 0.0), 1.0))
    heat = colormap(upsample(ov, H, W), colormap_name)  # [B, P, H, W, 3]
    out = (image[:, None] * (1.0 - op) + heat * op).clamp(0.0, 1.0).reshape(B * P, H, W, 3).contiguous()
    if labels:
        ws = _words(words, C)
        strips = [_render_lines([(f"{ws[m]} x {ws[n]}", (1.0, 1.0, 1.0))], scale) for m, n in pair_indices(C)]
        for b in range(B):
            for p in range(P):
                _paste(out[b * P + p], strips[p])
    return out


def step_timeline(recording: AttentionRecording, layers=None, mode: str = "per_concept", cell: int = 64,
                  colormap_name: str = "viridis", labels: bool = True) -> torch.Tensor:
    """Concept maps at every recorded step: [B, Ht, S*cell, 3].

    Row c holds concept c's layer-mean map (layers as in select_maps) at each recorded step, left to
    right in step order, each upsampled to cell x cell and coloured with `colormap_name`.
    Normalisation spans all steps so that attention fading or moving over time stays visible:
    per_concept = each concept by its max over steps and pixels; global = all concepts of a sample by
    their joint max over steps; none = raw, clamped to 0..1.

    Without labels Ht = C*cell and cell (c, s) is at rows c*cell, columns s*cell. With labels,
    lh = label_height(1): a header of height lh holds step numbers (white: guided steps with
    iterations > 0, grey: unguided; only every k-th if they do not fit) and each concept row gets a
    label row of height lh with its word in its colour above it, so Ht = lh + C*(lh + cell) and cell
    (c, s) starts at row lh + c*(lh + cell) + lh.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")
    cell = int(cell)
    if cell < 1:
        raise ValueError(f"cell must be >= 1 pixel, got {cell}")
    steps = _sorted_steps(recording)
    li = layer_indices(recording, layers)
    m = torch.stack([s.maps.detach().float().cpu()[li].mean(0) for s in steps])  # [S, B, C, h, w]
    m = torch.nan_to_num(m, nan=0.0).clamp_min(0.0)
    S, B, C = m.shape[:3]
    if mode == "none":
        m = m.clamp(0.0, 1.0)
    else:
        if mode == "per_concept":
            peak = m.amax(dim=(0, 3, 4), keepdim=True)  # [1, B, C, 1, 1]
        else:
            peak = m.amax(dim=(0, 2, 3, 4), keepdim=True)  # [1, B, 1, 1, 1]
        m = torch.where(peak > 0, m / peak.clamp_min(1e-12), torch.zeros_like(m)).clamp(0.0, 1.0)
    rgb = colormap(upsample(m, cell, cell), colormap_name)  # [S, B, C, cell, cell, 3]
    grid = rgb.permute(1, 2, 3, 0, 4, 5).reshape(B, C * cell, S * cell, 3)
    if not labels:
        return grid.contiguous()
    lh = label_height(1)
    Wt = S * cell
    out = torch.zeros(B, lh + C * (lh + cell), Wt, 3)
    # header: step numbers, centred per column, every k-th when they do not fit
    font = _font()
    texts = [str(s.step) for s in steps]
    tw = max(int(font.getbbox(t)[2]) for t in texts) + 2 * _PAD
    every = max(1, math.ceil(tw / cell))
    header = torch.zeros(lh, Wt, 3)
    for k, (t, s) in enumerate(zip(texts, steps)):
        if k % every:
            continue
        color = (1.0, 1.0, 1.0) if s.iterations > 0 else (0.55, 0.55, 0.55)
        strip = _render_lines([(t, color)])
        x = k * cell + max(0, (cell - strip.shape[1]) // 2)
        _paste(header, strip, 0, x)
    colors = concept_colors(C)
    ws = _words(recording.words, C)
    out[:, :lh] = header
    for c in range(C):
        y = lh + c * (lh + cell)
        label = torch.zeros(lh, Wt, 3)
        _paste(label, _render_lines([(ws[c], colors[c])]))
        out[:, y:y + lh] = label
        out[:, y + lh:y + lh + cell] = grid[:, c * cell:(c + 1) * cell]
    return out.contiguous()


# ----------------------------------------------------------------------------------------------
# Losses: plot and table
# ----------------------------------------------------------------------------------------------
def _loss_names(steps: list[StepRecord]) -> list[str]:
    seen: list[str] = []
    for s in steps:
        for k in (s.losses or {}):
            if k not in seen:
                seen.append(k)
    known = [k for k in _LOSS_ORDER if k in seen]
    return known + [k for k in seen if k not in known]


def _loss_values(value) -> torch.Tensor:
    """A recorded loss ([B] tensor, scalar tensor or number) -> 1-D float32 CPU tensor."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().reshape(-1)
    return torch.tensor([float(v) for v in (value if isinstance(value, (list, tuple)) else [value])])


def _loss_mean(value) -> float | None:
    v = _loss_values(value)
    if v.numel() == 0:
        return None
    m = float(v.mean())
    return m if math.isfinite(m) else None


def _nice_ceil(x: float) -> float:
    if not (x > 0 and math.isfinite(x)):
        return 1.0
    e = 10 ** math.floor(math.log10(x))
    for f in (1, 2, 2.5, 5, 10):
        if f * e >= x * (1 - 1e-9):
            return f * e
    return 10 * e


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.3g}"


def loss_plot(recording: AttentionRecording, width: int = 512, height: int = 256) -> torch.Tensor:
    """Line plot of the per-step losses and per-concept peak attention: [1, height, width, 3].

    Losses: every key of StepRecord.losses, batch mean, solid lines (broken where a step has no
    value, a dot where a value stands alone). Peaks: max over pixels of the all-layer-mean map of
    each concept, batch mean, dashed lines in the concept's colour. x = recorded step index,
    y = 0..nice ceiling of the largest value (at least 1). Guided steps (iterations > 0) are shaded.
    """
    width, height = int(width), int(height)
    if width < 160 or height < 100:
        raise ValueError(f"loss_plot needs at least 160 x 100 pixels, got {width} x {height}")
    steps = _sorted_steps(recording)
    S = len(steps)
    peaks = peak_attention(recording).mean(1)  # [S, C]
    C = peaks.shape[1]
    ws = _words(recording.words, C)
    names = _loss_names(steps)
    series = []  # (name, values list[float|None], rgb255, dashed)
    for i, k in enumerate(names):
        vals = [_loss_mean(s.losses[k]) if k in (s.losses or {}) else None for s in steps]
        series.append((k, vals, _LOSS_COLORS[i % len(_LOSS_COLORS)], False))
    colors = (concept_colors(C) * 255).round().int().tolist()
    for c in range(C):
        series.append((f"peak {ws[c]}", [float(v) for v in peaks[:, c]], tuple(colors[c]), True))
    finite = [v for _, vals, _, _ in series for v in vals if v is not None and math.isfinite(v)]
    ymin = min(0.0, min(finite, default=0.0))
    ymax = _nice_ceil(max(1.0, max(finite, default=1.0)))

    font = _font()
    lh = _line_height(font)
    top = font.getbbox("Agjy|")[1]
    im = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(im)
    ytick_w = max(int(font.getbbox(_fmt(ymin + (ymax - ymin) * f))[2]) for f in (0, .25, .5, .75, 1))
    entries = [(n, c, dsh) for n, _, c, dsh in series]
    if any(s.iterations > 0 for s in steps):
        entries.append(("guided step", (255, 236, 215), None))
    sw = 16
    legend_w = max((int(font.getbbox(_safe_text(n))[2]) for n, _, _ in entries), default=0) + sw + 12
    legend_w = min(legend_w, width // 3)  # overlong names run off the edge rather than squeeze the plot
    x0, x1 = ytick_w + 8, width - legend_w - 12
    y0, y1 = lh + 8, height - (2 * lh + 10)  # plot area top / bottom
    title = "losses (solid) and peak attention (dashed) per step"
    if not names:
        title = "peak attention per step (no losses recorded)"
    d.text((x0, 2 - top), title, fill=(40, 40, 40), font=font)

    xs_steps = [s.step for s in steps]
    lo, hi = min(xs_steps), max(xs_steps)

    def px(step):
        if hi == lo:
            return (x0 + x1) / 2
        return x0 + (step - lo) / (hi - lo) * (x1 - x0)

    def py(v):
        return y1 - (v - ymin) / (ymax - ymin) * (y1 - y0)

    # guided-step shading
    half = (x1 - x0) / max(1, 2 * (hi - lo)) if hi > lo else (x1 - x0) / 4
    for s in steps:
        if s.iterations > 0:
            xc = px(s.step)
            d.rectangle([max(x0, xc - half), y0, min(x1, xc + half), y1], fill=(255, 236, 215))
    # grid and y ticks
    for f in (0, .25, .5, .75, 1):
        v = ymin + (ymax - ymin) * f
        y = py(v)
        d.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        t = _fmt(v)
        d.text((x0 - 4 - int(font.getbbox(t)[2]), y - lh / 2 - top), t, fill=(60, 60, 60), font=font)
    # x ticks
    n_ticks = max(1, min(S, (x1 - x0) // 40))
    tick_steps = sorted({xs_steps[round(i * (S - 1) / max(1, n_ticks - 1))] for i in range(n_ticks)})
    for st in tick_steps:
        x = px(st)
        d.line([(x, y1), (x, y1 + 3)], fill=(60, 60, 60))
        t = str(st)
        d.text((x - font.getbbox(t)[2] / 2, y1 + 4 - top), t, fill=(60, 60, 60), font=font)
    d.text(((x0 + x1) / 2 - font.getbbox("step")[2] / 2, y1 + 5 + lh - top), "step", fill=(60, 60, 60), font=font)
    d.rectangle([x0, y0, x1, y1], outline=(60, 60, 60))

    # series
    def dashed(p, q, color):
        (ax, ay), (bx, by) = p, q
        length = math.hypot(bx - ax, by - ay)
        n = max(1, int(length // 4))
        for i in range(0, n, 2):
            t0, t1 = i / n, min(1.0, (i + 1) / n)
            d.line([(ax + (bx - ax) * t0, ay + (by - ay) * t0), (ax + (bx - ax) * t1, ay + (by - ay) * t1)],
                   fill=color, width=2)

    for name, vals, color, is_dashed in series:
        pts = [(px(s.step), py(v)) if v is not None and math.isfinite(v) else None for s, v in zip(steps, vals)]
        for i, p in enumerate(pts):
            if p is None:
                continue
            q = pts[i + 1] if i + 1 < S else None
            if q is not None:
                (dashed(p, q, color) if is_dashed else d.line([p, q], fill=color, width=2))
            alone = (i == 0 or pts[i - 1] is None) and q is None
            if alone or is_dashed:
                r = 2
                d.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=color)

    # legend (right of the plot area)
    if entries:
        lx = x1 + 8
        ly = y0
        d.rectangle([lx, ly, width - 3, ly + len(entries) * (lh + 2) + 4], fill=(255, 255, 255), outline=(160, 160, 160))
        for i, (n, c, dsh) in enumerate(entries):
            yy = ly + 3 + i * (lh + 2)
            ym = yy + lh / 2
            if dsh is None:
                d.rectangle([lx + 3, yy + 1, lx + 3 + sw - 2, yy + lh - 1], fill=c, outline=(200, 160, 120))
            elif dsh:
                dashed((lx + 3, ym), (lx + 3 + sw, ym), c)
            else:
                d.line([(lx + 3, ym), (lx + 3 + sw, ym)], fill=c, width=2)
            d.text((lx + sw + 7, yy - top), _safe_text(n), fill=(30, 30, 30), font=font)

    arr = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).float() / 255.0
    return arr.unsqueeze(0)


def loss_table(recording: AttentionRecording) -> str:
    """Readable text table, one row per recorded step: step, sigma, each loss (batch mean, and the
    per-sample values in brackets when B > 1; "-" where the step has none), iterations, and the peak
    attention (max over pixels of the all-layer-mean map, batch mean) of each concept."""
    steps = _sorted_steps(recording)
    L, B, C = steps[0].maps.shape[:3]
    ws = _words(recording.words, C)
    names = _loss_names(steps)
    peaks = peak_attention(recording).mean(1)  # [S, C]
    header = ["step", "sigma"] + names + ["iters"] + [f"peak {w}" for w in ws]
    rows = []
    for i, s in enumerate(steps):
        row = [str(s.step), f"{float(s.sigma):.4g}"]
        for k in names:
            if k not in (s.losses or {}):
                row.append("-")
                continue
            v = _loss_values(s.losses[k])
            cell = f"{float(v.mean()):.4f}" if v.numel() else "-"
            if v.numel() > 1:
                cell += " [" + ", ".join(f"{float(x):.4f}" for x in v) + "]"
            row.append(cell)
        row.append(str(int(s.iterations)))
        row += [f"{float(peaks[i, c]):.4f}" for c in range(C)]
        rows.append(row)
    widths = [max(len(r[j]) for r in [header] + rows) for j in range(len(header))]
    fmt = lambda r: "  ".join(x.rjust(w) for x, w in zip(r, widths)).rstrip()
    guided = sum(1 for s in steps if s.iterations > 0)
    lines = [
        f"A-STAR attention record: concepts {', '.join(ws) or '(none)'}; {len(steps)} steps "
        f"({guided} guided); {L} layers; batch {B}"
        + ("; losses are batch means [per sample]" if B > 1 and names else ""),
        fmt(header),
        fmt(["-" * w for w in widths]),
    ]
    lines += [fmt(r) for r in rows]
    if not names:
        lines.append("(no losses recorded: record-only run or no guided step)")
    return "\n".join(lines)
