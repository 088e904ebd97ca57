"""A-STAR KSampler: the stock KSampler with A-STAR Apply's patch, in one node (the same implementation)."""
from __future__ import annotations

import comfy.samplers
import nodes as comfy_nodes  # ComfyUI's nodes.py (common_ksampler); this package's own modules are relative
from comfy_api.latest import io

from ..attention.recording import AttentionRecording
from ..attention.tokens import parse_concepts
from .guidance_inputs import MODEL_TOOLTIP, ORDER_NOTE, SAMPLERS_NOTE, build_guidance, guidance_inputs
from .types import AttentionType
from .widgets import schema


class AStarKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AStarKSampler",
            display_name="A-STAR KSampler",
            category="sampling",
            search_aliases=["astar", "attend and excite", "attention guidance", "ksampler astar",
                            "missing objects", "multiple objects", "catastrophic neglect"],
            description="KSampler with A-STAR attention guidance: at the first denoising steps the latent takes "
                        "gradient steps that keep the listed concepts' cross-attention apart (segregation) and "
                        "in place (retention), so every concept of the prompt appears. " + SAMPLERS_NOTE + " "
                        + ORDER_NOTE,
            inputs=[
                io.Model.Input("model", tooltip=MODEL_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="The number of denoising steps."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The sampler. " + SAMPLERS_NOTE),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="The scheduler."),
                io.Conditioning.Input("positive", tooltip="The positive prompt, encoded with A-STAR Text Encode "
                                                          "(ControlNet Apply and conditioning nodes may follow)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (any encoder)."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the schedule to run (img2img < 1)."),
                *guidance_inputs(),
            ],
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The denoised latent."),
                AttentionType.Output(display_name="attention",
                                     tooltip="Recorded concept maps and per-step losses, for A-STAR Attention Overlay."),
            ],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, concepts, attention_resolution, layout_masks=None, **guidance) -> io.NodeOutput:
        patched, runs = build_guidance(model, concepts, attention_resolution, positive=positive,
                                       layout_masks=layout_masks, **guidance)
        (latent,) = comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive,
                                                negative, latent_image, denoise=denoise)
        # denoise 0: ComfyUI returns the input latent without running the sampler: nothing was recorded
        recording = runs[-1] if runs else AttentionRecording(words=[s.label for s in parse_concepts(concepts)])
        return io.NodeOutput(latent, recording)
