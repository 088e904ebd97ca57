#!/usr/bin/env python3
"""Run an example workflow of this pack headless on a real ComfyUI server; images land in ./out/.

    bash tools/run_example.sh                                  # set-up + astar_sd15 on a random-weight model
    bash tools/run_example.sh --ckpt v1-5-pruned-emaonly.safetensors    # a checkpoint the host has
    bash tools/run_example.sh --ckpt /path/to/model.safetensors         # any file (linked in)
    bash tools/run_example.sh --workflow example_workflows/astar_vs_plain.json

What it does: runs tools/setup.sh (unless --skip-setup, or COMFYUI_ROOT names your own ComfyUI),
starts a ComfyUI server with this pack (tests/support/host.py's ServerHost; COMFYUI_URL=... uses a
running server instead), converts the UI-format workflow to the API format with the server's
/object_info (tools/workflow_to_api.py), queues it, waits, and downloads every output image
through /view into --out (default ./out/), then prints the list and the overlay's text report.

Without --ckpt it runs on the generated random-weight mini SD1.5 checkpoint (built once, cached;
tests/support/models.py) at a small size and few steps, so it finishes in a minute or two on a
CPU. Random weights make noise images: that run shows the pipeline works, not what A-STAR does.
With --ckpt the workflow runs with its own settings (SD1.5: 512 px, 50 steps, guidance_start 0 and
guidance_end 0.5, so the first 25 steps are guided).

The A-STAR nodes (A-STAR KSampler, A-STAR Apply) guide a window of the model's noise schedule:
guidance_start / guidance_end are fractions of it (0 = pure noise, 1 = clean), read as ComfyUI's
ConditioningSetTimestepRange reads its start and end. A step is guided when its noise level lies in
the window. With the "normal" scheduler a full run places step i of n at i / (n - 1), so step i is
guided when start <= i / (n - 1) < end: 0 to 0.5 guides 25 of 50 steps, 4 of 8, only step 0 of 3 (an
odd n guides (n - 1) / 2). Other schedulers place their steps elsewhere on that clock (karras: fewer
steps in 0 to 0.5), so how many of their steps are guided depends on the scheduler.
--guidance-start / --guidance-end override the window.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.parse
from fractions import Fraction
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_DIR / "tests"))
sys.path.insert(0, str(PACK_DIR / "tools"))

from support import host as hosts  # noqa: E402  (stdlib only: a client plus a server subprocess)
from workflow_to_api import ConversionError, convert, validate  # noqa: E402

ASTAR_HOME = Path(os.environ.get("ASTAR_HOME", Path.home() / ".cache" / "astar-comfyui"))
DEFAULT_WORKFLOW = PACK_DIR / "example_workflows" / "astar_sd15.json"
MINI_CKPT = "astar-test-sd15-mini.safetensors"      # the test suite's name: one cached file for both
MINI_LORA = "sd15-lora-mini-s0-v1.safetensors"       # tests/support/models.py cache names
MINI_CONTROLNET = "sd15-controlnet-mini-s0-v1.safetensors"
# The small run on the random-weight model: a minute or two on 2 CPU cores.
# The workflows' guidance window (fractions of the noise schedule) is kept: 0 to 0.5 guides 4 of 8 steps
# with the "normal" scheduler (steps 0-3 at i/7 < 0.5).
SMALL = {"size": 256, "steps": 8, "attention_resolution": "1/16"}

MODEL_CHOICES = (("CheckpointLoaderSimple", "ckpt_name", "--ckpt"), ("LoraLoader", "lora_name", "--lora"),
                 ("ControlNetLoader", "control_net_name", "--controlnet"))
SAMPLERS = ("KSampler", "KSamplerAdvanced", "AStarKSampler", "BasicScheduler")
GUIDED = ("AStarKSampler", "AStarApply")  # nodes with the guidance window
RESOLUTION_NODES = GUIDED + ("AStarAttentionRecorder",)
# Pixel-size inputs scaled with the latent (the ControlNet hint drawn with core nodes).
EMPTY_LATENTS = ("EmptyLatentImage", "EmptySD3LatentImage",  # SD1.x/SDXL; SD3/Flux (16 channels)
                 "EmptyFlux2LatentImage")  # Flux.2 (128 channels at 1/16)
SIZE_INPUTS = {"EmptyLatentImage": ("width", "height"), "EmptyImage": ("width", "height"),
               "SolidMask": ("width", "height"), "MaskComposite": ("x", "y"),
               "ImageCompositeMasked": ("x", "y")}


def log(msg: str) -> None:
    print(f"[run_example] {msg}", flush=True)


def adapt_prompt(prompt: dict, *, ckpt: str | None = None, lora: str | None = None,
                 controlnet: str | None = None, size: int | None = None, steps: int | None = None,
                 guidance_start: float | None = None, guidance_end: float | None = None,
                 attention_resolution: str | None = None, seed: int | None = None) -> dict:
    """A copy of an API prompt with model files and sizes replaced (None keeps the workflow's).

    ``size`` sets the latent's width and height and scales the other pixel sizes (hint images and
    masks drawn with core nodes) by the same factor; ``steps`` sets every sampler's and scheduler's
    steps; ``guidance_start`` / ``guidance_end`` the A-STAR nodes' guidance window (fractions of the
    model's noise schedule: which steps it guides follows from ``steps`` and the scheduler, see
    guidance_window); ``seed`` every sampler's seed and RandomNoise's noise_seed."""
    for name, value in (("guidance_start", guidance_start), ("guidance_end", guidance_end)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} is a fraction of the model's noise schedule, 0 to 1; got {value!r}")
    out = json.loads(json.dumps(prompt))
    nodes = out.values()
    latent_w = [n["inputs"].get("width") for n in nodes if n["class_type"] in EMPTY_LATENTS]
    scale = size / latent_w[0] if size and latent_w and isinstance(latent_w[0], int) else None
    for n in nodes:
        ct, inp = n["class_type"], n["inputs"]
        if ckpt and ct in ("CheckpointLoaderSimple", "CheckpointLoader", "ImageOnlyCheckpointLoader"):
            inp["ckpt_name"] = ckpt
        if lora and ct in ("LoraLoader", "LoraLoaderModelOnly"):
            inp["lora_name"] = lora
        if controlnet and ct in ("ControlNetLoader", "DiffControlNetLoader"):
            inp["control_net_name"] = controlnet
        if scale:
            if ct in EMPTY_LATENTS:
                inp["width"] = inp["height"] = size
            elif ct in SIZE_INPUTS:
                for key in SIZE_INPUTS[ct]:
                    if isinstance(inp.get(key), int):
                        inp[key] = max(1 if key in ("width", "height") else 0, round(inp[key] * scale))
        if steps and ct in SAMPLERS and isinstance(inp.get("steps"), int):
            inp["steps"] = steps
        if ct in GUIDED:
            for key, value in (("guidance_start", guidance_start), ("guidance_end", guidance_end)):
                if value is not None:
                    inp[key] = value
        if seed is not None:
            for key in ("seed", "noise_seed"):
                if isinstance(inp.get(key), int) and not isinstance(inp.get(key), bool):
                    inp[key] = seed
        if attention_resolution and ct in RESOLUTION_NODES:
            inp["attention_resolution"] = attention_resolution
    return out


def guidance_window(inputs: dict) -> str:
    """The guidance window of an A-STAR node's inputs, in words, with the guided steps where the node
    itself has the step count (A-STAR KSampler).

    The window is a range of the model's noise schedule (docs/schedule.md). ComfyUI's "normal"
    scheduler (the inputs' scheduler, or none given) places the state of step i at f = i / (n - 1) of
    the schedule it computes; with denoise d < 1 KSampler computes int(n / d) steps and runs the last
    n, so step i sits at (int(n / d) - n + i) / (int(n / d) - 1). A step is guided when start <= f < end
    (exact for SD1.x/SD2.x/SDXL's discrete schedule; flow models' shift moves the places slightly).
    For other schedulers the count depends on where they place their steps: only the window is given."""
    start, end = inputs.get("guidance_start"), inputs.get("guidance_end")
    if not all(isinstance(v, (int, float)) for v in (start, end)):
        return "guidance window set by linked inputs"
    text = f"guidance window {start:g} to {end:g} of the noise schedule"
    steps, scheduler = inputs.get("steps"), inputs.get("scheduler", "normal")
    denoise = inputs.get("denoise", 1.0)
    if not isinstance(steps, int) or steps < 1 or not isinstance(denoise, (int, float)) or not 0 < denoise <= 1:
        return text
    if scheduler != "normal":
        return text + f" (how many of the {steps} steps are guided depends on where the {scheduler!r} scheduler " \
                      "places them)"
    total = int(steps / denoise)  # comfy.samplers.KSampler.set_steps
    places = [Fraction(total - steps + i, max(total - 1, 1)) for i in range(steps)]
    guided = [i for i, f in enumerate(places) if start <= f < end]  # exact: Fraction against the float
    listed = "" if not guided else f": step {guided[0]}" if len(guided) == 1 else f": steps {guided[0]}-{guided[-1]}"
    return text + f" ({len(guided)} of {steps} guided{listed})"


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction of the noise schedule, "
                                         "0 to 1") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value:g} is not a fraction of the noise schedule: give 0 to 1 (0 = pure "
                                         "noise, 1 = clean; 0.5 = the noisier half)")
    return value


class _GuidedStepsRemoved(argparse.Action):
    """--guided-steps N of earlier versions: the A-STAR nodes now take a window of fractions."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was replaced by --guidance-end FRACTION (and --guidance-start): the A-STAR "
                     "nodes guide a window of the model's noise schedule (0 = pure noise, 1 = clean). With the "
                     "'normal' scheduler step i of S sits at i / (S - 1), so --guidance-end F guides the steps i "
                     "with i / (S - 1) < F. To guide the first N of S steps give an F just above (N - 1) / (S - 1), "
                     "e.g. (N - 0.5) / (S - 1): the first 4 of 8 steps: --guidance-end 0.5.")


