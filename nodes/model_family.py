"""Which text attention a ComfyUI MODEL has, and so how A-STAR reads it: UNet cross-attention
(SD1.x, SD2.x, SDXL: nodes/attention_patch.py) or joint attention (nodes/joint_attention.py).

Every per-family fact of the joint-attention models is one JointFamily entry of JOINT_FAMILY_TABLE; the
hook, the token layout and the guidance read only these entries (a new family is a new entry). Models
A-STAR knows it cannot read are entries of REFUSED_MODELS, with the reason shown to the user.
Detection is by ComfyUI's model class (comfy.model_base), exactly: Chroma and Flux.2 are subclasses of
Flux's model class but differ in text encoder or blocks, so a subclass is never taken for its parent.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.model_base
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

UNET, FLUX, SD3, CHROMA = "unet", "flux", "sd3", "chroma"
KLEIN_4B, KLEIN_9B = "flux2_klein_4b", "flux2_klein_9b"
QWEN_IMAGE = "qwen_image"
ZIMAGE = "zimage"


@dataclass(frozen=True)
class JointFamily:
    """How A-STAR reads one joint-attention model family.

    model_class: the comfy.model_base class name ComfyUI's loaders build for it (matched exactly).
    blocks: block type -> the diffusion model's ModuleList attribute holding those blocks.
    counted: True when transformer_options carry no block index (SD3 in 0.3.75): the joint calls of a
        pass are counted instead (calls shorter than the joint sequence are neither counted nor read);
        False: the block is transformer_options' ("block_type", "block_index").
    default_blocks: the blocks read when joint_blocks is empty (parse_blocks' syntax), and why.
    context: the tokenize() keys of the encoders that make the context, in context order; keys in one
        tuple share their positions (SD3's CLIP-L and CLIP-G features are concatenated per token).
    text_encoder: what the user loads as text encoder(s), for messages and the docs.
    context_width: the diffusion model's context width (text_feature_width() below) that tells this family
        from others of the same model class (Flux.2 dev and Klein are one class, Lumina 2 and Z-Image
        another), None: any.
    template: the tokenizer wraps the prompt in a chat template (LLM encoders): the prompt's own tokens
        are where the prompt tokenized alone sits in it; the template and the padding are not the prompt.
    context_after: token ids after whose first occurrence the context starts: the encoder drops the
        template's head up to and including them (Qwen-Image drops its system turn and "<|im_start|>user\n");
        () when the context is every token.
    unread_conds: (model input, why) for inputs of the diffusion model that put tokens A-STAR does not place
        into the joint sequence: a guided pass that has one is an error, never a misread map.
    """

    name: str
    label: str
    model_class: str
    blocks: tuple[tuple[str, str], ...]
    counted: bool
    default_blocks: str
    context: tuple[tuple[str, ...], ...]
    text_encoder: str
    context_width: int | None = None
    template: bool = False
    context_after: tuple[int, ...] = ()
    unread_conds: tuple[tuple[str, str], ...] = ()

    def matches(self, model) -> bool:
        """True for a comfy.model_base model of exactly this family's class (and context width)."""
        if getattr(comfy.model_base, self.model_class, None) is not type(model):
            return False
        return self.context_width is None or text_feature_width(getattr(model, "diffusion_model", None)) == self.context_width

    def block_counts(self, net) -> dict[str, int]:
        """Number of blocks of each type of this family's diffusion model `net`."""
        return {kind: len(getattr(net, attr)) for kind, attr in self.blocks}


def text_feature_width(net) -> int | None:
    """Width of the text features a diffusion model takes: Flux's params.context_in_dim, or the input of
    NextDiT's (Lumina 2, Z-Image) caption embedder (RMSNorm, Linear); None when neither is there."""
    params = getattr(net, "params", None)
    if params is not None and hasattr(params, "context_in_dim"):
        return params.context_in_dim
    embedder = getattr(net, "cap_embedder", None)
    return getattr(embedder[-1], "in_features", None) if embedder is not None else None


_FLUX_BLOCKS = (("double", "double_blocks"), ("single", "single_blocks"))

# FOCUS reads Flux's double-stream blocks (the text and image streams keep their own weights there);
# Chroma has Flux.1's double and single blocks unchanged, so the same reason picks the same blocks.
# JEDI reads SD3.5's joint blocks 4-16.
JOINT_FAMILY_TABLE = {
    FLUX: JointFamily(FLUX, "Flux.1", "Flux", _FLUX_BLOCKS, False, "double:all", (("t5xxl",),),
                      "CLIP-L + T5-XXL (DualCLIPLoader, type flux); the context is T5's",
                      context_width=4096),  # T5-XXL's; other models of the Flux class (Ovis-Image) differ
    SD3: JointFamily(SD3, "SD3/SD3.5", "SD3", (("joint", "joint_blocks"),), True, "joint:4-16",
                     (("l", "g"), ("t5xxl",)), "CLIP-L + CLIP-G + T5-XXL (TripleCLIPLoader)"),
    CHROMA: JointFamily(CHROMA, "Chroma", "Chroma", _FLUX_BLOCKS, False, "double:all", (("t5xxl",),),
                        "T5-XXL alone (CLIPLoader, type chroma)"),
    # Flux.2 Klein (ComfyUI 0.19+): Flux.2's double/single blocks (FOCUS's reason holds: the double blocks keep
    # separate text and image weights); Qwen3 in a chat template, padded to 512 tokens; told from Flux.2 dev
    # (same class, Mistral-3, context 15360) by the context width: 3 Qwen3 layers of 2560 (4B) or 4096 (9B).
    KLEIN_4B: JointFamily(KLEIN_4B, "Flux.2 Klein 4B", "Flux2", _FLUX_BLOCKS, False, "double:all", (("qwen3_4b",),),
                          "Qwen3-4B (CLIPLoader, type flux2)", context_width=3 * 2560, template=True),
    KLEIN_9B: JointFamily(KLEIN_9B, "Flux.2 Klein 9B", "Flux2", _FLUX_BLOCKS, False, "double:all", (("qwen3_8b",),),
                          "Qwen3-8B (CLIPLoader, type flux2)", context_width=3 * 4096, template=True),
    # Qwen-Image: 60 dual-stream blocks, all with separate text and image weights (FOCUS's reason for Flux's
    # double blocks holds for each; ComfyUI names them "double"); no study picks a subset, joint_blocks narrows
    # them. Qwen2.5-VL-7B in a chat template whose head (system turn, "<|im_start|>user\n") the encoder drops.
    QWEN_IMAGE: JointFamily(QWEN_IMAGE, "Qwen-Image", "QwenImage", (("double", "transformer_blocks"),), False,
                            "double:all", (("qwen25_7b",),), "Qwen2.5-VL-7B (CLIPLoader, type qwen_image)",
                            template=True, context_after=(151644, 872, 198)),
    # Z-Image (Turbo): ComfyUI's Lumina2 class (NextDiT), told from Lumina Image 2.0 (Gemma-2, 2304) by its
    # Qwen3-4B context (2560). One stream of [caption, image] tokens through `layers`, after a text-only
    # context_refiner and an image-only noise_refiner (shorter calls: never read). Its layers are counted:
    # ComfyUI 0.3.75 sets no block index there (0.19 sets ("double", i), the same numbers). All layers by
    # default: every layer is a joint text-image attention with shared weights, and nothing published (nor
    # measured here) singles some out, as FOCUS does for Flux's double blocks.
    ZIMAGE: JointFamily(ZIMAGE, "Z-Image", "Lumina2", (("double", "layers"),), True, "double:all", (("qwen3_4b",),),
                        "Qwen3-4B (CLIPLoader, type lumina2)", context_width=2560, template=True,
                        unread_conds=(("ref_latents", "reference latents (ReferenceLatent, Z-Image Omni) put their own "
                                                      "caption and image tokens before the prompt's"),)),
}
JOINT_FAMILIES = tuple(JOINT_FAMILY_TABLE)

# comfy.model_base class name -> why A-STAR cannot read that model (checked before anything else).
_NO_OVERRIDE = ("its attention calls ComfyUI's optimized_attention without transformer_options, so they never "
                "reach optimized_attention_override, the only place a node pack can read joint attention: "
                "guidance would silently do nothing")
REFUSED_MODELS = {
    "HiDream": ("HiDream-I1's blocks put the image tokens first and append the Llama-3 tokens of each block to its "
                "own sequence, and ComfyUI gives its attention calls no block index, so A-STAR cannot tell which "
                "keys are the prompt's words in which block"),
    "ErnieImage": "Ernie-Image: " + _NO_OVERRIDE,
    "ChromaRadiance": ("Chroma Radiance works on pixels with 16x16 patches and NeRF decoder blocks; A-STAR reads "
                       "Chroma (latent) and has not been verified on Radiance"),
    "Lumina2": ("of ComfyUI's Lumina 2 models, A-STAR reads Z-Image (Qwen3-4B text encoder); Lumina Image 2.0 and "
                "NewBie (Gemma-2 text encoder, a system prompt before the user's) are not verified"),
    "ZImagePixelSpace": ("Z-Image pixel space works on pixels with its own decoder; A-STAR reads Z-Image (latent) "
                         "and has not been verified on the pixel-space variant"),
    "Flux2": ("of Flux.2, A-STAR reads Klein 4B and 9B (Qwen3 text encoder); Flux.2 dev's Mistral-3 context, "
              "left-padded by the model to 512 tokens, is not read yet"),
}


def joint_family(model_patcher) -> JointFamily | None:
    """The JointFamily of a MODEL, None for a UNet model; a clear error for any other model."""
    family = model_family(model_patcher)
    return None if family == UNET else JOINT_FAMILY_TABLE[family]


def model_family(model_patcher) -> str:
    """"unet" or a key of JOINT_FAMILY_TABLE for a MODEL; a clear error saying why for any other model."""
    model = model_patcher.model
    net = getattr(model, "diffusion_model", None)
    if isinstance(net, UNetModel):
        return UNET
    for family in JOINT_FAMILY_TABLE.values():
        if family.matches(model):
            return family.name
    name = type(model).__name__
    if name in REFUSED_MODELS:
        raise ValueError(f"A-STAR cannot guide this model ({name}): {REFUSED_MODELS[name]}.")
    labels = ", ".join(f.label for f in JOINT_FAMILY_TABLE.values())
    raise ValueError(
        f"A-STAR reads the text attention of SD1.x/SD2.x/SDXL UNets (cross-attention) and of {labels} "
        f"(joint attention); this model is {name} ({type(net).__name__}), which has neither. Use one of those models.")
