"""Overhead of A-STAR guidance against plain sampling, beside Attend-and-Excite (ours and diffusers').

One run times, at equal settings (exact SD1.5 or SDXL-base layout with random weights, same prompt,
seed, cfg, steps, guided steps; A&E's refinement in both A&E configurations), with interleaved repetitions. The A-STAR nodes guide
the window 0 to --guidance-end of the model's noise schedule; with the "normal" scheduler run here step i
of n sits at i / (n - 1), so the steps i / (n - 1) < guidance_end are guided (default 0.5: 25 of 50 steps);
diffusers' A&E pipeline guides as many (max_iter_to_alter):

  comfy_plain   stock KSampler                               } ComfyUI graphs run by the real
  comfy_astar   A-STAR KSampler, mode astar                  } executor (tests/support/host.py
  comfy_ae      A-STAR KSampler, mode attend_excite          } InProcessHost, inference mode)
  diffusers_plain  diffusers StableDiffusionPipeline                     } the peer: random-weight
  diffusers_ae     diffusers StableDiffusionAttendAndExcitePipeline      } SD1.5-config models

diffusers has no Attend-and-Excite pipeline for SDXL, so --model sdxl times the ComfyUI configurations
alone. SDXL's UNet weights are stored in fp16 (ComfyUI's --fp16-unet; its default on a GPU), which on
CPU keeps the loaded model at about 8 GB instead of 14 GB.

Every timed run is its own fresh subprocess, so wall time, CPU time and peak memory of one
configuration never include another's. In each: load the model (not timed), an identical warm-up
(ComfyUI: an A-STAR KSampler run of 1 step, guided, at 64 px, which loads the UNet and converts
its weights for autograd once, as the first A-STAR run after loading does; diffusers: a 1-step run
of the same pipeline at 64 px), then the peak-memory counter is reset (CPU: /proc/self/clear_refs
resets VmHWM to the current RSS; GPU: torch.cuda.reset_peak_memory_stats) and the timed run
starts. Peak memory is reported absolute and as the increase over that loaded-model baseline. A
components run measures, inside one guidance step, a cond-only UNet forward (batch 1, no grad),
a full guidance pass (forward + gradient w.r.t. the latent) and the lean pass (forward stopped
after the last recorded layer), and whether their gradients are bitwise equal; all on the kernels the
pack picks (attention/cpu_convolutions.py), and the lean pass again with CPU convolutions on oneDNN.

  python benchmarks/bench_overhead.py                       # CPU: 50 steps, 25 guided (0 to 0.5), 256 px
  python benchmarks/bench_overhead.py --steps 4 --guidance-end 0.5 --size 64 --reps 1 --name smoke
  python benchmarks/bench_overhead.py --device cuda         # GPU: 512 px
  python benchmarks/bench_overhead.py --device cuda --model sdxl   # GPU: SDXL base at 1024 px

Writes benchmarks/results/<name>.json and prints a table. diffusers is a benchmark-only extra:
pip install -r benchmarks/requirements.txt into the ComfyUI venv (--configs without the
diffusers_* entries runs without it). Models are built locally with random weights (no download).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
TESTS_DIR = PACK_DIR / "tests"
RESULTS_DIR = PACK_DIR / "benchmarks" / "results"
# Random-weight checkpoints of the exact layouts, built by tests/support/models.py.
CKPTS = {"sd15": "astar-test-sd15-full.safetensors", "sdxl": "astar-test-sdxl.safetensors"}
DEFAULT_SIZES = {("cpu", "sd15"): 256, ("cuda", "sd15"): 512, ("cpu", "sdxl"): 256, ("cuda", "sdxl"): 1024}
PROMPT, NEGATIVE, CONCEPTS = "a cat and a frog", "", "cat, frog"
CFG, SEED, STEP_SIZE = 7.5, 0, 20.0
# Variant: comfy_astar_single takes the gradient from the sampler's own model call (single_pass).
# Ablations: comfy_astar_untruncated runs every guidance pass in full; comfy_astar_keep_casts lets
# autograd keep the per-forward weight casts of a manual-cast model (attention/saved_tensors.py).
COMFY_CONFIGS = ("comfy_plain", "comfy_astar", "comfy_ae", "comfy_astar_single", "comfy_astar_untruncated",
                 "comfy_astar_keep_casts")
DIFFUSERS_CONFIGS = ("diffusers_plain", "diffusers_ae")
DEFAULT_CONFIGS = {"sd15": ("comfy_plain", "comfy_astar", "comfy_ae", "diffusers_plain", "diffusers_ae"),
                   "sdxl": ("comfy_plain", "comfy_astar", "comfy_ae")}
WARMUP_SIZE = 64


# ----------------------------------------------------------------------------------------------
# measurement helpers (run inside the workers)
# ----------------------------------------------------------------------------------------------

def _status_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) / 1024.0


class Meter:
    """Wall time, process CPU time and peak memory of one timed region."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_gpu = torch.cuda.memory_allocated() / 2 ** 20
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        self.base_rss = _status_mib("VmRSS")
        self.load0 = os.getloadavg()[0]
        self.cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self.t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu = (cpu1.ru_utime - self.cpu0.ru_utime) + (cpu1.ru_stime - self.cpu0.ru_stime)
        self.peak_rss = _status_mib("VmHWM")
        self.result = {"wall_s": self.wall, "cpu_s": self.cpu, "rss_baseline_mib": self.base_rss,
                       "rss_peak_mib": self.peak_rss, "rss_increase_mib": self.peak_rss - self.base_rss,
                       "loadavg_1min_start": self.load0, "loadavg_1min_end": os.getloadavg()[0]}
        if self.device == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
            self.result.update({"gpu_baseline_mib": self.base_gpu, "gpu_peak_mib": peak,
                                "gpu_increase_mib": peak - self.base_gpu})
        return False