def output_files(entry: dict) -> list[dict]:
    """Every image a finished prompt produced ({"node", "filename", "subfolder", "type"})."""
    files = []
    for nid, out in sorted(entry.get("outputs", {}).items(), key=lambda kv: kv[0]):
        for img in out.get("images", []) or []:
            if isinstance(img, dict) and "filename" in img:
                files.append({"node": nid, **img})
    return files


def view_url(img: dict) -> str:
    q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""),
                                "type": img.get("type", "output")})
    return f"/view?{q}"


def texts(entry: dict) -> dict[str, str]:
    """Text outputs (the overlay's report, PreviewAny) by node id."""
    out = {}
    for nid, o in entry.get("outputs", {}).items():
        t = o.get("text")
        if t:
            out[nid] = "\n".join(str(x) for x in t) if isinstance(t, list) else str(t)
    return out


def _venv_python() -> str:
    if os.environ.get("COMFYUI_ROOT"):
        return os.environ.get("ASTAR_PYTHON", sys.executable)
    py = ASTAR_HOME / "venv" / "bin" / "python"
    return str(py) if py.exists() else sys.executable


def _run_setup() -> None:
    log("set-up: tools/setup.sh (idempotent; the first run takes a few minutes)")
    subprocess.run(["bash", str(PACK_DIR / "tools" / "setup.sh")], check=True)


