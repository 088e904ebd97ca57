"""The guidance settings every A-STAR node shares (one widget list), and the model patch they make."""
from __future__ import annotations

import logging
import re

import comfy.patcher_extension
from comfy_api.latest import io

from ..attention.guidance import GuidanceConfig
from ..attention.recording import RecordedRuns
from ..attention.schedule import AE_REFINEMENT_POINTS, parse_thresholds
from ..attention.tokens import NoConceptGiven, parse_concepts
from .joint_attention import DEFAULT_BLOCKS
from .model_family import joint_family
from .prompt import missing_concepts_error, prompt_tokens_of
from .readers import DEFAULT_RESOLUTION, RESOLUTIONS, reader_for
from .sampler_steps import NOT_PREDICTED, UNGUIDABLE
from .sampling_wrapper import WRAPPER_KEY, AStarSampling
from .widgets import check_options, fold_advanced

ORDER_NOTE = ("Patch order: apply attention-replacing patches (IPAdapter, NAG, ...) BEFORE this node; "
              "A-STAR chains to them. A patch applied after it replaces A-STAR's at the same layers.")
MODEL_TOOLTIP = "An SD1.x/SD2.x/SDXL, Flux.1, Flux.2 Klein, Chroma, Qwen-Image, Z-Image or SD3/SD3.5 model (LoRAs and other patches welcome). " + ORDER_NOTE
SAMPLERS_NOTE = (f"Works with every scheduler and every sampler except {', '.join(UNGUIDABLE.values())} "
                 f"(predictor-corrector), {', '.join(NOT_PREDICTED.values())} (steps chosen at run time), "
                 "SamplerLCMUpscale, other packs' SAMPLER objects (no rule for their steps) and s_churn > 0: "
                 "those are refused with an error while guiding and may record with guidance_end 0.")
AE_THRESHOLDS_TEXT = ", ".join(f"{p:g}:{t:g}" for p, t in AE_REFINEMENT_POINTS.items())
# The widget each GuidanceConfig field comes from, where the names differ: errors name what the user sees.
CONFIG_WIDGETS = {"start": "guidance_start", "end": "guidance_end", "scale": "step_size",
                  "refine_points": "refine_thresholds", "fraction": "mask_fraction", "smooth": "smoothing"}
# Folded away where ComfyUI can (their defaults are the papers'; the other family's input is among them).
ADVANCED = ("attention_resolution", "joint_blocks", "segregation_weight", "retention_weight", "binarization",
            "mask_fraction", "smoothing", "refine", "refine_thresholds", "max_refine_iters", "single_pass",
            "layout_masks")


def in_widget_terms(error: ValueError) -> ValueError:
    """The same error, with each GuidanceConfig field named by its widget."""
    return ValueError(re.sub(r"GuidanceConfig\.(\w+)", lambda m: CONFIG_WIDGETS.get(m.group(1), m.group(1)),
                             str(error)))


def concept_inputs():
    return fold_advanced([
        io.String.Input("concepts", default="", placeholder="words of the prompt, e.g. cat, frog",
                        tooltip="Words of the positive prompt to keep apart and retain, separated by commas "
                                "(e.g. 'cat, frog' or 'teddy bear, red car'). Multi-token words are summed. "
                                "The first occurrence is used; 'frog#2' picks the second. Left empty, the run "
                                "stops with a list of the prompt's words to choose from."),
        io.Combo.Input("attention_resolution", options=list(RESOLUTIONS), default=DEFAULT_RESOLUTION,
                       tooltip="SD1.x/SD2.x/SDXL (UNet) models only: which cross-attention layers to read, by "
                               "their size relative to the image side. 1/32 is A&E's choice (SD1.5 at 512 px: "
                               "16x16, input 7-8 and output 3-5; SDXL: input 7-8, middle, output 0-2). Small UNets "
                               "may only have 1/16. Joint-attention models (Flux.1, Flux.2 Klein, Chroma, SD3/SD3.5, "
                               "Qwen-Image, Z-Image) read joint_blocks instead: leave this at 1/32."),
    ], ADVANCED)


def joint_blocks_input():
    # optional: API-format prompts saved before this input existed stay valid
    return fold_advanced([io.String.Input(
        "joint_blocks", default="", optional=True,
        tooltip="Joint-attention models only (Flux.1, Flux.2 Klein, Chroma, SD3/SD3.5, Qwen-Image, Z-Image): the "
                "blocks whose text attention makes the maps, as TYPE:all, TYPE:N or TYPE:A-B items separated by commas. Empty = the default: "
                f"Flux and Chroma '{DEFAULT_BLOCKS['flux']}' (every double-stream block), Qwen-Image and Z-Image "
                "'double:all' (every block; Z-Image's refiner layers are never read), SD3.5 "
                f"'{DEFAULT_BLOCKS['sd3']}' (clipped to the model's blocks). Leave empty for SD1.x/SD2.x/SDXL.")], ADVANCED)[0]


