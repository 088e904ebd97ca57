"""Real ComfyUI hosts for the tests: in-process (execution.PromptExecutor, which runs every node
under torch.inference_mode as users run them) and a server subprocess (main.py --cpu)."""
from __future__ import annotations

import asyncio
import gc
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[2]
PACK_MODULE = "astar_pack"
GC_INTERVAL_S = 10.0  # ComfyUI's main.py collects at most this often after a prompt
DEFAULT_HOME = Path(os.environ.get("ASTAR_HOME", Path.home() / ".cache" / "astar-comfyui"))


def comfy_root() -> Path:
    root = Path(os.environ.get("COMFYUI_ROOT", DEFAULT_HOME / "ComfyUI"))
    if not (root / "main.py").exists():
        raise RuntimeError(f"no ComfyUI at {root}: run tools/setup.sh, or set COMFYUI_ROOT to your ComfyUI folder")
    return root


def models_dir() -> Path:
    d = Path(os.environ.get("ASTAR_TEST_MODELS", DEFAULT_HOME / "test-models"))
    for sub in ("checkpoints", "loras", "controlnet", "embeddings", "vae", "dit"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    return d


def custom_nodes_dir(work: Path) -> Path:
    """A custom_nodes folder holding only this pack (linked under a fixed module name)."""
    d = work / "custom_nodes"
    d.mkdir(parents=True, exist_ok=True)
    link = d / PACK_MODULE
    if not link.exists():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    return d


def extra_paths_yaml(work: Path) -> Path:
    m = models_dir()
    y = work / "extra_model_paths.yaml"
    y.write_text(
        "astar_tests:\n"
        f"  custom_nodes: {custom_nodes_dir(work)}\n"
        f"  checkpoints: {m / 'checkpoints'}\n"
        f"  loras: {m / 'loras'}\n"
        f"  controlnet: {m / 'controlnet'}\n"
        f"  diffusion_models: {m / 'checkpoints'}\n"  # UNETLoader reads a checkpoint's UNet (fp8 tests)
        f"  embeddings: {m / 'embeddings'}\n"
        f"  vae: {m / 'vae'}\n")
    return y


class GraphError(AssertionError):
    """A prompt the host refused (validation) or a node that raised."""

    def __init__(self, message, details=None):
        super().__init__(message)
        self.details = details or {}


class _NoServer:
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *args, **kwargs):
        pass


