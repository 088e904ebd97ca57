"""Making a loaded network differentiable with respect to its input: the inference-mode fix, and
finding the networks a guidance pass runs (the UNet and the ControlNets of the conditioning)."""
from __future__ import annotations

import contextlib
import logging

import torch

import comfy.model_management


def _holds_its_storage(t: torch.Tensor) -> bool:
    """A strided tensor whose values are its own storage: a plain tensor or a subclass that keeps torch's
    dispatch (GGUF's GGMLTensor: quantized bytes in a uint8 tensor, its format in Python attributes). Not a
    wrapper subclass (ComfyUI's QuantizedTensor), whose values live in inner tensors."""
    return (t.layout == torch.strided and not t.is_quantized
            and getattr(type(t), "__torch_dispatch__", None) is torch.Tensor.__torch_dispatch__)


def _ordinary(t: torch.Tensor) -> torch.Tensor:
    """An ordinary (non-inference) tensor equal to inference tensor t. A tensor that holds its storage gets a
    view of t's own memory (no copy: converting an SD1.5 UNet this way takes milliseconds instead of a
    3.3 GB copy, and nothing is held twice), of t's class and with its Python attributes (a GGUF weight's
    quantization type and shape: its clone and detach return the tensor itself, so copying would keep the
    inference tensor); anything else (a wrapper subclass, a quantized or sparse tensor) is cloned."""
    if _holds_its_storage(t):
        alias = torch.empty(0, dtype=t.dtype, device=t.device)
        alias = alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
        if type(t) in (torch.Tensor, torch.nn.Parameter):
            return alias
        alias = torch.Tensor._make_subclass(type(t), alias, False)
        alias.__dict__.update(t.__dict__)
        return alias
    return t.detach().clone()


def _ordinary_parameter(p: torch.nn.Parameter) -> torch.nn.Parameter:
    """An ordinary Parameter equal to inference parameter p, with p's requires_grad flag and Python
    attributes (ComfyUI tags parameters: dynamic VRAM's loader sets `_model_dtype`, which sizes the
    weight's VRAM slot)."""
    new = torch.nn.Parameter(_ordinary(p), requires_grad=p.requires_grad)
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
    ordinary tensor on the same memory (see _ordinary; no second copy is held); weights ComfyUI serves
    from inference-mode caches are served anew (refresh_served_weights). Returns how many tensors were
    replaced; a later call is a
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
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = _ordinary(b)
                    replaced += 1
    return replaced


@contextlib.contextmanager
def gradient_to_input(modules):
    """What a gradient with respect to the input of `modules` needs, for as long as the context is open;
    everything put back as it was at its end:
    - every parameter frozen (requires_grad False: no weight gradients, and autograd saves no input for
      one). Put back, because the flag is the shared model's, and some kernels take another path for
      frozen weights: ComfyUI's later runs of the model would differ in the last bits (SD3.5, CPU: 3e-6);
    - ComfyUI's `in_training` switch on where it exists: since 0.19 Flux's RoPE runs as a comfy-kitchen
      kernel that has no backward unless it is set (ComfyUI's training node sets it the same way)."""
    thawed = [p for module in modules for p in module.parameters() if p.requires_grad]
    switch = hasattr(comfy.model_management, "in_training")
    before = switch and comfy.model_management.in_training
    for p in thawed:
        p.requires_grad_(False)
    if switch:
        comfy.model_management.in_training = True
    try:
        yield
    finally:
        for p in thawed:
            p.requires_grad_(True)
        if switch:
            comfy.model_management.in_training = before


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