def _build_test_models(python: str, need_lora: bool, need_controlnet: bool) -> None:
    """The random-weight mini SD1.5 checkpoint (and LoRA / ControlNet), built once into the
    models folder the host reads (tests/support/host.py models_dir)."""
    m = hosts.models_dir()
    todo = [("checkpoint", m / "checkpoints" / MINI_CKPT)]
    if need_lora:
        todo.append(("lora", m / "loras" / MINI_LORA))
    if need_controlnet:
        todo.append(("controlnet", m / "controlnet" / MINI_CONTROLNET))
    todo = [(k, p) for k, p in todo if not p.exists()]
    if not todo:
        return
    log("building the random-weight test model(s) once: " + ", ".join(str(p) for _, p in todo))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from support import models as M; "
            "from pathlib import Path; kinds = sys.argv[2::2]; paths = sys.argv[3::2]\n"
            "for k, p in zip(kinds, paths):\n"
            "    {'checkpoint': M.build_sd15_checkpoint, 'lora': M.build_sd15_lora,"
            " 'controlnet': M.build_sd15_controlnet}[k](Path(p), layout='mini', seed=0)\n")
    args = [python, "-c", code, str(PACK_DIR / "tests")]
    for k, p in todo:
        args += [k, str(p)]
    env = dict(os.environ)
    env.setdefault("COMFYUI_ROOT", str(hosts.comfy_root()))
    subprocess.run(args, check=True, env=env)