def guidance_inputs():
    return concept_inputs() + fold_advanced([
        io.Combo.Input("mode", options=["astar", "attend_excite"], default="astar",
                       tooltip="astar: segregation + retention losses (A-STAR, ICCV 2023). attend_excite: the "
                               "Attend-and-Excite loss (the weakest concept's peak attention), as published."),
        io.Float.Input("guidance_start", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Where guidance starts, as a fraction of the model's noise schedule (0 = pure noise), "
                               "read as ConditioningSetTimestepRange reads its start. Every sampler run of the model "
                               "(hires fix, img2img, KSamplerAdvanced segments, refiners) uses the same clock."),
        io.Float.Input("guidance_end", default=0.5, min=0.0, max=1.0, step=0.01,
                       tooltip="Guided steps are those whose noise level lies between guidance_start and guidance_end "
                               "of the model's noise schedule (start <= place < end). A full run with the 'normal' "
                               "scheduler places step i of n at i/(n-1): 0 to 0.5 guides A&E's first 25 of 50 steps. "
                               "A hires-fix pass at denoise 0.5 starts past 0.5, so it is not guided. 0 = record only."),
        io.Float.Input("step_size", default=20.0, min=0.0, max=1000.0, step=0.5,
                       tooltip="Scale of the latent update; a step at place f of the noise schedule uses "
                               "step_size * sqrt(1 - f/2) (A&E's sqrt(linspace(1, 0.5, 50)) over a full 50-step run, "
                               "default 20). 0 = the stock sampler's result, exactly."),
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
        io.Combo.Input("refine", options=["auto", "on", "off"], default="auto",
                       tooltip="Iterative refinement at the refinement points: repeat the update until the measure "
                               "reaches the threshold or the cap (one UNet pass per iteration). auto = on for "
                               "attend_excite (A&E always refines), off for astar (A-STAR's paper does not refine; "
                               "with 'on' its measure is 1 - the mean pairwise overlap)."),
        io.String.Input("refine_thresholds", default=AE_THRESHOLDS_TEXT,
                        tooltip="fraction:threshold pairs; fractions of the model's noise schedule, like guidance_start/"
                                "end: a point refines at the first step at or past it (A&E's steps 0, 10, 20 of 50 "
                                "= 0, 0.2, 0.4). attend_excite: weakest concept peak >= threshold; astar: "
                                "1 - mean pairwise overlap >= threshold."),
        io.Int.Input("max_refine_iters", default=20, min=1, max=200, tooltip="Cap on refinement iterations per point."),
        joint_blocks_input(),
        # optional: API-format prompts saved before this input existed stay valid
        io.Boolean.Input("single_pass", default=False, optional=True,
                         tooltip="Off (default): each guided step runs a guidance pass (the prompt's branch, "
                                 "stopped after the last read layer) for the gradient, then the sampler's model call "
                                 "on the updated latent, as A-STAR and A&E do. On: the sampler's own model call, run "
                                 "with gradients, gives the maps and the gradient, so a guided step costs a backward "
                                 "pass instead of a forward and a backward; but the sampler's prediction at a guided "
                                 "step is then the one from the latent before the update. Pays off where one call "
                                 "evaluates the prompt alone (Flux, cfg 1); keeps every activation of the call for "
                                 "the backward (more memory)."),
        io.Mask.Input("layout_masks", optional=True,
                      tooltip="Optional user layout (paper Fig. 12): mask n is where concept n should be; it "
                              "replaces that concept's retention mask at every guided step. An all-zero mask "
                              "leaves that concept free."),
    ], ADVANCED)


def build_guidance(model, concepts, attention_resolution, positive=None, mode="astar", guidance_start=0.0,
                   guidance_end=0.0, step_size=20.0, segregation_weight=1.0, retention_weight=1.0,
                   binarization="fraction", mask_fraction=0.5, smoothing=True, refine="auto",
                   refine_thresholds=AE_THRESHOLDS_TEXT, max_refine_iters=20, layout_masks=None, joint_blocks="",
                   single_pass=False, **kwargs):
    """A patched clone of `model` and the list its sampler runs will append their recordings to.
    Validates everything it can before any sampling."""
    # The model first: with a video model the prompt comes from another encoder, and the model's type
    # is the error to report, not the prompt's.
    joint_family(model)
    check_options(guidance_inputs(), {"attention_resolution": attention_resolution, "mode": mode,
                                      "binarization": binarization, "refine": refine})
    reader = reader_for(model, attention_resolution, joint_blocks)
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY):
        raise ValueError("A-STAR is already applied to this model (an A-STAR Apply, Recorder or KSampler before "
                         "this node): apply it once, listing every concept in that one node.")
    try:
        specs = parse_concepts(concepts)
    except NoConceptGiven:  # said with the prompt's words: now if the prompt is here, else when sampling
        if positive is not None:
            raise missing_concepts_error(prompt_tokens_of(positive).text) from None
        specs = []
    try:
        refine_points = parse_thresholds(refine_thresholds)
    except ValueError as e:
        raise ValueError(f"refine_thresholds: {e}") from None
    try:
        config = GuidanceConfig(
            mode=mode, segregation_weight=segregation_weight, retention_weight=retention_weight,
            start=guidance_start, end=guidance_end, scale=step_size,
            refine=refine == "on" or (refine == "auto" and mode == "attend_excite"),
            refine_points=refine_points, max_refine_iters=max_refine_iters,
            binarization=binarization, fraction=mask_fraction, smooth=smoothing)
    except ValueError as e:
        raise in_widget_terms(e) from None
    if specs and layout_masks is not None and layout_masks.shape[0] > len(specs):
        raise ValueError(f"{layout_masks.shape[0]} layout masks for {len(specs)} concepts: give one mask per "
                         "concept, in the order of the concepts (an all-zero mask leaves a concept free)")
    if positive is not None:  # fail now, before sampling, on a word not in the prompt
        reader.locate(prompt_tokens_of(positive), specs)
    if mode == "astar" and len(specs) == 1 and guidance_end > guidance_start:
        logging.warning("A-STAR: one concept ('%s'): no pair to segregate, guiding with retention only",
                        specs[0].label)
    runs = RecordedRuns()
    patched = model.clone()
    reader.install(patched)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY,
                                 AStarSampling(specs, config, runs, reader, layout_masks=layout_masks,
                                               single_pass=single_pass))
    return patched, runs
