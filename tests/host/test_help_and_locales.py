"""The help pages and translations, as the server gives them to the frontend: every node of the pack (from
the server's /object_info) has a help page at the address the frontend's help panel asks for
(/extensions/<pack folder>/docs/<NodeId>.md, and docs/<NodeId>/zh.md in Chinese) that documents each
input and shows a picture the server also serves; /i18n carries English and Simplified Chinese entries for
every node, input and output, and the English ones are the live schema's own texts (tools/make_locales.py)."""
from __future__ import annotations

import json
import re
import urllib.error
from pathlib import Path

import pytest

from support import host as hosts

HELP_DIR = hosts.PACK_DIR / "web" / "docs"
LOCALES = hosts.PACK_DIR / "locales"
LANGUAGES = ("en", "zh")
CJK = re.compile(r"[\u4e00-\u9fff]")


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


@pytest.fixture(scope="module")
def pack_nodes(object_info) -> dict[str, dict]:
    """The pack's nodes as the server lists them: every node of the module A-STAR Text Encode comes from."""
    module = object_info["AStarTextEncode"]["python_module"]
    nodes = {name: info for name, info in object_info.items() if info.get("python_module") == module}
    assert len(nodes) >= 5, sorted(nodes)
    return nodes


def help_base(info: dict) -> str:
    """Where the frontend's nodeHelpService looks for a custom node's pages: /extensions/<pack>/docs/, the
    pack being python_module's second part up to any '@' (ComfyUI-frontend, getNodeHelpBaseUrl)."""
    parts = info["python_module"].split(".")
    assert parts[0] == "custom_nodes", info["python_module"]
    return f"/extensions/{parts[1].split('@')[0]}/docs/"


def inputs_of(info: dict) -> dict[str, dict]:
    out = {}
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            out[name] = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return out


def page_files(node_id: str) -> dict[str, Path]:
    return {"en": HELP_DIR / f"{node_id}.md", "zh": HELP_DIR / node_id / "zh.md"}


def test_every_node_has_help_pages_served(server, pack_nodes):
    """For each node and language: the server serves the page at the frontend's address, byte for byte,
    and every picture it shows (resolved against the docs folder, as the frontend does)."""
    for node_id, info in pack_nodes.items():
        base = help_base(info)
        for lang, path in page_files(node_id).items():
            assert path.is_file(), f"{node_id}: no {lang} help page {path.relative_to(hosts.PACK_DIR)}"
            url = base + (f"{node_id}.md" if lang == "en" else f"{node_id}/{lang}.md")
            assert server.get(url, raw=True) == path.read_bytes(), url
            pictures = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", path.read_text(encoding="utf-8"))
            assert pictures, f"{path.name} ({lang}) shows no picture"
            for picture in pictures:
                assert server.get(base + picture, raw=True) == (HELP_DIR / picture).read_bytes(), picture


def test_a_page_that_is_not_there_is_not_served(server, pack_nodes):
    """The check above can fail: the server answers 404 for a page the pack lacks."""
    with pytest.raises(urllib.error.HTTPError) as err:
        server.get(help_base(pack_nodes["AStarApply"]) + "NoSuchNode.md", raw=True)
    assert err.value.code == 404


@pytest.mark.parametrize("lang", LANGUAGES)
def test_help_pages_document_every_input_and_output(pack_nodes, lang):
    """Each page names every input and output of the live schema (as `name`) and has a section on errors."""
    errors_heading = {"en": "## Common errors", "zh": "## 常见错误"}[lang]
    for node_id, info in pack_nodes.items():
        text = page_files(node_id)[lang].read_text(encoding="utf-8")
        missing = [name for name in [*inputs_of(info), *info["output_name"]] if f"`{name}`" not in text]
        assert not missing, f"{node_id} ({lang}) help page does not document {missing}"
        assert errors_heading in text, f"{node_id} ({lang})"


def expected_keys(info: dict) -> dict:
    """What a locale entry of the node must hold: its display name, description, each input's name (and
    tooltip where the schema has one; the seed's control_after_generate widget too), each output's name."""
    inputs = {}
    for name, options in inputs_of(info).items():
        inputs[name] = {"name"} | ({"tooltip"} if options.get("tooltip") else set())
        if options.get("control_after_generate"):
            inputs["control_after_generate"] = {"name"}
    outputs = {str(i): {"name"} | ({"tooltip"} if (info.get("output_tooltips") or [None] * (i + 1))[i] else set())
               for i in range(len(info["output_name"]))}
    return {"inputs": inputs, "outputs": outputs}


@pytest.fixture(scope="module")
def i18n(server):
    return server.get("/i18n")


@pytest.mark.parametrize("lang", LANGUAGES)
def test_locales_cover_every_node_input_and_output(i18n, pack_nodes, lang):
    """/i18n serves the pack's locale files, and they hold exactly the live schema's nodes, inputs and
    outputs (a missing entry and a stale one both fail); every category segment has a name."""
    defs = json.loads((LOCALES / lang / "nodeDefs.json").read_text(encoding="utf-8"))
    main = json.loads((LOCALES / lang / "main.json").read_text(encoding="utf-8"))
    served = i18n.get(lang, {})
    assert set(defs) == set(pack_nodes), f"{lang}: nodes {sorted(set(defs) ^ set(pack_nodes))}"
    for node_id, info in pack_nodes.items():
        entry = defs[node_id]
        assert served.get("nodeDefs", {}).get(node_id) == entry, f"/i18n does not serve {lang} {node_id}"
        assert entry["display_name"] and entry["description"], node_id
        want = expected_keys(info)
        for part in ("inputs", "outputs"):
            assert set(entry[part]) == set(want[part]), f"{lang} {node_id} {part}: {sorted(set(entry[part]) ^ set(want[part]))}"
            for key, fields in want[part].items():
                assert fields <= {k for k, v in entry[part][key].items() if v}, f"{lang} {node_id} {part}.{key}"
    for segment in {s for info in pack_nodes.values() for s in info["category"].split("/")}:
        assert main["nodeCategories"].get(segment), f"{lang}: category {segment}"
        assert served["nodeCategories"][segment] == main["nodeCategories"][segment]


def test_english_is_the_live_schema(pack_nodes):
    """locales/en holds the schema's own texts (regenerate with tools/make_locales.py after changing a node)."""
    defs = json.loads((LOCALES / "en" / "nodeDefs.json").read_text(encoding="utf-8"))
    for node_id, info in pack_nodes.items():
        entry = defs[node_id]
        assert (entry["display_name"], entry["description"]) == (info["display_name"], info["description"]), node_id
        for name, options in inputs_of(info).items():
            assert entry["inputs"][name].get("tooltip") == options.get("tooltip"), f"{node_id}.{name}"
        for i, name in enumerate(info["output_name"]):
            assert entry["outputs"][str(i)]["name"] == name, f"{node_id} output {i}"
            assert entry["outputs"][str(i)].get("tooltip") == (info.get("output_tooltips") or [None] * (i + 1))[i]


def test_chinese_is_chinese(pack_nodes):
    """Every Chinese display name, description and tooltip is written in Chinese (not English left over)."""
    defs = json.loads((LOCALES / "zh" / "nodeDefs.json").read_text(encoding="utf-8"))
    for node_id in pack_nodes:
        entry = defs[node_id]
        texts = [entry["display_name"], entry["description"]] + [
            v["tooltip"] for part in ("inputs", "outputs") for v in entry[part].values() if v.get("tooltip")]
        assert all(CJK.search(t) for t in texts), [t for t in texts if not CJK.search(t)]
