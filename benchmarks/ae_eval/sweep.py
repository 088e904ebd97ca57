"""The job grid (methods x prompts x seeds) spread over ComfyUI servers with Ray.

One threaded Ray actor per server (a local Ray instance unless --ray-address names a cluster)
keeps ``depth`` jobs queued on its server. The driver builds each job's graph for the server it
goes to, writes every result into the result folder as it arrives (store.py) and skips jobs done
by an earlier run. A server that drops is left alone and polled; its jobs go back to the queue and
run elsewhere (or on it, once it answers again). A job that fails on a server is retried up to
``max_attempts`` times; a graph a server rejects stops the sweep (a configuration error)."""
from __future__ import annotations

import collections
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import graphs, store
from .prompts import slug
from .worker import ServerWorker

PACKAGE_ROOT = Path(__file__).resolve().parents[1]   # benchmarks/, shipped to a Ray cluster's workers
OBJECT_STORE_BYTES = 200 * 1024 ** 2
LOCAL_RAY: dict = {}                 # the session folder of the local instance started here
ACTOR_TIMEOUT_S = 60                 # for an answer of a ready or polled actor


class SweepAborted(RuntimeError):
    """No server answered for too long, or a server rejected a graph; done images are kept."""


@dataclasses.dataclass
class SweepConfig:
    servers: list[str]
    out: Path
    methods: dict[str, dict]
    prompts: list[dict]
    seeds: list[int]
    settings: dict = dataclasses.field(default_factory=dict)   # {"size": px, "inputs": {name: value}}
    overlay_prompts: frozenset = frozenset()
    job_timeout: float = 1800
    depth: int = 2                  # jobs queued per server
    max_attempts: int = 3           # per job, for failures on a live server
    server_wait: float = 600        # seconds to wait when no server answers
    poll: float = 2.0               # seconds between checks of a dropped server
    max_new: int | None = None      # stop after this many new images (a partial run)
    ray_address: str | None = None
    progress: bool = True


def plan(cfg: SweepConfig) -> list[dict]:
    """Every job, ordered so that the methods of one prompt and seed run together."""
    return [{"method": m, "prompt": p["prompt"], "category": p["category"], "concepts": p["concepts"],
             "slug": slug(p["prompt"]), "seed": s, "overlay": p["prompt"] in cfg.overlay_prompts}
            for p in cfg.prompts for s in cfg.seeds for m in cfg.methods]


def signatures(cfg: SweepConfig) -> dict[str, dict]:
    return {name: {"method": m, "settings": cfg.settings} for name, m in cfg.methods.items()}


def start_ray(address: str | None, n_servers: int, attempts: int = 3):
    """Ray, started or joined once per process. A local start is retried: Ray gives its raylet a
    fixed 30 s to register, which a heavily loaded machine can miss."""
    import ray
    for attempt in range(attempts):
        try:
            return _init_ray(ray, address, n_servers)
        except Exception as e:  # Ray raises a bare Exception for a raylet that did not register
            if address or "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()


def _init_ray(ray, address: str | None, n_servers: int):
    if not ray.is_initialized():
        common = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning"}
        if address:
            ray.init(address=address, runtime_env={"py_modules": [str(PACKAGE_ROOT)]}, **common)
        else:
            # The actors only wait on HTTP (~100 MB each): Ray's memory monitor, which kills workers
            # when the machine runs short, would only kill them while the servers use the memory.
            os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
            LOCAL_RAY["temp_dir"] = tempfile.mkdtemp(prefix="ray", dir="/tmp")   # short: Ray's socket paths
            ray.init(num_cpus=max(1, n_servers), object_store_memory=OBJECT_STORE_BYTES,
                     _temp_dir=LOCAL_RAY["temp_dir"], **common)
    return ray


def stop_local_ray() -> None:
    """Shuts down the local Ray instance this process started and removes its session folder."""
    import ray
    ray.shutdown()
    if LOCAL_RAY.get("temp_dir"):
        shutil.rmtree(LOCAL_RAY.pop("temp_dir"), ignore_errors=True)


