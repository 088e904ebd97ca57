"""Attend-and-Excite's prompt set: 276 two-concept prompts from its word lists.

A prompt record is {"prompt", "category", "concepts"}; categories are animal-animal,
animal-object and object-object. The published set (A&E's own draw) is a JSON object
{"animals": [...], "animals_objects": [...], "objects": [...]} of prompt strings; ``load_prompts``
reads that form as well as a list of records (what ``generate`` draws and ``write_prompts`` writes).
The default set is the published draw itself (data/ae_prompts.json; its source in data/SOURCE.md).

``generate`` makes new draws of the same rule. By rule (and so equal to the published set): the 66 unordered animal pairs, the 36 "with"
prompts, and the 108 (animal, object) pairs of "a <animal> and a <colour> <object>" (each animal
with each object but glasses, crown and bow); the 66 unordered object pairs. Drawn (seeded here,
by A&E's script there): the order inside each pair and every colour. A&E writes "an" only before
"elephant" and "a" before colours ("a orange car"); kept for parity with the published prompts.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from pathlib import Path

ANIMALS = ("bear", "bird", "cat", "dog", "elephant", "frog", "horse", "lion", "monkey", "mouse", "rabbit",
           "turtle")
OBJECTS = ("apple", "backpack", "balloon", "bench", "bow", "bowl", "car", "chair", "clock", "crown", "glasses",
           "suitcase")
COLOURS = ("black", "blue", "brown", "gray", "green", "orange", "pink", "purple", "red", "white", "yellow")
WEARABLES = ("glasses", "crown", "bow")
CATEGORIES = ("animal-animal", "animal-object", "object-object")
# The published file's keys.
PUBLISHED_KEYS = {"animals": "animal-animal", "animals_objects": "animal-object", "objects": "object-object"}
SPLIT_WORDS = (" and ", " with ")
DEFAULT_SET = Path(__file__).resolve().parent / "data" / "ae_prompts.json"  # A&E's published draw


class PromptFileError(ValueError):
    """A prompt file that is not of a form the runner reads."""


def article(word: str) -> str:
    return "an" if word == "elephant" else "a"


def noun_phrase(noun: str, colour: str | None = None) -> str:
    words = f"{colour} {noun}" if colour else noun
    return f"{article(words.split()[0])} {words}"


def record(prompt: str, category: str) -> dict:
    return {"prompt": prompt, "category": category, "concepts": concepts_of(prompt)}


def halves(prompt: str) -> list[str]:
    """The two sub-prompts, split at " and " (else " with "), as A&E's minimum-object metric does."""
    for word in SPLIT_WORDS:
        if word in prompt:
            return prompt.split(word, 1)
    raise PromptFileError(f"prompt {prompt!r} has neither ' and ' nor ' with ': the two-concept metrics "
                          "need 'a X and a Y' or 'a X with a Y'")


def concepts_of(prompt: str) -> list[str]:
    """The concept words (the last word of each half): 'a monkey and a red car' -> monkey, car."""
    return [half.split()[-1] for half in halves(prompt)]


def generate(seed: int = 0) -> list[dict]:
    """The 276 prompts, by rule where the set is determined and seeded draws where A&E drew."""
    rng = random.Random(seed)

    def ordered(pair):
        pair = list(pair)
        rng.shuffle(pair)
        return pair

    out = []
    for a, b in itertools.combinations(ANIMALS, 2):
        x, y = ordered((a, b))
        out.append(record(f"{noun_phrase(x)} and {noun_phrase(y)}", "animal-animal"))
    for animal, thing in itertools.product(ANIMALS, WEARABLES):
        out.append(record(f"{noun_phrase(animal)} with {noun_phrase(thing)}", "animal-object"))
    for animal, thing in itertools.product(ANIMALS, [o for o in OBJECTS if o not in WEARABLES]):
        out.append(record(f"{noun_phrase(animal)} and {noun_phrase(thing, rng.choice(COLOURS))}", "animal-object"))
    for a, b in itertools.combinations(OBJECTS, 2):
        x, y = ordered((a, b))
        out.append(record(f"{noun_phrase(x, rng.choice(COLOURS))} and {noun_phrase(y, rng.choice(COLOURS))}",
                          "object-object"))
    return out


def _records_from_published(data: dict, source: str) -> list[dict]:
    unknown = sorted(set(data) - set(PUBLISHED_KEYS))
    if unknown:
        raise PromptFileError(f"{source}: unknown categories {unknown}; expected the keys {sorted(PUBLISHED_KEYS)} "
                              "(A&E's published form) or a list of {'prompt', 'category', 'concepts'} records")
    return [record(p, PUBLISHED_KEYS[key]) for key, prompts in data.items() for p in prompts]


def _checked(records: list, source: str) -> list[dict]:
    seen, out = set(), []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not r.get("category"):
            raise PromptFileError(f"{source}: entry {i} is not a {{'prompt', 'category', 'concepts'}} record: {r!r}")
        if r["prompt"] in seen:
            raise PromptFileError(f"{source}: prompt {r['prompt']!r} appears twice")
        seen.add(r["prompt"])
        out.append({**r, "concepts": r.get("concepts") or concepts_of(r["prompt"])})
    return out


def load_prompts(path: str | Path = DEFAULT_SET) -> list[dict]:
    """Prompt records from a file in either form (see the module's docstring)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"no prompt file at {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):
        return _checked(_records_from_published(data, str(path)), str(path))
    if isinstance(data, list):
        return _checked(data, str(path))
    raise PromptFileError(f"{path}: expected a JSON object of category lists or a list of records")


def file_name(text: str) -> str:
    """A readable file-name form of a text: 'Save Image (heatmaps)' -> 'save_image_heatmaps'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def slug(prompt: str) -> str:
    """A file-name form of a prompt, distinct for distinct prompts: 'a red car and a cat' ->
    'a_red_car_and_a_cat'; a prompt that other characters or capitals would map to the same form gets
    a short hash of its exact text ('A red car, and a cat' -> 'a_red_car_and_a_cat-1b2c3d4e')."""
    plain = file_name(prompt)
    if prompt == plain.replace("_", " "):
        return plain
    return f"{plain}-{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"


def write_prompts(records: list[dict], path: str | Path, overwrite: bool = False) -> None:
    """Writes a prompt file; refuses to replace an existing file (the committed set above all) unless
    overwrite."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; give another --output, or --overwrite to replace it")
    path.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