def _link_in(path_or_name: str, folder: str, base: Path) -> str:
    """A file path is linked into the server's models/<folder>/; a bare name is used as is."""
    p = Path(path_or_name).expanduser()
    if os.sep in path_or_name or p.exists():
        if not p.is_file():
            raise SystemExit(f"error: {path_or_name} is not a file")
        dest = base / "models" / folder / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.symlink_to(p.resolve())
        return p.name
    return path_or_name


def _check_choice(object_info: dict, node: str, field: str, value: str, flag: str) -> None:
    spec = object_info.get(node, {}).get("input", {}).get("required", {}).get(field)
    if not spec:
        return
    options = spec[0] if isinstance(spec[0], list) else (spec[1] or {}).get("options", [])
    if value not in options:
        listing = "\n  ".join(options) or "(none)"
        raise SystemExit(f"error: the server has no {field} {value!r}. Pass {flag} with a file name from its "
                         f"list or a path to a file (it will be linked in). Available:\n  {listing}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", default=str(DEFAULT_WORKFLOW), help="UI-format workflow (default: %(default)s)")
    ap.add_argument("--ckpt", help="checkpoint: a file name the host lists, or a path (linked into the host's "
                                   "models/checkpoints). Default: the generated random-weight mini SD1.5 model "
                                   "(noise images) at a small size")
    ap.add_argument("--lora", help="LoRA for workflows with Load LoRA (name or path; default with --ckpt: the "
                                   "workflow's own, else the generated test LoRA)")
    ap.add_argument("--controlnet", help="ControlNet for workflows with Load ControlNet (name or path)")
    ap.add_argument("--size", type=int, help="latent width and height in pixels (default: the workflow's; "
                                             f"{SMALL['size']} on the random-weight model)")
    ap.add_argument("--steps", type=int, help=f"sampling steps (default: the workflow's; {SMALL['steps']} on the "
                                              "random-weight model)")
    ap.add_argument("--guidance-start", type=fraction, metavar="FRACTION",
                    help="start of the A-STAR nodes' guidance window, a fraction of the model's noise schedule "
                         "(0 = pure noise, 1 = clean; default: the workflow's, 0)")
    ap.add_argument("--guidance-end", type=fraction, metavar="FRACTION",
                    help="end of the guidance window, a fraction of the model's noise schedule: a step is guided "
                         "when start <= its place < end; with the 'normal' scheduler step i of S sits at "
                         "i / (S - 1) (default: the workflow's, 0.5: the first 25 of 50 steps, 4 of the "
                         "random-weight model's 8; 0 = record only). The first N of S steps with 'normal': "
                         "(N - 0.5) / (S - 1)")
    ap.add_argument("--guided-steps", action=_GuidedStepsRemoved, help=argparse.SUPPRESS)
    ap.add_argument("--attention-resolution", choices=["1/8", "1/16", "1/32", "1/64"],
                    help="override the A-STAR nodes' attention_resolution (the random-weight mini model "
                         "only has 1/16 layers, so that is its default)")
    ap.add_argument("--out", default="out", help="folder for the downloaded images (default: ./out)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run (default: 3600)")
    ap.add_argument("--skip-setup", action="store_true", help="do not run tools/setup.sh first")
    args = ap.parse_args(argv)

    t0 = time.time()
    workflow_path = Path(args.workflow)
    if not workflow_path.exists() and (PACK_DIR / "example_workflows" / workflow_path.name).exists():
        workflow_path = PACK_DIR / "example_workflows" / workflow_path.name
    workflow = json.loads(workflow_path.read_text(encoding="utf-8"))
    node_types = {n.get("type") for n in workflow.get("nodes", []) if n.get("mode", 0) not in (2, 4)}
    random_weights = args.ckpt is None
    if not (args.skip_setup or os.environ.get("COMFYUI_ROOT") or os.environ.get("COMFYUI_URL")):
        _run_setup()
    python = _venv_python()
    if random_weights and not os.environ.get("COMFYUI_URL"):
        _build_test_models(python, need_lora="LoraLoader" in node_types and not args.lora,
                           need_controlnet="ControlNetLoader" in node_types and not args.controlnet)

    with tempfile.TemporaryDirectory(prefix="run-", dir=_work_parent()) as work:
        work = Path(work)
        base = work / "server-base"
        ckpt = _link_in(args.ckpt, "checkpoints", base) if args.ckpt else MINI_CKPT
        lora = _link_in(args.lora, "loras", base) if args.lora else (MINI_LORA if random_weights else None)
        controlnet = (_link_in(args.controlnet, "controlnet", base) if args.controlnet
                      else (MINI_CONTROLNET if random_weights else None))
        log("starting a ComfyUI server with the pack" + (f" (using {os.environ['COMFYUI_URL']})"
                                                          if os.environ.get("COMFYUI_URL") else ""))
        server = hosts.ServerHost(work, python=python)
        try:
            object_info = server.get("/object_info")
            try:
                prompt = convert(workflow, object_info)
            except ConversionError as e:
                raise SystemExit(f"error: {workflow_path}: {e}")
            small = SMALL if random_weights else {}
            prompt = adapt_prompt(
                prompt, ckpt=ckpt, lora=lora, controlnet=controlnet,
                size=args.size or small.get("size"), steps=args.steps or small.get("steps"),
                guidance_start=args.guidance_start, guidance_end=args.guidance_end,
                attention_resolution=args.attention_resolution or small.get("attention_resolution"))
            for node_type, field, flag in MODEL_CHOICES:
                for entry in prompt.values():
                    if entry["class_type"] == node_type and isinstance(entry["inputs"].get(field), str):
                        _check_choice(object_info, node_type, field, entry["inputs"][field], flag)
            problems = validate(prompt, object_info)
            if problems:
                raise SystemExit("error: the converted workflow does not fit this server:\n  " + "\n  ".join(problems))
            sampler = next((n["inputs"] for n in prompt.values() if n["class_type"] in GUIDED), {})
            window = guidance_window(sampler) if sampler else "no guided steps"
            if random_weights:
                log("NOTE: no --ckpt given, so this runs on a generated RANDOM-WEIGHT SD1.5 model "
                    f"({ckpt}) at {args.size or small['size']} px, {args.steps or small['steps']} steps, {window}: "
                    "its images are noise. It shows the whole pipeline runs; for real pictures pass "
                    "--ckpt v1-5-pruned-emaonly.safetensors (or a path to any SD1.5/SDXL checkpoint).")
            log(f"running {workflow_path.name}: {len(prompt)} nodes, checkpoint {ckpt}"
                + (f", concepts {sampler.get('concepts')!r}, {window}" if sampler else ""))
            t_run = time.time()
            try:
                entry = server.run(prompt, timeout=args.timeout)
            except hosts.GraphError as e:
                tail = "\n".join(server.log().splitlines()[-40:])
                raise SystemExit(f"error: the run failed: {e}\n--- end of the server log ---\n{tail}")
            log(f"finished in {time.time() - t_run:.1f} s")
            out_dir = Path(args.out)
            out_dir.mkdir(parents=True, exist_ok=True)
            saved = []
            for img in output_files(entry):
                data = server.get(view_url(img), raw=True)
                name = "_".join(p for p in (img.get("subfolder", "").replace("/", "_"), img["filename"]) if p)
                if img.get("type") == "temp":
                    name = "preview_" + name
                dest = out_dir / name
                dest.write_bytes(data)
                saved.append(dest)
            for nid, text in texts(entry).items():
                dest = out_dir / f"{workflow_path.stem}_report_node{nid}.txt"
                dest.write_text(text + "\n", encoding="utf-8")
                saved.append(dest)
                print(f"\n--- text output of node {nid} ({prompt[nid]['_meta']['title']}) ---\n{text}\n")
        finally:
            server.stop()
    log(f"{len(saved)} files in {out_dir.resolve()}/:")
    for p in saved:
        print(f"  {p}")
    if random_weights:
        log("(random-weight model: the images are noise by design; see the NOTE above)")
    log(f"total {time.time() - t0:.1f} s")
    return 0


def _work_parent() -> str:
    d = ASTAR_HOME / "run-example"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


if __name__ == "__main__":
    sys.exit(main())
