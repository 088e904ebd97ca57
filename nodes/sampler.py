"""A-STAR KSampler, A-STAR Guider and A-STAR Attention Recorder: one mechanism (guided.py) underneath."""
from __future__ import annotations

import logging
import math

import comfy.patcher_extension
import comfy.samplers
import nodes as comfy_nodes  # ComfyUI's nodes.py (common_ksampler); this package's own modules are relative
from comfy_api.latest import io

from ..attention.guidance import GuidanceConfig
from ..attention.recording import AttentionRecording
from ..attention.schedule import AE_REFINEMENT_THRESHOLDS, parse_thresholds
from ..attention.tokens import parse_concepts
from .guided import WRAPPER_KEY, AStarSampling
from .patch import add_capture_patches, cross_attention_keys
from .prompt import prompt_tokens_of
from .types import AttentionType

RESOLUTIONS = {"1/32": 2, "1/16": 1, "1/8": 0, "1/64": 3}  # of the image side -> UNet downsample level
ORDER_NOTE = ("Patch order: apply attention-replacing patches (IPAdapter, NAG, ...) BEFORE this node; "
              "A-STAR chains to them. A patch applied after it replaces A-STAR's at the same layers.")


def concept_inputs():
    return [
        io.String.Input("concepts", default="cat, frog",
                        tooltip="Words of the positive prompt to keep apart and retain, separated by commas "
                                "(e.g. 'cat, frog' or 'teddy bear, red car'). Multi-token words are summed. "
                                "The first occurrence is used; 'frog#2' picks the second."),
        io.Combo.Input("attention_resolution", options=list(RESOLUTIONS), default="1/32",
                       tooltip="Which cross-attention layers to read, by their size relative to the image side. "
                               "1/32 is A&E's choice (SD1.5 at 512 px: 16x16, input 7-8 and output 3-5; SDXL: "
                               "input 7-8, middle, output 0-2). Small UNets may only have 1/16."),
    ]


def guidance_inputs():
    return concept_inputs() + [
        io.Combo.Input("mode", options=["astar", "attend_excite"], default="astar",
                       tooltip="astar: segregation + retention losses (A-STAR, ICCV 2023). attend_excite: the "
                               "Attend-and-Excite loss (the weakest concept's peak attention), for comparison."),
        io.Int.Input("guided_steps", default=25, min=0, max=10000,
                     tooltip="How many of the first denoising steps are guided (A&E: 25 of 50). Counted on the "
                             "steps the sampler actually runs (with denoise < 1 the KSampler still runs 'steps' steps, "
                             "the last ones of a longer schedule; split sigmas may run fewer). 0 = plain sampling."),
        io.Float.Input("step_size", default=20.0, min=0.0, max=1000.0, step=0.5,
                       tooltip="Scale of the latent update; step t uses step_size * sqrt(linspace(1, 0.5, steps)[t]) "
                               "(A&E's schedule, default 20)."),
        io.Float.Input("segregation_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                       tooltip="Weight of the segregation loss (less overlap between concepts' attention)."),
        io.Float.Input("retention_weight", default=1.0, min=0.0, max=100.0, step=0.05,
                       tooltip="Weight of the retention loss (each concept keeps the region it held at the "
                               "previous step)."),
        io.Combo.Input("binarization", options=["fraction", "otsu"], default="fraction",
                       tooltip="How the retention mask is made from a map: fraction = pixels >= fraction x peak; "
                               "otsu = Otsu's threshold."),
        io.Float.Input("mask_fraction", default=0.5, min=0.01, max=1.0, step=0.01,
                       tooltip="For binarization 'fraction': the share of the peak a pixel needs."),
        io.Boolean.Input("smoothing", default=True,
                         tooltip="Smooth maps with A&E's 3x3 Gaussian (sigma 0.5) before the losses."),
        io.Boolean.Input("refine", default=False,
                         tooltip="Iterative refinement at the threshold steps (A&E): repeat the update until the "
                                 "measure reaches the threshold or the cap. Costs one UNet pass per iteration."),
        io.String.Input("refine_thresholds", default="0:0.05, 10:0.5, 20:0.8",
                        tooltip="step:threshold pairs. attend_excite: weakest concept peak >= threshold; astar: "
                                "1 - mean pairwise overlap >= threshold."),
        io.Int.Input("max_refine_iters", default=20, min=1, max=200, tooltip="Cap on refinement iterations per step."),
        io.Mask.Input("layout_masks", optional=True,
                      tooltip="Optional user layout (paper Fig. 12): mask n is where concept n should be; it "
                              "replaces that concept's retention mask at every guided step. An all-zero mask "
                              "leaves that concept free."),
    ]


def build_guidance(model, concepts, attention_resolution, positive=None, mode="astar", guided_steps=0,
                   step_size=20.0, segregation_weight=1.0, retention_weight=1.0, binarization="fraction",
                   mask_fraction=0.5, smoothing=True, refine=False, refine_thresholds="", max_refine_iters=20,
                   layout_masks=None):
    """A patched clone of `model` and the recording it will fill. Validates before any sampling."""
    # The model first: with an SD3/Flux/video model the prompt comes from another encoder, and the
    # model's type is the error to report, not the prompt's.
    cross_attention_keys(model)  # clear error for models without UNet cross-attention
    specs = parse_concepts(concepts)
    config = GuidanceConfig(
        mode=mode, segregation_weight=segregation_weight, retention_weight=retention_weight,
        guided_steps=guided_steps, scale=step_size, refine=refine,
        thresholds=parse_thresholds(refine_thresholds) if refine_thresholds.strip() else AE_REFINEMENT_THRESHOLDS,
        max_refine_iters=max_refine_iters, binarization=binarization, fraction=mask_fraction, smooth=smoothing)
    if layout_masks is not None and layout_masks.shape[0] > len(specs):
        raise ValueError(f"{layout_masks.shape[0]} layout masks for {len(specs)} concepts: give one mask per "
                         "concept, in the order of the concepts (an all-zero mask leaves a concept free)")
    if positive is not None:
        prompt_tokens_of(positive).locate(specs)  # fail now, before sampling, on a word not in the prompt
    if mode == "astar" and len(specs) == 1 and guided_steps > 0:
        logging.warning("A-STAR: one concept ('%s'): no pair to segregate, guiding with retention only",
                        specs[0].label)
    level = RESOLUTIONS[attention_resolution]
    recording = AttentionRecording(words=[s.label for s in specs])
    patched = model.clone()
    add_capture_patches(patched)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY,
                                 AStarSampling(specs, config, level, recording, layout_masks))
    return patched, recording


class AStarKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AStarKSampler",
            display_name="A-STAR KSampler",
            category="sampling/astar",
            description="KSampler with A-STAR attention guidance: at the first denoising steps the latent takes "
                        "gradient steps that keep the listed concepts' cross-attention apart (segregation) and "
                        "in place (retention), so every concept of the prompt appears. Works with every sampler "
                        "and scheduler. " + ORDER_NOTE,
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x/SD2.x/SDXL model (LoRAs and other patches welcome). " + ORDER_NOTE),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="The number of denoising steps."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="The sampler."),
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
        patched, recording = build_guidance(model, concepts, attention_resolution, positive=positive,
                                            layout_masks=layout_masks, **guidance)
        (latent,) = comfy_nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive,
                                                negative, latent_image, denoise=denoise)
        return io.NodeOutput(latent, recording)


class AStarGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AStarGuider",
            display_name="A-STAR Guider",
            category="sampling/astar",
            description="A CFG guider with A-STAR attention guidance, for SamplerCustomAdvanced (any sampler, "
                        "sigmas and noise). The attention output is filled when the sampler runs. " + ORDER_NOTE,
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x/SD2.x/SDXL model. " + ORDER_NOTE),
                io.Conditioning.Input("positive", tooltip="The positive prompt, encoded with A-STAR Text Encode."),
                io.Conditioning.Input("negative", tooltip="The negative prompt."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale."),
                *guidance_inputs(),
            ],
            outputs=[
                io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced."),
                AttentionType.Output(display_name="attention",
                                     tooltip="Filled by the sampler run: concept maps and per-step losses."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, concepts, attention_resolution, layout_masks=None,
                **guidance) -> io.NodeOutput:
        patched, recording = build_guidance(model, concepts, attention_resolution, positive=positive,
                                            layout_masks=layout_masks, **guidance)
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider, recording)


class AStarAttentionRecorder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="AStarAttentionRecorder",
            display_name="A-STAR Attention Recorder",
            category="sampling/astar",
            description="Records the concepts' cross-attention maps of any sampler run (stock KSampler included), "
                        "without guiding it. The attention output is filled when the sampler runs; the positive "
                        "prompt must come from A-STAR Text Encode. " + ORDER_NOTE,
            inputs=[io.Model.Input("model", tooltip="The model to record. " + ORDER_NOTE), *concept_inputs()],
            outputs=[
                io.Model.Output(tooltip="The same model, recording its cross-attention. Outputs are unchanged."),
                AttentionType.Output(display_name="attention",
                                     tooltip="Filled by the next sampler run with this model."),
            ],
        )

    @classmethod
    def execute(cls, model, concepts, attention_resolution) -> io.NodeOutput:
        patched, recording = build_guidance(model, concepts, attention_resolution, guided_steps=0)
        return io.NodeOutput(patched, recording)
