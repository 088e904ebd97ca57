"""The result folder without a server: scores.jsonl read back after an interrupted write, and a report
made from images alone (before or without scoring)."""
from __future__ import annotations

import io
import json
import logging

import pytest
from PIL import Image

from benchmarks.ae_eval import report, scoring, store
from benchmarks.ae_eval.prompts import slug

LINES = [{"key": f"astar/a_cat_and_a_dog/{s}", "method": "astar", "category": "animal-animal",
          "prompt": "a cat and a dog", "seed": s, "clip_full": 0.3, "clip_min": 0.2, "blip_text": 0.8}
         for s in range(3)]


def write_lines(path, lines, tail=""):
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)


def test_a_truncated_last_score_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "scores.jsonl"
    cut = json.dumps(LINES[2])[:40]
    write_lines(path, LINES[:2], cut)
    with caplog.at_level(logging.WARNING):
        assert scoring.load_scores(tmp_path) == LINES[:2]
    assert "incomplete" in caplog.text
    assert path.read_text().endswith(cut)  # reading alone changes nothing
    # the scorer's read drops the cut line, so its next append starts on a line of its own
    assert scoring.scored_keys(path) == {LINES[0]["key"], LINES[1]["key"]}
    with path.open("a") as f:
        f.write(json.dumps(LINES[2]) + "\n")
    assert scoring.load_scores(tmp_path) == LINES


def test_a_whole_last_line_without_newline_is_kept_and_closed(tmp_path):
    path = tmp_path / "scores.jsonl"
    path.write_text(json.dumps(LINES[0]))
    assert scoring.scored_keys(path) == {LINES[0]["key"]}
    assert path.read_text() == json.dumps(LINES[0]) + "\n"


def test_a_damaged_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "scores.jsonl"
    path.write_text(json.dumps(LINES[0]) + "\n{oops\n" + json.dumps(LINES[1]) + "\n")
    with pytest.raises(ValueError, match="line 2"):
        scoring.load_scores(tmp_path)


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def _sweep_folder(out, prompt="a cat and a dog"):
    for method, colour in (("plain", "red"), ("astar", "blue")):
        job = {"method": method, "prompt": prompt, "category": "animal-animal", "concepts": ["cat", "dog"],
               "slug": slug(prompt), "seed": 0, "overlay": method == "astar"}
        extras = {"overlay_0": _png("green"), "overlay_text": b"step losses"} if method == "astar" else {}
        store.save_result(out, job, {"png": _png(colour), "extras": extras, "server": "s", "prompt_id": "p",
                                     "seconds": 1.0})


def test_report_without_scores_has_grids_overlays_and_page(tmp_path):
    _sweep_folder(tmp_path)
    page = report.write_report(tmp_path) / "index.html"
    html = page.read_text()
    grid = tmp_path / "report" / "grids" / "a_cat_and_a_dog.png"
    assert grid.is_file() and "grids/a_cat_and_a_dog.png" in html
    assert Image.open(grid).size == (2 * report.GRID_CELL, report.GRID_CELL + report.LABEL_H)
    assert "overlay_0.png" in html and "step losses" in html
    assert "No scores yet" in html
    assert not (tmp_path / "report" / "summary.json").exists()


def test_report_without_images_or_scores_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the sweep first"):
        report.write_report(tmp_path)


@pytest.mark.parametrize("prompt, with_paper", [("a dog and a frog", True), ("a dog and a red frog", False)])
def test_paper_numbers_only_beside_prompts_of_the_published_set(tmp_path, prompt, with_paper):
    _sweep_folder(tmp_path, prompt)
    write_lines(tmp_path / "scores.jsonl", [{**x, "prompt": prompt, "key": f"{x['key']}-{i}", "seed": i}
                                            for i, x in enumerate(LINES)])
    rows = json.loads((report.write_report(tmp_path) / "summary.json").read_text())
    assert [r["blip_text_paper"] for r in rows] == [0.82 if with_paper else None]
