"""The prompt's tokens, carried inside the positive CONDITIONING so samplers can find concept words.

A-STAR Text Encode stores a PromptTokens under PROMPT_KEY in every conditioning entry's dict;
ConditioningConcat/Combine/SetArea/ControlNet Apply copy the dict, so it travels with the prompt.
"""
from __future__ import annotations

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

    def _names(self, key):
        inv = _encoder_tokenizer(self.tokenizer, key).inv_vocab
        return [inv.get(i, "?") if i is not None else "<embedding>" for i in self.ids[key]]

    def _word_ids(self, key):
        sub = _encoder_tokenizer(self.tokenizer, key)
        return lambda word: sub.tokenizer(word)["input_ids"][sub.tokens_start:-1]

    def locate(self, specs: list[ConceptSpec]) -> list[list[int]]:
        """Positions of each concept; every encoder must agree (SDXL's g and l do)."""
        found = {key: locate_concepts(ids, specs, self._word_ids(key), self._names(key))
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
