"""Take the README's and the help pages' pictures from the pack's own run in the real frontend.

    ~/.cache/astar-comfyui/venv/bin/python tools/screenshots.py     # tools/setup.sh's host (or COMFYUI_ROOT)

What it does, with the browser test's set-up (tests/host/test_browser.py: a ComfyUI server with this
pack, the frontend in headless Chromium through Python playwright): loads example_workflows/astar_sd15.json,
runs it from the page on the random-weight mini SD1.5 checkpoint of the test suite (256 px, 8 steps, the
first 4 guided; its images are noise, the overlay figures are the overlay node's real outputs of that
run), then writes
  docs/images/workflow.jpg        the example's nodes on the canvas after the run
  docs/images/overlays.jpg        the overlay node's outputs of that run (combined, heatmaps, timeline, loss plot)
  web/docs/images/<NodeId>.jpg    each A-STAR node on the canvas, for its help page
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
for p in (PACK_DIR, PACK_DIR / "tests", PACK_DIR / "tests" / "host"):
    sys.path.insert(0, str(p))

from PIL import Image  # noqa: E402

from support import host as hosts  # noqa: E402
from support.graphs import window_end  # noqa: E402
from test_browser import CHROMIUM_FLAGS, Page, _set_widget, chromium_path, missing_browser_tools  # noqa: E402

WORKFLOW = PACK_DIR / "example_workflows" / "astar_sd15.json"
README_IMAGES = PACK_DIR / "docs" / "images"
HELP_IMAGES = PACK_DIR / "web" / "docs" / "images"
MINI = "astar-test-sd15-mini.safetensors"
SMALL = {"width": 256, "height": 256, "steps": 8, "attention_resolution": "1/16", "seed": 42}
MAX_BYTES = 300_000
VIEWPORT = {"width": 2200, "height": 1300}  # the whole example fits at a zoom where node text is drawn
# The frontend's minimap and canvas statistics would cover nodes; a first-run banner is closed below.
SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}


def save_jpeg(png: bytes, path: Path, width: int | None = None) -> None:
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if width and img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    for quality in (85, 75, 65, 55):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality, optimize=True)
        if buf.tell() <= MAX_BYTES:
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    print(f"wrote {path.relative_to(PACK_DIR)} ({img.width}x{img.height}, {buf.tell() // 1024} KB)")


def small_workflow(object_info: dict) -> dict:
    workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            _set_widget(node, "ckpt_name", MINI, object_info)
        elif node["type"] == "EmptyLatentImage":
            _set_widget(node, "width", SMALL["width"], object_info)
            _set_widget(node, "height", SMALL["height"], object_info)
        elif node["type"] == "AStarKSampler":
            for key, value in (("steps", SMALL["steps"]), ("guidance_end", window_end(SMALL["steps"] // 2, SMALL["steps"])),
                               ("attention_resolution", SMALL["attention_resolution"]), ("seed", SMALL["seed"])):
                _set_widget(node, key, value, object_info)
    return workflow


def run_from_page(page: Page, server) -> dict:
    """Queue the loaded graph with the page's own Queue; the finished history entry."""
    before = set(server.get("/history?max_items=1000"))
    page.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.time() + 600
    while time.time() < deadline:
        hist = server.get("/history?max_items=1000")
        done = [pid for pid in hist if pid not in before and hist[pid].get("status", {}).get("completed") is not None]
        if done:
            entry = hist[done[0]]
            if entry["status"]["status_str"] != "success":
                raise RuntimeError(f"the run failed: {entry['status']}")
            return entry
        time.sleep(0.5)
    raise TimeoutError("the run did not finish in 600 s")


