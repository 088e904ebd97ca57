"""The metrics and intervals against explicit computations, and the scorer's wiring on tiny
random-weight CLIP and BLIP models (built from configs; tests/support/eval_models.py)."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from benchmarks.ae_eval import metrics, scoring, stats

T_975_DF3 = 3.182446305284263   # Student t, 97.5 % quantile, 3 degrees of freedom (tables)


def normalised(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def explicit_prompt_embedding(rows):
    rows = [normalised(r) for r in rows]
    return normalised([sum(col) / len(rows) for col in zip(*rows)])


TEMPLATE_ROWS = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [3.0, 4.0, 0.0]]
HALF_ROWS = ([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0]])
IMAGES = [[2.0, 0.0, 1.0], [0.0, -1.0, 3.0]]


def test_prompt_embedding_and_similarities_equal_explicit_sums():
    prompt = explicit_prompt_embedding(TEMPLATE_ROWS)
    emb = metrics.prompt_embedding(torch.tensor(TEMPLATE_ROWS))
    assert emb.tolist() == pytest.approx(prompt)
    full = metrics.similarity(torch.tensor(IMAGES), emb)
    assert full.tolist() == pytest.approx([dot(normalised(i), prompt) for i in IMAGES])
    halves = [explicit_prompt_embedding(rows) for rows in HALF_ROWS]
    low = metrics.min_object_similarity(torch.tensor(IMAGES), [metrics.prompt_embedding(torch.tensor(r))
                                                               for r in HALF_ROWS])
    assert low.tolist() == pytest.approx([min(dot(normalised(i), h) for h in halves) for i in IMAGES])
    # the two images differ in which half is the smaller one: the minimum is taken per image
    per_half = [[dot(normalised(i), h) for h in halves] for i in IMAGES]
    assert per_half[0].index(min(per_half[0])) != per_half[1].index(min(per_half[1]))


def test_templates_are_the_80_with_doubled_articles_removed():
    texts = metrics.templated("a cat and a dog")
    assert len(set(metrics.IMAGENET_TEMPLATES)) == 80 and len(texts) == 80
    assert texts[metrics.IMAGENET_TEMPLATES.index("a bad photo of a {}.")] == "a bad photo of a cat and a dog."
    assert texts[metrics.IMAGENET_TEMPLATES.index("a photo of the {}.")] == "a photo of a cat and a dog."
    assert texts[metrics.IMAGENET_TEMPLATES.index("itap of my {}.")] == "itap of my a cat and a dog."


def test_interval_is_the_student_t_interval():
    s = stats.interval([1.0, 2.0, 3.0, 4.0])
    half = T_975_DF3 * math.sqrt(5 / 3) / 2
    assert (s["mean"], s["n"]) == (2.5, 4)
    assert (s["low"], s["high"]) == pytest.approx((2.5 - half, 2.5 + half))


def test_summary_averages_seeds_per_prompt_first():
    rows = [{"category": "c", "method": "m", "prompt": p, "seed": k, "clip_full": v, "clip_min": v, "blip_text": v}
            for p, values in (("p1", [0.0, 1.0, 2.0]), ("p2", [4.0])) for k, v in enumerate(values)]
    cell = stats.summary(rows)["clip_full"][("c", "m")]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx((1.0 + 4.0) / 2)   # not (0+1+2+4)/4


def test_scorer_equals_the_metrics_on_the_models_own_embeddings(tiny_models):
    scorer = scoring.Scorer(*tiny_models)
    prompt = "a cat and a red car"
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "navy")]
    got = scorer.score(prompt, images)
    clip, proc = scorer.clip, scorer.clip_proc

    def text_features(texts):
        tok = proc.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            return scoring._features(clip.get_text_features(**tok))

    with torch.no_grad():
        img = scoring._features(clip.get_image_features(pixel_values=proc(images=images, return_tensors="pt")
                                                        ["pixel_values"]))
    prompt_emb = explicit_prompt_embedding(text_features(metrics.templated(prompt)).tolist())
    halves = [explicit_prompt_embedding(text_features(metrics.templated(h)).tolist())
              for h in ("a cat", "a red car")]
    captions = [g["caption"] for g in got]
    assert all(captions)
    caption_embs = text_features(captions).tolist()
    for k, g in enumerate(got):
        assert g["clip_full"] == pytest.approx(dot(normalised(img[k].tolist()), prompt_emb), abs=1e-5)
        assert g["clip_min"] == pytest.approx(min(dot(normalised(img[k].tolist()), h) for h in halves), abs=1e-5)
        assert g["blip_text"] == pytest.approx(dot(normalised(caption_embs[k]), prompt_emb), abs=1e-5)
    assert got[0]["clip_full"] != pytest.approx(got[1]["clip_full"])   # the images are told apart


def test_missing_weights_error_names_the_files_and_the_folder(tmp_path, tiny_models):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(scoring.MissingWeights) as e:
        scoring.Scorer(tmp_path, tiny_models[1])
    message = str(e.value)
    assert str(tmp_path) in message and "model.safetensors" in message and "vocab.json + merges.txt" in message
    assert "config.json (the model's configuration)" not in message   # present files are not listed
    assert "openai/clip-vit-base-patch16" in message
