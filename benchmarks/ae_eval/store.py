"""The result folder of a sweep, which makes a rerun skip what is done.

    OUT/sweep.json                         what defines each method's images (settings, inputs)
    OUT/images/<method>/<prompt slug>/<seed>.png     the image
    OUT/images/<method>/<prompt slug>/<seed>.json    its record, written last: the job is done
    OUT/images/<method>/<prompt slug>/<seed>.extras/ attention overlays and reports (overlay jobs)
    OUT/scores.jsonl                       one line of scores per image (scoring.py appends to it)

Every file is written to a temporary name and renamed, so an interrupted sweep leaves no partial
file that would count as done."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path


class SweepMismatch(ValueError):
    """The folder holds images of a method made with other settings."""


def job_key(job: dict) -> str:
    """method/prompt slug/seed: a job's name in logs, scores and the servers' history."""
    return f"{job['method']}/{job['slug']}/{job['seed']}"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def job_dir(out: Path, job: dict) -> Path:
    return Path(out) / "images" / job["method"] / job["slug"]


def image_path(out: Path, job: dict) -> Path:
    return job_dir(out, job) / f"{job['seed']}.png"


def record_path(out: Path, job: dict) -> Path:
    return job_dir(out, job) / f"{job['seed']}.json"


def extras_dir(out: Path, job: dict) -> Path:
    return job_dir(out, job) / f"{job['seed']}.extras"


def is_done(out: Path, job: dict) -> bool:
    return record_path(out, job).is_file() and image_path(out, job).is_file()


def save_result(out: Path, job: dict, result: dict) -> dict:
    """Image, extras, then the record (the mark of a done job). Returns the record."""
    write_atomic(image_path(out, job), result["png"])
    for name, data in result.get("extras", {}).items():
        write_atomic(extras_dir(out, job) / (name + (".txt" if name.endswith("_text") else ".png")), data)
    rec = {**job, "server": result["server"], "prompt_id": result["prompt_id"],
           "seconds": round(result["seconds"], 3), "saved_at": time.time()}
    write_atomic(record_path(out, job), json.dumps(rec, indent=1).encode())
    return rec


def records(out: Path) -> list[dict]:
    """Every done job's record."""
    return [json.loads(p.read_text()) for p in sorted((Path(out) / "images").glob("*/*/*.json"))]


def claim_signatures(out: Path, signatures: dict[str, dict]) -> None:
    """Stores what defines each method's images; refuses a folder where a method was made otherwise."""
    path = Path(out) / "sweep.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    for method, sig in signatures.items():
        if method in known and known[method] != sig:
            raise SweepMismatch(f"{out} holds images of method {method!r} made with other settings:\n"
                                f"  there: {json.dumps(known[method], sort_keys=True)}\n"
                                f"  now:   {json.dumps(sig, sort_keys=True)}\n"
                                "Use another --out, or the same settings to resume that sweep.")
    write_atomic(path, json.dumps({**known, **signatures}, indent=1, sort_keys=True).encode())


def read_scores(path: Path, repair: bool = False) -> list[dict]:
    """The lines of a scores.jsonl. A last line cut short (scoring interrupted while writing it) is
    skipped with a warning, and with repair removed from the file, so appending starts on a fresh line;
    a damaged line before the last is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{path}, line {number}: not a JSON record ({line[:80]!r}); remove or fix "
                                 "that line (its image is scored again on the next run)") from None
            logging.warning("%s: the last line is incomplete (scoring was interrupted while writing it); "
                            "skipped%s", path, ", its image is scored again" if repair else "")
            text = "".join(f"{kept}\n" for kept in lines[:number - 1])
            if repair:
                write_atomic(path, text.encode())
    if repair and text and not text.endswith("\n"):  # a whole last record without its newline
        write_atomic(path, (text + "\n").encode())
    return out
