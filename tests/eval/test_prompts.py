"""The prompt set: counts, uniqueness, and the parts fixed by rule equal to A&E's published prompts."""
from __future__ import annotations

import collections
import itertools
import json
import os
import re
from pathlib import Path

import pytest

from benchmarks.ae_eval import prompts as P

PUBLISHED = Path(os.environ.get("AE_PROMPTS", Path(__file__).resolve().parents[2].parent / "shared" / "data"
                                / "ae_prompts.json"))
COUNTS = {"animal-animal": 66, "animal-object": 144, "object-object": 66}
PHRASE = r"an? (?:(\w+) )?(\w+)"
FORMS = {"and": re.compile(rf"^{PHRASE} and {PHRASE}$"), "with": re.compile(rf"^{PHRASE} with {PHRASE}$")}


def parse(prompt: str):
    """(joiner, colour1, noun1, colour2, noun2) of a two-concept prompt."""
    for joiner, form in FORMS.items():
        m = form.match(prompt)
        if m:
            return (joiner, *m.groups())
    raise AssertionError(f"prompt {prompt!r} has neither form")


def structure(records: list[dict]) -> dict:
    """What the rule fixes: unordered noun pairs per category and form, and which nouns take a colour."""
    out = collections.defaultdict(set)
    for r in records:
        joiner, c1, n1, c2, n2 = parse(r["prompt"])
        out[(r["category"], joiner, c1 is not None, c2 is not None)].add(frozenset((n1, n2)))
    return dict(out)


@pytest.fixture(scope="module")
def committed():
    return P.load_prompts()


@pytest.fixture(scope="module")
def published():
    if not PUBLISHED.is_file():
        pytest.skip(f"A&E's published prompt file is not at {PUBLISHED} (set AE_PROMPTS to it)")
    return P.load_prompts(PUBLISHED)


def test_counts_and_uniqueness(committed):
    assert collections.Counter(r["category"] for r in committed) == COUNTS
    assert len({r["prompt"] for r in committed}) == 276
    for r in committed:
        joiner, c1, n1, c2, n2 = parse(r["prompt"])
        assert r["concepts"] == [n1, n2]
        assert {n1, n2} <= set(P.ANIMALS) | set(P.OBJECTS)
        assert {c for c in (c1, c2) if c} <= set(P.COLOURS)


def test_committed_file_is_the_generator_output():
    assert P.load_prompts() == P.generate(seed=0)
    assert P.generate(seed=0) == P.generate(seed=0)
    assert P.generate(seed=1) != P.generate(seed=0)  # the drawn parts depend on the seed


def test_rule_parts_equal_the_published_set(committed, published):
    assert collections.Counter(r["category"] for r in published) == COUNTS
    assert structure(committed) == structure(published)
    assert {r["prompt"] for r in committed if " with " in r["prompt"]} == \
        {r["prompt"] for r in published if " with " in r["prompt"]}
    assert {frozenset(p) for p in itertools.combinations(P.ANIMALS, 2)} == \
        structure(published)[("animal-animal", "and", False, False)]


def test_published_form_and_records_load_alike(tmp_path, published):
    path = tmp_path / "records.json"
    P.write_prompts(published, path)
    assert P.load_prompts(path) == published


@pytest.mark.parametrize("content, message", [
    ({"animals": ["a cat and a dog"], "plants": ["a rose and a tulip"]}, "unknown categories"),
    ([{"prompt": "a cat and a dog", "category": "x"}, {"prompt": "a cat and a dog", "category": "x"}], "twice"),
    ({"animals": ["a cat beside a dog"]}, "neither ' and ' nor ' with '"),
    ([["a cat and a dog"]], "record"),
])
def test_bad_prompt_files_are_refused_clearly(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(P.PromptFileError, match=message):
        P.load_prompts(path)
