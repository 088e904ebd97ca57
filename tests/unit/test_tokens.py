"""attention/tokens.py: concept words are found whatever their case in the prompt, also with a
tokenizer that keeps case (T5, LLMs), where "Cat" and "cat" are different ids and "Frog" may even be
split into other pieces than "frog"."""
from __future__ import annotations

import pytest

from attention.tokens import ConceptSpec, locate_concepts, parse_concepts

# A case-keeping toy tokenizer: each word is one id, except that capitalised "Frog" splits into two.
VOCAB = {"A": 1, "a": 2, "Cat": 3, "cat": 4, "and": 5, "Frog": (6, 7), "frog": 8, "CAT": 9, "teddy": 10,
         "bear": 11, "Teddy": 12, "Bear": 13, "TEDDY": 14, "BEAR": 15}


def word_ids(text):
    ids = []
    for w in text.split():
        v = VOCAB.get(w, 99)
        ids += list(v) if isinstance(v, tuple) else [v]
    return ids


def locate(prompt, concepts):
    ids = word_ids(prompt)
    return locate_concepts(ids, parse_concepts(concepts), word_ids, [str(i) for i in ids])


def test_lower_case_concepts_are_found_in_capitalised_words():
    # "A Cat and a Frog" -> 1 3 5 2 6 7: Cat at 1, Frog's two pieces at 4-5
    assert locate("A Cat and a Frog", "cat, frog") == [[1], [4, 5]]
    assert locate("a cat and a frog", "Cat, FROG") == [[1], [4]]  # and the other way round


def test_occurrences_count_every_case_in_prompt_order():
    # cat at 1, CAT at 3, Cat at 5
    assert locate("a cat and CAT and Cat", "cat#1") == [[1]]
    assert locate("a cat and CAT and Cat", "cat#2") == [[3]]
    assert locate("a cat and CAT and Cat", "cat#3") == [[5]]
    with pytest.raises(ValueError, match="occurs only 3 time"):
        locate("a cat and CAT and Cat", "cat#4")


def test_multi_word_concepts_in_title_case():
    assert locate("A Teddy Bear and a cat", "teddy bear, cat") == [[1, 2], [5]]


def test_a_word_not_in_the_prompt_is_still_refused():
    with pytest.raises(ValueError, match="concept 'dog' is not in the prompt"):
        locate_concepts(word_ids("A Cat"), [ConceptSpec("dog")], word_ids, ["A", "Cat"])


def test_words_after_a_space_in_byte_level_bpe():
    """A byte-level BPE tokenizer (Qwen's) marks a word after a space ("Ġcat"): the word typed alone is found
    inside the sentence."""
    vocab = {"A": 1, "ĠCat": 2, "Ġand": 3, "Ġa": 4, "ĠFrog": 5, "cat": 6, "Cat": 7, "frog": 8, "Frog": 9}

    def bpe_ids(text):
        pieces = text.replace(" ", " Ġ").split(" ")
        return [vocab.get(p, 99) for p in pieces if p]

    ids = bpe_ids("A Cat and a Frog")
    assert ids == [1, 2, 3, 4, 5]
    assert locate_concepts(ids, parse_concepts("cat, frog"), bpe_ids, [str(i) for i in ids]) == [[1], [4]]
