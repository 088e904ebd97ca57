"""ComfyUI 0.19+ dynamic VRAM (ModelPatcherDynamic, comfy-aimdo) and the guidance pass.

On an NVIDIA GPU ComfyUI 0.19+ loads models with ModelPatcherDynamic by default: weights stay in
(mmapped) RAM and each layer's weight is copied at its forward into a view of VRAM that comfy-aimdo
manages (cached on the module while resident) or into a shared cast buffer. That path cannot run on a
CPU (the last test states why), so these tests run, on CPU, the pack's handling of what that path
hands the guidance pass: weights cached by an inference-mode forward, cast buffers made in inference
mode, parameters tagged by the loader. Weights served from a reused cast buffer are covered by
tests/unit/test_saved_tensors.py. README, Compatibility, says what was run where and the fallback."""
from __future__ import annotations

import logging

import pytest
import torch

from support import host as hosts


def _dynamic_patcher_class():
    import comfy.model_patcher
    cls = getattr(comfy.model_patcher, "ModelPatcherDynamic", None)
    if cls is None:
        pytest.skip("this ComfyUI has no dynamic VRAM (ModelPatcherDynamic arrived after 0.3.75)")
    return cls


class _Layer(torch.nn.Module):
    """A layer as dynamic VRAM leaves it: a resident weight view cached on the module."""

    def __init__(self, served_in_inference_mode: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)
        self._v = object()  # comfy-aimdo's allocation handle
        self._v_signature = b"resident"
        if served_in_inference_mode:
            with torch.inference_mode():
                self._v_weight = self.weight.detach().clone()
        else:
            self._v_weight = self.weight.detach().clone()


def test_weights_cached_by_an_inference_mode_forward_are_served_again(host, caplog):
    patch = hosts.pack_module("nodes.autograd_weights")
    stale, fresh = _Layer(True), _Layer(False)
    with caplog.at_level(logging.INFO):
        patch.make_autograd_safe(torch.nn.Sequential(stale, fresh))
    assert stale._v_signature is None  # ComfyUI copies this weight in again at the next forward
    assert fresh._v_signature == b"resident"  # an ordinary cached view is kept: no needless copy
    assert any("dynamic VRAM: 1 layers" in r.getMessage() for r in caplog.records)


def test_inference_mode_cast_buffers_are_made_anew(host, monkeypatch):
    import comfy.model_management as mm
    if not hasattr(mm, "STREAM_CAST_BUFFERS"):
        pytest.skip("this ComfyUI has no shared weight cast buffers (they arrived after 0.3.75)")
    patch = hosts.pack_module("nodes.autograd_weights")

    class Stream:
        def synchronize(self):
            pass

    buffers = {}
    monkeypatch.setattr(mm, "STREAM_CAST_BUFFERS", buffers)
    with torch.inference_mode():
        buffers[Stream()] = torch.empty(64, dtype=torch.int8)
    patch.make_autograd_safe(torch.nn.Linear(2, 2))
    assert not buffers
    with torch.inference_mode(False):
        buffers[Stream()] = torch.empty(64, dtype=torch.int8)  # made by a guidance pass: kept
    patch.make_autograd_safe(torch.nn.Linear(2, 2))
    assert len(buffers) == 1


def test_parameters_keep_the_loaders_tags(host):
    """ModelPatcherDynamic tags each weight with `_model_dtype` (the size of its VRAM slot); the
    inference-mode fix replaces inference parameters and must carry such tags over."""
    patch = hosts.pack_module("nodes.autograd_weights")
    with torch.inference_mode():
        layer = torch.nn.Linear(4, 4)
        layer.weight._model_dtype = torch.float16
    patch.make_autograd_safe(layer)
    assert not layer.weight.is_inference()
    assert layer.weight._model_dtype is torch.float16


def test_dynamic_vram_cannot_run_on_cpu(host):
    """Why the dynamic path itself is not run here: ComfyUI builds a classic ModelPatcher for a CPU
    load device and never switches dynamic VRAM on with --cpu (main.py with --cpu
    --enable-dynamic-vram stops in comfy-aimdo's device set-up, and comfy-aimdo's loaders without a
    device crash the process). If this changes, a guided graph can run the dynamic patcher on CPU and
    this test says so."""
    cls = _dynamic_patcher_class()
    import comfy.cli_args
    import comfy.model_patcher
    cpu = torch.device("cpu")
    patcher = cls(torch.nn.Linear(2, 2), load_device=cpu, offload_device=cpu)
    assert type(patcher) is comfy.model_patcher.ModelPatcher and not patcher.is_dynamic()
    assert comfy.cli_args.args.cpu and not comfy.cli_args.enables_dynamic_vram()