class Servers:
    """The actors, which servers answer, and each live server's templates."""

    def __init__(self, ray, cfg: SweepConfig):
        actor_class = ray.remote(num_cpus=0, max_concurrency=cfg.depth + 2, max_restarts=3)(ServerWorker)
        self.ray, self.cfg = ray, cfg
        self.actors = [actor_class.remote(url, cfg.job_timeout) for url in cfg.servers]
        self.templates: dict[int, dict] = {}
        self.down: set[int] = set(range(len(cfg.servers)))   # not answering (all, until first asked)
        self.last_poll = -1e9

    def poll_down(self, force: bool = False) -> None:
        """Asks every dropped server for its nodes (at most every cfg.poll s); answering ones are live."""
        if not self.down or (not force and time.monotonic() - self.last_poll < self.cfg.poll):
            return
        self.last_poll = time.monotonic()
        idx = sorted(self.down)
        refs = [self.actors[i].object_info.remote() for i in idx]
        for i, ref in zip(idx, refs):
            info = _get(self.ray, ref, None)
            if info is not None:
                self.templates[i] = self._templates(info)
                self.down.discard(i)

    def _templates(self, info: dict) -> dict:
        cfg = self.cfg
        out = {(name, overlay): graphs.method_template(name, m, info, overlay)
               for name, m in cfg.methods.items() for overlay in {False, bool(cfg.overlay_prompts)}}
        graphs.check_settings(cfg.settings, out)
        return {"templates": out, "info": info}

    def graph(self, i: int, job: dict) -> tuple[dict, str]:
        t = self.templates[i]["templates"][(job["method"], job["overlay"])]
        g = graphs.job_graph(t, job, self.cfg.settings)
        graphs.check_graph(g, self.templates[i]["info"], job["method"])
        return g, t["image_node"]

    def drop(self, i: int) -> None:
        self.down.add(i)
        self.templates.pop(i, None)

    def live(self) -> list[int]:
        return [i for i in range(len(self.actors)) if i not in self.down]


def _progress(cfg: SweepConfig, total: int, done: int):
    from tqdm import tqdm
    return tqdm(total=total, initial=done, unit="img", disable=not cfg.progress, dynamic_ncols=True,
                desc="sweep", smoothing=0.1)


def run_sweep(cfg: SweepConfig) -> dict:
    """Runs every job not yet in cfg.out. Returns counts, failures and throughput."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    store.claim_signatures(cfg.out, signatures(cfg))
    jobs = plan(cfg)
    queue = collections.deque(j for j in jobs if not store.is_done(cfg.out, j))
    done_before = len(jobs) - len(queue)
    ray = start_ray(cfg.ray_address, len(cfg.servers))
    servers = Servers(ray, cfg)
    servers.poll_down(force=True)
    inflight: dict = {}                   # future -> (server index, job)
    attempts = collections.Counter()
    failures, ran, t0 = {}, [], time.monotonic()
    bar = _progress(cfg, len(jobs), done_before)
    try:
        while queue or inflight:
            budget_left = cfg.max_new is None or len(ran) + len(inflight) < cfg.max_new
            for i in servers.live():
                while queue and budget_left and sum(s == i for s, _ in inflight.values()) < cfg.depth:
                    job = queue.popleft()
                    graph, image_node = servers.graph(i, job)
                    fut = servers.actors[i].run.remote(store.job_key(job), graph, image_node, job["overlay"])
                    inflight[fut] = (i, job)
                    budget_left = cfg.max_new is None or len(ran) + len(inflight) < cfg.max_new
            if not inflight:
                if not budget_left or not queue:
                    break
                _wait_for_a_server(servers, cfg)
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=cfg.poll)
            for fut in ready:
                i, job = inflight.pop(fut)
                result = _result(ray, fut, cfg.servers[i])
                if result["status"] == "ok":
                    if not store.is_done(cfg.out, job):
                        store.save_result(cfg.out, job, result)
                        ran.append(store.job_key(job))
                        bar.update(1)
                elif result["status"] == "unavailable":
                    servers.drop(i)
                    queue.appendleft(job)
                elif result["status"] == "rejected":
                    raise SweepAborted(f"{store.job_key(job)}: {result['message']}")
                else:
                    attempts[store.job_key(job)] += 1
                    if attempts[store.job_key(job)] < cfg.max_attempts:
                        queue.append(job)
                    else:
                        failures[store.job_key(job)] = result["message"]
            servers.poll_down()
    finally:
        bar.close()
    seconds = time.monotonic() - t0
    return {"jobs": len(jobs), "done_before": done_before, "ran": ran, "failures": failures,
            "seconds": seconds, "images_per_min": 60 * len(ran) / seconds if seconds > 0 else 0.0}


def _get(ray, ref, default):
    """ray.get, or default when the actor is restarting or gone (Ray restarts it; the server is
    then polled again)."""
    try:
        return ray.get(ref, timeout=ACTOR_TIMEOUT_S)
    except ray.exceptions.RayError:
        return default


def _result(ray, fut, url: str) -> dict:
    return _get(ray, fut, {"status": "unavailable", "server": url, "message": f"the actor for {url} was lost"})


def _wait_for_a_server(servers: Servers, cfg: SweepConfig) -> None:
    deadline = time.monotonic() + cfg.server_wait
    while time.monotonic() < deadline:
        servers.poll_down(force=True)
        if servers.live():
            return
        time.sleep(cfg.poll)
    raise SweepAborted(f"no server answered for {cfg.server_wait:.0f} s ({', '.join(cfg.servers)}); the images "
                       f"made so far are in {cfg.out}: run the same command again to resume")
