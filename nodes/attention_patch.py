"""The cross-attention patch that feeds the collectors (attention/capture.py) from the UNet's layers."""
from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, UNetModel, Upsample

from ..attention.maps import downsample_level, head_mean_probs
from .transformer_options import CAPTURES_KEY, hand_to_sinks


def require_cross_attention_unet(model_patcher) -> UNetModel:
    """The model's UNet, or a clear error for models A-STAR cannot guide."""
    unet = getattr(model_patcher.model, "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        raise ValueError(
            f"A-STAR needs a UNet with text cross-attention (SD1.x, SD2.x, SDXL); this model is "
            f"{type(model_patcher.model).__name__} ({type(unet).__name__}), which has none. "
            "Use an SD1.5/SD2/SDXL checkpoint.")
    return unet


def cross_attention_layers(model_patcher) -> list[tuple[tuple[str, int, int], int]]:
    """((block, block_id, transformer_index), depth) of every text cross-attention layer of the UNet, in
    the order its forward runs them; depth = the Downsample layers the input has passed at that layer,
    minus the Upsample layers passed since the middle block."""
    unet = require_cross_attention_unet(model_patcher)
    blocks = [("input", i, b) for i, b in enumerate(unet.input_blocks)]
    if unet.middle_block is not None:
        blocks.append(("middle", 0, unet.middle_block))
    blocks += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    layers, depth = [], 0
    for name, block_id, block in blocks:
        for layer in block:
            if isinstance(layer, Downsample):
                depth += 1
            elif isinstance(layer, Upsample):
                depth -= 1
            elif isinstance(layer, comfy_attention.SpatialTransformer):
                layers += [((name, block_id, i), depth) for i in range(len(layer.transformer_blocks))]
    return layers


def cross_attention_keys(model_patcher) -> list[tuple[str, int, int]]:
    """(block, block_id, transformer_index) of every text cross-attention layer of the UNet."""
    return [key for key, _ in cross_attention_layers(model_patcher)]


def layer_depths(model_patcher) -> list[tuple[tuple[str, int, int], int]] | None:
    """cross_attention_layers, or None for a UNet that also resamples in its ResBlocks (resblock_updown),
    whose depths the Downsample count does not give: its guidance passes learn their layers from a full pass."""
    if any(getattr(m, "updown", False) for m in require_cross_attention_unet(model_patcher).modules()):
        return None
    return cross_attention_layers(model_patcher)


class AttentionCapturePatch:
    """attn2 replace for one layer: hands the cond branch's attention probabilities to the active
    collectors, then computes attention exactly as before (the previous replace at this layer, or
    ComfyUI's own attention), so outputs are unchanged. When every active collector is complete
    (a lean guidance pass, attention/capture.py) it raises StopForward instead."""

    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, q, k, v, extra_options, **kwargs):
        captures = extra_options.get(CAPTURES_KEY)
        if captures:
            self._record(captures, q, k, extra_options)
        if self.previous is not None:
            return self.previous(q, k, v, extra_options, **kwargs)
        return comfy_attention.optimized_attention(
            q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
            transformer_options=extra_options)

    @staticmethod
    def _record(captures, q, k, extra_options):
        latent = extra_options["original_shape"][2:]
        act = extra_options["activations_shape"][2:]
        level = downsample_level(tuple(latent), tuple(act))
        wanted = [c for c in captures if c.level == level]
        if not wanted:
            return
        chunk = q.shape[0] // len(extra_options.get("cond_or_uncond") or [0])
        shared_k = k.shape[0] != q.shape[0]

        def chunk_probs(j):
            rows = slice(j * chunk, (j + 1) * chunk)
            return head_mean_probs(q[rows], k if shared_k else k[rows], extra_options["n_heads"])

        block = extra_options.get("block")
        key = (block[0], block[1], extra_options.get("block_index", 0))
        hand_to_sinks(captures, wanted, extra_options, key, (int(act[0]), int(act[1])), chunk_probs)


def add_capture_patches(model_patcher) -> None:
    """Put an AttentionCapturePatch on every cross-attention layer of a (cloned) model, chained to
    any attn2 replace already there (at the layer's own key or at its block's key)."""
    replaces = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for name, block_id, index in cross_attention_keys(model_patcher):
        previous = replaces.get((name, block_id, index)) or replaces.get((name, block_id))
        model_patcher.set_model_attn2_replace(AttentionCapturePatch(previous), name, block_id, index)
