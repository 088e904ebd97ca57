"""Evaluate the pack's methods on Attend-and-Excite's prompt set through ComfyUI servers.

    python -m benchmarks.ae_eval all --servers http://gpu1:8188,http://gpu2:8188 \\
        --ckpt v1-5-pruned-emaonly.safetensors --clip ~/weights/clip-vit-base-patch16 \\
        --blip ~/weights/blip-image-captioning-base --out eval-out

Subcommands: sweep (images), score (CLIP/BLIP), report (tables, plots, grids, HTML), all (the three),
prompts (a new draw of A&E's prompt rule, written to a file of your choice; the default set is the
published draw, data/ae_prompts.json). Rerunning a command resumes it."""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from . import graphs, prompts


def parse_seeds(spec: str) -> list[int]:
    """'64' -> 0..63; '3,7,9' -> those; '10-19' -> 10..19."""
    try:
        if "," in spec:
            return [int(s) for s in spec.split(",")]
        if "-" in spec:
            lo, hi = spec.split("-")
            return list(range(int(lo), int(hi) + 1))
        return list(range(int(spec)))
    except ValueError:
        raise SystemExit(f"error: --seeds {spec!r}: give a count (64), a list (3,7,9) or a range (10-19)")


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_sets(items: list[str], methods: dict) -> dict:
    """--set input=value (every node having that input, every method) and
    --set method:Class.input=value (one method's node class). Returns the global settings."""
    everywhere = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: expected input=value or method:Class.input=value")
        if ":" in key:
            method, _, target = key.partition(":")
            class_type, dot, name = target.partition(".")
            if method not in methods or not dot:
                raise SystemExit(f"error: --set {item!r}: method must be one of {', '.join(methods)} and the "
                                 "target Class.input")
            methods[method].setdefault("inputs", {}).setdefault(class_type, {})[name] = parse_value(value)
        else:
            everywhere[key] = parse_value(value)
    return everywhere


def select_prompts(args) -> list[dict]:
    records = prompts.load_prompts(args.prompts)
    if not args.prompts_per_category:
        return records
    taken, out = collections.Counter(), []
    for r in records:
        if taken[r["category"]] < args.prompts_per_category:
            out.append(r)
            taken[r["category"]] += 1
    return out


def sweep_config(args):
    from .sweep import SweepConfig
    methods = graphs.load_methods(args.methods_file)
    if args.methods:
        unknown = [m for m in args.methods.split(",") if m not in methods]
        if unknown:
            raise SystemExit(f"error: unknown method(s) {unknown}; {args.methods_file} has {', '.join(methods)}")
        methods = {m: methods[m] for m in args.methods.split(",")}
    inputs = parse_sets(args.set, methods)
    if args.steps:
        inputs["steps"] = args.steps
    if args.ckpt:
        inputs["ckpt_name"] = args.ckpt
    records = select_prompts(args)
    overlay = frozenset(args.overlay_prompt)
    unknown = overlay - {r["prompt"] for r in records}
    if unknown:
        raise SystemExit(f"error: --overlay-prompt {sorted(unknown)} is not among the sweep's prompts")
    servers = [u.strip() for s in args.servers for u in s.split(",") if u.strip()]
    return SweepConfig(servers=servers, out=Path(args.out), methods=methods, prompts=records,
                       seeds=parse_seeds(args.seeds), settings={"size": args.size, "inputs": inputs},
                       overlay_prompts=overlay, job_timeout=args.job_timeout, depth=args.depth,
                       server_wait=args.server_wait, max_new=args.max_new, ray_address=args.ray_address,
                       progress=not args.no_progress)


def run_sweep(args) -> None:
    from .sweep import run_sweep as sweep, stop_local_ray
    try:
        stats = sweep(sweep_config(args))
    finally:
        stop_local_ray()
    print(f"sweep: {stats['jobs']} jobs, {stats['done_before']} done before, {len(stats['ran'])} made now "
          f"({stats['images_per_min']:.1f} images/min), {len(stats['failures'])} failed")
    for key, message in stats["failures"].items():
        print(f"  failed: {key}: {message}", file=sys.stderr)


