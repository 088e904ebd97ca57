"""The GPU check (tools/gpu_check.sh, tools/gpu_check.py) kept from rotting on a CPU: its dry run (every job, the
mini SD1.5 model and the Flux test model at 64 px, only the packages the GPU image will have), the size of what a
GPU run carries (tools/prepare_gpu_carry.sh, under the device's 64 MiB), and its comparisons failing on wrong
rules. docs/gpu-check.md says how it runs on a GPU."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import host as hosts

PACK_DIR = Path(__file__).resolve().parents[2]
LIMIT = 64 * 2 ** 20
DRY_RUN_PROOFS = ("sd15 step0", "sd15 lowers", "sd15 maps", "sd15 fp8", "flux-test step0", "flux-test lowers",
                  "flux-test maps")


def gpu_check():
    spec = importlib.util.spec_from_file_location("astar_gpu_check", PACK_DIR / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_proves_and_times_every_job_on_cpu(tmp_path):
    """`bash tools/gpu_check.sh --dry-run` on this host: exit 0, every proof PASS (SDXL and dynamic VRAM SKIP on a
    CPU), the timing families written, and nothing imported that the GPU image will lack."""
    env = dict(os.environ, COMFYUI_ROOT=str(hosts.comfy_root()), ASTAR_PYTHON=sys.executable)
    run = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--out", str(tmp_path)], cwd=str(PACK_DIR),
                         env=env, capture_output=True, text=True, timeout=1500)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    doc = json.loads((tmp_path / "gpu-check-dry-run.json").read_text())
    status = {c["check"]: c["status"] for c in doc["checks"]}
    assert {name: status.get(name) for name in DRY_RUN_PROOFS} == {name: "PASS" for name in DRY_RUN_PROOFS}, tail
    assert status["sdxl"] == "SKIP" and status["dynamic vram"] == "SKIP", status
    assert not [c for c in doc["checks"] if c["status"] == "FAIL"], doc["checks"]
    (timing,) = doc["timings"]
    assert set(timing["timings"]) == {"sd15", "flux"}, timing.get("errors")
    assert set(timing["timings"]["sd15"]["configs"]) == {"comfy_plain", "comfy_astar", "comfy_ae"}
    assert set(timing["timings"]["flux"]["configs"]) == {"comfy_plain", "comfy_astar"}
    assert all(v["x_plain"] > 0 for t in timing["timings"].values() for v in t["configs"].values())
    allowed = gpu_check().allowed_distributions()
    for job in doc["jobs"]:
        assert job["rc"] == 0
        assert not set(job["imported"]) - allowed, f"{job['job']} imported what the GPU image lacks"
    # the dry run refused what the image lacks (kornia, spandrel: optional ComfyUI nodes), so it was enforced
    assert doc["jobs"][0]["refused_imports"], doc["jobs"][0]


def _wheel_name(path: Path) -> str:
    return re.sub(r"[-_.]+", "-", path.name.split("-")[0]).lower()


@pytest.mark.host_independent  # measures files, whichever host runs it
def test_carried_wheels_and_comfyui_sources_fit_the_64_mib_limit(tmp_path):
    """tools/prepare_gpu_carry.sh for real (PyPI downloads, cached by pip; both ComfyUI trees), measured with the
    working tree as a device run sends it."""
    sources = [PACK_DIR / "../shared/comfyui/ComfyUI-0.19.3.tar.gz", PACK_DIR / "../../shared/comfyui/ComfyUI-0.19.3.tar.gz"]
    env = dict(os.environ, ASTAR_GPU_CARRY=str(tmp_path / "carry"))
    if not any(p.is_file() for p in sources) and "ASTAR_COMFYUI_0193_SRC" not in env:
        pytest.skip("no ComfyUI 0.19.3 source (../shared/comfyui/ComfyUI-0.19.3.tar.gz or ASTAR_COMFYUI_0193_SRC)")
    run = subprocess.run(["bash", "tools/prepare_gpu_carry.sh"], cwd=str(PACK_DIR), env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    carry = tmp_path / "carry"
    on_disk = sum(p.stat().st_size for p in carry.rglob("*") if p.is_file())
    assert measured["carry_bytes"] == on_disk
    assert measured["tree_bytes"] > 500_000  # the tracked tree was counted
    assert measured["total_bytes"] == measured["tree_bytes"] + on_disk < LIMIT, measured
    assert {_wheel_name(p) for p in (carry / "wheels").glob("*.whl")} == set(gpu_check().CARRIED)
    assert {p.name for p in carry.glob("*.tar.xz")} == {"ComfyUI-0.3.75.tar.xz", "ComfyUI-0.19.3.tar.xz"}


@pytest.mark.host_independent
def test_the_comparisons_fail_on_wrong_rules():
    """The check's own verdicts: maps off by a wrong rule, a dynamic-VRAM latent off by more than fp noise, or a
    guidance too weak to tell them apart, are FAILs; an unlisted distribution is not importable in the dry run."""
    g = gpu_check()
    torch.manual_seed(0)
    q, k = torch.randn(2, 16, 4 * 8), torch.randn(2, 77, 4 * 8)
    want, unscaled = g.explicit_probs(q, k, 4), g.explicit_probs(q, k, 4, scaled=False)
    got = want.float()
    assert g.compare_maps(got, want, unscaled, cuda=False)[0]
    assert not g.compare_maps(got * 1.01, want, unscaled, cuda=False)[0]  # 1% off
    assert not g.compare_maps(g.explicit_probs(q, torch.flip(k, [0]), 4).float(), want, unscaled, cuda=True)[0]
    assert not g.compare_maps(got, want, want + 1e-7, cuda=False)[0]  # a "wrong" rule the tolerance cannot see

    def verdict(tmp, off_shift, effect=1.0, ran=True):
        from safetensors.torch import save_file
        base = torch.randn(1, 4, 8, 8)
        save_file({"guided": base + effect, "still": base}, str(tmp / "on.safetensors"))
        save_file({"guided": base + effect + off_shift, "still": base}, str(tmp / "off.safetensors"))
        results = [{"job": "proofs", "latent_file": str(tmp / "on.safetensors"), "has_dynamic_vram": True,
                    "ran_dynamic": ran, "checks": [{"host": "0.19.3+dynamic"}]},
                   {"job": "guided", "latent_file": str(tmp / "off.safetensors")}]
        return g.dynamic_check(results, cuda=True)["status"]

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        assert verdict(tmp, 0.0) == "PASS"
        assert verdict(tmp, 1e-5) == "PASS"  # fp noise
        assert verdict(tmp, 0.05) == "FAIL"
        assert verdict(tmp, 0.0, effect=1e-3) == "FAIL"  # guidance too weak for the comparison to mean anything
        assert verdict(tmp, 0.0, ran=False) == "FAIL"  # on CUDA the dynamic patcher must have run

    blocker = g.ImageOnlyImports()
    # a top-level module of this venv that only distributions missing from the GPU image provide
    outside = sorted(t for t, dists in blocker.owner.items()
                     if t not in blocker.local and not any(d in blocker.allowed for d in dists))
    if not outside:
        pytest.skip("every installed distribution is on the GPU image")
    top = outside[0]
    with pytest.raises(ModuleNotFoundError, match="not on the GPU image"):
        blocker.find_spec(top)
    assert blocker.find_spec("torch") is None and blocker.find_spec("json") is None