# ----------------------------------------------------------------------------------------------
# ComfyUI workers
# ----------------------------------------------------------------------------------------------

def _comfy_host(a, work: Path):
    sys.path.insert(0, str(TESTS_DIR))
    from support import host as hosts
    return hosts, hosts.InProcessHost(work, cpu=(a.device == "cpu"), fp16_unet=(a.model == "sdxl"))


def guided_count(steps: int, guidance_end: float, scheduler: str = "normal") -> int:
    """Steps the A-STAR nodes guide with the window 0 to guidance_end of the noise schedule: the steps
    whose place f < guidance_end, f = i / (n - 1) with the "normal" scheduler, i / n with "simple" on a
    flow model (its shift applies to the schedule and to percent_to_sigma alike)."""
    places = {"normal": lambda i: Fraction(i, max(steps - 1, 1)), "simple": lambda i: Fraction(i, steps)}[scheduler]
    return sum(1 for i in range(steps) if places(i) < guidance_end)


def ae_thresholds(steps: int) -> dict[int, float]:
    """A&E's refinement points (fractions 0, 0.2, 0.4) as step indices of `steps`, placed as the pack places
    them (first step at or after f * steps): {0: 0.05, 10: 0.5, 20: 0.8} at 50 steps, diffusers' default."""
    return {math.ceil(f * steps): t for f, t in ((0.0, 0.05), (0.2, 0.5), (0.4, 0.8))}


def _graph(a, kind: str, size: int, steps: int, guidance_end: float, seed: int = SEED):
    from support.graphs import sd15_graph  # SD1.5 and SDXL graphs are the same nodes
    sampler = "KSampler" if kind == "comfy_plain" else "AStarKSampler"
    mode = "attend_excite" if kind == "comfy_ae" else "astar"
    g = sd15_graph(CKPTS[a.model], sampler=sampler, prompt=PROMPT, negative=NEGATIVE, concepts=CONCEPTS, size=size, steps=steps,
                   seed=seed, cfg=CFG, sampler_name="euler", scheduler="normal", resolution="1/32", mode=mode,
                   step_size=STEP_SIZE, decode=False, guidance_start=0.0, guidance_end=guidance_end,
                   refine="auto",  # auto: A&E's refinement in attend_excite mode, none in astar mode
                   **({"single_pass": True} if kind == "comfy_astar_single" else {}))
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return g