def run_score(args) -> None:
    from .scoring import Scorer, score_folder
    n = score_folder(Path(args.out), Scorer(args.clip, args.blip, device=args.device))
    print(f"score: {n} images scored into {Path(args.out) / 'scores.jsonl'}")


def run_report(args) -> None:
    from .report import write_report
    print(f"report: {write_report(Path(args.out), grid_seeds=args.grid_seeds) / 'index.html'}")


def run_all(args) -> None:
    from .scoring import check_folder
    check_folder("CLIP", args.clip)
    check_folder("BLIP", args.blip)
    run_sweep(args)
    run_score(args)
    run_report(args)


def run_prompts(args) -> None:
    prompts.write_prompts(prompts.generate(args.seed), args.output, overwrite=args.overwrite)
    print(f"prompts: {args.output}")


def add_sweep_args(p) -> None:
    p.add_argument("--servers", action="append", required=True,
                   help="ComfyUI server URLs (comma-separated or repeated); only these are contacted")
    p.add_argument("--prompts", default=str(prompts.DEFAULT_SET),
                   help="prompt file: records or A&E's published {category: [prompts]} form (default: %(default)s)")
    p.add_argument("--prompts-per-category", type=int, help="only the first N prompts of each category")
    p.add_argument("--seeds", default="64", help="a count (64 = seeds 0..63, A&E's protocol), a list or a range")
    p.add_argument("--methods-file", default=str(graphs.DEFAULT_METHODS))
    p.add_argument("--methods", help="comma-separated subset of the methods file (default: all)")
    p.add_argument("--ckpt", help="checkpoint file name as the servers list it (default: the workflows')")
    p.add_argument("--size", type=int, help="image width and height (default: the workflows', 512)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the workflows', 50)")
    p.add_argument("--set", action="append", default=[], metavar="SETTING",
                   help="input=value on every node with that input (e.g. cfg=7.5), or method:Class.input=value")
    p.add_argument("--overlay-prompt", action="append", default=[], help="keep attention overlays for this prompt")
    p.add_argument("--depth", type=int, default=2, help="jobs queued per server (default: %(default)s)")
    p.add_argument("--job-timeout", type=float, default=1800, help="seconds per image before a job counts as lost")
    p.add_argument("--server-wait", type=float, default=600,
                   help="seconds to wait when no server answers before stopping (rerun to resume)")
    p.add_argument("--max-new", type=int, help="stop after this many new images")
    p.add_argument("--ray-address", help="an existing Ray cluster (default: a local Ray instance)")
    p.add_argument("--no-progress", action="store_true")


def add_score_args(p) -> None:
    p.add_argument("--clip", required=True, help="local folder with CLIP ViT-B/16 (safetensors)")
    p.add_argument("--blip", required=True, help="local folder with BLIP base captioning (safetensors)")
    p.add_argument("--device", default="cpu", help="torch device for scoring (cpu, cuda, cuda:1)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ae_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    commands = {"sweep": (run_sweep, [add_sweep_args]), "score": (run_score, [add_score_args]),
                "report": (run_report, []), "all": (run_all, [add_sweep_args, add_score_args])}
    for name, (_, adders) in commands.items():
        p = sub.add_parser(name)
        p.add_argument("--out", required=True, help="result folder (a rerun resumes it)")
        p.add_argument("--grid-seeds", type=int, default=4, help="seeds (rows) per prompt grid")
        for add in adders:
            add(p)
    p = sub.add_parser("prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True,
                   help="file to write the new draw to (use it with --prompts); an existing file is kept")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = ap.parse_args(argv)
    try:
        {**{k: v[0] for k, v in commands.items()}, "prompts": run_prompts}[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
