"""Concept words -> token positions in the prompt. Pure Python; the tokenizer is passed in."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


@dataclass(frozen=True)
class ConceptSpec:
    """A concept as the user typed it: `word` (one or more words) and which occurrence of it in the
    prompt to use (1 = first). Written "frog" or "frog#2"."""

    word: str
    occurrence: int = 1

    @property
    def label(self) -> str:
        return self.word if self.occurrence == 1 else f"{self.word}#{self.occurrence}"


class NoConceptGiven(ValueError):
    """The concept list names no concept."""


_SPEC = re.compile(r"^(?P<word>.*?)(?:#(?P<occ>\d+))?$")


def parse_concepts(text: str) -> list[ConceptSpec]:
    """Split "cat, teddy bear, frog#2" into concept specs.

    Commas separate concepts; surrounding spaces and punctuation are ignored; case is ignored when
    the words are located (locate_concepts). Raises NoConceptGiven (a ValueError) for an empty list,
    ValueError for a concept listed twice."""
    specs = []
    for part in text.split(","):
        m = _SPEC.match(part.strip())
        word = m.group("word").strip().strip(".;:!?\"'()[]{}").strip()
        if not word:
            continue
        occ = int(m.group("occ")) if m.group("occ") else 1
        if occ < 1:
            raise ValueError(f"concept '{part.strip()}': occurrences count from 1 (write {word}#1 for the first)")
        specs.append(ConceptSpec(word, occ))
    if not specs:
        raise NoConceptGiven(
            "no concept given: type the words of the prompt to keep apart, separated by commas, "
            "e.g. 'cat, frog'")
    seen = {}
    for s in specs:
        key = (s.word.lower(), s.occurrence)
        if key in seen:
            raise ValueError(
                f"concept '{s.label}' is listed twice; list each concept once, or name another "
                f"occurrence in the prompt with '#': {s.word}#1, {s.word}#2")
        seen[key] = s
    return specs


def find_occurrences(sequence: Sequence[Optional[int]], pattern: Sequence[int]) -> list[int]:
    """Start positions of `pattern` in `sequence` (None entries, e.g. embedding vectors, never match)."""
    n = len(pattern)
    return [i for i in range(len(sequence) - n + 1) if list(sequence[i:i + n]) == list(pattern)]


def _listing(token_names: Sequence[str]) -> str:
    """The prompt's own tokens as "position:name", without start/end tokens and the padding after an
    end token (CLIP-L pads with the end token, CLIP-G with "!"; a "!" typed in the prompt is kept)."""
    shown, padding = [], False
    for i, name in enumerate(token_names):
        if name == "<|startoftext|>":
            padding = False
        elif name == "<|endoftext|>":
            padding = True
        elif not padding:
            shown.append(f"{i}:{name}")
    return " ".join(shown) if shown else "(none: the prompt is empty)"


def locate_concepts(prompt_ids: Sequence[Optional[int]], specs: Sequence[ConceptSpec],
                    word_ids: Callable[[str], Sequence[int]],
                    token_names: Sequence[str]) -> list[list[int]]:
    """Token positions of each concept in the prompt.

    prompt_ids: the prompt's token ids over all 77-token chunks concatenated (None where a
        textual-inversion vector stands), as the encoder sees them.
    word_ids: tokenizes a word alone, without start/end tokens.
    token_names: readable names of prompt_ids, for error messages.
    Returns one list of positions per concept (several for a multi-token word). Raises ValueError
    naming the word and listing the prompt's tokens when a word is not found."""
    groups = []
    for spec in specs:
        pattern = list(word_ids(spec.word))
        if not pattern:
            raise ValueError(f"concept '{spec.word}' has no tokens; type a word of the prompt")
        matches = case_insensitive_occurrences(prompt_ids, spec.word, word_ids)
        starts = [start for start, _ in matches]
        if len(starts) < spec.occurrence:
            listing = _listing(token_names)
            found = "is not in the prompt" if not starts else \
                f"occurs only {len(starts)} time(s) in the prompt (asked for #{spec.occurrence})"
            raise ValueError(
                f"concept '{spec.label}' {found}. The prompt's tokens are: {listing}. "
                "Type concepts exactly as words of the positive prompt (e.g. 'cat, frog'); a plural "
                "or a different spelling is a different token.")
        start, length = matches[spec.occurrence - 1]
        groups.append(list(range(start, start + length)))
    return groups


def case_variants(word: str) -> list[str]:
    """The word as typed, lower case, capitalised, title case and upper case, each also after a space
    (byte-level BPE tokenizers, e.g. Qwen's, give a word inside a sentence other ids, "Ġcat", than the
    word alone; CLIP and T5 ignore the space), each once, in that order."""
    variants = [word, word.lower(), word[:1].upper() + word[1:].lower(), word.title(), word.upper()]
    return list(dict.fromkeys(variants + [" " + v for v in variants]))


def case_insensitive_occurrences(prompt_ids: Sequence[Optional[int]], word: str,
                                 word_ids: Callable[[str], Sequence[int]]) -> list[tuple[int, int]]:
    """(start, length) of every occurrence of `word` in the prompt, in prompt order, whatever its case
    there (as typed, lower, Capitalised, Title or UPPER case, with or without a space before it: see
    case_variants): tokenizers that keep case (T5, LLMs)
    give "Cat" other ids than "cat". A lowercasing tokenizer (CLIP) gives every variant the same ids, so
    this is an exact match there. Overlapping matches keep the first (then the longest)."""
    found = []
    for variant in case_variants(word):
        pattern = list(word_ids(variant))
        if pattern:
            found += [(start, len(pattern)) for start in find_occurrences(prompt_ids, pattern)]
    matches, end = [], -1
    for start, length in sorted(set(found), key=lambda m: (m[0], -m[1])):
        if start >= end:
            matches.append((start, length))
            end = start + length
    return matches
