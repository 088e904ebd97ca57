"""A-STAR Attention Overlay: pictures of an attention recording over the image of the same run."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from . import overlay_drawing as overlay
from .types import AttentionType
from .widgets import check_options, fold_advanced, schema

_TIMELINE_CELL = 64  # pixels per step and concept in the timeline
ADVANCED = ("step_start", "step_end", "layers", "normalization", "colormap", "opacity")


def in_node_previews(images: list[torch.Tensor], report: str, cls) -> dict:
    """What the node shows, as stock preview nodes do: every picture (saved to ComfyUI's temp folder like
    Preview Image's) and the report text."""
    saved = [entry for batch in images for entry in ui.PreviewImage(batch, cls=cls).as_dict()["images"]]
    return {"images": saved, "text": (report,)}


def parse_layers(text: str, n_layers: int, names=None) -> list[int] | None:
    """'' -> None (all layers); '0, 2, -1' -> [0, 2, n_layers - 1]. ValueError with advice otherwise."""
    text = (text or "").strip()
    if not text:
        return None
    named = ""
    if names:
        named = " (" + "; ".join(f"{i}: {names[i]}" for i in range(min(n_layers, len(names)))) + ")"
    out = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            i = int(part)
        except ValueError:
            raise ValueError(
                f"layers: cannot read {part!r} as a layer index. Enter comma-separated integers such as "
                f"'0, 2' (0..{n_layers - 1}, negatives count from the end; the recording has {n_layers} "
                f"layers{named}), or leave it empty to use all layers.") from None
        if not -n_layers <= i < n_layers:
            raise ValueError(
                f"layers: index {i} is out of range; the recording has {n_layers} layers, so use "
                f"0..{n_layers - 1} (or -{n_layers}..-1 from the end){named}, or leave it empty for all.")
        out.append(i)
    if not out:
        raise ValueError(f"layers: {text!r} names no layer; leave it empty for all {n_layers} layers "
                         "or list indices such as '0, 2'.")
    return out


def step_range(step_start: int, step_end: int, n_steps: int) -> tuple[int, int]:
    """The node's inclusive [step_start, step_end] (negatives count from the end, -1 = last step)
    -> overlay.select_maps' (start, end-exclusive), as non-negative positions."""
    s0 = step_start + n_steps if step_start < 0 else step_start
    s1 = step_end + n_steps if step_end < 0 else step_end
    allowed = f"0..{n_steps - 1} (or -{n_steps}..-1 counting from the end, -1 = last step)"
    if not 0 <= s0 < n_steps:
        raise ValueError(f"step_start {step_start} is out of range: the recording has {n_steps} steps, "
                         f"use {allowed}.")
    if not 0 <= s1 < n_steps:
        raise ValueError(f"step_end {step_end} is out of range: the recording has {n_steps} steps, "
                         f"use {allowed}.")
    if s1 < s0:
        raise ValueError(f"step_start {step_start} (position {s0}) comes after step_end {step_end} (position "
                         f"{s1}) of the {n_steps} recorded steps; choose step_start <= step_end.")
    return s0, s1 + 1


def pick_run(attention, run: int):
    """The recording of one run: a sampler's own recording, or run `run` of a patched model's runs."""
    if isinstance(attention, list):
        if not attention:
            raise ValueError("attention: no sampler has run with the A-STAR model yet. Connect its MODEL output "
                             "to a sampler node; this node must execute after that sampler (give it the image "
                             "decoded from that sampler's latent).")
        if not -len(attention) <= run < len(attention):
            raise ValueError(f"run {run} is out of range: the model recorded {len(attention)} run(s); use "
                             f"0..{len(attention) - 1} or -1 for the latest.")
        return attention[run]
    return attention


class AttentionOverlay(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AStarAttentionOverlay",
            display_name="A-STAR Attention Overlay",
            category="image/astar",
            search_aliases=["astar", "attention heatmap", "attention map", "cross attention", "loss plot"],
            description=(
                "Draws the concept cross-attention recorded during an A-STAR (or record-only) sampling "
                "run over the image it produced: one heatmap per concept, all concepts in their own "
                "colours, the maps at every step (does attention stay where it was found?), the "
                "pairwise overlap the segregation loss penalises, and the losses per step. Shows them in "
                "the node, and returns them for Save Image or other nodes."),
            is_output_node=True,
            inputs=fold_advanced([
                AttentionType.Input(
                    "attention",
                    tooltip="The attention recorded by A-STAR KSampler, A-STAR Apply or the attention recorder. "
                            "A patched model records every sampler run that uses it; 'run' picks one."),
                io.Image.Input(
                    "image",
                    tooltip="The decoded image of the same run (batch equal to the recording's batch, "
                            "or a single image used for every sample)."),
                io.Int.Input(
                    "run", default=-1, min=-8, max=7,
                    tooltip="Which run of the patched model to draw, in execution order: -1 = the latest, 0 = the "
                            "first (the last 8 runs are kept). Two samplers sharing one A-STAR model make two runs."),
                io.Int.Input(
                    "step_start", default=0, min=-10000, max=10000,
                    tooltip="First recorded step averaged into the heatmaps, combined and overlap "
                            "images (0 = first). Counts recorded steps; negatives count from the end "
                            "(-1 = last). Inclusive."),
                io.Int.Input(
                    "step_end", default=-1, min=-10000, max=10000,
                    tooltip="Last recorded step averaged, inclusive: -1 = the last step, -2 the one "
                            "before, 0..N-1 a step index. Must not come before step_start. The "
                            "timeline always shows every step."),
                io.String.Input(
                    "layers", default="",
                    tooltip="Which maps to draw: empty = the maps as the guidance loss sees them (mean over "
                            "the selected layers, token softmax, smoothing; at guided steps those of the guidance "
                            "pass); 'all' = the mean of every recorded layer's own maps; or comma-separated indices "
                            "into the recording's layer list, e.g. '0, 2' (negatives count from the end)."),
                io.Combo.Input(
                    "normalization", options=list(overlay.NORMALIZATIONS), default="per_concept",
                    tooltip="per_concept: each concept's map scaled to its own max (shows where, hides "
                            "how strong). global: all concepts of an image scaled by their joint max "
                            "(shows which concept is weak). none: raw token-softmax values (0..1). The "
                            "timeline scales over all steps, so fading attention stays visible."),
                io.Combo.Input(
                    "colormap", options=list(overlay.COLORMAPS), default="jet",
                    tooltip="Colour map of the heatmaps, overlap images and timeline (low -> high)."),
                io.Float.Input(
                    "opacity", default=0.5, min=0.0, max=1.0, step=0.05,
                    tooltip="0 = only the image, 1 = only the attention colours. In the combined image "
                            "it scales each concept's colour by its map."),
            ], ADVANCED),
            outputs=[
                io.Image.Output("heatmaps", display_name="heatmaps", tooltip="One heatmap per image and concept (image-major), "
                                                    "labelled with the concept's word."),
                io.Image.Output("combined", display_name="combined", tooltip="Every concept in its own colour over the image; "
                                                    "overlaps mix their colours; with a legend."),
                io.Image.Output("timeline", display_name="timeline", tooltip="Per image: one row per concept, one column per "
                                                    "recorded step (left = first); step numbers on top, "
                                                    "white = guided step."),
                io.Image.Output("overlap", display_name="overlap", tooltip="Per image and concept pair, min(A, B) per pixel: what "
                                                   "the segregation loss penalises. With one concept, "
                                                   "the image itself."),
                io.Image.Output("loss_plot", display_name="loss_plot", tooltip="Losses (solid) and peak attention per concept "
                                                     "(dashed) per step; guided steps shaded."),
                io.String.Output("report", display_name="report", tooltip="Text table of sigma, losses, iterations and peak "
                                                   "attention per step."),
            ],
        )

    @classmethod
    def execute(cls, attention, image, run=-1, step_start=0, step_end=-1, layers="", normalization="per_concept",
                colormap="jet", opacity=0.5) -> io.NodeOutput:
        check_options(cls.define_schema().inputs, {"normalization": normalization, "colormap": colormap})
        rec = pick_run(attention, int(run))
        if hasattr(rec, "loss_view") and not (layers or "").strip():
            rec = rec.loss_view()
        elif (layers or "").strip().lower() == "all":
            layers = ""
        if rec is None or not hasattr(rec, "steps") or not hasattr(rec, "words"):
            raise ValueError(f"attention: expected an A-STAR attention recording, got {type(rec).__name__}. "
                             "Connect the 'attention' output of an A-STAR sampler or attention recorder.")
        if not rec.steps:
            raise ValueError("attention: the recording is empty (no step recorded). Run the A-STAR sampler "
                             "or the attention recorder first; this node must execute after it.")
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise ValueError(f"image: expected an IMAGE [batch, height, width, channels], got "
                             f"{list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}.")
        steps = sorted(rec.steps, key=lambda s: s.step)
        n_layers = steps[0].maps.shape[0]
        batch = steps[0].maps.shape[1]
        if image.shape[0] != batch and image.shape[0] != 1 and batch != 1:
            raise ValueError(
                f"batch size mismatch: the image has {image.shape[0]} images but the attention recording "
                f"has batch {batch}. Connect the image decoded from the same sampling run, or one image.")
        layer_list = parse_layers(layers, n_layers, getattr(rec, "layers", None))
        rng = step_range(int(step_start), int(step_end), len(steps))

        maps = overlay.normalize_maps(overlay.select_maps(rec, rng, layer_list), normalization)
        heatmaps = overlay.concept_heatmaps(image, maps, rec.words, colormap, opacity)
        combined = overlay.combined_overlay(image, maps, opacity, words=rec.words)
        timeline = overlay.step_timeline(rec, layer_list, normalization, cell=_TIMELINE_CELL,
                                         colormap_name=colormap)
        overlap = overlay.overlap_image(image, maps, colormap, opacity, words=rec.words)
        plot = overlay.loss_plot(rec)

        sel_layers = overlay.layer_indices(rec, layer_list)
        names = getattr(rec, "layers", None) or []
        if names and names[0][0] == "as the loss saw them":
            layer_text = f"the maps as the loss saw them (from {names[0][1]} recorded layers)"
        else:
            layer_text = ", ".join(f"{i}{' ' + str(tuple(names[i])) if i < len(names) else ''}" for i in sel_layers)
        report = (f"images averaged over recorded steps {steps[rng[0]].step}..{steps[rng[1] - 1].step} "
                  f"(positions {rng[0]}..{rng[1] - 1} of {len(steps)}), layers {layer_text}; "
                  f"normalization {normalization}\n" + overlay.loss_table(rec))
        pictures = [heatmaps, combined, timeline, overlap, plot]
        return io.NodeOutput(*pictures, report, ui=in_node_previews(pictures, report, cls))
