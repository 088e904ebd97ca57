"""Which text attention a ComfyUI MODEL has, and so how A-STAR reads it: UNet cross-attention
(SD1.x, SD2.x, SDXL: nodes/attention_patch.py) or joint attention (Flux.1, SD3/SD3.5:
nodes/joint_attention.py)."""
from __future__ import annotations

from comfy.ldm.flux.model import Flux
from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

UNET, FLUX, SD3 = "unet", "flux", "sd3"
JOINT_FAMILIES = (FLUX, SD3)


def model_family(model_patcher) -> str:
    """"unet", "flux" or "sd3" for a MODEL; a clear error naming the type for any other model."""
    net = getattr(model_patcher.model, "diffusion_model", None)
    if isinstance(net, UNetModel):
        return UNET
    if isinstance(net, Flux):
        return FLUX
    if isinstance(net, MMDiT):
        return SD3
    raise ValueError(
        f"A-STAR reads the text attention of SD1.x/SD2.x/SDXL UNets (cross-attention) and of Flux.1 and "
        f"SD3/SD3.5 (joint attention); this model is {type(model_patcher.model).__name__} "
        f"({type(net).__name__}), which has neither. Use one of those models.")
