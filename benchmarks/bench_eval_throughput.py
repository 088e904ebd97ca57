#!/usr/bin/env python3
"""Throughput of the evaluation sweep (benchmarks/ae_eval) with 1 and 2 local ComfyUI servers.

Each configuration starts its servers (tests/support/host.py's ServerHost: main.py --cpu on
127.0.0.1), loads the model on each with one untimed job, then times a sweep of --jobs images
(plain and A-STAR alternating) spread over the servers by Ray, and stops the servers. Servers get
--threads-total / N torch threads each, so 1 and 2 servers use the same cores. Prints a table and
writes benchmarks/results/<name>.json with the machine's description and load.

    python benchmarks/bench_eval_throughput.py                  # the random-weight mini SD1.5 model
    python benchmarks/bench_eval_throughput.py --ckpt v1-5-pruned-emaonly.safetensors --size 512 --steps 50 \
        --set guidance_end=0.5 --set attention_resolution=1/32
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(PACK_DIR), str(PACK_DIR / "tests")]

from benchmarks.ae_eval import graphs, prompts, store  # noqa: E402
from benchmarks.ae_eval.__main__ import parse_value  # noqa: E402
from benchmarks.ae_eval.sweep import SweepConfig, plan, run_sweep  # noqa: E402
from support import host as hosts  # noqa: E402

MINI = "astar-test-sd15-mini.safetensors"
MINI_GUIDANCE = ("guidance_end=0.5", "attention_resolution=1/16")   # the A-STAR inputs of 8 steps on the mini model


def setting(text: str) -> tuple:
    key, _, value = text.partition("=")
    return key, parse_value(value)


def start_servers(n: int, threads: int, work: Path) -> list:
    os.environ.pop("COMFYUI_URL", None)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return [hosts.ServerHost(work / f"server{i}") for i in range(n)]


def warm_up(servers, cfg: SweepConfig) -> None:
    """One untimed job per server and method: loads the model and fills nothing the sweep reuses
    (other seeds)."""
    warm = SweepConfig(**{**cfg.__dict__, "out": cfg.out.with_name(cfg.out.name + "-warm"), "seeds": [10_000],
                          "prompts": cfg.prompts[:len(servers)], "progress": False})
    run_sweep(warm)


def measure(n_servers: int, args, records: list[dict], work: Path) -> dict:
    """One configuration in a folder of its own (work must be new: a done image would be skipped)."""
    servers = start_servers(n_servers, max(1, args.threads_total // n_servers), work)
    try:
        methods = {m: graphs.load_methods()[m] for m in args.methods.split(",")}
        settings = {"size": args.size, "inputs": {"steps": args.steps, "ckpt_name": args.ckpt, **dict(args.set)}}
        per_method = -(-args.jobs // len(methods))
        cfg = SweepConfig(servers=[s.url for s in servers], out=work / "out", methods=methods,
                          prompts=records[:per_method], seeds=[0], settings=settings, progress=False)
        warm_up(servers, cfg)
        stats = run_sweep(cfg)
        recs = store.records(cfg.out)
        return {"servers": n_servers, "threads_per_server": max(1, args.threads_total // n_servers),
                "images": len(stats["ran"]), "seconds": round(stats["seconds"], 2),
                "images_per_min": round(stats["images_per_min"], 2),
                "per_server": {s.url: sum(r["server"] == s.url for r in recs) for s in servers},
                "jobs_planned": len(plan(cfg))}
    finally:
        for s in servers:
            s.stop()


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1),
            "python": platform.python_version(), "load_average_at_start": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default=MINI)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--set", action="append", type=setting, default=None, metavar="INPUT=VALUE",
                    help=f"node inputs for every node having them (default: {' '.join(MINI_GUIDANCE)}: half "
                         "the steps guided, the mini model's only attention level)")
    ap.add_argument("--methods", default="plain,astar")
    ap.add_argument("--jobs", type=int, default=16, help="timed images per configuration")
    ap.add_argument("--servers", default="1,2", help="server counts to measure")
    ap.add_argument("--threads-total", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--name", default="eval-throughput-cpu")
    args = ap.parse_args(argv)
    args.set = args.set or [setting(s) for s in MINI_GUIDANCE]
    if args.ckpt == MINI:
        from tools.run_example import _build_test_models, _venv_python
        _build_test_models(_venv_python(), need_lora=False, need_controlnet=False)
    records = prompts.load_prompts()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as work:
        for k, n in enumerate(int(x) for x in args.servers.split(",")):
            rows.append(measure(n, args, records, Path(work) / f"run{k}-{n}servers"))
            print(f"{n} server(s): {rows[-1]['images_per_min']:.1f} images/min", flush=True)
    base = rows[0]["images_per_min"]
    print("\n| servers | threads each | images | seconds | images/min | x 1 server |\n|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['servers']} | {r['threads_per_server']} | {r['images']} | {r['seconds']} | "
              f"{r['images_per_min']} | {r['images_per_min'] / base:.2f} |")
    result = {"machine": machine(), "settings": vars(args), "rows": rows, "when": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                            time.gmtime())}
    out = PACK_DIR / "benchmarks" / "results" / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