class InProcessHost:
    """ComfyUI imported into the test process, with this pack loaded as a custom node."""

    def __init__(self, work: Path, cpu: bool = True, fp16_unet: bool = False):
        """cpu=False lets ComfyUI use its accelerator (benchmarks on a GPU machine); tests run on CPU.
        fp16_unet: ComfyUI's --fp16-unet (UNet weights stored in fp16; an SDXL model then fits in
        about half the memory on CPU)."""
        root = str(comfy_root())
        if root not in sys.path:
            sys.path.insert(0, root)
        import comfy.cli_args
        comfy.cli_args.args.cpu = cpu
        comfy.cli_args.args.fp16_unet = fp16_unet
        comfy.cli_args.args.disable_api_nodes = True
        import utils.extra_config  # ComfyUI's utils package, before `nodes` shadows the name
        import folder_paths
        for sub in ("output", "temp", "input"):
            (work / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(work / "output"))
        folder_paths.set_temp_directory(str(work / "temp"))
        folder_paths.set_input_directory(str(work / "input"))
        utils.extra_config.load_extra_path_config(str(extra_paths_yaml(work)))
        import execution
        import nodes
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        if not asyncio.run(nodes.load_custom_node(str(custom_nodes_dir(work) / PACK_MODULE))):
            raise RuntimeError("the pack failed to load into ComfyUI (see the log above)")
        self.nodes = nodes
        self.execution = execution
        self.executor = execution.PromptExecutor(_NoServer(), cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})
        self.pack = sys.modules[[m for m in sys.modules if m.endswith(PACK_MODULE)][0]]
        self.last_collect = time.monotonic()

    def run(self, prompt: dict, fresh: bool = False) -> dict:
        """Validate and execute an API-format prompt; returns {node_id: outputs tuple} of every node.
        ComfyUI serves an unchanged node from its cache; fresh=True empties the cache first, so every
        node runs again (a test comparing two runs of one graph under different settings needs it)."""
        if fresh:
            self.executor.reset()
            self.collect_garbage()  # the old models go before the new ones load
        pid = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(pid, prompt, None))
        if not valid[0]:
            raise GraphError(f"invalid prompt: {valid[1]} {valid[3]}", {"error": valid[1], "node_errors": valid[3]})
        self.executor.execute(prompt, pid, {}, valid[2])
        if not self.executor.success:
            errors = [d for ev, d in self.executor.status_messages if ev == "execution_error"]
            msg = errors[0].get("exception_message", "") if errors else "execution failed"
            raise GraphError(msg, errors[0] if errors else {})
        if time.monotonic() - self.last_collect > GC_INTERVAL_S:
            self.collect_garbage()
        out = {}
        for nid in prompt:
            entry = self.cached_output(nid)
            if entry is not None:
                out[nid] = [v[0] if isinstance(v, list) and len(v) == 1 else v for v in entry.outputs]
        return out

    def collect_garbage(self):
        """What ComfyUI's prompt worker does between prompts. The executor's caches hold reference cycles
        (stock graphs too), so a dropped model is freed only by a collection; without one, fresh runs of
        the exact-layout models piled up copies until the test process was killed for memory."""
        import comfy.model_management
        gc.collect()
        comfy.model_management.soft_empty_cache()
        self.last_collect = time.monotonic()

    def cached_output(self, node_id: str):
        """The output cache's entry of a node (None when it has none). The cache's `get` is a plain
        method up to ComfyUI 0.3.x and a coroutine function in later versions (0.19 at least)."""
        entry = self.executor.caches.outputs.get(node_id)
        return asyncio.run(entry) if inspect.isawaitable(entry) else entry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerHost:
    """`python main.py --cpu --fp16-unet` on a free loopback port, or an existing server named by
    COMFYUI_URL."""

    def __init__(self, work: Path, python: str = sys.executable):
        self.proc = None
        self.url = os.environ.get("COMFYUI_URL")
        self.log_path = work / "server.log"
        if self.url:
            self.url = self.url.rstrip("/")
            return
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        base = work / "server-base"
        for sub in ("custom_nodes", "input", "output", "temp", "user", "models"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--extra-model-paths-config", str(extra_paths_yaml(work)),
               "--disable-api-nodes", "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
               # UNet weights kept in fp16 as on a GPU (on CPU ComfyUI computes in fp32 through its
               # manual-cast ops): an SDXL model then holds ~7 GB, not ~14 GB. The in-process host
               # keeps ComfyUI's CPU default (fp32), so both weight paths are tested.
               "--fp16-unet"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(comfy_root()), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI server did not answer within 180 s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def get(self, path: str, raw=False):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            data = r.read()
        return data if raw else json.loads(data)

    def post(self, path: str, payload) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else {})
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, {"raw": body.decode(errors="replace")}

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "astar-tests"})
        if status != 200:
            raise GraphError(f"server refused the prompt ({status}): {body}", body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None \
                    and hist[prompt_id]["status"].get("status_str") in ("success", "error"):
                entry = hist[prompt_id]
                if entry["status"]["status_str"] == "error":
                    msgs = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                    raise GraphError(f"execution failed: {msgs[0][1].get('exception_message') if msgs else entry}",
                                     msgs[0][1] if msgs else entry)
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def stop(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=20)
        self._log.close()
        self.proc = None


def pack_module(name: str):
    """A module of the pack as ComfyUI loaded it (e.g. 'nodes.patch', 'attention.losses')."""
    import importlib
    root = next(m for m in sys.modules if m.endswith(PACK_MODULE))  # ComfyUI names it by its path
    return importlib.import_module(f"{root}.{name}")


def full_guidance_passes(monkeypatch) -> None:
    """Every guidance pass of the runs that follow runs the whole model (GuidancePasses with lean=False),
    for tests that compare with full passes or watch layers after the last read one."""
    capture = pack_module("attention.capture")
    lean_init = capture.GuidancePasses.__init__
    monkeypatch.setattr(capture.GuidancePasses, "__init__",
                        lambda self, *a, **k: lean_init(self, *a, **{**k, "lean": False}))


class Attn2ReplaceNode:
    """Base of test-only nodes (register a subclass in host.nodes.NODE_CLASS_MAPPINGS): MODEL -> a clone
    with the subclass's `replace(q, k, v, extra_options)` as the attn2 replace of every cross-attention
    layer, found here by walking the UNet (independently of the pack)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def replace(self, q, k, v, extra_options, **kwargs):
        raise NotImplementedError

    def patch(self, model):
        import comfy.ldm.modules.attention as comfy_attention
        patched = model.clone()
        unet = patched.model.diffusion_model
        for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]),
                             ("output", unet.output_blocks)):
            for i, block in enumerate(blocks):
                for layer in block:
                    if isinstance(layer, comfy_attention.SpatialTransformer):
                        for t in range(len(layer.transformer_blocks)):
                            patched.set_model_attn2_replace(self.replace, name, i, t)
        return (patched,)
