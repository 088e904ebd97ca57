"""Concept words in the context of joint-attention models (Flux.1, Chroma, SD3 / SD3.5).

What the text keys of a joint block are (ComfyUI 0.3.75):
- Flux: the context is the T5-XXL output only (comfy/text_encoders/flux.py: CLIP-L gives just the
  pooled vector). T5 has no start token; the prompt's tokens are followed by the end token (id 1) and
  padding (id 0) up to 256 tokens (longer prompts are not cut).
- Chroma: the context is T5-XXL's alone (comfy/text_encoders/pixart_t5.py): the prompt's tokens and
  the end token, no padding (min_length 1).
- Flux.2 Klein (ComfyUI 0.19+, comfy/text_encoders/flux.py KleinTokenizer): Qwen3 tokens of the chat
  template "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n" (one
  text, weights disabled), padded at the end with 151643 to 512 tokens. Only the prompt's own tokens
  take part in the token renormalisation (families with `template`: everything else is excluded).
- Qwen-Image (comfy/text_encoders/qwen_image.py): Qwen2.5-VL-7B tokens of "<|im_start|>system\n...<|im_end|>\n
  <|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", no padding; the encoder drops the system turn
  and "<|im_start|>user\n" (the family's context_after), so the context is the prompt's tokens and the 5 tokens
  after them (+ padding 151643 when the tokenizer is given a min_length: the conditioning then carries an
  attention mask, which ComfyUI 0.19+ hands to the attention as an additive mask).
- Z-Image (comfy/text_encoders/z_image.py ZImageTokenizer): Qwen3 tokens of the chat template
  "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n" (one text, weights disabled), no padding;
  the model pads the context itself with a learned token to a multiple of 32 (not part of the context:
  the hook records the context's own columns only). Only the prompt's own tokens take part in the
  token renormalisation, as for Klein.
- SD3 / SD3.5: the context is [CLIP, T5] along the sequence (comfy/text_encoders/sd3_clip.py):
  CLIP-L and CLIP-G encode the same 77-token chunks with the same token positions and their features
  are concatenated (so one context position is one CLIP token of both), then the T5 tokens follow
  (padded to 77). A concept occupies its CLIP positions and its T5 positions: both are one group.
Excluded from the token renormalisation: CLIP start tokens, CLIP end tokens and the padding after them
(CLIP-L pads with the end token, CLIP-G with "!" = 0), T5 end and padding tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..attention.maps import CLIP_CHUNK_TOKENS
from ..attention.tokens import ConceptSpec, find_occurrences, locate_concepts
from .model_family import JOINT_FAMILY_TABLE
from .prompt import PromptTokens

CLIP_START, CLIP_END = 49406, 49407
T5_END, T5_PAD = 1, 0


@dataclass(frozen=True)
class JointTokenLayout:
    """Where the prompt sits in a joint model's context: n_tokens context positions; groups = the
    positions of each concept (CLIP and T5 together for SD3); excluded = positions left out of the
    token renormalisation (start, end and padding tokens)."""

    n_tokens: int
    groups: tuple[tuple[int, ...], ...]
    excluded: tuple[int, ...]

    def check_context(self, n_txt: int) -> None:
        """Raise a clear error when a conditioning's own context (before ComfyUI repeats it to batch it
        with a longer one) has n_txt tokens, which is not this prompt's context."""
        if n_txt != self.n_tokens:
            raise ValueError(
                f"the conditioning has {n_txt} text tokens, but the A-STAR prompt's context has "
                f"{self.n_tokens}: it was changed after A-STAR Text Encode (e.g. ConditioningConcat, or a text "
                "encoder without T5); encode the positive prompt with A-STAR Text Encode and the model's own "
                "text encoders, and connect it to the sampler directly or through nodes that keep its text")


def _clip_excluded(ids) -> set[int]:
    """Start token, end token and everything after it, in every 77-token CLIP chunk."""
    out = set()
    for start in range(0, len(ids), CLIP_CHUNK_TOKENS):
        chunk = ids[start:start + CLIP_CHUNK_TOKENS]
        out.add(start)
        ends = [i for i, t in enumerate(chunk) if i > 0 and t == CLIP_END]
        if ends:
            out |= set(range(start + ends[0], start + len(chunk)))
    return out


