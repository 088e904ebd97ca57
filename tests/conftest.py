"""Session fixtures: one in-process ComfyUI, one server, the random-weight test checkpoints.

Unit tests (tests/unit) use none of these and never import ComfyUI."""
from __future__ import annotations

import pytest

from support import host as hosts

MINI = "astar-test-sd15-mini.safetensors"
FULL = "astar-test-sd15-full.safetensors"
SD21 = "astar-test-sd21-768v.safetensors"


def pytest_collection_modifyitems(config, items):
    """tests/unit never import ComfyUI: the same on every host (tools/test.sh runs them in pass 1 only)."""
    unit = config.rootpath / "tests" / "unit"
    for item in items:
        if unit in item.path.parents:
            item.add_marker(pytest.mark.host_independent)


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("comfy")


@pytest.fixture(scope="session")
def host(work_dir):
    """ComfyUI in this process; graphs run through execution.PromptExecutor (inference mode)."""
    return hosts.InProcessHost(work_dir)


def _checkpoint(name, layout):
    from support.models import build_sd15_checkpoint
    return build_sd15_checkpoint(hosts.models_dir() / "checkpoints" / name, layout=layout, seed=0)


@pytest.fixture(scope="session")
def mini_ckpt(host):
    """File name (as the loader lists it) of the mini SD1.5-layout checkpoint (two resolution levels)."""
    _checkpoint(MINI, "mini")
    return MINI


@pytest.fixture(scope="session")
def full_ckpt(host):
    """File name of the exact SD1.5-layout checkpoint (random weights)."""
    _checkpoint(FULL, "full")
    return FULL


@pytest.fixture(scope="session")
def sd21_ckpt(host):
    """File name of the SD2.1 768-v checkpoint (random weights, 2.4 GiB; v-prediction, OpenCLIP-H)."""
    from support.models import build_sd21_checkpoint
    build_sd21_checkpoint(hosts.models_dir() / "checkpoints" / SD21, seed=0)
    return SD21


@pytest.fixture(scope="session")
def server(work_dir, mini_ckpt):
    """One ComfyUI server for the whole session (or COMFYUI_URL's); always stopped."""
    srv = hosts.ServerHost(work_dir)
    yield srv
    srv.stop()
