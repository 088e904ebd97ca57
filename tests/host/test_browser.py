"""The example workflows in the real ComfyUI frontend, in headless Chromium (Debian's `chromium`, driven
by Python playwright; tools/setup.sh installs both): each loads with no missing node and no error, the
frontend's own conversion (graphToPrompt) equals tools/workflow_to_api.py's, and one example queued
from the page produces images the page shows. Screenshots go to test-artifacts/ (gitignored).

A missing tool is not a failure of the pack: without Python playwright or a Chromium binary the
page tests are skipped with the reason (the template-serving test needs neither and always runs).
With COMFYUI_ROOT set, tools/setup.sh is skipped, so install them yourself (docs/compatibility.md)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from support import host as hosts
from support.graphs import window_end
from tools.run_example import texts
from tools.workflow_to_api import convert, widget_inputs

EXAMPLES_DIR = hosts.PACK_DIR / "example_workflows"
EXAMPLES = sorted(p.stem for p in EXAMPLES_DIR.glob("*.json"))
ARTIFACTS = hosts.PACK_DIR / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The frontend asks api.comfy.org about node packs; the page's CSP blocks that on an offline host.
IGNORED_CONSOLE = ("Content Security Policy",)
APP_READY = "() => window.app && window.app.graph && window.app.extensionManager && window.LiteGraph"


def chromium_path() -> str | None:
    for cand in (os.environ.get("ASTAR_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                 "/usr/bin/chromium"):
        if cand and Path(cand).exists():
            return cand
    return None


def missing_browser_tools() -> str | None:
    """Why the page tests cannot run here (None when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return ("Python playwright is not installed in this Python: `pip install playwright==1.65.2` "
                "(tools/setup.sh does it for its own host; no browser download, a system Chromium is used)")
    if chromium_path() is None:
        return ("no Chromium binary: `apt-get install chromium` (tools/setup.sh does it as root), "
                "or set ASTAR_CHROMIUM to a Chromium executable")
    return None


@pytest.fixture(scope="module")
def browser():
    reason = missing_browser_tools()
    if reason:
        pytest.skip(f"browser test skipped: {reason}")
    from playwright.sync_api import sync_playwright
    exe = chromium_path()
    profile = tempfile.mkdtemp(prefix="astar-chromium-")
    pw = sync_playwright().start()
    try:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=exe, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1600, "height": 1000})
        yield context
        context.close()
    finally:
        pw.stop()
        shutil.rmtree(profile, ignore_errors=True)


def test_a_missing_tool_is_a_skip_reason(monkeypatch):
    """Without playwright, or without a Chromium binary, the page tests skip and say what to install."""
    import sys
    import types
    monkeypatch.setitem(globals(), "chromium_path", lambda: "/usr/bin/chromium")
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # `import` fails as if not installed
    assert "pip install playwright" in missing_browser_tools()
    for name in ("playwright", "playwright.sync_api"):  # installed
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["playwright"].sync_api = sys.modules["playwright.sync_api"]
    assert missing_browser_tools() is None
    monkeypatch.setitem(globals(), "chromium_path", lambda: None)
    assert "apt-get install chromium" in missing_browser_tools()


