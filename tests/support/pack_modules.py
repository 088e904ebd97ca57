"""Pack modules that live under nodes/ but import no ComfyUI (the overlay renderer, the sampler step
rules), imported for unit tests as submodules of a private package: `nodes` itself cannot be
imported by that name, which is ComfyUI's own nodes.py in the host tests of the same session."""
import importlib
import importlib.util
import sys
from pathlib import Path

PACKAGE = "astar_unit_pack"
ROOT = Path(__file__).resolve().parents[2]


def pack_module(name: str):
    """pack_module("nodes.sampler_steps") -> that module of the pack, loaded as astar_unit_pack.<name>."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{name}")