def _instrument(hosts):
    """Counts guidance passes (full/lean), times make_autograd_safe and keeps each pass's saved-tensor
    stats, without changing behaviour."""
    guided = hosts.pack_module("nodes.sampling_wrapper")
    stats = {"passes": [], "autograd_safe": [], "saved": []}
    real_policy = guided.saved_tensor_policy

    def policy(**kw):
        p = real_policy(**kw)
        stats["saved"].append(p)
        return p

    class CountedPasses(guided.GuidancePasses):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            stats["passes"].append(self)

    real_safe = guided.make_autograd_safe

    def timed_safe(module):
        t = time.perf_counter()
        n = real_safe(module)
        stats["autograd_safe"].append((time.perf_counter() - t, n))
        return n

    guided.GuidancePasses = CountedPasses
    guided.make_autograd_safe = timed_safe
    guided.saved_tensor_policy = policy
    return stats


def _untruncated(hosts) -> None:
    """Every guidance pass in full: the A-STAR nodes build their sampling wrapper with lean=False."""
    inputs = hosts.pack_module("nodes.guidance_inputs")
    lean_sampling = inputs.AStarSampling

    class FullPassSampling(lean_sampling):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "lean": False})

    inputs.AStarSampling = FullPassSampling


def comfy_worker(kind: str, a) -> dict:
    import torch
    with tempfile.TemporaryDirectory(prefix="astar-bench-") as tmp:
        hosts, host = _comfy_host(a, Path(tmp))
        if kind == "comfy_astar_untruncated":
            _untruncated(hosts)
        if kind == "comfy_astar_keep_casts":
            guided, policy = hosts.pack_module("nodes.sampling_wrapper"), hosts.pack_module("attention.saved_tensors")
            guided.saved_tensor_policy = lambda recast_weight_casts, copy_others: \
                policy.saved_tensor_policy(False, copy_others)
        stats = _instrument(hosts)
        t = time.perf_counter()
        host.run(_graph(a, "comfy_astar", WARMUP_SIZE, 1, 1.0, seed=SEED + 1))  # loads everything; identical for every config
        warmup_s = time.perf_counter() - t
        first_safe = list(stats["autograd_safe"])
        stats["passes"].clear(), stats["autograd_safe"].clear(), stats["saved"].clear()
        with Meter(a.device) as m:
            host.run(_graph(a, kind, a.size, a.steps, a.guidance_end))
        out = dict(m.result, warmup_s=warmup_s, torch_threads=torch.get_num_threads())
        out["autograd_safe_first_call"] = {"seconds": sum(s for s, _ in first_safe),
                                           "tensors_replaced": sum(n for _, n in first_safe)}
        if stats["autograd_safe"]:
            calls = stats["autograd_safe"]
            out["autograd_safe_later_calls"] = {"calls": len(calls), "total_s": sum(s for s, _ in calls),
                                                "tensors_replaced": sum(n for _, n in calls)}
        watched = [p.stats for p in stats["saved"] if p.recast_weight_casts]  # hooks only where weights are cast
        if watched:
            out["saved_tensors_per_pass"] = {"kept_mib_max": max(s.kept_bytes for s in watched) / 2 ** 20,
                                             "recast_mib_max": max(s.recast_bytes for s in watched) / 2 ** 20,
                                             "recast_weights_max": max(s.recast_count for s in watched)}
        if stats["passes"]:
            out["guidance_passes"] = {"full": sum(p.full_passes for p in stats["passes"]),
                                      "lean": sum(p.lean_passes for p in stats["passes"]),
                                      "stop_after_layers": [list(k) for k in (stats["passes"][-1].layers or ())]}
        return out