class Page:
    """The ComfyUI frontend in one tab, with its console collected."""

    def __init__(self, context, server):
        self.server = server
        self.console: list[tuple[str, str]] = []
        status, _ = server.post("/settings/Comfy.TutorialCompleted", True)
        assert status == 200
        self.page = context.new_page()
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.console.append(("pageerror", str(e))))
        t = time.time()
        self.page.goto(server.url + "/", wait_until="domcontentloaded")
        self.page.wait_for_function(APP_READY, timeout=120_000)
        self.load_s = time.time() - t
        # Record what the frontend reports as missing node types (and still show its dialog).
        self.page.evaluate("""() => {
            window.__astarMissing = [];
            const show = window.app.showMissingNodesError.bind(window.app);
            window.app.showMissingNodesError = (types) => { window.__astarMissing.push(...types); return show(types); };
        }""")

    def errors_since(self, start: int) -> list[str]:
        return [f"{kind}: {text}" for kind, text in self.console[start:]
                if kind in ("error", "pageerror") and not any(s in text for s in IGNORED_CONSOLE)]

    def load(self, workflow: dict, name: str) -> dict:
        """Load a workflow as the templates menu does; returns what went wrong (empty lists when fine)."""
        start = len(self.console)
        self.page.evaluate("async ([wf, name]) => { window.__astarMissing = [];"
                           " await window.app.loadGraphData(wf, true, true, name); }", [workflow, name])
        self.page.wait_for_timeout(500)
        return {
            "missing_reported": self.page.evaluate("() => window.__astarMissing"),
            "unregistered": self.page.evaluate(
                "() => window.app.graph.nodes.filter(n => !(n.type in window.LiteGraph.registered_node_types))"
                ".map(n => n.type)"),
            "node_count": self.page.evaluate("() => window.app.graph.nodes.length"),
            "dialogs": self.page.evaluate(
                "() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 300))"),
            "error_toasts": self.page.evaluate(
                "() => Array.from(document.querySelectorAll('.p-toast-message-error, .p-toast-message-warn'))"
                ".map(d => d.innerText.slice(0, 300))"),
            "console_errors": self.errors_since(start),
        }

    def graph_to_prompt(self) -> dict:
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def screenshot(self, name: str, fit: bool = True) -> Path:
        if fit:
            self.page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
            self.page.wait_for_timeout(300)
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"browser_{name}.png"
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture(scope="module")
def page(browser, server):
    p = Page(browser, server)
    yield p
    p.page.close()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def template_module(server) -> str:
    """The pack's folder name as the server lists it under /workflow_templates."""
    listing = server.get("/workflow_templates")
    for module, names in listing.items():
        if set(EXAMPLES) <= set(names):
            return module
    pytest.fail(f"the server does not list the pack's example workflows as templates: {listing}")


