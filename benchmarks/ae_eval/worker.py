"""One ComfyUI server as seen by the sweep: run one job's graph and bring back its images.

``ServerWorker`` is a plain class; the sweep runs one per server as a threaded Ray actor, so a
server's next job is queued while its current one runs. ``run`` never raises: it returns a result
whose ``status`` says what happened ("ok", "unavailable", "failed", "rejected")."""
from __future__ import annotations

import hashlib
import json
import time
import uuid

from .prompts import file_name
from .client import ComfyClient, JobFailed, JobRejected, ServerUnavailable, output_images, output_texts


class ServerWorker:
    def __init__(self, url: str, job_timeout: float):
        self.url = url
        self.job_timeout = job_timeout
        self.client = ComfyClient(url)

    def ping(self) -> bool:
        return self.client.alive()

    def object_info(self) -> dict | None:
        try:
            return self.client.object_info()
        except ServerUnavailable:
            return None

    def run(self, job_key: str, graph: dict, image_node: str, keep_extras: bool) -> dict:
        """Runs a job's graph, or adopts it when this server already has it (a job sent again after its
        answer was lost: the prompt id is derived from the job and its graph)."""
        t0 = time.time()
        prompt_id = job_prompt_id(job_key, graph)
        try:
            state = self.client.state(prompt_id)
            if state == "error":   # a failed run is tried again, under a new id (its entry would answer)
                prompt_id, state = str(uuid.uuid4()), None
            if state is None:
                self.client.submit(graph, prompt_id, {"ae_eval_job": job_key})
            entry = self.client.wait(prompt_id, self.job_timeout)
            refs = output_images(entry)
            image = next((ref for nid, ref in refs if nid == image_node), None)
            if image is None:
                raise JobFailed(f"{self.url}: node {image_node} returned no image")
            extras = {}
            if keep_extras:
                extras = {f"{_title(graph, nid)}_{i}": self.client.image(ref)
                          for i, (nid, ref) in enumerate(refs) if ref is not image}
                extras.update({f"{_title(graph, nid)}_text": text.encode() for nid, text in output_texts(entry).items()})
            return {"status": "ok", "server": self.url, "prompt_id": prompt_id, "png": self.client.image(image),
                    "extras": extras, "seconds": time.time() - t0}
        except ServerUnavailable as e:
            return {"status": "unavailable", "server": self.url, "message": str(e)}
        except JobRejected as e:
            return {"status": "rejected", "server": self.url, "message": str(e)}
        except JobFailed as e:
            return {"status": "failed", "server": self.url, "message": str(e)}


def _title(graph: dict, nid: str) -> str:
    """A file-name form of a node's title ('Save Image (heatmaps)' -> 'save_image_heatmaps')."""
    return file_name(graph.get(nid, {}).get("_meta", {}).get("title", nid))


def job_prompt_id(job_key: str, graph: dict) -> str:
    """The same job with the same graph always gets the same prompt id."""
    digest = hashlib.sha256(json.dumps(graph, sort_keys=True).encode()).hexdigest()
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"ae-eval:{job_key}:{digest}"))
