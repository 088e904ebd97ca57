"""Cost of A-STAR guidance on the joint-attention (DiT) families against plain sampling, on the test suite's
random-weight models: the exact widths with few blocks, small random text encoders behind ComfyUI's real
tokenizers (tests/support/dit_models.py; files cached in ~/.cache/astar-comfyui/test-models, built there
by the suite's builders when missing). Parameters are those of the diffusion model; every file is fp16.

  flux         Flux.1-dev, 1 double + 1 single block (hidden 3072, 24 heads of 128, context 4096; 0.55 B);
               CLIP-L (3 layers) + T5 (d_model 4096, 1 layer). UNETLoader. cfg 1 (FluxGuidance 3.5).
  sd35         SD3.5-Medium width, 3 joint blocks (hidden 1536, 24 heads, context 4096); CLIP-L + CLIP-G
               (3 layers each) + T5 (1 layer). Loaded by the suite (ComfyUI 0.3.75's UNETLoader counts
               an MMDiT's blocks from its width). cfg 4.5, negative "".
  chroma       Chroma, 1 double + 1 single block (Flux.1's blocks, hidden 3072, 24 heads, context 4096, the
               5-layer 5120-wide modulation approximator; 0.63 B); T5 alone (d_model 4096, 1 layer, no
               padding). UNETLoader. cfg 4 with a negative prompt, as astar_chroma.json.
  flux2_klein  Flux.2 Klein 4B, 1 double + 1 single block (hidden 3072, 24 heads, context 7680, 128 latent
               channels, patch 1; 0.56 B); Qwen3 of width 2560 (3 layers), chat template padded to 512
               tokens. UNETLoader, EmptyFlux2LatentImage. cfg 1, ConditioningZeroOut, as
               astar_flux2_klein.json. Needs a ComfyUI with Flux.2 Klein (0.19 or later).
  qwen_image   Qwen-Image, 1 block (24 heads of 128 = 3072, context 3584; 0.38 B); Qwen2.5 of width 3584
               (2 layers, no vision tower). UNETLoader. cfg 2.5, negative "", as astar_qwen_image.json
               without its ModelSamplingAuraFlow (the shift moves the noise levels, not the cost).
  zimage       Z-Image Turbo (NextDiT), 2 main layers + 2 context-refiner + 2 noise-refiner layers (dim 3840,
               30 heads of 128, caption features 2560; 1.09 B); Qwen3 of width 2560 (3 layers). UNETLoader.
               cfg 1, ConditioningZeroOut, as astar_zimage.json.

At 256 px every family has 16 x 16 = 256 image tokens. Configurations:

  plain         stock KSampler
  astar         A-STAR Apply (mode astar, window 0 to 0.5, step size 20) + the stock KSampler
  astar_single  the same with single_pass (the sampler's own call gives the maps and the gradient)
  astar_zero    the same with step size 0: the stock run, with the losses of the unguided latents

Besides time and memory, each A-STAR configuration reports the guidance loss (A-STAR's total, at the
latent each guided step starts from, before its update) at every guided step: astar_zero's are those of
the unguided run, so a guided configuration keeps the loss going down if its losses fall below them.

Every family samples with euler on the "simple" scheduler. Blocks read: each family's default (every
double block, every Qwen-Image block, every Z-Image main layer); on the 3-block SD3.5 model `joint:all`
(the default 4-16 needs 17 blocks). Every configuration runs in its own subprocess; loading and a
warm-up run (1 guided step at 64 px) are not timed; then wall and CPU time and peak memory of the sampler
node (CPU: peak RSS over the loaded model, as bench_overhead.py measures it; cuda: max allocated).
Interleaved repetitions, medians. Few blocks make the guidance pass a larger share of a step than on the
real models (Flux.1-dev: 19 double + 38 single blocks; the lean pass stops after the last read block).

  python benchmarks/bench_dit.py --model flux             # CPU, 256 px, 10 steps
  python benchmarks/bench_dit.py --model sd35 --device cuda --size 1024 --steps 28
  python benchmarks/bench_dit.py --model chroma --size 128   # likewise qwen_image, zimage (the 2026-12-03 runs)
  COMFYUI_ROOT=~/.cache/astar-comfyui/ComfyUI-0.19.3 ~/.cache/astar-comfyui/venv-0.19.3/bin/python \\
      benchmarks/bench_dit.py --model flux2_klein --size 128

Writes benchmarks/results/<device>-<model>-<size>px-<steps>steps.json (--note adds a remark on the
machine, e.g. concurrent load) and prints a table.
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

PROMPT, CONCEPTS, SEED = "a cat and a frog", "cat, frog", 0
# One entry per family: the test model (its file in the test-model cache, the tests/support/dit_models builder
# that writes it, and `load`, the suite's loader where UNETLoader cannot read it), the test text encoder, the
# latent node, the sampling settings (negative None: ConditioningZeroOut of the positive; flux_guidance: a
# FluxGuidance node), the blocks read, and what the ComfyUI host must have (module, attribute) with a hint.
_COMMON = {"sampler": "euler", "scheduler": "simple", "latent": "EmptySD3LatentImage", "folder": "checkpoints",
           "load": None, "negative": "", "flux_guidance": None, "blocks": "", "requires": (), "host": ""}
SETTINGS = {
    "flux": {**_COMMON, "file": "astar-test-flux1-dev-d1s1.safetensors", "build": "build_flux_checkpoint",
             "clip": "flux_clip", "cfg": 1.0, "flux_guidance": 3.5},
    "sd35": {**_COMMON, "file": "astar-test-sd35m-b3.safetensors", "folder": "dit", "build": "build_sd35_checkpoint",
             "load": "load_sd35_model", "clip": "sd35_clip", "cfg": 4.5, "blocks": "joint:all"},
    "chroma": {**_COMMON, "file": "astar-test-chroma-d1s1.safetensors", "build": "build_chroma_checkpoint",
               "clip": "chroma_clip", "cfg": 4.0, "negative": "low quality, blurry, deformed"},
    "flux2_klein": {**_COMMON, "file": "astar-test-flux2-klein4b-d1s1.safetensors", "build": "build_klein_checkpoint",
                    "clip": "klein_clip", "cfg": 1.0, "negative": None, "latent": "EmptyFlux2LatentImage",
                    "requires": (("comfy.text_encoders.flux", "KleinTokenizer"), ("comfy.supported_models", "Flux2")),
                    "host": "ComfyUI 0.19 or later (here: COMFYUI_ROOT=~/.cache/astar-comfyui/ComfyUI-0.19.3 "
                            "with ~/.cache/astar-comfyui/venv-0.19.3/bin/python)"},
    "qwen_image": {**_COMMON, "file": "astar-test-qwen-image-b1.safetensors", "build": "build_qwen_image_checkpoint",
                   "clip": "qwen_image_clip", "cfg": 2.5, "requires": (("comfy.supported_models", "QwenImage"),),
                   "host": "ComfyUI 0.3.75 or later"},
    "zimage": {**_COMMON, "file": "astar-test-zimage-l2.safetensors", "build": "build_zimage_checkpoint",
               "clip": "zimage_clip", "cfg": 1.0, "negative": None,
               "requires": (("comfy.supported_models", "ZImage"),), "host": "ComfyUI 0.3.75 or later"},
}
CONFIGS = ("plain", "astar", "astar_single", "astar_zero")


def graph(model: str, kind: str, size: int, steps: int, guidance_end: float, seed: int,
          step_size: float = 20.0) -> dict:
    s = SETTINGS[model]
    loader = ({"class_type": "AStarTestModel", "inputs": {"name": model}} if s["load"] else
              {"class_type": "UNETLoader", "inputs": {"unet_name": s["file"], "weight_dtype": "default"}})
    g = {"model": loader,
         "clip": {"class_type": "AStarTestClip", "inputs": {"name": f"{model}_clip"}},
         "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
         "neg": ({"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}} if s["negative"] is None
                 else {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": s["negative"]}}),
         "latent": {"class_type": s["latent"], "inputs": {"width": size, "height": size, "batch_size": 1}}}
    positive = ["pos", 0]
    if s["flux_guidance"] is not None:
        g["guidance"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": positive,
                                                                  "guidance": s["flux_guidance"]}}
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


def missing_capability(model: str) -> str | None:
    """Why this ComfyUI ($COMFYUI_ROOT) cannot run `model`'s family, or None: the first (module, attribute)
    of its `requires` that the host lacks, with the host to use."""
    import importlib
    s = SETTINGS[model]
    if not s["requires"]:
        return None
    sys.path.insert(0, str(common.TESTS_DIR))
    from support import host as hosts
    from support import models
    models.prepare_comfy_import()
    for module, attribute in s["requires"]:
        if not hasattr(importlib.import_module(module), attribute):
            return (f"--model {model} needs {module}.{attribute}, which the ComfyUI at {hosts.comfy_root()} lacks; "
                    f"run it on {s['host']}")
    return None


def worker(a) -> dict:
    import torch
    sys.path.insert(0, str(common.TESTS_DIR))
    from support import dit_models, dit_nodes
    from support import host as hosts
    with tempfile.TemporaryDirectory(prefix="astar-bench-dit-") as tmp:
        host = hosts.InProcessHost(Path(tmp), cpu=(a.device == "cpu"))
        objects = {}
        dit_nodes.register(host.nodes, objects, hosts.pack_module("nodes.joint_attention"))
        s = SETTINGS[a.model]
        path = getattr(dit_models, s["build"])(hosts.models_dir() / s["folder"] / s["file"])
        if s["load"]:
            objects[a.model] = getattr(dit_models, s["load"])(path)
        objects[f"{a.model}_clip"] = getattr(dit_models, s["clip"])(seed=0)
        t = time.perf_counter()
        host.run(graph(a.model, "astar", 64, 1, 1.0, SEED + 1))  # loads everything; the same for both configs
        warmup_s = time.perf_counter() - t
        with common.Meter(a.device) as m:
            out = host.run(graph(a.model, a.worker, a.size, a.steps, a.guidance_end, SEED, a.step_size))
        result = dict(m.result, warmup_s=warmup_s, torch_threads=torch.get_num_threads())
        if "apply" in out:
            steps = out["apply"][1][-1].steps
            result["guided_losses"] = [float(r.losses["total"].mean()) for r in steps if r.losses]
            result["guided_step_indices"] = [r.step for r in steps if r.losses]
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
    expected = common.guided_count(a.steps, a.guidance_end, SETTINGS[a.model]["scheduler"])
    for c, q in s.items():
        # the steps the run guided (its records), which can differ from the expected count: a step that lies
        # on the window's end in exact arithmetic falls on either side of it by rounding
        guided = len(runs[c][0].get("guided_step_indices", [None] * expected))
        if c != "plain":
            q["guided_steps_run"] = guided
        if c != "plain" and "plain" in s:
            p = s["plain"]
            q["x_plain_wall"] = q["wall_s_median"] / p["wall_s_median"]
            q["guided_step_extra_in_plain_steps"] = \
                (q["wall_s_median"] - p["wall_s_median"]) / max(guided, 1) / (p["wall_s_median"] / a.steps)
        for key in ("guided_losses", "guided_step_indices"):  # deterministic: the same in every rep
            if key in runs[c][0]:
                q[key] = runs[c][0][key]
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
    ap.add_argument("--note", default=None, help="a remark on the machine, kept in the JSON (e.g. concurrent load)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        Path(a.worker_out).write_text(json.dumps(worker(a)))
        return
    reason = missing_capability(a.model)
    if reason:
        ap.exit(2, f"bench_dit.py: {reason}\n")
    name = a.name or f"{a.device}-{a.model}-{a.size}px-{a.steps}steps"
    info = common.machine(argparse.Namespace(device=a.device))
    if a.note:
        info["note"] = a.note
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
                        "guided_steps": common.guided_count(a.steps, a.guidance_end, SETTINGS[a.model]["scheduler"]),
                        "step_size": a.step_size,
                        **{k: v for k, v in SETTINGS[a.model].items() if k not in ("requires", "host")},
                        "prompt": PROMPT, "concepts": CONCEPTS,
                        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
           "summary": summary, "runs": runs}
    out = common.RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps(doc, indent=1))
    print(f"{'config':<14}{'wall s':>9}{'cpu s':>9}{'x plain':>9}{'peak RSS MiB':>14}{'+MiB':>8}{'step+':>8}"
          f"{'guided':>7}  loss at each guided step")
    for c, v in summary.items():
        losses = " ".join(f"{x:.6f}" for x in v.get("guided_losses", []))
        print(f"{c:<14}{v['wall_s_median']:>9.1f}{v['cpu_s_median']:>9.1f}{v.get('x_plain_wall', 1.0):>9.3f}"
              f"{v['rss_peak_mib_max']:>14.0f}{v['rss_increase_mib_max']:>8.0f}"
              f"{v.get('guided_step_extra_in_plain_steps', 0.0):>8.2f}{v.get('guided_steps_run', 0):>7}  {losses}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
