"""The report of a scored sweep, in OUT/report/:

    summary.md, summary.json   per category x method: mean and 95 % interval of each metric, the
                               papers' BLIP text-text numbers beside them (only when every scored
                               prompt is one of the published set's, which those numbers are of)
    plots/<metric>.png         bars with intervals per category and method (paper numbers marked)
    grids/<prompt>.png         methods side by side (columns), one row per seed
    index.html                 all of the above on one page, with the attention overlays

Without scores (before `score`, or without CLIP/BLIP weights) it writes the grids, the overlays and
the page; the metric files and plots come once OUT/scores.jsonl has scores.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

from PIL import Image, ImageDraw

from . import store
from .prompts import CATEGORIES, DEFAULT_SET, load_prompts
from .scoring import load_scores
from .stats import METRICS, summary

# Reported BLIP text-text similarity (A-STAR paper, ICCV 2023), by this runner's method names.
PAPER = {"blip_text": {
    "animal-animal": {"plain": 0.76, "attend_excite": 0.80, "astar": 0.82},
    "animal-object": {"plain": 0.78, "attend_excite": 0.82, "astar": 0.84},
    "object-object": {"plain": 0.77, "attend_excite": 0.81, "astar": 0.82},
}}
LABELS = {"clip_full": "CLIP full-prompt similarity", "clip_min": "CLIP minimum-object similarity",
          "blip_text": "BLIP caption - prompt text-text similarity"}
GRID_CELL = 256
LABEL_H = 20


def paper_value(metric: str, category: str, method: str):
    return PAPER.get(metric, {}).get(category, {}).get(method)


def table_rows(summ: dict, with_paper: bool = True) -> list[dict]:
    cells = sorted({cell for per in summ.values() for cell in per},
                   key=lambda c: (CATEGORIES.index(c[0]) if c[0] in CATEGORIES else 99, c[1]))
    rows = []
    for category, method in cells:
        row = {"category": category, "method": method}
        for metric in METRICS:
            row[metric] = summ[metric][(category, method)]
            row[f"{metric}_paper"] = paper_value(metric, category, method) if with_paper else None
        rows.append(row)
    return rows


def row_cells(r: dict) -> list[str]:
    """category, method, prompts, then each metric's mean [interval] (and the paper's number)."""
    cells = [r["category"], r["method"], str(r[METRICS[0]]["n"])]
    for m in METRICS:
        cells.append(f"{r[m]['mean']:.3f} [{r[m]['low']:.3f}, {r[m]['high']:.3f}]")
        if m in PAPER:
            cells.append("" if r[f"{m}_paper"] is None else f"{r[f'{m}_paper']:.2f}")
    return cells


def markdown(rows: list[dict]) -> str:
    head = "| category | method | prompts | " + " | ".join(
        f"{m} (95 % CI) | paper" if m in PAPER else f"{m} (95 % CI)" for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (3 + len(METRICS) + len(PAPER))]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    categories = [c for c in CATEGORIES if any(r["category"] == c for r in rows)] or \
        sorted({r["category"] for r in rows})
    methods = sorted({r["method"] for r in rows})
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(categories), 3.6))
    for k, method in enumerate(methods):
        for j, category in enumerate(categories):
            r = next((r for r in rows if r["category"] == category and r["method"] == method), None)
            if r is None:
                continue
            x = j + (k - (len(methods) - 1) / 2) * width
            s = r[metric]
            ax.bar(x, s["mean"], width, color=f"C{k}", label=method if j == 0 else None,
                   yerr=[[s["mean"] - s["low"]], [s["high"] - s["mean"]]], capsize=3)
            if r[f"{metric}_paper"] is not None:
                ax.plot(x, r[f"{metric}_paper"], "k_", markersize=14, markeredgewidth=2,
                        label="paper" if (j, k) == (0, 0) else None)
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel(metric)
    ax.set_title(LABELS[metric], fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grid(out: Path, recs: list[dict], methods: list[str], path: Path, max_seeds: int) -> None:
    """One prompt: a column per method, a row per seed (the same seed across a row)."""
    seeds = sorted({r["seed"] for r in recs})[:max_seeds]
    canvas = Image.new("RGB", (GRID_CELL * len(methods), (GRID_CELL + LABEL_H) * len(seeds)), "white")
    draw = ImageDraw.Draw(canvas)
    by_cell = {(r["method"], r["seed"]): r for r in recs}
    for row, seed in enumerate(seeds):
        for col, method in enumerate(methods):
            x, y = col * GRID_CELL, row * (GRID_CELL + LABEL_H)
            draw.text((x + 4, y + 4), f"{method}  seed {seed}", fill="black")
            if (method, seed) in by_cell:
                img = Image.open(store.image_path(out, by_cell[(method, seed)])).convert("RGB")
                canvas.paste(img.resize((GRID_CELL, GRID_CELL)), (x, y + LABEL_H))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def overlay_files(out: Path, recs: list[dict]) -> list[tuple[dict, list[Path]]]:
    found = []
    for r in recs:
        folder = store.extras_dir(out, r)
        if folder.is_dir():
            found.append((r, sorted(folder.iterdir())))
    return found


def published_prompts() -> set[str]:
    return {r["prompt"] for r in load_prompts(DEFAULT_SET)}


def html_page(rows: list[dict], plots: list[Path], grids: list[Path], overlays, report: Path,
              note: str = "") -> str:
    def rel(p: Path) -> str:
        return html.escape(os.path.relpath(p, report))

    parts = ["<!doctype html><meta charset='utf-8'><title>A&amp;E prompt set evaluation</title>",
             "<style>body{font-family:sans-serif} td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
             " img.t{width:256px}</style>",
             "<h1>Evaluation on the Attend-and-Excite prompt set</h1><h2>Metrics (mean, 95 % CI over prompts)</h2>"]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    if rows:
        parts.append("<table><tr><th>category</th><th>method</th><th>prompts</th>"
                     + "".join(f"<th>{m}</th>" + ("<th>paper</th>" if m in PAPER else "") for m in METRICS) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row_cells(r)) + "</tr>" for r in rows]
        parts.append("</table><h2>Plots</h2>" + "".join(f"<img src='{rel(p)}'>" for p in plots))
    if overlays:
        parts.append("<h2>Attention overlays</h2>")
        for r, files in overlays:
            parts.append(f"<h3>{html.escape(r['method'])}: {html.escape(r['prompt'])}, seed {r['seed']}</h3>")
            parts += [f"<img class='t' src='{rel(f)}' title='{html.escape(f.name)}'>" for f in files if f.suffix == ".png"]
            parts += [f"<pre>{html.escape(f.read_text())}</pre>" for f in files if f.suffix == ".txt"]
    parts.append("<h2>Images per prompt (methods side by side, same seed per row)</h2>")
    parts += [f"<figure style='display:inline-block'><img class='t' src='{rel(g)}'>"
              f"<figcaption>{html.escape(g.stem)}</figcaption></figure>" for g in grids]
    return "\n".join(parts)


def write_report(out: Path, grid_seeds: int = 4) -> Path:
    out = Path(out)
    report = out / "report"
    scores, recs = load_scores(out), store.records(out)
    if not scores and not recs:
        raise FileNotFoundError(f"no images in {out / 'images'}: run the sweep first")
    report.mkdir(parents=True, exist_ok=True)
    rows, plots, note = [], [], ""
    if not scores:
        note = (f"No scores yet ({out / 'scores.jsonl'}): run the score step for the metric tables; "
                "the images and overlays are below.")
    else:
        with_paper = {s["prompt"] for s in scores} <= published_prompts()
        if not with_paper:
            note = ("Some prompts are not in the published A&E set, so the papers' numbers (of that set) are "
                    "not shown beside these.")
        rows = table_rows(summary(scores), with_paper)
        (report / "summary.md").write_text((f"{note}\n\n" if note else "") + markdown(rows))
        (report / "summary.json").write_text(json.dumps(rows, indent=1))
        plots = [report / "plots" / f"{m}.png" for m in METRICS]
        for metric, path in zip(METRICS, plots):
            plot(rows, metric, path)
    methods = list(dict.fromkeys(r["method"] for r in recs))
    grids = []
    for prompt_slug in dict.fromkeys(r["slug"] for r in recs):
        grids.append(report / "grids" / f"{prompt_slug}.png")
        grid(out, [r for r in recs if r["slug"] == prompt_slug], methods, grids[-1], grid_seeds)
    (report / "index.html").write_text(html_page(rows, plots, grids, overlay_files(out, recs), report, note))
    return report
