"""attention.capture: the lean guidance pass bookkeeping (GuidanceCapture.complete, GuidancePasses)."""
import pytest
import torch

from attention.capture import GuidanceCapture, GuidancePasses, StopForward


def fake_forward(capture, layers, ran):
    """A stand-in UNet pass: layers = [(key, selected?)] in order; stops as the attention patch does."""
    def forward():
        for key, selected in layers:
            ran.append(key)
            if selected:
                capture.record(key, torch.zeros(1, 4, 77), (2, 2), None)
                if capture.complete:
                    raise StopForward
    return forward


UNET = [(("input", 7, 0), True), (("input", 8, 0), True), (("middle", 0, 0), False), (("output", 3, 0), True),
        (("output", 5, 0), True), (("output", 6, 0), False), (("output", 9, 0), False)]


def test_first_pass_full_then_lean_stops_after_the_last_selected_layer():
    passes = GuidancePasses(level=2)
    ran = []
    c = passes.capture()
    passes.run(c, fake_forward(c, UNET, ran))
    assert ran == [k for k, _ in UNET] and passes.full_passes == 1
    assert passes.layers == (("input", 7, 0), ("input", 8, 0), ("output", 3, 0), ("output", 5, 0))
    ran.clear()
    c = passes.capture()
    passes.run(c, fake_forward(c, UNET, ran))
    assert ran == [k for k, _ in UNET[:5]] and passes.lean_passes == 1
    assert len(c.probs) == 4


def test_a_pass_with_other_layers_runs_in_full_and_is_learned_from():
    """E.g. Deep Shrink: other layers have the selected size at some steps."""
    passes = GuidancePasses(level=2)
    c = passes.capture()
    passes.run(c, fake_forward(c, UNET, []))
    shrunk = [(k, not s if k[0] == "output" and k[1] >= 5 else s) for k, s in UNET]
    ran = []
    c = passes.capture()
    passes.run(c, fake_forward(c, shrunk, ran))
    assert ran == [k for k, _ in shrunk] and passes.full_passes == 2 and passes.lean_passes == 0
    assert passes.layers == tuple(k for k, s in shrunk if s)


def test_not_lean_runs_every_pass_in_full():
    passes = GuidancePasses(level=2, lean=False)
    for _ in range(3):
        c = passes.capture()
        passes.run(c, fake_forward(c, UNET, []))
    assert passes.full_passes == 3 and passes.lean_passes == 0


def test_a_capture_without_stop_after_never_completes():
    c = GuidanceCapture(level=2)
    c.record(("input", 7, 0), torch.zeros(1, 4, 77), (2, 2), None)
    assert not c.complete
    with pytest.raises(ValueError, match="differ in map size"):
        c.record(("input", 4, 0), torch.zeros(1, 16, 77), (4, 4), None)


def test_stop_forward_is_not_an_ordinary_exception():
    """A wrapper's `except Exception` (an OOM fallback, say) must not swallow the lean pass's stop."""
    assert not issubclass(StopForward, Exception)
    passes = GuidancePasses(level=2)
    c = passes.capture()
    passes.run(c, fake_forward(c, UNET, []))
    c = passes.capture()

    def forward_inside_a_catch_all():
        try:
            fake_forward(c, UNET, [])()
        except Exception:  # noqa: BLE001 - what a careless wrapper does
            pytest.fail("StopForward was caught as an Exception")
    passes.run(c, forward_inside_a_catch_all)
    assert passes.lean_passes == 1
