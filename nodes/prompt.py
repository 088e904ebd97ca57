"""The prompt's tokens, carried inside the positive CONDITIONING so samplers can find concept words.

A-STAR Text Encode stores a PromptTokens under PROMPT_KEY in every conditioning entry's dict;
ConditioningConcat/Combine/SetArea/ControlNet Apply copy the dict, so it travels with the prompt.
"""
from __future__ import annotations

import re

from ..attention.maps import CLIP_CHUNK_TOKENS, excluded_token_columns
from ..attention.tokens import ConceptSpec, locate_concepts

PROMPT_KEY = "astar_prompt"


def _encoder_tokenizer(tokenizer, key):
    """ComfyUI's per-encoder SDTokenizer for a tokenize() key ('l', 'g', ...)."""
    for name in (f"clip_{key}", key, getattr(tokenizer, "clip", None)):
        sub = getattr(tokenizer, name, None) if name else None
        if sub is not None and hasattr(sub, "tokenizer"):
            return sub
    raise ValueError(f"cannot find the '{key}' tokenizer of this CLIP ({type(tokenizer).__name__})")


class PromptTokens:
    """Token ids of an encoded prompt, per encoder, over all 77-token chunks; and its tokenizer."""

    def __init__(self, text: str, tokens: dict, tokenizer):
        self.text = text
        self.tokenizer = tokenizer
        # t is (id, weight) or (id, weight, word_id); an embedding vector stands where id is a tensor.
        self.ids = {key: [t[0] if isinstance(t[0], int) else None for chunk in chunks for t in chunk]
                    for key, chunks in tokens.items()}

    @property
    def length(self) -> int:
        return len(next(iter(self.ids.values())))

    def names(self, key) -> list[str]:
        """The token text of each of the encoder's positions."""
        inv = _encoder_tokenizer(self.tokenizer, key).inv_vocab
        return [inv.get(i, "?") if i is not None else "<embedding>" for i in self.ids[key]]

    def word_ids(self, key):
        """word -> the encoder's token ids of it (no start/end token; LLM tokenizers add no end token)."""
        sub = _encoder_tokenizer(self.tokenizer, key)
        end = -1 if getattr(sub, "tokenizer_adds_end_token", True) else None
        return lambda word: sub.tokenizer(word)["input_ids"][sub.tokens_start:end]

    def excluded_columns(self, context_tokens: int) -> tuple[int, ...]:
        """Token columns the token softmax leaves out, for a context of context_tokens columns (the
        conditioning's own length: longer than the prompt after ConditioningConcat): each 77-token
        chunk's start and the last column (A&E), and, when every encoder pads with another token
        than its end token (SD2.x's OpenCLIP pads with 0), each prompt chunk from its end token on
        (A&E cuts SD 2.1's softmax there, so padding columns take no share of the attention)."""
        columns = set(excluded_token_columns(context_tokens))
        cuts = None
        for key, ids in self.ids.items():
            sub = _encoder_tokenizer(self.tokenizer, key)
            end = getattr(sub, "end_token", None)
            if end is None or getattr(sub, "pad_token", end) == end:
                cuts = set()
                break
            cut = set()
            for first in range(0, len(ids), CLIP_CHUNK_TOKENS):
                chunk = ids[first:first + CLIP_CHUNK_TOKENS]
                if end in chunk:
                    cut |= set(range(first + chunk.index(end), first + len(chunk)))
            cuts = cut if cuts is None else cuts & cut
        return tuple(sorted(columns | {c for c in (cuts or ()) if c < context_tokens}))

    def locate(self, specs: list[ConceptSpec]) -> list[list[int]]:
        """Positions of each concept; every encoder must agree (SDXL's g and l do)."""
        found = {key: locate_concepts(ids, specs, self.word_ids(key), self.names(key))
                 for key, ids in self.ids.items()}
        first = next(iter(found.values()))
        for key, groups in found.items():
            if groups != first:
                raise ValueError(f"the text encoders disagree on concept positions ({found}); "
                                 "please report this prompt")
        return first


def prompt_tokens_of(conditioning) -> PromptTokens:
    """The PromptTokens of a CONDITIONING list ([[tensor, dict], ...]) or of sampler conds ([dict])."""
    for entry in conditioning or []:
        d = entry[1] if isinstance(entry, (list, tuple)) else entry
        if PROMPT_KEY in d:
            return d[PROMPT_KEY]
    raise ValueError(
        "the positive conditioning does not say which prompt it encodes, so concept words cannot "
        "be found: encode the positive prompt with 'A-STAR Text Encode' (a drop-in replacement "
        "for CLIP Text Encode) and connect it to 'positive'.")


def context_tokens(entry) -> int | None:
    """The context length of one sampler cond entry (its own, before ComfyUI repeats it for batching)."""
    cross = (entry.get("model_conds") or {}).get("c_crossattn")
    cond = getattr(cross, "cond", None)
    return int(cond.shape[1]) if cond is not None and cond.dim() >= 2 else None


def missing_concepts_error(text: str) -> ValueError:
    """The error for an empty concepts widget, listing the words of the prompt to choose from."""
    words = list(dict.fromkeys(re.findall(r"[^\W\d_][\w'-]*", text)))
    listing = ", ".join(words) if words else "(none: the prompt is empty)"
    return ValueError(
        "concepts is empty: type the words of the positive prompt whose objects should all appear, separated "
        f"by commas (e.g. 'cat, frog' for 'a cat and a frog'). The prompt's words: {listing}.")
