"""Making a loaded network differentiable with respect to its input: the inference-mode fix, and
finding the networks a guidance pass runs (the UNet and the ControlNets of the conditioning)."""
from __future__ import annotations

import torch


def _ordinary(t: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) tensor equal to inference tensor t. A plain strided tensor gets a
    view of t's own memory (no copy: converting an SD1.5 UNet this way takes milliseconds instead of a
    3.3 GB copy, and nothing is held twice); anything else (a tensor subclass, a quantized or sparse
    tensor) is cloned."""
    if type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided and not t.is_quantized:
        alias = torch.empty(0, dtype=t.dtype, device=t.device)
        return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return t.detach().clone()


def make_autograd_safe(module: torch.nn.Module) -> int:
    """The inference-mode fix: ComfyUI loads weights under torch.inference_mode, and autograd
    refuses to save such tensors for backward. Replace each inference parameter/buffer by an equal
    ordinary tensor on the same memory (see _ordinary; no second copy is held) and freeze every
    parameter (no weight gradients). Returns how many tensors were replaced; a later call is a
    walk over the module that replaces nothing unless ComfyUI has put inference weights back (a
    reload, or LoRA patches restored)."""
    replaced = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is None:
                    continue
                if p.is_inference():
                    m._parameters[name] = torch.nn.Parameter(_ordinary(p), requires_grad=False)
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


def casts_weights(module: torch.nn.Module) -> bool:
    """Whether some layer casts its weight at every forward (ComfyUI's manual cast and lowvram offload)."""
    return any(getattr(m, "comfy_cast_weights", False) for m in module.modules())
