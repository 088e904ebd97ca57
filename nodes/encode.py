"""A-STAR Text Encode: CLIP Text Encode that also records the prompt's tokens."""
from __future__ import annotations

from comfy_api.latest import io

from .prompt import PROMPT_KEY, PromptTokens
from .widgets import schema


class AStarTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AStarTextEncode",
            display_name="A-STAR Text Encode",
            category="conditioning",
            search_aliases=["astar", "clip text encode astar", "astar prompt"],
            description="Encodes the positive prompt exactly like CLIP Text Encode, and remembers its "
                        "tokens so A-STAR nodes can find the concept words in it. Use it for the positive "
                        "prompt of A-STAR Apply, A-STAR KSampler and A-STAR Attention Recorder.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder(s) of the model: SD1.x/SD2.x/SDXL's CLIP, Flux.1's "
                                              "CLIP-L + T5-XXL, SD3/SD3.5's CLIP-L + CLIP-G + T5-XXL, Chroma's "
                                              "T5-XXL, Flux.2 Klein's Qwen3 (4B / 8B), Qwen-Image's Qwen2.5-VL-7B, "
                                              "Z-Image's Qwen3-4B."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The positive prompt. Concepts you list in the sampler must be words of it."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The same conditioning as CLIP Text Encode, plus the prompt's tokens.")],
        )

    @classmethod
    def execute(cls, clip, text, **kwargs) -> io.NodeOutput:
        if clip is None:
            raise ValueError("clip input is empty: the checkpoint has no text encoder; load one with a CLIP loader")
        tokens = clip.tokenize(text)
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        prompt = PromptTokens(text, tokens, clip.tokenizer)
        return io.NodeOutput([[c, {**d, PROMPT_KEY: prompt}] for c, d in conditioning])
