"""Cost of A-STAR guidance on Flux.1 and SD3.5 against plain sampling, on the test suite's random-weight
models (exact widths, few blocks: Flux.1-dev with 1 double + 1 single block, SD3.5-Medium width with
3 joint blocks; small random text encoders behind the real tokenizers; tests/support/dit_models.py).

  plain         stock KSampler
  astar         A-STAR Apply (mode astar, window 0 to 0.5, step size 20) + the stock KSampler
  astar_single  the same with single_pass (the sampler's own call gives the maps and the gradient)
  astar_zero    the same with step size 0: the stock run, with the losses of the unguided latents

Besides time and memory, each A-STAR configuration reports the guidance loss (A-STAR's total, at the
latent each guided step starts from, before its update) at every guided step: astar_zero's are those of
the unguided run, so a guided configuration keeps the loss going down if its losses fall below them.

Flux runs at cfg 1 (one cond pass per step, FluxGuidance 3.5), SD3.5 at cfg 4.5 (cond + uncond batch).
Blocks read: Flux's default (every double block); on the 3-block SD3.5 model `joint:all` (the default
4-16 needs 17 blocks). Every configuration runs in its own subprocess; loading and a warm-up run (1
guided step at 64 px) are not timed; then wall and CPU time and peak memory of the sampler node (CPU:
peak RSS over the loaded model, as bench_overhead.py measures it; cuda: max allocated). Interleaved
repetitions, medians. Few blocks make the guidance pass a larger share of a step than on the real
models (Flux.1-dev: 19 double + 38 single blocks; the lean pass stops after the last double block).

  python benchmarks/bench_dit.py --model flux             # CPU, 256 px, 10 steps
  python benchmarks/bench_dit.py --model sd35 --device cuda --size 1024 --steps 28

Writes benchmarks/results/<device>-<model>-<size>px-<steps>steps.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import bench_overhead as common  # noqa: E402  (Meter, machine description, result folder)

FLUX_FILE = "astar-test-flux1-dev-d1s1.safetensors"
SD35_FILE = "astar-test-sd35m-b3.safetensors"
PROMPT, CONCEPTS, SEED = "a cat and a frog", "cat, frog", 0
SETTINGS = {"flux": {"cfg": 1.0, "sampler": "euler", "scheduler": "simple", "blocks": ""},
            "sd35": {"cfg": 4.5, "sampler": "euler", "scheduler": "simple", "blocks": "joint:all"}}
CONFIGS = ("plain", "astar", "astar_single", "astar_zero")


def graph(model: str, kind: str, size: int, steps: int, guidance_end: float, seed: int,
          step_size: float = 20.0) -> dict:
    s = SETTINGS[model]
    loader = ({"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_FILE, "weight_dtype": "default"}}
              if model == "flux" else {"class_type": "AStarTestModel", "inputs": {"name": "sd35"}})
    g = {"model": loader,
         "clip": {"class_type": "AStarTestClip", "inputs": {"name": f"{model}_clip"}},
         "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
         "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}},
         "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}}
    positive = ["pos", 0]
    if model == "flux":
        g["guidance"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": positive, "guidance": 3.5}}
        positive = ["guidance", 0]
    source = ["model", 0]
    if kind.startswith("astar"):
        g["apply"] = {"class_type": "AStarApply", "inputs": {
            "model": source, "concepts": CONCEPTS, "attention_resolution": "1/32", "mode": "astar",
            "guidance_start": 0.0, "guidance_end": guidance_end, "step_size": step_size, "segregation_weight": 1.0,
            "retention_weight": 1.0, "binarization": "fraction", "mask_fraction": 0.5, "smoothing": True,
            "refine": "auto", "refine_thresholds": "0:0.05, 0.2:0.5, 0.4:0.8", "max_refine_iters": 20,
            "joint_blocks": s["blocks"], "single_pass": kind == "astar_single"}}
        if kind == "astar_zero":
            g["apply"]["inputs"]["step_size"] = 0.0
        source = ["apply", 0]
    g["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": source, "seed": seed, "steps": steps, "cfg": s["cfg"], "sampler_name": s["sampler"],
        "scheduler": s["scheduler"], "positive": positive, "negative": ["neg", 0], "latent_image": ["latent", 0],
        "denoise": 1.0}}
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return g


def worker(a) -> dict:
    import torch
    sys.path.insert(0, str(common.TESTS_DIR))
    from support import dit_models, dit_nodes
    from support import host as hosts
    with tempfile.TemporaryDirectory(prefix="astar-bench-dit-") as tmp:
        host = hosts.InProcessHost(Path(tmp), cpu=(a.device == "cpu"))
        objects = {}
        dit_nodes.register(host.nodes, objects, hosts.pack_module("nodes.joint_attention"))
        if a.model == "flux":
            dit_models.build_flux_checkpoint(hosts.models_dir() / "checkpoints" / FLUX_FILE)
            objects["flux_clip"] = dit_models.flux_clip(seed=0)
        else:
            path = dit_models.build_sd35_checkpoint(hosts.models_dir() / "dit" / SD35_FILE)
            objects["sd35"] = dit_models.load_sd35_model(path)
            objects["sd35_clip"] = dit_models.sd35_clip(seed=0)
        t = time.perf_counter()
        host.run(graph(a.model, "astar", 64, 1, 1.0, SEED + 1))  # loads everything; the same for both configs
        warmup_s = time.perf_counter() - t
        with common.Meter(a.device) as m:
            out = host.run(graph(a.model, a.worker, a.size, a.steps, a.guidance_end, SEED, a.step_size))
        result = dict(m.result, warmup_s=warmup_s, torch_threads=torch.get_num_threads())
        if "apply" in out:
            steps = out["apply"][1][-1].steps
            result["guided_losses"] = [float(r.losses["total"].mean()) for r in steps if r.losses]
        return result


def spawn(config: str, a, log) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--worker", config, "--worker-out", str(out), "--device", a.device,
           "--model", a.model, "--size", str(a.size), "--steps", str(a.steps), "--guidance-end", repr(a.guidance_end),
           "--step-size", repr(a.step_size), "--configs", *a.configs]
    if subprocess.run(cmd, cwd=str(common.PACK_DIR), stdout=log, stderr=subprocess.STDOUT).returncode != 0:
        raise RuntimeError(f"worker {config} failed; see {log.name}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def summarize(runs: dict, a) -> dict:
    s = {c: {"wall_s_median": statistics.median(r["wall_s"] for r in rs),
             "cpu_s_median": statistics.median(r["cpu_s"] for r in rs),
             "rss_peak_mib_max": max(r["rss_peak_mib"] for r in rs),
             "rss_increase_mib_max": max(r["rss_increase_mib"] for r in rs), "reps": len(rs)}
         for c, rs in runs.items() if rs}
    if a.device == "cuda":
        for c, rs in runs.items():
            s[c]["gpu_increase_mib_max"] = max(r["gpu_increase_mib"] for r in rs)
    guided = common.guided_count(a.steps, a.guidance_end, SETTINGS[a.model]["scheduler"])
    for c, q in s.items():
        if c != "plain" and "plain" in s:
            p = s["plain"]
            q["x_plain_wall"] = q["wall_s_median"] / p["wall_s_median"]
            q["guided_step_extra_in_plain_steps"] = \
                (q["wall_s_median"] - p["wall_s_median"]) / max(guided, 1) / (p["wall_s_median"] / a.steps)
        if runs[c] and "guided_losses" in runs[c][0]:
            q["guided_losses"] = runs[c][0]["guided_losses"]  # deterministic: the same in every rep
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(SETTINGS), default="flux")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance-end", type=float, default=0.5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--step-size", type=float, default=20.0,
                    help="A-STAR's step size (20, A&E's default; random weights give small gradients, so a larger "
                         "one shows whether the guided losses go down)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--name", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        Path(a.worker_out).write_text(json.dumps(worker(a)))
        return
    name = a.name or f"{a.device}-{a.model}-{a.size}px-{a.steps}steps"
    info = common.machine(argparse.Namespace(device=a.device))
    runs = {c: [] for c in a.configs}
    log_path = Path(tempfile.gettempdir()) / f"bench_dit-{name}.log"
    with open(log_path, "w") as log:
        for rep in range(a.reps):
            for c in (a.configs if rep % 2 == 0 else a.configs[::-1]):
                r = spawn(c, a, log)
                runs[c].append(r)
                print(f"rep {rep} {c:<12} wall {r['wall_s']:7.1f} s  peak RSS {r['rss_peak_mib']:7.0f} MiB "
                      f"(+{r['rss_increase_mib']:.0f})", flush=True)
    summary = summarize(runs, a)
    doc = {"benchmark": "bench_dit", "machine": info,
           "settings": {"model": a.model, "device": a.device, "size_px": a.size, "steps": a.steps,
                        "guided_steps": common.guided_count(a.steps, a.guidance_end, SETTINGS[a.model]["scheduler"]), "step_size": a.step_size,
                        **SETTINGS[a.model],
                        "prompt": PROMPT, "concepts": CONCEPTS,
                        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
           "summary": summary, "runs": runs}
    out = common.RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps(doc, indent=1))
    print(f"{'config':<14}{'wall s':>9}{'cpu s':>9}{'x plain':>9}{'peak RSS MiB':>14}{'+MiB':>8}{'step+':>8}"
          "  loss at each guided step")
    for c, v in summary.items():
        losses = " ".join(f"{x:.6f}" for x in v.get("guided_losses", []))
        print(f"{c:<14}{v['wall_s_median']:>9.1f}{v['cpu_s_median']:>9.1f}{v.get('x_plain_wall', 1.0):>9.3f}"
              f"{v['rss_peak_mib_max']:>14.0f}{v['rss_increase_mib_max']:>8.0f}"
              f"{v.get('guided_step_extra_in_plain_steps', 0.0):>8.2f}  {losses}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
