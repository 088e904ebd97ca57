"""A ComfyUI server over HTTP (standard library only): queue an API-format prompt, wait for it,
fetch its images. Every request has a timeout and every wait a deadline.

Errors say whose fault a failure is: ServerUnavailable (the server is unreachable or dropped the
job: try elsewhere), JobRejected (HTTP 400, the graph does not fit the server: a configuration
error, retrying cannot help) and JobFailed (a node raised while running)."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request

REQUEST_TIMEOUT_S = 30
POLL_S = 0.2


class ServerUnavailable(ConnectionError):
    """The server did not answer, or lost the job (restarted)."""


class JobRejected(ValueError):
    """The server refused the graph (validation, HTTP 400)."""


class JobFailed(RuntimeError):
    """A node raised while the server ran the graph."""


def _request(url: str, data: bytes | None = None, timeout: float = REQUEST_TIMEOUT_S) -> bytes:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        if e.code == 400:
            raise JobRejected(f"{url}: the server refused the graph: {body[:4000]}") from None
        raise ServerUnavailable(f"{url}: HTTP {e.code}: {body[:500]}") from None
    except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as e:
        raise ServerUnavailable(f"{url}: {e}") from None


class ComfyClient:
    def __init__(self, url: str, timeout: float = REQUEST_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def get_json(self, path: str):
        return json.loads(_request(self.url + path, timeout=self.timeout))

    def get_bytes(self, path: str) -> bytes:
        return _request(self.url + path, timeout=self.timeout)

    def post_json(self, path: str, payload) -> dict:
        body = _request(self.url + path, json.dumps(payload).encode(), timeout=self.timeout)
        return json.loads(body) if body else {}

    def alive(self) -> bool:
        try:
            self.get_json("/system_stats")
            return True
        except ServerUnavailable:
            return False

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def submit(self, prompt: dict, prompt_id: str, extra_data: dict | None = None) -> str:
        body = self.post_json("/prompt", {"prompt": prompt, "prompt_id": prompt_id, "client_id": "ae-eval",
                                          "extra_data": extra_data or {}})
        if body.get("node_errors"):
            raise JobRejected(f"{self.url}: the server refused the graph: {body['node_errors']}")
        return body["prompt_id"]

    def state(self, prompt_id: str) -> str | None:
        """"success" or "error" (in the history), "queued" (queued or running), or None (unknown)."""
        entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry is not None:
            return entry.get("status", {}).get("status_str") or "queued"
        return "queued" if self._queued(prompt_id) else None

    def _queued(self, prompt_id: str) -> bool:
        queue = self.get_json("/queue")
        return any(item[1] == prompt_id for key in ("queue_running", "queue_pending") for item in queue.get(key, []))

    def wait(self, prompt_id: str, timeout: float) -> dict:
        """The history entry of a finished prompt. A prompt neither finished nor queued was lost (the
        server restarted in between): ServerUnavailable."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status", {})
            if status.get("completed") is not None and status.get("status_str") in ("success", "error"):
                if status["status_str"] == "error":
                    raise JobFailed(f"{self.url}: the graph failed: {_execution_error(status)}")
                return entry
            if entry is None and not self._queued(prompt_id):
                raise ServerUnavailable(f"{self.url}: prompt {prompt_id} is neither queued nor finished (restarted?)")
            time.sleep(POLL_S)
        raise ServerUnavailable(f"{self.url}: prompt {prompt_id} did not finish within {timeout:.0f} s")

    def image(self, ref: dict) -> bytes:
        query = urllib.parse.urlencode({"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                                        "type": ref.get("type", "output")})
        return self.get_bytes(f"/view?{query}")


def _execution_error(status: dict) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_message', '').strip()}"
    return "no error message in the history"


def output_images(entry: dict) -> list[tuple[str, dict]]:
    """(node id, image reference) of every image a finished prompt produced, in node order."""
    refs = []
    for nid, out in sorted(entry.get("outputs", {}).items()):
        refs += [(nid, img) for img in out.get("images", []) or [] if isinstance(img, dict) and "filename" in img]
    return refs


def output_texts(entry: dict) -> dict[str, str]:
    """Text outputs (PreviewAny) by node id."""
    texts = {}
    for nid, out in entry.get("outputs", {}).items():
        if out.get("text"):
            t = out["text"]
            texts[nid] = "\n".join(map(str, t)) if isinstance(t, list) else str(t)
    return texts
