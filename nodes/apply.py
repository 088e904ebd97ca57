"""A-STAR Apply and A-STAR Attention Recorder: model patches (MODEL -> MODEL) that any sampler node runs."""
from __future__ import annotations

from comfy_api.latest import io

from .guidance_inputs import (MODEL_TOOLTIP, ORDER_NOTE, SAMPLERS_NOTE, build_guidance, concept_inputs,
                              guidance_inputs, joint_blocks_input)
from .types import AttentionType
from .widgets import schema

RUNS_TOOLTIP = ("Filled by every sampler run that uses the patched model (the last 8 runs, oldest first), for "
                "A-STAR Attention Overlay; connect the overlay's image to the image decoded from that sampler, "
                "so the overlay runs after it.")


class AStarApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AStarApply",
            display_name="A-STAR Apply",
            category="model_patches/astar",
            search_aliases=["astar", "attend and excite", "attention guidance", "attention segregation",
                            "missing objects", "multiple objects", "catastrophic neglect"],
            description="Patches a model with A-STAR attention guidance: a sampler node that runs the patched "
                        "model (KSampler, KSamplerAdvanced, SamplerCustomAdvanced with any guider, other packs' "
                        "sampler nodes) takes gradient steps on the latent at the guided steps, keeping the listed "
                        "concepts' cross-attention apart (segregation) and in place (retention). The positive "
                        "prompt must come from A-STAR Text Encode. " + SAMPLERS_NOTE + " " + ORDER_NOTE,
            inputs=[io.Model.Input("model", tooltip=MODEL_TOOLTIP),
                    *guidance_inputs()],
            outputs=[
                io.Model.Output(tooltip="The patched model; connect it to any sampler node."),
                AttentionType.Output(display_name="attention", tooltip=RUNS_TOOLTIP),
            ],
        )

    @classmethod
    def execute(cls, model, concepts, attention_resolution, layout_masks=None, **guidance) -> io.NodeOutput:
        return io.NodeOutput(*build_guidance(model, concepts, attention_resolution, layout_masks=layout_masks,
                                             **guidance))


class AStarAttentionRecorder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AStarAttentionRecorder",
            display_name="A-STAR Attention Recorder",
            category="model_patches/astar",
            search_aliases=["astar", "attention map", "cross attention", "record attention", "attention heatmap"],
            description="Records the concepts' cross-attention maps of any sampler run (stock KSampler included), "
                        "without guiding it. The positive prompt must come from A-STAR Text Encode. " + ORDER_NOTE,
            inputs=[io.Model.Input("model", tooltip="The model to record. " + ORDER_NOTE), *concept_inputs(),
                    joint_blocks_input()],
            outputs=[
                io.Model.Output(tooltip="The same model, recording its cross-attention. Outputs are unchanged."),
                AttentionType.Output(display_name="attention", tooltip=RUNS_TOOLTIP),
            ],
        )

    @classmethod
    def execute(cls, model, concepts, attention_resolution, joint_blocks="") -> io.NodeOutput:
        return io.NodeOutput(*build_guidance(model, concepts, attention_resolution, guidance_end=0.0,
                                             joint_blocks=joint_blocks))
