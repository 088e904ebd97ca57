"""Sweeps end to end on two local ComfyUI servers under a local Ray instance: the README's one
command (sweep, score, report), and a sweep interrupted, resumed, and losing a server midway."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from benchmarks.ae_eval import graphs, store
from benchmarks.ae_eval.__main__ import main
from benchmarks.ae_eval.prompts import load_prompts, slug
from benchmarks.ae_eval.sweep import SweepConfig, plan, run_sweep
from benchmarks.ae_eval.worker import ServerWorker, job_prompt_id

from .conftest import GUIDANCE, MINI, SMALL

METHODS = ("plain", "astar", "attend_excite")


def one_per_category():
    records = load_prompts()
    return [next(r for r in records if r["category"] == c) for c in ("animal-animal", "animal-object", "object-object")]


def test_the_one_command_sweeps_scores_and_reports(two_servers, tiny_models, tmp_path):
    out = tmp_path / "out"
    prompts = one_per_category()
    overlay = prompts[0]["prompt"]
    args = ["all", "--out", str(out), "--servers", ",".join(s.url for s in two_servers),
            "--prompts-per-category", "1", "--seeds", "1", "--ckpt", MINI, "--size", "64", "--steps", "3",
            "--overlay-prompt", overlay, "--no-progress", "--clip", str(tiny_models[0]), "--blip", str(tiny_models[1])]
    args += [f"--set={k}={v}" for k, v in GUIDANCE.items()]
    assert main(args) == 0
    recs = store.records(out)
    assert sorted(store.job_key(r) for r in recs) == sorted(f"{m}/{slug(r['prompt'])}/0" for r in prompts for m in METHODS)
    assert {r["server"] for r in recs} == {s.url for s in two_servers}       # spread over both
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert sorted(s["key"] for s in scores) == sorted(store.job_key(r) for r in recs)
    report = out / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert sorted((r["category"], r["method"]) for r in summary) == \
        sorted((p["category"], m) for p in prompts for m in METHODS)
    row = next(r for r in summary if (r["category"], r["method"]) == ("animal-object", "astar"))
    assert row["blip_text_paper"] == 0.84
    animal_object = next(p["prompt"] for p in prompts if p["category"] == "animal-object")
    assert row["clip_full"]["mean"] == next(s["clip_full"] for s in scores if s["key"] == f"astar/{slug(animal_object)}/0")
    assert sorted(p.name for p in (report / "grids").iterdir()) == sorted(f"{slug(p['prompt'])}.png" for p in prompts)
    assert sorted(p.name for p in (report / "plots").iterdir()) == ["blip_text.png", "clip_full.png", "clip_min.png"]
    html = (report / "index.html").read_text()
    for m in METHODS:   # the overlay prompt kept its attention overlays, for every method
        extras = store.extras_dir(out, {"method": m, "slug": slug(prompts[0]["prompt"]), "seed": 0})
        files = sorted(extras.iterdir())  # the overlay's six pictures (two concepts) and its report
        assert sum(p.suffix == ".png" for p in files) == 6 and any(p.name.endswith("_text.txt") for p in files), m
        assert os.path.relpath(next(p for p in files if p.suffix == ".png"), report) in html
    assert not store.extras_dir(out, {"method": "astar", "slug": slug(prompts[1]["prompt"]), "seed": 0}).exists()
    # Rerun: nothing to do, nothing rewritten.
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before


def runs_after_saving(server, recs: dict) -> list[str]:
    """Jobs the server started again after their image was saved (from its /history)."""
    late = []
    for entry in server.get("/history?max_items=10000").values():
        key = entry["prompt"][3].get("ae_eval_job")
        starts = [d["timestamp"] / 1000 for ev, d in entry["status"]["messages"] if ev == "execution_start"]
        if key in recs and any(t > recs[key]["saved_at"] for t in starts):
            late.append(key)
    return late


def kill_on_first_record(out, server, exclude, deadline_s=240):
    """Kills the server's process group (SIGKILL) as soon as it has saved a record not in exclude."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if any(r["server"] == server.url and store.job_key(r) not in exclude for r in store.records(out)):
            os.killpg(server.proc.pid, signal.SIGKILL)
            return
        time.sleep(0.1)


@pytest.mark.host_independent  # the runner's recovery; the one-command test covers each host
def test_interrupted_sweep_and_a_killed_server_lose_no_image_and_repeat_none(two_servers, tmp_path):
    a, b = two_servers
    cfg = SweepConfig(servers=[a.url, b.url], out=tmp_path / "out",
                      methods={m: graphs.load_methods()[m] for m in ("plain", "astar")},
                      prompts=one_per_category()[:2], seeds=[1, 2], settings=SMALL, max_new=3, progress=False,
                      poll=0.5, job_timeout=300)
    keys = {store.job_key(j) for j in plan(cfg)}
    assert len(keys) == 8
    first = run_sweep(cfg)                               # interrupted after 3 images
    assert len(first["ran"]) == 3 and not first["failures"]
    first_records = {store.job_key(r): r for r in store.records(cfg.out)}
    assert set(first_records) == set(first["ran"])

    cfg.max_new = None
    killer = threading.Thread(target=kill_on_first_record, args=(cfg.out, b, set(first_records)))
    killer.start()
    second = run_sweep(cfg)                              # resumed; b dies midway
    killer.join()
    assert b.proc.poll() is not None, "the server was not killed during the sweep"

    recs = {store.job_key(r): r for r in store.records(cfg.out)}
    assert set(recs) == keys and all(store.image_path(cfg.out, r).is_file() for r in recs.values())
    assert {k: recs[k] for k in first_records} == first_records            # untouched by the rerun
    assert second["done_before"] == 3 and sorted(second["ran"]) == sorted(keys - set(first_records))
    assert not second["failures"]
    assert any(r["server"] == b.url and k not in first_records for k, r in recs.items()), \
        "b made no image in the resumed sweep before it was killed"
    assert any(r["server"] == a.url and k not in first_records for k, r in recs.items())
    assert runs_after_saving(a, recs) == []          # no image made again once saved (b is dead)


def test_a_job_sent_again_to_a_server_that_ran_it_is_adopted_not_rerun(two_servers, object_info):
    server = two_servers[0]
    template = graphs.method_template("plain", graphs.load_methods()["plain"], object_info, overlays=False)
    job = {**plan(SweepConfig(servers=[], out=None, methods={"plain": {}}, prompts=one_per_category()[:1],
                              seeds=[99]))[0]}
    graph = graphs.job_graph(template, job, SMALL)
    worker = ServerWorker(server.url, job_timeout=300)
    first = worker.run(store.job_key(job), graph, template["image_node"], keep_extras=False)
    queued_as = server.get(f"/history/{first['prompt_id']}")[first["prompt_id"]]["prompt"][0]
    again = worker.run(store.job_key(job), graph, template["image_node"], keep_extras=False)
    assert first["status"] == again["status"] == "ok"
    assert again["prompt_id"] == first["prompt_id"] and again["png"] == first["png"]
    # A prompt queued again gets the next queue number (its history entry is replaced once it has run):
    # when the server is idle, the entry is still the first one.
    deadline = time.monotonic() + 120
    while any(server.get("/queue").values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.get(f"/history/{first['prompt_id']}")[first["prompt_id"]]["prompt"][0] == queued_as
    other = graphs.job_graph(template, {**job, "seed": 98}, SMALL)   # another graph: another prompt id
    assert job_prompt_id(store.job_key(job), other) != first["prompt_id"]