def components_worker(a) -> dict:
    """Inside one guidance step of a real run: forward / full pass / lean pass, interleaved reps."""
    import torch
    with tempfile.TemporaryDirectory(prefix="astar-bench-") as tmp:
        hosts, host = _comfy_host(a, Path(tmp))
        guided = hosts.pack_module("nodes.sampling_wrapper")
        guidance = hosts.pack_module("attention.guidance")
        stats = _instrument(hosts)  # the run's GuidancePasses, whose lean switch each timed pass sets
        host.run(_graph(a, "comfy_astar", WARMUP_SIZE, 1, 1.0, seed=SEED + 1))
        times = {"forward_cond_nograd": [], "guidance_pass_full": [], "guidance_pass_lean": [],
                 "guidance_pass_lean_onednn": []}
        grads = {}
        real_step = guided.guided_step

        def sync():
            if a.device == "cuda":
                torch.cuda.synchronize()

        def one(z, maps_fn, prev, config, lean, grad):
            passes = stats["passes"][-1]  # the current run's
            passes.lean = lean
            try:
                sync()
                t = time.perf_counter()
                with torch.inference_mode(False):
                    if grad:
                        with torch.enable_grad():
                            leaf = z.detach().clone().requires_grad_(True)
                            loss = guidance.guidance_losses(maps_fn(leaf), prev, config)["total"].sum()
                            (g,) = torch.autograd.grad(loss, leaf)
                    else:
                        with torch.no_grad():
                            maps_fn(z.detach().clone())
                        g = None
                sync()
                return time.perf_counter() - t, g
            finally:
                passes.lean = True

        def spy(z, maps_fn, step_size, prev_masks, config, **kw):
            one(z, maps_fn, prev_masks, config, lean=False, grad=True)  # warm this size up, learn layers
            for _ in range(a.component_reps):
                times["forward_cond_nograd"].append(one(z, maps_fn, prev_masks, config, False, False)[0])
                t, grads["full"] = one(z, maps_fn, prev_masks, config, False, True)
                times["guidance_pass_full"].append(t)
                t, grads["lean"] = one(z, maps_fn, prev_masks, config, True, True)
                times["guidance_pass_lean"].append(t)
                # the lean pass with CPU convolutions on oneDNN, as before attention/cpu_convolutions.py
                direct, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, True
                try:
                    times["guidance_pass_lean_onednn"].append(one(z, maps_fn, prev_masks, config, True, True)[0])
                finally:
                    torch.backends.mkldnn.enabled = direct
            return real_step(z, maps_fn, step_size, prev_masks, config, **kw)

        guided.guided_step = spy
        host.run(_graph(a, "comfy_astar", a.size, 1, 1.0))
        med = {k: statistics.median(v) for k, v in times.items()}
        fwd = med["forward_cond_nograd"]
        return {"seconds": times, "median_s": med,
                "full_pass_in_forwards": med["guidance_pass_full"] / fwd,
                "lean_pass_in_forwards": med["guidance_pass_lean"] / fwd,
                "lean_over_full": med["guidance_pass_lean"] / med["guidance_pass_full"],
                "gradients_bitwise_equal": bool(torch.equal(grads["full"], grads["lean"])),
                "gradients_max_abs_diff": float((grads["full"] - grads["lean"]).abs().max())}


# ----------------------------------------------------------------------------------------------
# diffusers workers
# ----------------------------------------------------------------------------------------------

def _diffusers_dir() -> Path:
    home = Path(os.environ.get("ASTAR_HOME", Path.home() / ".cache" / "astar-comfyui"))
    return home / "bench-diffusers" / "sd15-random-s0"


def build_diffusers_models(a) -> Path:
    """Random-weight SD1.5-configuration models for diffusers (UNet, VAE, CLIP-L text encoder from
    ComfyUI's sd1_clip_config.json, DDIM scheduler), built once and cached (fp32)."""
    out = _diffusers_dir()
    if (out / "done").exists():
        return out
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    sys.path.insert(0, str(TESTS_DIR))
    from support.host import comfy_root
    comfy = comfy_root() / "comfy"
    torch.manual_seed(0)
    # SD1.5's UNet: diffusers' defaults are its block layout; cross-attention dim 768, 8 heads.
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig.from_json_file(str(comfy / "sd1_clip_config.json")))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder), ("scheduler", scheduler)):
        part.save_pretrained(str(out / name))
    (out / "done").write_text("ok\n")
    return out


def sd15_tokenizer():
    """CLIP-L's tokenizer from the vocabulary files ComfyUI ships (its config says 8192 tokens, for
    ComfyUI's own chunking; SD1.5 pipelines need CLIP's 77)."""
    from transformers import CLIPTokenizer
    sys.path.insert(0, str(TESTS_DIR))
    from support.host import comfy_root
    return CLIPTokenizer.from_pretrained(str(comfy_root() / "comfy" / "sd1_tokenizer"), model_max_length=77)


