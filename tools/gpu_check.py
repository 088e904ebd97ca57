"""The GPU check: proves and times the pack on CUDA through the real ComfyUI executor (docs/gpu-check.md).

  python tools/gpu_check.py                 # CUDA: both ComfyUI hosts, exact layouts, timings
  python tools/gpu_check.py --dry-run       # CPU: the same jobs at tiny sizes (mini SD1.5, 64 px, few steps)

Proofs (each printed PASS, FAIL or SKIP; any FAIL, or a job that crashed, makes the exit status 1):
  step0        A-STAR KSampler / A-STAR Apply with step size 0 = the stock KSampler, bit for bit (SD1.5 exact
               layout, SDXL base, the Flux.1-dev test model; weights in the dtype ComfyUI picks there)
  lowers       one guided update lowers the loss (refinement capped at one iteration: loss before/after)
  maps         the probabilities the pack records equal softmax(q k^T / sqrt(d)) computed here in float64 from
               the q and k a chained patch captured in a real run; the unscaled softmax must miss that tolerance
  fp8          UNet weights loaded as fp8_e4m3fn_fast: a guided run moves the latent away from its step-size-0
               run, or the pack refuses with an error message
  dynamic      ComfyUI 0.19+ with dynamic VRAM (its default on NVIDIA): the guided run completes on the dynamic
               patcher and its latent equals the run with --disable-dynamic-vram within fp tolerance
Timings (interleaved repetitions, median; peak VRAM = torch.cuda.max_memory_allocated): SD1.5 512 px 50 steps
(25 guided): plain, A-STAR, A&E mode, and diffusers' plain and A&E pipelines; SDXL 1024 px 30 steps; Flux.1-dev
widths with all 19 double and 38 single blocks (random bf16) at 1024 px, 20 steps. Wall ratio to plain.

Every job runs in its own process (one ComfyUI per process; dynamic VRAM is a process-wide switch). Writes
<out>/gpu-<date>-<gpu>.json (--dry-run: gpu-check-dry-run.json) and prints a table.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.abc
import importlib.metadata
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
TESTS_DIR = PACK_DIR / "tests"
RESULTS_DIR = PACK_DIR / "benchmarks" / "results"
IMAGE_PACKAGES = Path(__file__).with_name("gpu_check_image_packages.txt")
# Distributions tools/prepare_gpu_carry.sh carries as wheels (tests/host/test_gpu_check.py keeps them equal).
CARRIED = ("av", "comfy-aimdo", "torchsde", "trampoline", "comfy-kitchen", "diffusers", "importlib-metadata")

MINI, FULL = "astar-test-sd15-mini.safetensors", "astar-test-sd15-full.safetensors"
FLUX_FILE = "astar-test-flux1-dev-d1s1.safetensors"
PROMPT, CONCEPTS = "a cat and a frog", "cat, frog"

# What each mode runs. The dry run keeps every job and code path at sizes a 2-core CPU runs in about 2 minutes.
PLANS = {
    "cuda": {"sd15": {"ckpt": FULL, "layout": "full", "size": 512, "resolution": "1/32"},
             "flux_test_size": 256, "sdxl_size": 1024, "sdxl": True, "proof_steps": 4, "proof_guided": 2,
             "timing": {"sd15": (512, 50, 25), "sdxl": (1024, 30, 15), "flux": (1024, 20, 10)},
             "flux_blocks": (19, 38), "flux_test_steps": (3, 2), "reps": 3, "warmup": True, "diffusers": True,
             "max_refine_iters": 20},
    "dry": {"sd15": {"ckpt": MINI, "layout": "mini", "size": 64, "resolution": "1/16"},
            "flux_test_size": 64, "sdxl_size": 128, "sdxl": False, "proof_steps": 3, "proof_guided": 2,
            "timing": {"sd15": (64, 4, 2), "sdxl": None, "flux": (64, 1, 1)},
            "flux_blocks": (1, 1), "flux_test_steps": (2, 1), "reps": 1, "warmup": False, "diffusers": False,
            "max_refine_iters": 1},
}
GUIDED_STEP_SIZE = 400.0  # random weights give small gradients: the update must dwarf fp noise (test_guided.py)


# ----------------------------------------------------------------------------------------------------------------
# the package set of the GPU image, enforced in the dry run
# ----------------------------------------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def allowed_distributions() -> set[str]:
    """The image's distributions and the carried ones, with everything they require here (this venv's
    versions may need other helpers, e.g. huggingface_hub's HTTP client): what the GPU machine will have."""
    lines = IMAGE_PACKAGES.read_text().splitlines()
    todo = [_norm(x) for x in lines if x.strip() and not x.startswith("#")] + [_norm(x) for x in CARRIED]
    allowed = set()
    while todo:
        name = todo.pop()
        if name in allowed:
            continue
        allowed.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" not in req:
                todo.append(_norm(re.split(r"[\s;<>=!~\[(]", req.strip(), maxsplit=1)[0]))
    return allowed


class ImageOnlyImports(importlib.abc.MetaPathFinder):
    """Refuses a top-level import whose distribution the GPU image will not have (as ModuleNotFoundError,
    which ComfyUI handles as it would there: optional nodes are skipped with a warning)."""

    def __init__(self):
        self.allowed = allowed_distributions()
        self.owner = {top: [_norm(d) for d in dists] for top, dists in importlib.metadata.packages_distributions().items()}
        self.refused: set[str] = set()
        local = [Path(os.environ.get("COMFYUI_ROOT", "")), TESTS_DIR, PACK_DIR]  # ComfyUI's own `utils`, `app`, ...
        self.local = {p.stem for d in local if str(d) and d.is_dir() for p in d.iterdir()}

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        dists = None if top in self.local else self.owner.get(top)
        if dists and not any(d in self.allowed for d in dists):
            self.refused.add(dists[0])
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU image, not carried)", name=name)
        return None