def output_images(server, entry: dict, workflow: dict, prefix: str) -> list[Image.Image]:
    node = next(str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveImage" and n["widgets_values"][0] == prefix)
    return [Image.open(io.BytesIO(server.get(
                f"/view?filename={i['filename']}&subfolder={i['subfolder']}&type={i['type']}", raw=True))).convert("RGB")
            for i in entry["outputs"][node]["images"]]


def close_banners(page: Page) -> None:
    """Close the frontend's announcement banner (a version's "Introducing ..." bar), where there is one."""
    page.page.evaluate("""() => {
        for (const el of document.querySelectorAll('div, section')) {
            if (el.children.length && /^Introducing/.test(el.innerText || '') && el.querySelectorAll('button').length >= 1
                    && el.getBoundingClientRect().top < 5 && el.getBoundingClientRect().height < 80) {
                const buttons = el.querySelectorAll('button');
                buttons[buttons.length - 1].click();
                return;
            }
        }
    }""")
    page.page.wait_for_timeout(300)


def overlay_montage(images: list[Image.Image], height: int = 256) -> Image.Image:
    """The images side by side at one height, on white."""
    scaled = [im.resize((round(im.width * height / im.height), height), Image.LANCZOS) for im in images]
    gap = 8
    out = Image.new("RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), height), "white")
    x = 0
    for im in scaled:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out


def node_shot(page: Page, node_id: int) -> bytes:
    """One node at zoom 1 (title included), cut from the canvas."""
    margin = 200  # clear of the sidebar and the menu bar
    box = page.page.evaluate("""([id, m]) => {
        const n = window.app.graph.getNodeById(id), c = window.app.canvas;
        const title = window.LiteGraph.NODE_TITLE_HEIGHT;
        c.ds.scale = 1; c.ds.offset = [-n.pos[0] + m, -n.pos[1] + m];
        c.setDirty(true, true); c.draw(true, true);
        const r = c.canvas.getBoundingClientRect();
        return {x: r.left + m - 12, y: r.top + m - title - 12, width: n.size[0] + 24, height: n.size[1] + title + 40};
    }""", [node_id, margin])
    page.page.wait_for_timeout(300)
    return page.page.screenshot(clip=box)


def main() -> int:
    reason = missing_browser_tools()
    if reason:
        raise SystemExit(reason)
    from playwright.sync_api import sync_playwright
    from support.models import build_sd15_checkpoint

    work = Path(tempfile.mkdtemp(prefix="astar-screenshots-"))
    build_sd15_checkpoint(hosts.models_dir() / "checkpoints" / MINI, layout="mini", seed=0)
    server = hosts.ServerHost(work)
    profile = tempfile.mkdtemp(prefix="astar-chromium-")
    pw = sync_playwright().start()
    try:
        context = pw.chromium.launch_persistent_context(profile, executable_path=chromium_path(), headless=True,
                                                        args=CHROMIUM_FLAGS, viewport=VIEWPORT)
        for key, value in SETTINGS.items():
            server.post(f"/settings/{key}", value)
        page = Page(context, server)
        close_banners(page)
        object_info = server.get("/object_info")
        workflow = small_workflow(object_info)
        page.load(workflow, "astar_sd15")
        entry = run_from_page(page, server)
        page.page.wait_for_function(
            "() => window.app.graph.nodes.filter(n => n.type === 'SaveImage').every(n => n.imgs && n.imgs.length)",
            timeout=60_000)
        page.page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
        page.page.wait_for_timeout(500)
        save_jpeg(page.page.screenshot(), README_IMAGES / "workflow.jpg", width=1600)

        figures = [im for name in ("combined", "heatmaps", "timeline", "loss_plot")
                   for im in output_images(server, entry, workflow, f"astar/sd15_{name}")]
        buf = io.BytesIO()
        overlay_montage(figures).save(buf, "PNG")
        save_jpeg(buf.getvalue(), README_IMAGES / "overlays.jpg")

        # Each A-STAR node of the pack on the canvas (the Apply and Recorder nodes from their own examples).
        shots = {"AStarTextEncode": ("astar_sd15", None), "AStarKSampler": ("astar_sd15", None),
                 "AStarAttentionOverlay": ("astar_sd15", None),
                 "AStarApply": ("astar_apply_ksampler_advanced", None), "AStarAttentionRecorder": ("record_only", None)}
        loaded = None  # the examples as they are saved (the run above changed sizes and steps)
        for node_type, (example, _) in shots.items():
            if example != loaded:
                wf = json.loads((PACK_DIR / "example_workflows" / f"{example}.json").read_text(encoding="utf-8"))
                page.load(wf, example)
                loaded = example
            node_id = page.page.evaluate("(t) => window.app.graph.nodes.find(n => n.type === t).id", node_type)
            save_jpeg(node_shot(page, node_id), HELP_IMAGES / f"{node_type}.jpg")
        save_jpeg(buf.getvalue(), HELP_IMAGES / "overlay_outputs.jpg", width=1600)
        context.close()
    finally:
        pw.stop()
        server.stop()
        shutil.rmtree(profile, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