def diffusers_worker(kind: str, a) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import diffusers
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionAttendAndExcitePipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel
    diffusers.utils.logging.set_verbosity_error()
    d = build_diffusers_models(a)
    dtype = torch.float16 if a.device == "cuda" else torch.float32
    parts = dict(unet=UNet2DConditionModel.from_pretrained(str(d / "unet"), torch_dtype=dtype),
                 vae=AutoencoderKL.from_pretrained(str(d / "vae"), torch_dtype=dtype),
                 text_encoder=CLIPTextModel.from_pretrained(str(d / "text_encoder"), torch_dtype=dtype),
                 tokenizer=sd15_tokenizer(),
                 scheduler=DDIMScheduler.from_pretrained(str(d / "scheduler")))
    cls = StableDiffusionAttendAndExcitePipeline if kind == "diffusers_ae" else StableDiffusionPipeline
    pipe = cls(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(a.device)
    pipe.set_progress_bar_config(disable=True)

    def call(size, steps, guided):
        kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_inference_steps=steps,
                  guidance_scale=CFG, generator=torch.Generator(a.device).manual_seed(SEED), output_type="latent")
        if kind == "diffusers_ae":
            # "a cat and a frog": <start> a cat and a frog -> cat 2, frog 5. max_iter_to_alter = guided steps;
            # refinement at A&E's points placed on this step count as the pack places them.
            kw.update(token_indices=[2, 5], max_iter_to_alter=guided, thresholds=ae_thresholds(steps),
                      scale_factor=int(STEP_SIZE), attn_res=(size // 32, size // 32))
        return pipe(**kw)

    calls = {"unet": 0}
    real_forward = pipe.unet.forward

    def counted_forward(*args, **kwargs):
        calls["unet"] += 1
        return real_forward(*args, **kwargs)

    pipe.unet.forward = counted_forward

    if kind == "diffusers_ae":
        ids = pipe.get_indices(PROMPT)
        assert ids[2].startswith("cat") and ids[5].startswith("frog"), ids
    t = time.perf_counter()
    call(WARMUP_SIZE, 1, 1)
    warmup_s = time.perf_counter() - t
    calls["unet"] = 0
    with Meter(a.device) as m:
        call(a.size, a.steps, a.guided)
    # one batched CFG forward per step; every other UNet call is a guidance pass (A&E's loss or refinement)
    passes = {"guidance_passes": {"full": calls["unet"] - a.steps, "lean": 0}} if kind == "diffusers_ae" else {}
    return dict(m.result, **passes, warmup_s=warmup_s, torch_threads=torch.get_num_threads(),
                diffusers_version=diffusers.__version__, scheduler="DDIMScheduler",
                weights_require_grad=any(p.requires_grad for p in pipe.unet.parameters()))


# ----------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------

def machine(a) -> dict:
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "python": platform.python_version(), "logical_cpus": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M).group(1).strip()
        info["ram_gib"] = round(int(re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
                                    .group(1)) / 2 ** 20, 1)
    except (OSError, AttributeError):
        pass
    probe = ("import json, torch, importlib.metadata as md\n"
             "v = {'torch': torch.__version__}\n"
             "for p in ('diffusers', 'transformers'):\n"
             "    try: v[p] = md.version(p)\n"
             "    except md.PackageNotFoundError: v[p] = None\n"
             "v['torch_threads'] = torch.get_num_threads()\n"
             f"if {a.device!r} == 'cuda': v['gpu'] = torch.cuda.get_device_name(0)\n"
             "print(json.dumps(v))")
    info.update(json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                          check=True).stdout.strip().splitlines()[-1]))
    sys.path.insert(0, str(TESTS_DIR))
    from support.host import comfy_root
    version = re.search(r'__version__\s*=\s*"([^"]+)"', (comfy_root() / "comfyui_version.py").read_text())
    info["comfyui"] = version.group(1) if version else None
    return info