def test_templates_are_served(server):
    module = template_module(server)
    for name in EXAMPLES:
        wf = server.get(f"/api/workflow_templates/{module}/{name}.json")
        assert wf == json.loads((EXAMPLES_DIR / f"{name}.json").read_text(encoding="utf-8"))
        png = server.get(f"/api/workflow_templates/{module}/{name}.png", raw=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        jpg = server.get(f"/api/workflow_templates/{module}/{name}.jpg", raw=True)  # what the dialog shows
        assert jpg[:3] == b"\xff\xd8\xff"


def test_templates_dialog_shows_and_opens_the_examples(page, server):
    """The user's path: Templates > the pack's category shows every example with its thumbnail (this
    frontend asks for <name>.jpg), and clicking one loads it."""
    module = template_module(server)
    page.page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.BrowseTemplates'); }")
    page.page.get_by_text(module, exact=True).first.click(timeout=30_000)
    for name in EXAMPLES:  # the dialog loads a card's image when it scrolls into view
        page.page.locator(f'[data-testid="template-workflow-{name}"]').scroll_into_view_if_needed(timeout=30_000)
        page.page.wait_for_function(
            "(n) => { const img = document.querySelector(`[data-testid=\"template-workflow-${n}\"] img`);"
            " return img && img.complete && img.naturalWidth > 0; }", arg=name, timeout=30_000)
    page.screenshot("templates_dialog", fit=False)
    start = len(page.console)
    page.page.evaluate("() => { window.__astarMissing = []; }")
    page.page.locator('[data-testid="template-workflow-astar_sd15"]').click()
    expected = len(json.loads((EXAMPLES_DIR / "astar_sd15.json").read_text(encoding="utf-8"))["nodes"])
    page.page.wait_for_function(
        "(n) => window.app.graph.nodes.length === n"
        " && window.app.graph.nodes.some(n => n.type === 'AStarKSampler')", arg=expected, timeout=30_000)
    page.page.wait_for_timeout(500)
    assert page.page.evaluate("() => window.__astarMissing") == []
    assert not page.errors_since(start)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_loads_in_the_frontend(page, server, object_info, name):
    """The template as the frontend fetches it loads with no missing node type, no dialog, no error
    toast and no console error; the frontend's graphToPrompt equals our converter's output."""
    module = template_module(server)
    workflow = page.page.evaluate(f"async () => await (await fetch('/api/workflow_templates/{module}/{name}.json')).json()")
    report = page.load(workflow, name)
    page.screenshot(name)
    assert report["node_count"] == len(workflow["nodes"]), report
    assert not report["missing_reported"] and not report["unregistered"], report
    assert not report["dialogs"] and not report["error_toasts"], report
    assert not report["console_errors"], report
    frontend = page.graph_to_prompt()
    ours = convert(workflow, object_info)
    assert set(frontend) == set(ours)
    for nid, entry in frontend.items():
        known = {k: v for k, v in entry["inputs"].items() if k in ours[nid]["inputs"] or k in _inputs_of(object_info, entry)}
        assert entry["class_type"] == ours[nid]["class_type"]
        assert known == ours[nid]["inputs"], f"node {nid} ({entry['class_type']})"


def _inputs_of(object_info, entry) -> set:
    d = object_info[entry["class_type"]]["input"]
    return set(d.get("required", {})) | set(d.get("optional", {}))


def _set_widget(node: dict, name: str, value, object_info) -> None:
    i = 0
    for widget, extra in widget_inputs(object_info[node["type"]]):
        if widget == name:
            node["widgets_values"][i] = value
            return
        i += 1 + extra
    raise KeyError(f"{node['type']} has no widget {name}")


def test_queue_from_the_page(page, server, object_info, mini_ckpt):
    """astar_sd15 with the mini checkpoint at 64 px, 3 steps of which the first 2 guided, queued with the page's
    own Queue (app.queuePrompt): the run succeeds, the history has its images and the page shows them on the
    Save Image node, and the overlay's pictures and report on the overlay node."""
    workflow = json.loads((EXAMPLES_DIR / "astar_sd15.json").read_text(encoding="utf-8"))
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            _set_widget(node, "ckpt_name", mini_ckpt, object_info)
        elif node["type"] == "EmptyLatentImage":
            _set_widget(node, "width", 64, object_info)
            _set_widget(node, "height", 64, object_info)
        elif node["type"] == "AStarKSampler":
            for key, value in (("steps", 3), ("guidance_end", window_end(2, 3)), ("attention_resolution", "1/16"),
                               ("seed", 4242)):
                _set_widget(node, key, value, object_info)
    report = page.load(workflow, "astar_sd15_queued")
    assert not report["missing_reported"] and not report["console_errors"], report
    before = set(server.get("/history?max_items=1000"))
    start = len(page.console)
    page.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.time() + 300
    new = None
    while time.time() < deadline:
        hist = server.get("/history?max_items=1000")
        new = [pid for pid in hist if pid not in before and hist[pid].get("status", {}).get("completed") is not None]
        if new:
            break
        time.sleep(0.5)
    assert new, f"the page's prompt did not finish in 300 s\n{server.log()[-3000:]}"
    entry = server.get(f"/history/{new[0]}")[new[0]]
    assert entry["status"]["status_str"] == "success", entry["status"]
    save_ids = [str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveImage"]
    assert all(entry["outputs"].get(nid, {}).get("images") for nid in save_ids), entry["outputs"].keys()
    reports = list(texts(entry).values())  # the widgets set on the page are the ones that ran
    assert len(reports) == 1 and "3 steps (2 guided)" in reports[0], reports
    main_save = next(str(n["id"]) for n in workflow["nodes"]
                     if n["type"] == "SaveImage" and n["widgets_values"][0] == "astar/sd15")
    filename = entry["outputs"][main_save]["images"][0]["filename"]
    # The page shows them: each Save Image node gets its images from the server's "executed" messages.
    page.page.wait_for_function(
        "([id, f, count]) => { const n = window.app.graph.getNodeById(Number(id));"
        " const shown = window.app.graph.nodes.filter(m => m.type === 'SaveImage' && m.imgs && m.imgs.length);"
        " return n && n.imgs && n.imgs.some(i => i.src.includes('/view') && i.src.includes(f))"
        " && shown.length === count; }",
        arg=[main_save, filename, len(save_ids)], timeout=30_000)
    # The overlay shows its six pictures (two heatmaps, combined, timeline, overlap, loss plot) and its report.
    overlay = next(str(n["id"]) for n in workflow["nodes"] if n["type"] == "AStarAttentionOverlay")
    page.page.wait_for_function(
        "([id, report]) => { const n = window.app.graph.getNodeById(Number(id));"
        " const w = n && (n.widgets || []).find(w => w.name === 'report_text');"
        " return n.imgs && n.imgs.length === 6 && w && w.value === report; }",
        arg=[overlay, reports[0]], timeout=30_000)
    assert not page.errors_since(start)
    page.screenshot("astar_sd15_queued_result")


HELP_DIR = hosts.PACK_DIR / "web" / "docs"
LOCALE_SETTING = "Comfy.Locale"


def _open_help(page: Page, node_type: str) -> None:
    """As a user does: click the node's title on the canvas, then the selection toolbox's info button."""
    x, y = page.page.evaluate("""(t) => {
        const n = window.app.graph.nodes.find(n => n.type === t), c = window.app.canvas;
        c.ds.scale = 1; c.ds.offset = [-n.pos[0] + 500, -n.pos[1] + 300]; c.setDirty(true, true);
        const r = c.canvas.getBoundingClientRect();
        return [r.left + 500 + 60, r.top + 300 - window.LiteGraph.NODE_TITLE_HEIGHT / 2];
    }""", node_type)
    page.page.wait_for_timeout(300)
    page.page.mouse.click(x, y)
    page.page.locator('[data-testid="info-button"]').first.click(timeout=30_000)


def _wait_for_help(page: Page, sentence: str, picture: str) -> None:
    """The panel shows the page's text and its picture, loaded from the pack's web directory."""
    page.page.wait_for_function(
        "([s, p]) => document.body.innerText.includes(s) && Array.from(document.querySelectorAll('img')).some("
        "i => i.src.endsWith('/docs/' + p) && i.src.includes('/extensions/') && i.complete && i.naturalWidth > 0)",
        arg=[sentence, picture], timeout=30_000)


def test_help_page_opens_in_the_help_panel(page):
    """A-STAR Apply's info button shows its help page (web/docs/AStarApply.md) with its picture."""
    workflow = json.loads((EXAMPLES_DIR / "astar_apply_ksampler_advanced.json").read_text(encoding="utf-8"))
    page.load(workflow, "astar_apply_help")
    text = (HELP_DIR / "AStarApply.md").read_text(encoding="utf-8")
    assert "Typical graph: Load Checkpoint" in text and "images/AStarApply.jpg" in text
    _open_help(page, "AStarApply")
    _wait_for_help(page, "Typical graph: Load Checkpoint", "images/AStarApply.jpg")
    page.screenshot("help_panel_AStarApply", fit=False)


def frontend_keeps_custom_translations() -> bool:
    """Whether the served frontend merges the custom nodes' /i18n translations again after it loads a
    locale's own messages (frontend 1.42 does, in mergeCustomNodesI18n; 1.32.9, which ComfyUI 0.3.75 ships,
    replaces them when it loads Chinese, so its pages show the pack's English names)."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return True
    assets = Path(comfyui_frontend_package.__file__).parent / "static" / "assets"
    return any("mergeCustomNodesI18n" in p.read_text(encoding="utf-8", errors="ignore") for p in assets.glob("*.js"))


def test_chinese_help_page_and_node_title(browser, server):
    """With the frontend's language set to Chinese the help panel shows the Chinese page
    (web/docs/AStarApply/zh.md) and a new A-STAR KSampler is titled with its Chinese name."""
    settings = server.get("/settings")
    status, _ = server.post(f"/settings/{LOCALE_SETTING}", "zh")
    assert status == 200
    try:
        zh = Page(browser, server)
        try:
            workflow = json.loads((EXAMPLES_DIR / "astar_apply_ksampler_advanced.json").read_text(encoding="utf-8"))
            zh.load(workflow, "astar_apply_help_zh")
            assert "典型连接" in (HELP_DIR / "AStarApply" / "zh.md").read_text(encoding="utf-8")
            _open_help(zh, "AStarApply")
            _wait_for_help(zh, "典型连接", "images/AStarApply.jpg")
            zh.screenshot("help_panel_AStarApply_zh", fit=False)
            title = zh.page.evaluate("() => window.LiteGraph.createNode('AStarKSampler').title")
            expected = json.loads((hosts.PACK_DIR / "locales" / "zh" / "nodeDefs.json").read_text(
                encoding="utf-8"))["AStarKSampler"]["display_name"]
            if not frontend_keeps_custom_translations():
                assert title == "A-STAR KSampler"
                pytest.xfail("this frontend replaces custom nodes' translations when it loads a locale "
                             f"(the pack's Chinese names are served by /i18n; the page shows {title!r})")
            assert title == expected
        finally:
            zh.page.close()
    finally:
        server.post(f"/settings/{LOCALE_SETTING}", settings.get(LOCALE_SETTING, "en"))