def imported_distributions() -> list[str]:
    owner = importlib.metadata.packages_distributions()
    return sorted({_norm(d) for m in list(sys.modules) for d in owner.get(m.split(".")[0], [])})


# ----------------------------------------------------------------------------------------------------------------
# worker side: host, models, checks
# ----------------------------------------------------------------------------------------------------------------

class Checks:
    def __init__(self, label: str):
        self.label, self.items = label, []

    def run(self, name: str, fn, *args, **kwargs):
        """fn returns (passed: bool | None for skipped, detail, data). An exception is a FAIL with its message."""
        t = time.perf_counter()
        try:
            passed, detail, data = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
            passed, detail, data = False, f"{type(e).__name__}: {e}"[:600], {"traceback": traceback.format_exc()[-3000:]}
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[passed]
        self.items.append({"host": self.label, "check": name, "status": status, "detail": detail,
                           "seconds": round(time.perf_counter() - t, 2), **({"data": data} if data else {})})
        print(f"[gpu_check] {status} {self.label} {name} ({self.items[-1]['seconds']} s): {detail}", flush=True)
        return data


def sync(cuda: bool):
    if cuda:
        import torch
        torch.cuda.synchronize()


def setup_host(work: Path, cuda: bool, disable_dynamic: bool):
    """ComfyUI in this process (tests/support/host.py InProcessHost), with dynamic VRAM switched as ComfyUI's
    main.py switches it: comfy-aimdo initialised before CUDA, then the dynamic patcher made the core one."""
    sys.path.insert(0, str(TESTS_DIR))
    from support import host as hosts
    root = str(hosts.comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.cli_args as cli
    cli.args.cpu = not cuda
    if hasattr(cli.args, "disable_dynamic_vram"):
        cli.args.disable_dynamic_vram = disable_dynamic
    aimdo = None
    if cuda and hasattr(cli, "enables_dynamic_vram") and cli.enables_dynamic_vram():
        import comfy_aimdo.control as aimdo
        aimdo.init()
    host = hosts.InProcessHost(work, cpu=not cuda)
    dynamic = False
    if aimdo is not None:
        import comfy.memory_management
        import comfy.model_management as mm
        import comfy.model_patcher
        if mm.is_nvidia() and not mm.is_wsl() and mm.torch_version_numeric >= (2, 8) \
                and aimdo.init_device(mm.get_torch_device().index):
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
            dynamic = True
    return hosts, host, dynamic


def draw_on_gpu():
    """The test suite's model builders draw each tensor with its own seeded CPU generator; on a GPU machine draw
    it on the GPU from the same seed instead (seconds for 12 B parameters, not minutes). Other bytes than the
    CPU builders', so the check keeps its own model cache (gpu_check.sh sets ASTAR_TEST_MODELS)."""
    import torch
    from support import models as M

    def normal_(t, std, gen):
        g = torch.Generator(device="cuda").manual_seed(gen.initial_seed())
        flat = t.view(-1)
        for start in range(0, flat.numel(), 1 << 26):
            part = flat[start:start + (1 << 26)]
            part.copy_(torch.randn(part.numel(), device="cuda", generator=g).mul_(std))

    M._normal_ = normal_


def sd15_run(host, ckpt, sampler="AStarKSampler", **kw):
    from support.graphs import sd15_graph
    g = sd15_graph(ckpt, decode=False, sampler=sampler, **kw)
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return host.run(g)["sampler"]


def trace_lowered(rec, label):
    trace = rec.steps[0].trace
    ok = trace is not None and trace.shape[0] == 2 and bool((trace[1] < trace[0]).all())
    return ok, f"{label} loss before/after one update {[[round(float(x), 6) for x in row] for row in trace.T]}" \
        if trace is not None else f"{label}: no trace"


def explicit_probs(q, k, heads, scaled=True):
    """[B, Nq, H*d], [B, Nk, H*d] -> [B, Nq, Nk] float64: softmax(q k^T / sqrt(d)) per head, mean over heads."""
    d = q.shape[-1] // heads
    qh = q.double().unflatten(-1, (heads, d)).transpose(1, 2)
    kh = k.double().unflatten(-1, (heads, d)).transpose(1, 2)
    logits = qh @ kh.transpose(-1, -2) * (d ** -0.5 if scaled else 1.0)
    return logits.softmax(-1).mean(1)


def compare_maps(got, want, wrong, cuda):
    """Tolerance: float32 probabilities of fp16/bf16 q and k against float64 (CUDA matmuls may round more);
    it must be at least 10 times smaller than the difference of the unscaled softmax, a wrong rule."""
    rtol, atol = (1e-3, 1e-5) if cuda else (1e-5, 1e-6)
    err = float(((got.double() - want).abs() - rtol * want.abs()).max())
    miss = float((wrong - want).abs().max())
    return err <= atol and miss > 10 * (atol + rtol * float(want.abs().max())), err, miss


class Sd15Proofs:
    def __init__(self, hosts, host, plan, cuda, checks):
        self.hosts, self.host, self.plan, self.cuda, self.checks = hosts, host, plan, cuda, checks
        p = plan["sd15"]
        self.ckpt, self.common = p["ckpt"], {"size": p["size"], "resolution": p["resolution"]}
        from support.models import build_sd15_checkpoint
        build_sd15_checkpoint(hosts.models_dir() / "checkpoints" / self.ckpt, layout=p["layout"], seed=0)

    def step0(self):
        steps, guided = self.plan["proof_steps"], self.plan["proof_guided"]
        stock = sd15_run(self.host, self.ckpt, sampler="KSampler", steps=steps, seed=7, **self.common)[0]["samples"]
        latent, rec = sd15_run(self.host, self.ckpt, steps=steps, seed=7, guided_steps=guided, step_size=0.0,
                               **self.common)
        same = bool(stock.shape == latent["samples"].shape and (stock == latent["samples"]).all())
        computed = sum(1 for s in rec.steps if s.losses)
        return same and computed == guided, (f"bitwise {same}, {computed} of {guided} steps computed their loss, "
                                             f"dtype {stock.dtype}"), {}

    def lowers(self):
        details, ok = [], True
        for mode in ("astar", "attend_excite"):
            _, rec = sd15_run(self.host, self.ckpt, steps=2, guided_steps=1, batch=2, mode=mode, step_size=0.5,
                              refine="on", refine_thresholds="0:1.0", max_refine_iters=1, **self.common)
            good, text = trace_lowered(rec, mode)
            ok, details = ok and good, details + [text]
        return ok, "; ".join(details), {}

    def maps(self):
        import torch
        patch = self.hosts.pack_module("nodes.attention_patch")
        capture = self.hosts.pack_module("attention.capture")
        maps = self.hosts.pack_module("attention.maps")
        import comfy.ldm.modules.attention as comfy_attention
        calls = []

        class QKSink(self.hosts.Attn2ReplaceNode):
            def replace(self, q, k, v, extra, **kwargs):
                if len(calls) < 16 and len(extra["cond_or_uncond"]) == 2:
                    keep = {key: extra[key] for key in ("original_shape", "activations_shape", "cond_or_uncond",
                                                        "n_heads", "block", "block_index", "attn_precision")}
                    calls.append((q.clone(), k.clone(), v.clone(), keep))
                return comfy_attention.optimized_attention(q, k, v, extra["n_heads"])

        self.host.nodes.NODE_CLASS_MAPPINGS["AStarGpuCheckQKSink"] = QKSink
        from support.graphs import sd15_graph
        g = sd15_graph(self.ckpt, sampler="KSampler", steps=1, seed=5, decode=False, size=self.common["size"])
        g["sink"] = {"class_type": "AStarGpuCheckQKSink", "inputs": {"model": ["ckpt", 0]}}
        g["sampler"]["inputs"]["model"] = ["sink", 0]
        g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
        self.host.run(g)
        if not calls:
            return False, "no cross-attention call was captured", {}
        worst, ok, layers = 0.0, True, 0
        for q, k, v, extra in calls:
            level = maps.downsample_level(tuple(extra["original_shape"][2:]), tuple(extra["activations_shape"][2:]))
            wanted = capture.GuidanceCapture(level=level)
            out = patch.AttentionCapturePatch()(q, k, v, dict(extra, **{patch.CAPTURES_KEY: [wanted]}))
            heads, cond = extra["n_heads"], extra["cond_or_uncond"].index(0)
            rows = slice(cond * q.shape[0] // 2, (cond + 1) * q.shape[0] // 2)
            want = explicit_probs(q[rows], k[rows], heads)
            good, err, miss = compare_maps(wanted.probs[0], want, explicit_probs(q[rows], k[rows], heads, False),
                                           self.cuda)
            same_out = bool(torch.equal(out, comfy_attention.optimized_attention(q, k, v, heads)))
            ok, worst, layers = ok and good and same_out, max(worst, err), layers + 1
        return ok, (f"{layers} layers of a {self.common['size']} px run: max error over tolerance {worst:.2e} "
                    f"(unscaled softmax off by {miss:.2e}); attention outputs unchanged"), {}

    def fp8(self):
        import torch
        from support.graphs import sd15_graph

        def run(step_size):
            g = sd15_graph(self.ckpt, decode=False, steps=self.plan["proof_steps"], guided_steps=self.plan["proof_guided"],
                           seed=3, step_size=step_size, **self.common)
            g["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": self.ckpt, "weight_dtype": "fp8_e4m3fn_fast"}}
            g["sampler"]["inputs"]["model"] = ["unet", 0]
            g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
            return self.host.run(g)["sampler"][0]["samples"]

        try:
            guided = run(GUIDED_STEP_SIZE)
        except self.hosts.GraphError as e:  # a refusal passes only if it says what is refused
            return bool(re.search(r"fp8|float8", str(e), re.I)), f"refused: {e}", {}
        still = run(0.0)
        import comfy.model_management as mm
        ops = sorted({type(m).__qualname__ for lm in mm.current_loaded_models for m in lm.model.model.modules()
                      if type(m).__name__ == "Linear"})
        moved = float((guided - still).abs().max())
        ok = bool(torch.isfinite(guided).all()) and moved > 1e-2
        return ok, f"guided latent moved {moved:.3g} from its step-size-0 run; linear ops {ops}", {"ops": ops}

    def guided_latent(self):
        """The latent of a guided run (for the dynamic-VRAM comparison) and of its step-size-0 run."""
        kw = dict(steps=self.plan["proof_steps"], guided_steps=self.plan["proof_guided"], seed=9, **self.common)
        guided = sd15_run(self.host, self.ckpt, step_size=GUIDED_STEP_SIZE, **kw)[0]["samples"]
        still = sd15_run(self.host, self.ckpt, step_size=0.0, **kw)[0]["samples"]
        import comfy.model_management as mm
        patchers = sorted({type(lm.model).__name__ for lm in mm.current_loaded_models})
        dynamic = any(getattr(lm.model, "is_dynamic", lambda: False)() for lm in mm.current_loaded_models)
        return guided, still, patchers, dynamic


def release(host):
    import comfy.model_management
    host.executor.reset()
    comfy.model_management.unload_all_models()
    host.collect_garbage()


class FluxProofs:
    """The Flux.1-dev test model (exact widths, 1 double + 1 single block, tests/support/dit_models.py) through
    UNETLoader, the small text encoders behind ComfyUI's tokenizers, A-STAR Apply and the stock KSampler."""

    def __init__(self, hosts, host, plan, cuda, objects):
        from support import dit_models as D
        self.hosts, self.host, self.cuda, self.objects = hosts, host, cuda, objects
        self.size, (self.steps, self.guided) = plan["flux_test_size"], plan["flux_test_steps"]
        D.build_flux_checkpoint(hosts.models_dir() / "checkpoints" / FLUX_FILE)
        objects["flux_clip"] = D.flux_clip(seed=0)

    def graph(self, steps=3, apply=None, hook=None):
        g = {"model": {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_FILE, "weight_dtype": "default"}},
             "clip": {"class_type": "AStarTestClip", "inputs": {"name": "flux_clip"}},
             "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
             "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}},
             "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": self.size, "height": self.size,
                                                                        "batch_size": 1}}}
        source = ["model", 0]
        if hook:
            g["hook"] = {"class_type": "AStarTestJointHook", "inputs": {"model": source, "blocks": "", "installs": 1,
                                                                       **hook}}
            source = ["hook", 0]
        if apply is not None:
            from support.graphs import guidance_settings
            # joint models keep attention_resolution's default; the window is on the "simple" scheduler's clock
            g["apply"] = {"class_type": "AStarApply", "inputs": {
                "model": source, **guidance_settings(**{"resolution": "1/32", "scheduler": "simple", **apply})}}
            source = ["apply", 0]
        g["sampler"] = {"class_type": "KSampler", "inputs": {
            "model": source, "seed": 3, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
        g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
        return g

    def step0(self):
        stock = self.host.run(self.graph(steps=self.steps))["sampler"][0]["samples"]
        out = self.host.run(self.graph(steps=self.steps, apply=dict(guided_steps=self.guided, steps=self.steps,
                                                                    step_size=0.0)))
        latent, rec = out["sampler"][0]["samples"], out["apply"][1][-1]
        same = bool(stock.shape == latent.shape and (stock == latent).all())
        computed = sum(1 for r in rec.steps if r.losses)
        return same and computed == self.guided, (f"bitwise {same}, {computed} of {self.guided} steps computed their "
                                                  f"loss, dtype {stock.dtype}"), {}

    def lowers(self):
        out = self.host.run(self.graph(steps=2, apply=dict(guided_steps=1, steps=2, step_size=2.0, refine="on",
                                                           refine_thresholds="0:1.0", max_refine_iters=1)))
        ok, text = trace_lowered(out["apply"][1][-1], "astar")
        return ok, text, {}

    def maps(self):
        """A test override under the pack's joint hook keeps q and k of every joint call; the sink receives the
        pack's probabilities of the read blocks (image rows x text columns, mean over heads)."""
        n_img = (self.size // 16) ** 2
        calls, records = [], []

        def qk(func, *args, **kwargs):
            options = kwargs["transformer_options"]
            q, k = args[0], args[1]
            heads = args[3] if len(args) > 3 else kwargs["heads"]
            if not kwargs.get("skip_reshape", False):
                q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
            if "block_type" in options and q.shape[2] > n_img:
                calls.append(((options["block_type"], options["block_index"]), q.detach().clone(), k.detach().clone()))
            return func(*args, **kwargs)

        class Sink:  # an AttentionSink (attention/capture.py)
            level, uuids, complete = None, None, False

            def record(self, key, probs, grid_hw, step, **kwargs):
                records.append((key, probs.detach().clone()))

        self.objects["gpu_check_qk"], self.objects["gpu_check_sink"] = qk, Sink()
        self.host.run(self.graph(steps=1, hook={"capture": "gpu_check_qk", "sink": "gpu_check_sink"}))
        if not records:
            return False, "the sink received no probabilities", {}
        ok, worst, miss = True, 0.0, 0.0
        by_key = {}
        for key, q, k in calls:
            by_key.setdefault(key, (q, k))
        for key, probs in records:
            q, k = by_key[key]
            n_txt = q.shape[2] - n_img

            def explicit(scaled):
                logits = q.double() @ k.double().transpose(-1, -2) * (q.shape[-1] ** -0.5 if scaled else 1.0)
                return logits.softmax(-1)[:, :, n_txt:, :n_txt].mean(1)

            good, err, m = compare_maps(probs, explicit(True), explicit(False), self.cuda)
            ok, worst, miss = ok and good, max(worst, err), max(miss, m)
        return ok, (f"{len(records)} blocks at {self.size} px: max error over tolerance {worst:.2e} "
                    f"(unscaled softmax off by {miss:.2e})"), {}


class SdxlProofs:
    """The exact SDXL base UNet (random fp16 weights, tests/support/models.py), loaded through ComfyUI's
    diffusion-model loader so it gets the patcher users get, sampled with comfy.sample.sample under inference
    mode as the executor runs nodes; random conditioning with the real tokenizer's token positions."""

    def __init__(self, hosts, host, size):
        from support.models import build_sdxl_model, sdxl_tokenizer
        import comfy.sd
        self.hosts, self.size = hosts, size
        built = build_sdxl_model(seed=0)
        sd = built.model.diffusion_model.state_dict()
        self.model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={})
        del built, sd
        prompt = hosts.pack_module("nodes.prompt")
        tokenizer = sdxl_tokenizer()
        self.tokens = prompt.PromptTokens(PROMPT, tokenizer.tokenize_with_weights(PROMPT), tokenizer)
        self.prompt = prompt

    def conds(self):
        from support.models import sdxl_conditioning
        positive = sdxl_conditioning(batch=1, seed=1, width=self.size, height=self.size)
        positive[0][1][self.prompt.PROMPT_KEY] = self.tokens
        return positive, sdxl_conditioning(batch=1, seed=2, width=self.size, height=self.size)

    def sample(self, steps, guided=None, seed=0, **guidance):
        import torch
        import comfy.sample
        positive, negative = self.conds()
        model, runs = self.model, None
        if guided is not None:
            from support.graphs import window_end
            sampler = self.hosts.pack_module("nodes.guidance_inputs")
            model, runs = sampler.build_guidance(self.model, CONCEPTS, "1/32", positive=positive,
                                                 guidance_end=window_end(guided, steps), **guidance)
        latent = torch.zeros(1, 4, self.size // 8, self.size // 8)
        with torch.inference_mode():
            out = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, 5.0, "euler", "normal",
                                      positive, negative, latent, seed=seed)
        return out, (runs[-1] if runs else None)

    def step0(self):
        stock, _ = self.sample(4)
        zero, rec = self.sample(4, guided=2, step_size=0.0)
        same = bool((stock == zero).all())
        return same and len(rec.steps) == 4, f"bitwise {same} at {self.size} px, dtype {self.model.model.get_dtype()}", {}

    def lowers(self):
        _, rec = self.sample(2, guided=1, step_size=0.5, refine="on", refine_thresholds="0:1.0", max_refine_iters=1)
        ok, text = trace_lowered(rec, "astar")
        return ok, text, {}


def proofs_worker(a, plan, cuda, out_dir: Path) -> dict:
    from safetensors.torch import save_file
    with tempfile.TemporaryDirectory(prefix="astar-gpu-check-") as tmp:
        hosts, host, dynamic = setup_host(Path(tmp), cuda, a.disable_dynamic_vram)
        if cuda:
            draw_on_gpu()
        import comfy.model_patcher
        label = f"{comfy_version(hosts)}{'+dynamic' if dynamic else ''}"
        checks = Checks(label)
        result = {"checks": checks.items, "dynamic_vram": dynamic,
                  "has_dynamic_vram": hasattr(comfy.model_patcher, "ModelPatcherDynamic")}
        sd15 = Sd15Proofs(hosts, host, plan, cuda, checks)
        if a.job == "guided":  # only the latent the dynamic-VRAM comparison needs
            guided, still, patchers, dyn = sd15.guided_latent()
        else:
            checks.run("sd15 step0", sd15.step0)
            checks.run("sd15 lowers", sd15.lowers)
            checks.run("sd15 maps", sd15.maps)
            checks.run("sd15 fp8", sd15.fp8)
            release(host)
            guided, still, patchers, dyn = sd15.guided_latent()
        path = out_dir / f"latent-{a.job}-{os.getpid()}.safetensors"
        save_file({"guided": guided.float().contiguous(), "still": still.float().contiguous()}, str(path))
        result.update(latent_file=str(path), patchers=patchers, ran_dynamic=dyn)
        release(host)
        if a.job == "guided":
            return result
        from support import dit_nodes
        objects = {}
        dit_nodes.register(host.nodes, objects, hosts.pack_module("nodes.joint_attention"))
        try:
            flux = FluxProofs(hosts, host, plan, cuda, objects)
            checks.run("flux-test step0", flux.step0)
            checks.run("flux-test lowers", flux.lowers)
            checks.run("flux-test maps", flux.maps)
        except Exception as e:  # noqa: BLE001 - a model that cannot be built is a failed proof, not a crash
            checks.run("flux-test", lambda: (False, f"{type(e).__name__}: {e}", {}))
        objects.clear()
        release(host)
        if plan["sdxl"]:
            try:
                sdxl = SdxlProofs(hosts, host, plan["sdxl_size"])
                checks.run("sdxl step0", sdxl.step0)
                checks.run("sdxl lowers", sdxl.lowers)
                del sdxl
            except Exception as e:  # noqa: BLE001
                checks.run("sdxl", lambda: (False, f"{type(e).__name__}: {e}", {}))
            release(host)
        else:
            checks.run("sdxl", lambda: (None, "skipped in the dry run (the exact SDXL UNet needs ~6 GB)", {}))
        return result


# ----------------------------------------------------------------------------------------------------------------
# timings
# ----------------------------------------------------------------------------------------------------------------

class Meter:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __enter__(self):
        import torch
        sync(self.cuda)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch
        sync(self.cuda)
        self.result = {"wall_s": time.perf_counter() - self.t0}
        if self.cuda:
            free, total = torch.cuda.mem_get_info()
            self.result.update(peak_allocated_mib=torch.cuda.max_memory_allocated() / 2 ** 20,
                               device_used_mib=(total - free) / 2 ** 20)
        return False


def interleaved(configs: dict, steps: int, reps: int, deadline: float, cuda: bool, warmup: bool = True) -> dict:
    """configs: name -> fn(seed, steps) running one sample. A 2-step warm-up of each, then repetitions in
    alternating order while the deadline allows (at least one). Returns name -> list of measurements."""
    runs = {c: [] for c in configs}
    for c, fn in configs.items():  # loads the models, picks the kernels for this size
        if warmup:
            fn(1000, 2)
    for rep in range(reps):
        t = time.perf_counter()
        for c in (list(configs) if rep % 2 == 0 else list(configs)[::-1]):
            with Meter(cuda) as m:
                configs[c](rep, steps)
            runs[c].append(m.result)
            print(f"[gpu_check] rep {rep} {c:<16} {m.result['wall_s']:7.2f} s", flush=True)
        if time.time() + (time.perf_counter() - t) > deadline:
            break
    return runs


def summarize(runs: dict, steps: int, guided: int) -> dict:
    s = {c: {"wall_s_median": statistics.median(r["wall_s"] for r in rs), "reps": len(rs),
             **({"peak_allocated_mib": max(r["peak_allocated_mib"] for r in rs),
                 "device_used_mib": max(r["device_used_mib"] for r in rs)} if "peak_allocated_mib" in rs[0] else {})}
         for c, rs in runs.items() if rs}
    for fam in ("comfy", "diffusers"):
        plain = s.get(f"{fam}_plain")
        for c, v in s.items():
            if plain and c.startswith(fam + "_"):
                v["x_plain"] = v["wall_s_median"] / plain["wall_s_median"]
    return {"steps": steps, "guided_steps": guided, "configs": s}


def flux_full_model(double: int, single: int):
    """Flux.1-dev at its widths with `double` + `single` blocks, random bf16 (tests/support/models.py's rule,
    norm scales 1), built in memory and loaded by ComfyUI's diffusion-model loader (the patcher users get)."""
    import dataclasses
    import torch
    import comfy.model_detection
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.flux.model import FluxParams
    from support import dit_models as D
    from support import models as M
    cfg = dict(D.FLUX_DEV, depth=double, depth_single_blocks=single)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        cfg["txt_ids_dims"] = []
    mc = comfy.model_detection.model_config_from_unet_config(dict(cfg))
    if type(mc) is not comfy.supported_models.Flux:
        raise RuntimeError(f"ComfyUI does not take this config for Flux: {type(mc).__name__}")
    mc.set_inference_dtype(torch.bfloat16, None)
    net = mc.get_model({}, device=torch.device("meta")).diffusion_model
    norms = {name for name, mod in net.named_modules() if "norm" in type(mod).__name__.lower()}
    sd = {}
    for name, p in net.named_parameters():
        module, _, leaf = name.rpartition(".")
        t = torch.empty(p.shape, dtype=torch.bfloat16)
        M._fill_parameter_(t, 0, f"flux-full/{name}", module in norms and leaf in ("weight", "scale"))
        sd[name] = t
    del net
    return comfy.sd.load_diffusion_model_state_dict(sd, model_options={})


def timing_worker(a, plan, cuda, out_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="astar-gpu-check-") as tmp:
        hosts, host, dynamic = setup_host(Path(tmp), cuda, a.disable_dynamic_vram)
        if cuda:
            draw_on_gpu()
        from support import dit_nodes
        from support.graphs import sd15_graph, window_end
        objects = {}
        dit_nodes.register(host.nodes, objects, hosts.pack_module("nodes.joint_attention"))
        result = {"comfyui": comfy_version(hosts), "dynamic_vram": dynamic, "timings": {}, "errors": {}}
        families = [f for f in ("sd15", "sdxl", "flux") if plan["timing"][f]]
        for i, family in enumerate(families):
            left = a.deadline - time.time()
            deadline = time.time() + left / (len(families) - i)  # an equal share of what is left
            size, steps, guided = plan["timing"][family]
            try:
                if family == "sd15":
                    p = plan["sd15"]
                    from support.models import build_sd15_checkpoint
                    build_sd15_checkpoint(hosts.models_dir() / "checkpoints" / p["ckpt"], layout=p["layout"], seed=0)

                    def comfy_cfg(sampler, mode="astar"):
                        def run(seed, steps):
                            g = sd15_graph(p["ckpt"], sampler=sampler, mode=mode, size=size, steps=steps, seed=seed,
                                           decode=False, resolution=p["resolution"], step_size=20.0, refine="auto",
                                           max_refine_iters=plan["max_refine_iters"], guided_steps=guided)
                            g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
                            host.run(g)
                        return run

                    configs = {"comfy_plain": comfy_cfg("KSampler"), "comfy_astar": comfy_cfg("AStarKSampler"),
                               "comfy_ae": comfy_cfg("AStarKSampler", "attend_excite")}
                    if plan["diffusers"]:
                        configs.update(diffusers_configs(size, steps, guided, cuda, result))
                elif family == "sdxl":
                    sdxl = SdxlProofs(hosts, host, size)
                    configs = {"comfy_plain": lambda seed, n: sdxl.sample(n, seed=seed),
                               "comfy_astar": lambda seed, n: sdxl.sample(n, guided, seed=seed, step_size=20.0),
                               "comfy_ae": lambda seed, n: sdxl.sample(n, guided, seed=seed, step_size=20.0,
                                                                       mode="attend_excite", refine="auto",
                                                                       max_refine_iters=plan["max_refine_iters"])}
                else:
                    from support import dit_models as D
                    objects["flux_full"] = flux_full_model(*plan["flux_blocks"])
                    objects["flux_clip"] = D.flux_clip(seed=0)

                    def flux_cfg(apply):
                        def run(seed, steps):
                            host.run(flux_graph(size, steps, seed, window_end(guided, steps) if apply else None))
                        return run

                    configs = {"comfy_plain": flux_cfg(False), "comfy_astar": flux_cfg(True)}
                runs = interleaved(configs, steps, plan["reps"], deadline, cuda, plan["warmup"])
                result["timings"][family] = dict(summarize(runs, steps, guided), size_px=size, runs=runs)
            except Exception as e:  # noqa: BLE001 - report, go on with the next family
                result["errors"][family] = f"{type(e).__name__}: {e}"[:600] + "\n" + traceback.format_exc()[-2000:]
                print(f"[gpu_check] timing {family} failed: {e}", flush=True)
            objects.clear()
            sdxl = None
            release(host)
            Path(a.worker_out).write_text(json.dumps(result, default=str))  # kept if a later family is cut off
        return result


def flux_graph(size, steps, seed, guidance_end):
    g = {"model": {"class_type": "AStarTestModel", "inputs": {"name": "flux_full"}},
         "clip": {"class_type": "AStarTestClip", "inputs": {"name": "flux_clip"}},
         "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
         "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}},
         "guidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["pos", 0], "guidance": 3.5}},
         "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}}}
    source = ["model", 0]
    if guidance_end is not None:
        from support.graphs import guidance_settings
        inputs = guidance_settings(resolution="1/32", step_size=20.0, refine="auto")
        inputs.update(guidance_end=guidance_end)
        g["apply"] = {"class_type": "AStarApply", "inputs": {"model": source, **inputs}}
        source = ["apply", 0]
    g["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": source, "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["guidance", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return g


def diffusers_configs(size, steps, guided, cuda, result) -> dict:
    """diffusers' StableDiffusionPipeline and StableDiffusionAttendAndExcitePipeline on random SD1.5-config
    models (benchmarks/bench_overhead.py builds them), fp16 on CUDA, DDIM, A&E guiding as many steps."""
    try:
        import diffusers  # noqa: F401
    except ImportError as e:
        result["errors"]["diffusers"] = f"not installed: {e}"
        return {}
    import torch
    sys.path.insert(0, str(PACK_DIR / "benchmarks"))
    import bench_overhead as bench
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionAttendAndExcitePipeline,
                           StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    diffusers.utils.logging.set_verbosity_error()
    d = bench.build_diffusers_models(None)
    dtype, device = (torch.float16, "cuda") if cuda else (torch.float32, "cpu")
    parts = dict(unet=UNet2DConditionModel.from_pretrained(str(d / "unet"), torch_dtype=dtype),
                 vae=AutoencoderKL.from_pretrained(str(d / "vae"), torch_dtype=dtype),
                 text_encoder=CLIPTextModel.from_pretrained(str(d / "text_encoder"), torch_dtype=dtype),
                 tokenizer=bench.sd15_tokenizer(), scheduler=DDIMScheduler.from_pretrained(str(d / "scheduler")))
    plain = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False).to(device)
    ae = StableDiffusionAttendAndExcitePipeline(**parts, safety_checker=None, feature_extractor=None,
                                                requires_safety_checker=False).to(device)
    for pipe in (plain, ae):
        pipe.set_progress_bar_config(disable=True)
    result["diffusers_version"] = diffusers.__version__

    stock_processors = dict(parts["unet"].attn_processors)

    def call(pipe, seed, n, extra):
        try:
            pipe(prompt=PROMPT, negative_prompt="", height=size, width=size, num_inference_steps=n, guidance_scale=7.5,
                 generator=torch.Generator(device).manual_seed(seed), output_type="latent", **extra)
        finally:  # A&E's pipeline puts its own processors on the UNet both pipelines share
            parts["unet"].set_attn_processor(dict(stock_processors))

    def ae_kw(n):
        return dict(token_indices=[2, 5], max_iter_to_alter=guided, thresholds=bench.ae_thresholds(n), scale_factor=20,
                    attn_res=(size // 32, size // 32))
    return {"diffusers_plain": lambda seed, n: call(plain, seed, n, {}),
            "diffusers_ae": lambda seed, n: call(ae, seed, n, ae_kw(n))}


def comfy_version(hosts) -> str:
    text = (hosts.comfy_root() / "comfyui_version.py").read_text()
    found = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return found.group(1) if found else "?"


def worker_main(a) -> None:
    cuda = not a.dry_run
    if a.dry_run:
        sys.meta_path.insert(0, ImageOnlyImports())
    plan = PLANS["dry" if a.dry_run else "cuda"]
    out_dir = Path(a.worker_out).parent
    t = time.perf_counter()
    result = (timing_worker if a.job == "timing" else proofs_worker)(a, plan, cuda, out_dir)
    result.update(job=a.job, seconds=round(time.perf_counter() - t, 1), imported=imported_distributions())
    blocker = next((f for f in sys.meta_path if isinstance(f, ImageOnlyImports)), None)
    if blocker is not None:
        result["refused_imports"] = sorted(blocker.refused)
    Path(a.worker_out).write_text(json.dumps(result, default=str))


# ----------------------------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------------------------

def jobs(a) -> list[dict]:
    """(job, ComfyUI root, disable dynamic VRAM) in the order they run: proofs first, timings last."""
    if a.dry_run:
        root = os.environ.get("COMFYUI_ROOT")
        return [{"job": "proofs", "root": root, "off": False}, {"job": "guided", "root": root, "off": True},
                {"job": "timing", "root": root, "off": False}]
    out = [{"job": "proofs", "root": r, "off": False} for r in a.comfy if r]
    newest = a.comfy[-1]
    out += [{"job": "guided", "root": newest, "off": True}, {"job": "timing", "root": newest, "off": False}]
    return out


def spawn(job: dict, a, out_dir: Path, log_dir: Path, deadline: float) -> dict:
    out = out_dir / f"{job['job']}-{len(list(out_dir.glob('*.json')))}.json"
    cmd = [sys.executable, __file__, "--worker", job["job"], "--worker-out", str(out), "--deadline", repr(deadline)]
    cmd += ["--dry-run"] if a.dry_run else []
    cmd += ["--disable-dynamic-vram"] if job["off"] else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if job["root"]:
        env["COMFYUI_ROOT"] = job["root"]
    t = time.perf_counter()
    timeout = max(60.0, deadline - time.time() + (600 if a.dry_run else 60))
    log = log_dir / f"gpu-check-{out.stem}.log"
    with open(log, "w") as f:  # ComfyUI's start-up warnings go to the log; the check's own lines are shown
        proc = subprocess.Popen(cmd, cwd=str(PACK_DIR), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        for line in proc.stdout:
            f.write(line)
            if line.startswith("[gpu_check]"):
                print(line, end="", flush=True)
        rc = proc.wait()
        timer.cancel()
    if rc != 0:
        print(f"[gpu_check] job {job['job']} exited with {rc}; its log {log} ends:\n"
              + "".join(log.read_text().splitlines(True)[-25:]), flush=True)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(job=job["job"], root=job["root"], disable_dynamic_vram=job["off"], rc=rc, log=str(log),
                  process_s=round(time.perf_counter() - t, 1))
    return result


def dynamic_check(results: list[dict], cuda: bool) -> dict:
    """The guided latent of the newest host with dynamic VRAM on (its proofs job) against --disable-dynamic-vram."""
    import torch
    from safetensors.torch import load_file
    on = [r for r in results if r["job"] == "proofs" and r.get("latent_file")]
    off = [r for r in results if r["job"] == "guided" and r.get("latent_file")]
    label = on[-1]["checks"][0]["host"] if on and on[-1].get("checks") else "?"
    item = {"host": label, "check": "dynamic vram", "seconds": 0.0}
    if not on or not off:
        return dict(item, status="FAIL", detail="a guided run with or without dynamic VRAM did not finish")
    a, b = load_file(on[-1]["latent_file"]), load_file(off[-1]["latent_file"])
    diff = float((a["guided"] - b["guided"]).abs().max())
    effect = float((a["guided"] - a["still"]).abs().max())
    tol = 1e-3 * (1.0 + float(b["guided"].abs().max()))
    detail = (f"dynamic on ({', '.join(on[-1].get('patchers', []))}) vs off: max |difference| {diff:.3g} "
              f"(tolerance {tol:.3g}; the guidance itself moved the latent {effect:.3g})")
    if not on[-1].get("has_dynamic_vram"):
        return dict(item, status="SKIP", detail="this ComfyUI has no dynamic VRAM (ModelPatcherDynamic came after 0.3.x)")
    if not on[-1].get("ran_dynamic"):
        status = "SKIP" if not cuda else "FAIL"
        detail = ("the dynamic patcher did not run (" + ("CPU: ComfyUI never enables dynamic VRAM with --cpu)"
                                                        if not cuda else "no comfy-aimdo device?)")) + "; " + detail
        if not cuda and diff > tol:
            status = "FAIL"
    else:
        status = "PASS" if diff <= tol and effect > 10 * tol else "FAIL"
    return dict(item, status=status, detail=detail)


def machine(cuda: bool) -> dict:
    import platform
    info = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform()}
    probe = ("import json, torch; v = {'torch': torch.__version__, 'cuda': torch.version.cuda}\n"
             "if torch.cuda.is_available(): v['gpu'] = torch.cuda.get_device_name(0); "
             "v['gpu_mib'] = torch.cuda.get_device_properties(0).total_memory // 2**20\n"
             "print(json.dumps(v))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if run.returncode == 0:
        info.update(json.loads(run.stdout.strip().splitlines()[-1]))
    return info


def table(checks: list[dict], timings: list[dict]) -> str:
    lines = [f"{'status':<6} {'host':<16} {'check':<18} detail"]
    for c in checks:
        lines.append(f"{c['status']:<6} {c['host']:<16} {c['check']:<18} {c['detail'][:150]}")
    for t in timings:
        for family, v in t["timings"].items():
            lines.append(f"\n{family} on ComfyUI {t['comfyui']}{' (dynamic VRAM)' if t['dynamic_vram'] else ''}: "
                         f"{v['size_px']} px, {v['steps']} steps, {v['guided_steps']} guided")
            lines.append(f"  {'config':<16}{'wall s':>9}{'x plain':>9}{'peak alloc MiB':>16}{'device MiB':>12}{'reps':>6}")
            for c, s in v["configs"].items():
                lines.append(f"  {c:<16}{s['wall_s_median']:>9.2f}{s.get('x_plain', float('nan')):>9.2f}"
                             f"{s.get('peak_allocated_mib', float('nan')):>16.0f}{s.get('device_used_mib', float('nan')):>12.0f}"
                             f"{s['reps']:>6}")
        for family, err in t.get("errors", {}).items():
            lines.append(f"\n{family} timing: ERROR {err.splitlines()[0]}")
    return "\n".join(lines)


def orchestrate(a) -> int:
    cuda = not a.dry_run
    start = time.time()
    deadline = start + a.budget_s
    out_dir = Path(a.out or (tempfile.mkdtemp(prefix="astar-gpu-check-") if a.dry_run else RESULTS_DIR))
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="astar-gpu-check-jobs-")) / "jobs"
    work.mkdir()
    info = machine(cuda)
    if cuda and "gpu" not in info:
        print("[gpu_check] no CUDA device: run with --dry-run on a machine without a GPU", flush=True)
        return 2
    results = []
    for job in jobs(a):
        # proofs must finish; the timing job gets whatever time is left
        results.append(spawn(job, a, work, Path(a.out) if a.out else work.parent, deadline))
    checks = [c for r in results for c in r.get("checks", [])]
    checks.append(dynamic_check(results, cuda))
    for r in results:
        if r["rc"] != 0:
            checks.append({"host": Path(r["root"] or "").name or "host", "check": f"job {r['job']}", "status": "FAIL",
                           "detail": f"exited with {r['rc']}", "seconds": r["process_s"]})
    timings = [r for r in results if r["job"] == "timing" and "timings" in r]
    doc = {"check": "gpu_check", "dry_run": a.dry_run, "machine": info, "wall_s": round(time.time() - start, 1),
           "checks": checks, "timings": timings, "jobs": results}
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", info.get("gpu", "cpu")).strip("-").lower()
    name = "gpu-check-dry-run.json" if a.dry_run else f"gpu-{info['date_utc'][:10]}-{gpu}.json"
    (out_dir / name).write_text(json.dumps(doc, indent=1, default=str))
    print(table(checks, timings))
    failed = [c for c in checks if c["status"] == "FAIL"]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed or skipped, {len(failed)} failed; "
          f"{doc['wall_s']:.0f} s; wrote {out_dir / name}")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, this host only, GPU image's packages only")
    ap.add_argument("--comfy", nargs="+", default=[], metavar="ROOT",
                    help="ComfyUI roots, oldest first (proofs on each; dynamic VRAM and timings on the last)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results; dry run: a temp folder)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="wall time the jobs aim to end within")
    ap.add_argument("--worker", dest="job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--disable-dynamic-vram", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.job:
        worker_main(a)
        return 0
    if not a.dry_run and not a.comfy:
        ap.error("give the ComfyUI roots with --comfy (tools/gpu_check.sh does)")
    return orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