def spawn(config: str, a, log) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, __file__, "--worker", config, "--worker-out", path, "--device", a.device, "--model", a.model,
           "--size", str(a.size), "--steps", str(a.steps), "--guidance-end", repr(a.guidance_end),
           "--component-reps", str(a.component_reps)] + (["--threads", str(a.threads)] if a.threads else [])
    t = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)} if a.threads else {}))
    proc = subprocess.run(cmd, cwd=str(PACK_DIR), stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {config} failed ({proc.returncode}); see {log.name}")
    result = json.loads(Path(path).read_text())
    os.unlink(path)
    result["process_s"] = time.perf_counter() - t
    return result


def summarize(runs: dict, configs, a) -> dict:
    s = {}
    for c in configs:
        rs = runs[c]
        s[c] = {"wall_s_median": statistics.median(r["wall_s"] for r in rs),
                "cpu_s_median": statistics.median(r["cpu_s"] for r in rs),
                "wall_s_min": min(r["wall_s"] for r in rs),
                "cpu_s_min": min(r["cpu_s"] for r in rs),
                "rss_peak_mib_max": max(r["rss_peak_mib"] for r in rs),
                "rss_increase_mib_max": max(r["rss_increase_mib"] for r in rs),
                "reps": len(rs)}
        if all("guidance_passes" in r for r in rs):  # full + lean passes of the last run (deterministic)
            s[c]["guidance_passes"] = rs[-1]["guidance_passes"]["full"] + rs[-1]["guidance_passes"]["lean"]
        if a.device == "cuda":
            s[c]["gpu_peak_mib_max"] = max(r["gpu_peak_mib"] for r in rs)
            s[c]["gpu_increase_mib_max"] = max(r["gpu_increase_mib"] for r in rs)
    ratios = {}
    for fam, plain in (("comfy", "comfy_plain"), ("diffusers", "diffusers_plain")):
        if plain not in s:
            continue
        p = s[plain]
        for c in configs:
            if c.startswith(fam + "_") and c != plain:
                step_wall = p["wall_s_median"] / a.steps
                r = {"wall": s[c]["wall_s_median"] / p["wall_s_median"],
                     "cpu": s[c]["cpu_s_median"] / p["cpu_s_median"],
                     "wall_min": s[c]["wall_s_min"] / p["wall_s_min"],
                     "cpu_min": s[c]["cpu_s_min"] / p["cpu_s_min"],
                     "rss_peak": s[c]["rss_peak_mib_max"] / p["rss_peak_mib_max"],
                     "rss_increase": s[c]["rss_increase_mib_max"] / max(p["rss_increase_mib_max"], 1.0),
                     # extra wall time per guided step, in plain sampling steps (one CFG step = a batch-2 UNet forward)
                     "guided_step_extra_in_plain_steps": ((s[c]["wall_s_median"] - p["wall_s_median"])
                                                          / max(a.guided, 1)) / step_wall}
                if a.device == "cuda":
                    r["gpu_peak"] = s[c]["gpu_peak_mib_max"] / p["gpu_peak_mib_max"]
                ratios[c] = r
    return {"per_config": s, "ratios_to_plain": ratios}


def table(summary: dict, components: dict | None, a) -> str:
    s, r = summary["per_config"], summary["ratios_to_plain"]
    lines = [f"{'configuration':<26}{'wall s':>9}{'cpu s':>9}{'x plain':>9}{'cpu x':>7}{'min x':>7}{'cpu min x':>10}"
             f"{'peak RSS MiB':>14}{'+MiB':>8}{'x peak':>8}{'step+ (plain steps)':>21}{'passes':>8}"]
    for c, v in s.items():
        rr = r.get(c, {})
        lines.append(f"{c:<26}{v['wall_s_median']:>9.1f}{v['cpu_s_median']:>9.1f}"
                     f"{rr.get('wall', 1.0):>9.3f}{rr.get('cpu', 1.0):>7.3f}{rr.get('wall_min', 1.0):>7.3f}"
                     f"{rr.get('cpu_min', 1.0):>10.3f}{v['rss_peak_mib_max']:>14.0f}"
                     f"{v['rss_increase_mib_max']:>8.0f}{rr.get('rss_peak', 1.0):>8.3f}"
                     f"{rr.get('guided_step_extra_in_plain_steps', 0.0):>21.2f}{v.get('guidance_passes', 0):>8}")
    if components:
        m = components["median_s"]
        lines.append(f"guidance pass at {a.size} px: forward (cond, batch 1, no grad) {m['forward_cond_nograd']:.2f} s; "
                     f"full pass {m['guidance_pass_full']:.2f} s = {components['full_pass_in_forwards']:.2f} forwards; "
                     f"lean pass {m['guidance_pass_lean']:.2f} s = {components['lean_pass_in_forwards']:.2f} forwards; "
                     f"gradients bitwise equal: {components['gradients_bitwise_equal']}"
                     + (f"; lean pass on oneDNN {m['guidance_pass_lean_onednn']:.2f} s"
                        if "guidance_pass_lean_onednn" in m else ""))
    return "\n".join(lines)


def orchestrate(a) -> None:
    configs = list(a.configs)
    unknown = [c for c in configs if c not in COMFY_CONFIGS + DIFFUSERS_CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {COMFY_CONFIGS + DIFFUSERS_CONFIGS}")
    if a.model != "sd15" and any(c in DIFFUSERS_CONFIGS for c in configs):
        raise SystemExit(f"the diffusers configurations are SD1.5 only (diffusers has no Attend-and-Excite "
                         f"pipeline for {a.model}); drop them from --configs")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out_json = RESULTS_DIR / f"{a.name}.json"
    log_path = Path(a.log or (tempfile.gettempdir() + f"/bench_overhead-{a.name}.log"))
    info = machine(a)
    print(f"machine: {info}\nworker log: {log_path}", flush=True)
    with open(log_path, "a") as log:
        subprocess.run([sys.executable, __file__, "--worker", "prepare", "--device", a.device, "--model", a.model,
                        "--with-diffusers", str(int(any(c in DIFFUSERS_CONFIGS for c in configs)))],
                       cwd=str(PACK_DIR), stdout=log, stderr=subprocess.STDOUT, check=True)
        components, runs, order, first_rep = None, {c: [] for c in configs}, [], 0
        if a.resume and out_json.exists():
            old = json.loads(out_json.read_text())
            same = {k: old["settings"].get(k, "sd15" if k == "model" else None)
                    for k in ("device", "model", "size_px", "steps", "guided_steps")}
            if same != {"device": a.device, "model": a.model, "size_px": a.size, "steps": a.steps,
                        "guided_steps": a.guided}:
                raise SystemExit(f"--resume: {out_json} has other settings {same}")
            components, order = old.get("components"), list(old["settings"]["order"])
            for c, rs in old["runs"].items():
                runs.setdefault(c, []).extend(rs)
            configs = [c for c in runs if runs[c] or c in configs]
            first_rep = 1 + max(r["rep"] for rs in runs.values() for r in rs)
            info["resumed_at_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            info["date_utc"] = old["machine"]["date_utc"]
        elif a.component_reps > 0 and any(c in COMFY_CONFIGS for c in configs):
            components = spawn("components", a, log)
            print(f"components: {json.dumps(components['median_s'])}", flush=True)
        todo = [c for c in a.configs]
        for rep in range(first_rep, first_rep + a.reps):
            k = rep % len(todo)
            for c in todo[k:] + todo[:k]:  # interleaved, rotated each repetition
                res = spawn(c, a, log)
                res["rep"], res["order"] = rep, len(order)
                order.append(c)
                runs[c].append(res)
                print(f"rep {rep} {c:<26} wall {res['wall_s']:7.1f} s  cpu {res['cpu_s']:7.1f} s  "
                      f"peak RSS {res['rss_peak_mib']:7.0f} MiB (+{res['rss_increase_mib']:.0f})  "
                      f"load {res['loadavg_1min_start']:.1f}->{res['loadavg_1min_end']:.1f}", flush=True)
                summary = summarize({c2: v for c2, v in runs.items() if v}, [c2 for c2 in configs if runs[c2]], a)
                doc = {"benchmark": "bench_overhead", "machine": info,
                       "settings": {"device": a.device, "model": a.model, "size_px": a.size, "steps": a.steps, "guided_steps": a.guided,
                                    "guidance_window": [0.0, a.guidance_end],
                                    "refinement": {"comfy_astar": "off (A-STAR mode)", "comfy_ae": "A&E's: 0:0.05, 0.2:0.5, 0.4:0.8, <= 20 iterations",
                                                   "diffusers_ae": {str(k): v for k, v in ae_thresholds(a.steps).items()}},
                                    "cfg": CFG, "seed": SEED, "step_size": STEP_SIZE,
                                    "prompt": PROMPT, "concepts": CONCEPTS, "comfy_sampler": "euler/normal",
                                    "comfy_attention_resolution": "1/32", "comfy_checkpoint": f"{CKPTS[a.model]} (exact {a.model} layout, random weights"
                                                        + (", UNet weights fp16)" if a.model == "sdxl" else ")"),
                                    "diffusers_scheduler": "DDIM", "order": order,
                                    "threads_per_worker": a.threads or "torch default"},
                       "method": {"timing": "each configuration in its own fresh subprocess; model load and an identical "
                                            "warm-up are not timed; wall and process CPU time of the sampling call "
                                            "(ComfyUI: the executor running the sampler node; diffusers: the pipeline "
                                            "call, output_type='latent', text encoding included); medians over reps",
                                  "memory": "CPU: VmHWM after /proc/self/clear_refs reset at the start of the timed run "
                                            "(absolute peak RSS, and its increase over the loaded-model RSS at that "
                                            "moment); GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats",
                                  "guided_step_extra_in_plain_steps": "(wall - plain wall) / guided steps / (plain wall / steps)"},
                       "summary": summary, "components": components, "runs": runs}
                out_json.write_text(json.dumps(doc, indent=1))
    print(table(summary, components, a))
    print(f"wrote {out_json}")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g}: give a fraction of the noise schedule, 0 to 1")
    return value


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", choices=list(CKPTS), default="sd15",
                    help="sd15: exact SD1.5 layout (with the diffusers peer); sdxl: exact SDXL base layout")
    ap.add_argument("--size", type=int, default=None,
                    help="image side in px (default 256 on CPU; on cuda 512 for sd15, 1024 for sdxl)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-end", type=_fraction, default=0.5, metavar="FRACTION",
                    help="A-STAR guides the window 0 to FRACTION of the noise schedule: with the normal scheduler "
                         "the steps i with i / (steps - 1) < FRACTION (default %(default)s: 25 of 50); diffusers' "
                         "A&E pipeline guides as many (max_iter_to_alter)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--component-reps", type=int, default=3, help="reps of the in-step components run (0: skip it)")
    ap.add_argument("--configs", nargs="+", default=None, help="default: all of the model's configurations")
    ap.add_argument("--name", default=None, help="results/<name>.json (default <device>-<model>-<size>px-<steps>steps)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch/OpenMP threads per worker (default: torch's). On a shared machine, 1 avoids "
                         "OpenMP threads spinning on cores other jobs hold; the same for every configuration")
    ap.add_argument("--resume", action="store_true",
                    help="add --reps more repetitions to an existing results/<name>.json (same settings)")
    ap.add_argument("--log", default=None, help="worker log file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--with-diffusers", default="1", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.size = a.size or DEFAULT_SIZES[a.device, a.model]
    a.name = a.name or f"{a.device}-{a.model}-{a.size}px-{a.steps}steps"
    a.configs = a.configs or list(DEFAULT_CONFIGS[a.model])
    a.guided = guided_count(a.steps, a.guidance_end)
    if a.worker is None:
        return orchestrate(a)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    if a.worker == "prepare":
        sys.path.insert(0, str(TESTS_DIR))
        from support import host as hosts
        from support import models
        path = hosts.models_dir() / "checkpoints" / CKPTS[a.model]
        if a.model == "sdxl":
            models.build_sdxl_checkpoint(path, seed=0)
        else:
            models.build_sd15_checkpoint(path, layout="full", seed=0)
        if a.with_diffusers == "1":
            build_diffusers_models(a)
        return
    if a.worker == "components":
        result = components_worker(a)
    elif a.worker in COMFY_CONFIGS:
        result = comfy_worker(a.worker, a)
    elif a.worker in DIFFUSERS_CONFIGS:
        result = diffusers_worker(a.worker, a)
    else:
        raise SystemExit(f"unknown worker {a.worker}")
    Path(a.worker_out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
