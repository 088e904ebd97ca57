"""The prompt set: the default is A&E's published draw (same 276 strings); the generator's new draws keep
the parts fixed by rule; `prompts` never replaces a file unless asked; prompt folders are distinct."""
from __future__ import annotations

import collections
import hashlib
import itertools
import json
import os
import re
from pathlib import Path

import pytest

from benchmarks.ae_eval import prompts as P
from benchmarks.ae_eval.__main__ import main as cli

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
def published(committed):
    """The published draw: the committed default set (checked against the shared copy below)."""
    return committed


def test_counts_and_uniqueness(committed):
    assert collections.Counter(r["category"] for r in committed) == COUNTS
    assert len({r["prompt"] for r in committed}) == 276
    for r in committed:
        joiner, c1, n1, c2, n2 = parse(r["prompt"])
        assert r["concepts"] == [n1, n2]
        assert {n1, n2} <= set(P.ANIMALS) | set(P.OBJECTS)
        assert {c for c in (c1, c2) if c} <= set(P.COLOURS)


def test_default_set_is_the_published_draw(committed):
    """The committed default is A&E's published file (the bytes of the shared copy when it is at hand;
    its hash in SOURCE.md), in its published order: a few of its strings written out here."""
    assert P.DEFAULT_SET.name == "ae_prompts.json"
    assert len(committed) == 276
    source = (P.DEFAULT_SET.parent / "SOURCE.md").read_text()
    assert hashlib.sha256(P.DEFAULT_SET.read_bytes()).hexdigest() in source
    by_category = collections.defaultdict(list)
    for r in committed:
        by_category[r["category"]].append(r["prompt"])
    assert by_category["animal-animal"][:3] == ["an elephant and a rabbit", "a dog and a frog", "a bird and a mouse"]
    assert by_category["animal-object"][:3] == ["a horse with a glasses", "a bear with a glasses",
                                                "a monkey and a red car"]
    assert by_category["object-object"][:3] == ["a pink crown and a purple bow", "a blue clock and a blue apple",
                                                "a blue balloon and a orange bench"]
    if not PUBLISHED.is_file():
        pytest.skip(f"the shared copy of A&E's published prompts is not at {PUBLISHED} (set AE_PROMPTS to it)")
    assert P.DEFAULT_SET.read_bytes() == PUBLISHED.read_bytes()
    assert committed == P.load_prompts(PUBLISHED)


def test_generator_draws_are_reproducible_and_seeded():
    assert P.generate(seed=0) == P.generate(seed=0)
    assert P.generate(seed=1) != P.generate(seed=0)  # the drawn parts depend on the seed


@pytest.mark.parametrize("seed", [0, 1])
def test_generated_draws_keep_the_rule_parts_of_the_published_set(seed, published):
    drawn = P.generate(seed)
    assert collections.Counter(r["category"] for r in drawn) == COUNTS
    assert len({r["prompt"] for r in drawn}) == 276
    assert structure(drawn) == structure(published)
    assert {r["prompt"] for r in drawn if " with " in r["prompt"]} == \
        {r["prompt"] for r in published if " with " in r["prompt"]}


def test_prompts_command_writes_a_new_file_and_never_replaces_one_unasked(tmp_path, capsys):
    out = tmp_path / "draw.json"
    assert cli(["prompts", "--seed", "3", "--output", str(out)]) == 0
    assert P.load_prompts(out) == P.generate(3)
    assert cli(["prompts", "--seed", "4", "--output", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert P.load_prompts(out) == P.generate(3)
    assert cli(["prompts", "--seed", "4", "--output", str(out), "--overwrite"]) == 0
    assert P.load_prompts(out) == P.generate(4)
    with pytest.raises(SystemExit):  # no default output: the committed set cannot be its target
        cli(["prompts", "--seed", "4"])


def test_prompts_differing_in_case_or_punctuation_get_distinct_folders():
    variants = ["a cat and a dog", "A cat and a dog", "a cat, and a dog", "a cat and a dog.", "a cat and a dog!"]
    slugs = [P.slug(v) for v in variants]
    assert len(set(slugs)) == len(variants), slugs
    assert slugs[0] == "a_cat_and_a_dog"  # the published prompts keep their readable folder names
    assert all(s.startswith("a_cat_and_a_dog") for s in slugs)
    assert P.slug("A cat and a dog") == slugs[1]  # stable


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
