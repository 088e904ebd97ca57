"""How A-STAR reads a MODEL's text attention: one reader object per kind of model, made by reader_for.

- UNetReader: SD1.x/SD2.x/SDXL cross-attention (attention_patch.py), the layers at one downsample level.
- JointReader: the joint-attention families of model_family.py's table (joint_attention.py), chosen blocks.

The guidance (guidance_inputs.py, sampling_wrapper.py) asks a reader, never which kind of model it
is: which patches to install, the size of the concept maps, the layers a pass reads (so it may stop
after the last), where the concepts sit in the context, and what to tell the user when nothing was read.
A reader is made from the unpatched model and the widgets, and checks them before anything is patched.
"""
from __future__ import annotations

import math

from ..attention.maps import downsample_level
from .attention_patch import add_capture_patches, layer_depths
from .joint_attention import install_joint_attention_hook, parse_blocks
from .joint_tokens import joint_token_layout
from .model_family import JointFamily, joint_family
from .prompt import PromptTokens

RESOLUTIONS = {"1/32": 2, "1/16": 1, "1/8": 0, "1/64": 3}  # of the image side -> UNet downsample level
DEFAULT_RESOLUTION = "1/32"


def unet_map_size(latent_hw, level) -> tuple[int, int]:
    """Spatial size of the UNet activations `level` downsamplings below the latent (stride-2, pad 1)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


class UNetReader:
    """Maps from the cross-attention layers `level` downsamplings below the latent (A&E's 16x16 at 1/32).

    level: the sinks' downsample level. layer_depths: [(layer key, depth)] of the UNet's cross-attention
    layers in forward order (attention_patch.layer_depths), [] when the depths are not known from the
    structure (resblock_updown: the first pass learns its layers)."""

    adds_in_place = False  # block outputs are not added in place to tensors autograd saved

    def __init__(self, model_patcher, attention_resolution: str = DEFAULT_RESOLUTION, joint_blocks: str = ""):
        if joint_blocks.strip():
            raise ValueError(f"joint_blocks ('{joint_blocks}') is for joint-attention models (Flux, Chroma, SD3.5, "
                             "Qwen-Image, Z-Image); this is a UNet model: leave joint_blocks empty and choose its "
                             "layers with attention_resolution")
        self.level = RESOLUTIONS[attention_resolution]
        self.layer_depths = layer_depths(model_patcher) or []
        self.read_failure = (f"this UNet has no cross-attention layer at the chosen attention resolution "
                             f"({attention_resolution} of the image side); choose another resolution")

    def install(self, model_patcher) -> None:
        """Put the reading patches on a clone of the model."""
        add_capture_patches(model_patcher)

    def map_size(self, latent_hw) -> tuple[int, int]:
        """(h, w) of the concept maps for a latent of latent_hw."""
        return unet_map_size(latent_hw, self.level)

    def planned_layers(self, latent_hw) -> tuple | None:
        """The layers a pass on a latent of latent_hw reads, in order: those whose activations (each
        downsampling rounds the size up) the patch's size rule puts at `level`. None when not known."""
        planned = tuple(key for key, depth in self.layer_depths
                        if downsample_level(latent_hw, unet_map_size(latent_hw, depth)) == self.level)
        return planned or None

    def locate(self, prompt: PromptTokens, specs, n_context: int | None = None):
        """(token groups of the concepts, context columns left out of the token softmax, context length)
        for a conditioning of n_context tokens (None: the prompt's own)."""
        n_context = n_context or prompt.length
        return prompt.locate(specs), prompt.excluded_columns(n_context), n_context


class JointReader:
    """Maps from the chosen blocks of a joint-attention model, on its grid of patch_size x patch_size
    latent patches. blocks: the (type, index) keys read, in forward order."""

    level = None  # a joint pass hands its sinks every read block
    adds_in_place = True  # Flux's blocks add their outputs in place (img += ...) to tensors autograd saved

    def __init__(self, model_patcher, family: JointFamily, attention_resolution: str = DEFAULT_RESOLUTION,
                 joint_blocks: str = ""):
        if attention_resolution != DEFAULT_RESOLUTION:
            raise ValueError(f"attention_resolution ('{attention_resolution}') is for SD1.x/SD2.x/SDXL UNet models; "
                             f"this is a {family.label} model, whose maps come from joint_blocks: set "
                             f"attention_resolution back to {DEFAULT_RESOLUTION} and choose its blocks with "
                             "joint_blocks (empty = the default blocks)")
        net = model_patcher.model.diffusion_model
        self.family = family
        self.blocks = parse_blocks(joint_blocks.strip() or family.default_blocks, family.block_counts(net))
        self.patch_size = int(net.patch_size)
        self.read_failure = "no chosen joint-attention block ran in this model's forward pass; check joint_blocks"

    def install(self, model_patcher) -> None:
        install_joint_attention_hook(model_patcher, self.family, self.blocks)

    def map_size(self, latent_hw) -> tuple[int, int]:
        return tuple(math.ceil(s / self.patch_size) for s in latent_hw)

    def planned_layers(self, latent_hw) -> tuple | None:
        return self.blocks or None

    def locate(self, prompt: PromptTokens, specs, n_context: int | None = None):
        layout = joint_token_layout(prompt, specs, self.family.name)
        n_context = n_context or layout.n_tokens
        layout.check_context(n_context)
        return [list(g) for g in layout.groups], layout.excluded, n_context


def reader_for(model_patcher, attention_resolution: str = DEFAULT_RESOLUTION,
               joint_blocks: str = "") -> UNetReader | JointReader:
    """The reader of a MODEL with these widgets; a clear error for a model A-STAR cannot read or a widget
    that does not apply to it."""
    family = joint_family(model_patcher)
    if family is None:
        return UNetReader(model_patcher, attention_resolution, joint_blocks)
    return JointReader(model_patcher, family, attention_resolution, joint_blocks)
