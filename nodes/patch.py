"""The cross-attention patch that feeds the collectors, and the inference-mode fix."""
from __future__ import annotations

import logging

import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ..attention.capture import StopForward
from ..attention.maps import downsample_level, head_mean_probs

# transformer_options key: the collectors (attention/capture.py) active in the current forward pass.
CAPTURES_KEY = "astar_captures"


def require_cross_attention_unet(model_patcher) -> UNetModel:
    """The model's UNet, or a clear error for models A-STAR cannot guide."""
    unet = getattr(model_patcher.model, "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        raise ValueError(
            f"A-STAR needs a UNet with text cross-attention (SD1.x, SD2.x, SDXL); this model is "
            f"{type(model_patcher.model).__name__} ({type(unet).__name__}), which has none. "
            "Use an SD1.5/SD2/SDXL checkpoint.")
    return unet


def cross_attention_keys(model_patcher) -> list[tuple[str, int, int]]:
    """(block, block_id, transformer_index) of every text cross-attention layer of the UNet."""
    unet = require_cross_attention_unet(model_patcher)
    blocks = [("input", i, b) for i, b in enumerate(unet.input_blocks)]
    if unet.middle_block is not None:
        blocks.append(("middle", 0, unet.middle_block))
    blocks += [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    keys = []
    for name, block_id, block in blocks:
        for layer in block:
            if isinstance(layer, comfy_attention.SpatialTransformer):
                keys += [(name, block_id, i) for i in range(len(layer.transformer_blocks))]
    return keys


def step_of(extra_options) -> int | None:
    """Index of the current sigma in the run's schedule (None when it is not one of them)."""
    schedule = extra_options.get("sample_sigmas")
    sigma = extra_options.get("sigmas")
    if schedule is None or sigma is None:
        return None
    hits = torch.isclose(schedule.float().cpu(), sigma.detach().float().cpu().reshape(-1)[:1], rtol=1e-5, atol=0.0)
    idx = torch.nonzero(hits)
    return int(idx[0]) if len(idx) else None


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
        chunks = extra_options.get("cond_or_uncond") or [0]
        uuids = extra_options.get("uuids")
        size = q.shape[0] // len(chunks)
        per_chunk = {}

        def chunk_probs(j):
            if j not in per_chunk:
                per_chunk[j] = head_mean_probs(q[j * size:(j + 1) * size],
                                               k[j * size:(j + 1) * size] if k.shape[0] == q.shape[0] else k,
                                               extra_options["n_heads"])
            return per_chunk[j]

        block = extra_options.get("block")
        key = (block[0], block[1], extra_options.get("block_index", 0))
        step = step_of(extra_options)
        for c in wanted:
            # the cond chunks of the entries that carry the prompt (not a Combine'd other prompt)
            picked = [j for j, kind in enumerate(chunks) if kind == 0 and
                      (c.uuids is None or uuids is None or uuids[j] in c.uuids)]
            if picked:
                probs = [chunk_probs(j) for j in picked]
                mean = probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)
                c.record(key, mean, (int(act[0]), int(act[1])), step)
        if all(getattr(c, "complete", False) for c in captures):
            raise StopForward  # lean guidance pass: later layers cannot change the loss


def add_capture_patches(model_patcher) -> None:
    """Put an AttentionCapturePatch on every cross-attention layer of a (cloned) model, chained to
    any attn2 replace already there (at the layer's own key or at its block's key)."""
    replaces = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for name, block_id, index in cross_attention_keys(model_patcher):
        previous = replaces.get((name, block_id, index)) or replaces.get((name, block_id))
        model_patcher.set_model_attn2_replace(AttentionCapturePatch(previous), name, block_id, index)


def _ordinary(t: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) tensor equal to inference tensor t. A plain strided tensor gets a
    view of t's own memory (no copy: converting an SD1.5 UNet this way takes milliseconds instead of a
    3.3 GB copy, and nothing is held twice); anything else (a tensor subclass, a quantized or sparse
    tensor) is cloned."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided and not t.is_quantized:
        alias = torch.empty(0, dtype=t.dtype, device=t.device)
        return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return t.detach().clone()


def _ordinary_parameter(p: torch.nn.Parameter) -> torch.nn.Parameter:
    """A frozen ordinary Parameter equal to inference parameter p, with p's Python attributes (ComfyUI
    tags parameters: dynamic VRAM's loader sets `_model_dtype`, which sizes the weight's VRAM slot)."""
    new = torch.nn.Parameter(_ordinary(p), requires_grad=False)
    new.__dict__.update(p.__dict__)
    return new


# ComfyUI 0.19+ dynamic VRAM (ModelPatcherDynamic) serves a cast layer's weight and bias from views of
# its own VRAM that it caches on the module while `_v_signature` says they are resident.
_SERVED = ("_v_weight", "_v_bias")


def _inference(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_inference()


def refresh_served_weights(module: torch.nn.Module) -> int:
    """Weights that ComfyUI serves from caches it filled during an inference-mode forward are
    inference tensors too, which autograd refuses: dynamic VRAM's resident weight views, and the
    shared cast buffers that offloaded weights are copied into. Marks such layers as not resident
    (ComfyUI's own "dirty" mark: their next forward copies the weight in again, here outside inference
    mode) and drops inference cast buffers (they are made anew). Returns the number of layers marked."""
    marked = 0
    for m in module.modules():
        if getattr(m, "_v_signature", None) is not None and any(_inference(getattr(m, a, None)) for a in _SERVED):
            m._v_signature = None
            marked += 1
    buffers = getattr(comfy.model_management, "STREAM_CAST_BUFFERS", None)
    if buffers and any(_inference(b) for b in buffers.values()) and hasattr(comfy.model_management, "reset_cast_buffers"):
        comfy.model_management.reset_cast_buffers()
        logging.info("A-STAR: ComfyUI's weight cast buffers were made in inference mode; made anew for the "
                     "guidance pass")
    if marked:
        logging.info("A-STAR: dynamic VRAM: %d layers served cached inference-mode weight copies; they are "
                     "copied in again for the guidance pass", marked)
    return marked


def make_autograd_safe(module: torch.nn.Module) -> int:
    """The inference-mode fix: ComfyUI loads weights under torch.inference_mode, and autograd
    refuses to save such tensors for backward. Replace each inference parameter/buffer by an equal
    ordinary tensor on the same memory (see _ordinary; no second copy is held) and freeze every
    parameter (no weight gradients); weights ComfyUI serves from inference-mode caches are served
    anew (refresh_served_weights). Returns how many tensors were replaced; a later call is a
    walk over the module that replaces nothing unless ComfyUI has put inference weights back (a
    reload, or LoRA patches restored)."""
    replaced = 0
    with torch.inference_mode(False):
        refresh_served_weights(module)
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is None:
                    continue
                if p.is_inference():
                    m._parameters[name] = _ordinary_parameter(p)
                    replaced += 1
                elif p.requires_grad:
                    p.requires_grad_(False)
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = _ordinary(b)
                    replaced += 1
    return replaced


def control_modules(conds) -> list[torch.nn.Module]:
    """ControlNet / T2I-Adapter networks attached to sampler conds (each may chain to previous ones)."""
    found = []
    for c in conds or []:
        ctrl = c.get("control")
        while ctrl is not None:
            for attr in ("control_model", "t2i_model"):
                mod = getattr(ctrl, attr, None)
                if isinstance(mod, torch.nn.Module) and all(mod is not f for f in found):
                    found.append(mod)
            ctrl = getattr(ctrl, "previous_controlnet", None)
    return found