def _t5_excluded(ids) -> set[int]:
    return {i for i, t in enumerate(ids) if t in (T5_END, T5_PAD)}


def prompt_span(prompt: PromptTokens, key) -> tuple[int, int]:
    """(start, stop) of the prompt's own tokens inside the encoder's chat template: where the prompt
    tokenized alone sits (the template's special tokens and newlines end BPE words, so the prompt's
    tokens there are those of the prompt alone). Raises a clear error when it is not found."""
    ids, own = prompt.ids[key], list(prompt.word_ids(key)(prompt.text))
    starts = find_occurrences(ids, own) if own else []
    if not starts:
        raise ValueError(f"the prompt's own tokens were not found inside the {key} chat template of the conditioning "
                         "(was the template changed?): encode the prompt with A-STAR Text Encode and the model's "
                         "own text encoder")
    return starts[0], starts[0] + len(own)


def context_start(ids, after: tuple[int, ...]) -> int:
    """Where the context starts in the tokenized text: after the first occurrence of `after` (0 for ())."""
    if not after:
        return 0
    starts = find_occurrences(ids, after)
    if not starts:
        raise ValueError(f"the tokens {list(after)} after which this model's text encoder starts the context are not "
                         "in the prompt's tokens (was the chat template changed?): encode the prompt with A-STAR Text "
                         "Encode and the model's own text encoder")
    return starts[0] + len(after)


def _segment_positions(prompt: PromptTokens, keys, specs, span=None):
    """Concept positions in one segment (inside `span` only, when given); encoders sharing a segment must agree."""
    lo, hi = span or (0, None)
    found = [[[lo + p for p in g] for g in locate_concepts(prompt.ids[key][lo:hi], specs, prompt.word_ids(key),
                                                            prompt.names(key)[lo:hi])] for key in keys]
    if any(groups != found[0] for groups in found[1:]):
        raise ValueError(f"the text encoders {keys} disagree on concept positions ({found}); please report this prompt")
    return found[0]


def joint_token_layout(prompt: PromptTokens, specs: list[ConceptSpec], family: str) -> JointTokenLayout:
    """The concepts' context positions for a model of a JOINT_FAMILY_TABLE family (see the module
    docstring). Raises the pack's error naming the word and listing the prompt's tokens when a
    concept is not in the prompt (checked in every encoder that makes the context)."""
    if family not in JOINT_FAMILY_TABLE:
        raise ValueError(f"unknown joint-attention family {family!r}; expected one of {sorted(JOINT_FAMILY_TABLE)}")
    entry = JOINT_FAMILY_TABLE[family]
    missing = [k for keys in entry.context for k in keys if k not in prompt.ids]
    if missing:
        raise ValueError(
            f"the prompt was encoded without the {', '.join(missing)} tokenizer(s) this {entry.label} model "
            f"reads (it has {', '.join(prompt.ids)}): encode it with the model's own text encoder, "
            f"{entry.text_encoder}")
    offset, excluded = 0, set()
    groups: list[list[int]] = [[] for _ in specs]
    for keys in entry.context:
        ids = prompt.ids[keys[0]]
        length = min(len(prompt.ids[k]) for k in keys)  # ComfyUI cuts CLIP-L/G to the shorter
        first = context_start(ids, entry.context_after)  # tokens before it are not in the context
        span = prompt_span(prompt, keys[0]) if entry.template else None
        if span is not None and span[0] < first:
            raise ValueError(f"the prompt's own tokens lie in the part of the {keys[0]} chat template that the text "
                             "encoder drops: encode the prompt with A-STAR Text Encode and the model's own text encoder")
        for group, positions in zip(groups, _segment_positions(prompt, keys, specs, span)):
            group += [offset + p - first for p in positions]
        if span is not None:  # the template's tokens and the padding
            skip = set(range(first, length)) - set(range(*span))
        elif keys == ("t5xxl",):
            skip = _t5_excluded(ids[:length])
        else:
            skip = _clip_excluded(ids[:length])
        excluded |= {offset + p - first for p in skip}
        offset += length - first
    return JointTokenLayout(offset, tuple(tuple(g) for g in groups), tuple(sorted(excluded)))
