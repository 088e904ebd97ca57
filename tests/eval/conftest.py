"""Two local ComfyUI servers (127.0.0.1, the mini random-weight checkpoint) for the sweep tests,
a local Ray instance shut down after them, the suite's server's /object_info for the graph tests,
and the tiny CLIP/BLIP folders."""
from __future__ import annotations

import os

import pytest

from support import host as hosts

MINI = "astar-test-sd15-mini.safetensors"
# What the small sweeps set on every node having the input: a 64 px, 3-step run of the mini model,
# whose only cross-attention layers are at 1/16 of the image side; guided from 0 to 0.5 of the noise schedule,
# which with the templates' "normal" scheduler is step 0 of the 3 (step i sits at i/2; step 1 at 0.5, the open end).
GUIDANCE = {"guidance_end": 0.5, "attention_resolution": "1/16"}
SMALL = {"size": 64, "inputs": {"steps": 3, "ckpt_name": MINI, **GUIDANCE}}


@pytest.fixture(scope="module")
def two_servers(tmp_path_factory, mini_ckpt):
    """Two servers of our own, even when COMFYUI_URL names a running one (one of them is killed).
    Module scope: they are stopped before the rest of the suite (whose SDXL tests need the memory)."""
    pytest.importorskip("ray", reason="pip install -r benchmarks/ae_eval/requirements.txt (tools/setup.sh does)")
    saved = os.environ.pop("COMFYUI_URL", None)
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(hosts.ServerHost(tmp_path_factory.mktemp(f"eval-server-{name}")))
    finally:
        if saved is not None:
            os.environ["COMFYUI_URL"] = saved
    yield servers
    for s in servers:
        s.stop()
    from benchmarks.ae_eval.sweep import stop_local_ray
    stop_local_ray()


@pytest.fixture(scope="session")
def object_info(server):
    """/object_info of the suite's shared server (tests/conftest.py), which lists the mini checkpoint."""
    return server.get("/object_info")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(CLIP folder, BLIP folder) of tiny random-weight models, as transformers saves them."""
    from benchmarks.ae_eval.prompts import load_prompts
    from support.eval_models import build_tiny_blip, build_tiny_clip
    root = tmp_path_factory.mktemp("eval-models")
    words = sorted({w for r in load_prompts() for w in r["prompt"].split()})
    return build_tiny_clip(root / "clip", hosts.comfy_root()), build_tiny_blip(root / "blip", words)
