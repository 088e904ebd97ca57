"""tests/support/capability.require_comfy: a missing module or attribute skips with a reason that names
it; anything else that goes wrong on import fails. Checked on a throwaway package, not on ComfyUI."""
from __future__ import annotations

import pytest

from support.capability import require_comfy


def require_no_skip(*args, **kwargs):
    """require_comfy where a skip would hide the failure being tested: a skip fails the test."""
    try:
        return require_comfy(*args, **kwargs)
    except pytest.skip.Exception as e:
        pytest.fail(f"skipped instead of failing: {e}")


@pytest.fixture
def fake_comfy(tmp_path, monkeypatch):
    """A package `fakecomfy` with a module `fakecomfy.family` (attribute `Model`), a module whose import
    needs a missing third-party module, and one whose import raises."""
    pkg = tmp_path / "fakecomfy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "family.py").write_text("class Model:\n    pass\n")
    (pkg / "needs_dep.py").write_text("import astar_no_such_dependency\n")
    (pkg / "broken.py").write_text("raise ImportError('broken on purpose')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "fakecomfy"


def test_present_module_and_attribute_are_returned(fake_comfy):
    family = require_no_skip("fakecomfy.family", what="a family")
    assert family.__name__ == "fakecomfy.family"
    assert require_no_skip("fakecomfy.family", "Model", what="a family") is family.Model


def test_missing_module_skips_naming_it(fake_comfy):
    with pytest.raises(pytest.skip.Exception, match=r"^Flux\.2 Klein: this ComfyUI \(.+\) has no module "
                                                    r"fakecomfy\.flux2$"):
        require_comfy("fakecomfy.flux2", what="Flux.2 Klein")


def test_missing_parent_package_skips_naming_it(fake_comfy):
    with pytest.raises(pytest.skip.Exception, match=r"has no module fakecomfy\.ldm$"):
        require_comfy("fakecomfy.ldm.flux2.model", what="Flux.2")


def test_missing_attribute_skips_naming_it(fake_comfy):
    with pytest.raises(pytest.skip.Exception, match=r"^Klein: this ComfyUI \(.+\) has no "
                                                    r"fakecomfy\.family\.KleinTokenizer$"):
        require_comfy("fakecomfy.family", "KleinTokenizer", what="Klein")


def test_a_missing_dependency_of_a_present_module_fails(fake_comfy):
    with pytest.raises(ModuleNotFoundError, match="astar_no_such_dependency"):
        require_no_skip("fakecomfy.needs_dep", what="a family")


def test_an_import_error_inside_a_present_module_fails(fake_comfy):
    with pytest.raises(ImportError, match="broken on purpose"):
        require_no_skip("fakecomfy.broken", what="a family")


def test_comfyui_itself_missing_fails(fake_comfy):
    """No top-level package (ComfyUI not on the path: the test forgot the host) is an error, not a skip."""
    with pytest.raises(ModuleNotFoundError):
        require_no_skip("astar_no_such_toplevel.ldm", what="a family")
