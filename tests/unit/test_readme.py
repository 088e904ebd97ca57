"""The README and the docs stay true: its length and pictures, the commands it shows (scripts that exist,
flags tools/run_example.py accepts, files that exist), every relative link and anchor of README.md,
docs/*.md and the help pages, the node names (those of the live schemas, through locales/en, which
tests/host/test_help_and_locales.py ties to them), the example workflows and the tested ComfyUI range."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
HELP_DIR = ROOT / "web" / "docs"
MAX_LINES = 250
MAX_PICTURE_BYTES = 300_000
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def readme() -> str:
    return README.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", path.read_text(encoding="utf-8"), re.M)}


def code_lines(text: str) -> list[str]:
    """The command lines of the ```bash blocks, comments cut."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]
    return lines


def test_readme_is_short_and_starts_with_the_two_commands():
    text = readme()
    assert len(text.splitlines()) <= MAX_LINES
    head = code_lines("\n".join(text.splitlines()[:10]) + "\n```")
    assert head[:2] == ["bash tools/run_example.sh", "bash tools/test.sh"], head


def test_readme_pictures_exist_and_are_small():
    pictures = [target for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", readme())]
    assert len(pictures) >= 2, pictures
    for target in pictures:
        path = ROOT / target
        assert path.is_file(), target
        assert path.stat().st_size < MAX_PICTURE_BYTES, (target, path.stat().st_size)
        assert path.read_bytes()[:3] in (b"\xff\xd8\xff", b"\x89PN"), target  # JPEG or PNG


def _run_example_accepts(args: list[str]) -> tuple[int, str]:
    """(exit status, help text) of tools/run_example.py's parser on args + --help: argparse converts every
    value before --help (status 2 on a bad one); the help text lists the flags it knows."""
    from tools.run_example import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as stop:
        main(args + ["--help"])
    return stop.value.code, out.getvalue()


def bash_commands(doc: str) -> list[list[str]]:
    """The `[VAR=value ...] bash SCRIPT args` lines of a document's bash blocks, as words from `bash` on."""
    commands = []
    for line in code_lines((ROOT / doc).read_text(encoding="utf-8")):
        words = shlex.split(line)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        if words and words[0] == "bash":
            commands.append(words)
    return commands


@pytest.mark.parametrize("doc", ["README.md", "docs/compatibility.md"])
def test_commands_shown_are_real(doc):
    """Each `bash tools/X ...` line names an existing script; run_example's flags and values are ones its
    parser accepts, and the files they name exist."""
    commands = bash_commands(doc)
    assert commands
    for words in commands:
        line = " ".join(words)
        script = words[1]
        assert (ROOT / script).is_file(), line
        if script == "tools/run_example.sh":
            status, help_text = _run_example_accepts(words[2:])
            assert status == 0, line
            for word in words[2:]:
                if word.startswith("--"):
                    assert word in help_text, f"{line}: {word} is not an option of tools/run_example.py"
                elif word.endswith(".json"):
                    assert (ROOT / word).is_file(), line


def test_a_wrong_command_fails_the_check():
    """The check above can fail: an unknown flag is absent from the help text, a bad value exits 2."""
    status, help_text = _run_example_accepts(["--steps", "many"])
    assert status == 2
    assert "--no-such-flag" not in _run_example_accepts([])[1]


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), *sorted(HELP_DIR.rglob("*.md"))]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    """Files and #anchors exist. Help pages resolve like the frontend: relative to web/docs/, whichever
    file (docs/<NodeId>/zh.md included) holds the link."""
    base = HELP_DIR if HELP_DIR in path.parents else path.parent
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (base / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.relative_to(ROOT)}: {target}"
        if anchor:
            assert anchor in anchors(linked), f"{path.relative_to(ROOT)}: no heading for #{anchor} in {linked.name}"


def test_every_doc_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall(readme())}
    for doc in (ROOT / "docs").glob("*.md"):
        assert doc.resolve() in linked, f"README does not link {doc.relative_to(ROOT)}"


def test_node_names_are_the_nodes_of_the_pack():
    """The Nodes table names every node by its display name, and nothing else."""
    names = {d["display_name"] for d in
             json.loads((ROOT / "locales" / "en" / "nodeDefs.json").read_text(encoding="utf-8")).values()}
    table = [line for line in section(readme(), "Nodes").splitlines() if line.startswith("| **")]
    assert {re.match(r"\| \*\*(.+?)\*\*", line).group(1) for line in table} == names
    for name in re.findall(r"\*\*(A-STAR [A-Za-z ]+?)\*\*", readme()):
        assert name in names, name


def test_example_workflows_listed_are_the_examples():
    listed = set(re.findall(r"`(\w+)`", "".join(
        line.split("|")[1] for line in section(readme(), "Example workflows").splitlines()
        if line.startswith("| `"))))
    assert listed == {p.stem for p in (ROOT / "example_workflows").glob("*.json")}


def test_paths_named_in_the_readme_exist():
    for path in re.findall(r"`((?:tools|docs|web|locales|example_workflows|tests|benchmarks)/[^`\s<>*]*)`", readme()):
        assert (ROOT / path).exists(), path


def test_works_with_gives_the_tested_range():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["comfy"]["requires-comfyui"]
    (low,) = re.fullmatch(r">=([\d.]+)", spec).groups()
    row = next(line for line in section(readme(), "Works with").splitlines() if line.startswith("| ComfyUI"))
    assert f"{low} and newer" in row, row
