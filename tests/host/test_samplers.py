"""The guided run is the sampler's own run (nodes/sampling_wrapper.py, nodes/sampler_steps.py).

With step size 0 every update is zero, so for every sampler and scheduler the result must be the
stock KSampler's, bit for bit (with and without a denoise mask); with a step size the update lands
on the latent the sampler continues from, which reference loops written here check for one sampler
of each family (test_guided.py), at exactly the window's states of every sampler (test_schedule.py). Mini model at 32 px: the matrix must fit in CI."""
from __future__ import annotations

import pytest
import torch

from support.graphs import sd15_graph

STEPS, GUIDED = 4, 2
UNGUIDABLE = ("uni_pc", "uni_pc_bh2", "sa_solver", "sa_solver_pece", "dpm_adaptive")


def _graph(ckpt, sampler_name, scheduler="normal", step_size=0.0, masked=False, stock=False, **kw):
    g = sd15_graph(ckpt, decode=False, steps=STEPS, guided_steps=GUIDED, sampler_name=sampler_name,
                   scheduler=scheduler, seed=11, cfg=3.0, step_size=step_size, size=32,
                   sampler="KSampler" if stock else "AStarKSampler", **kw)
    if masked:  # inpaint the left half: every model call composes the sampler's latent with the input
        g["mask"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 32, "height": 32}}
        g["half"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 16, "height": 32}}
        g["paste"] = {"class_type": "MaskComposite", "inputs": {"destination": ["mask", 0], "source": ["half", 0],
                                                                "x": 0, "y": 0, "operation": "add"}}
        g["noise_mask"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["latent", 0], "mask": ["paste", 0]}}
        g["sampler"]["inputs"]["latent_image"] = ["noise_mask", 0]
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return g


def _latent(host, ckpt, sampler_name, **kw):
    return host.run(_graph(ckpt, sampler_name, **kw))["sampler"][0]["samples"]


def test_sampler_list_is_complete(host):
    import comfy.samplers
    assert len(comfy.samplers.KSampler.SAMPLERS) >= 40 and len(comfy.samplers.KSampler.SCHEDULERS) >= 9
    assert set(UNGUIDABLE) <= set(comfy.samplers.KSampler.SAMPLERS)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "denoise_mask"])
def test_step_size_zero_is_the_stock_sampler_for_every_sampler(host, mini_ckpt, masked):
    import comfy.samplers
    failures = []
    for name in comfy.samplers.KSampler.SAMPLERS:
        stock = _latent(host, mini_ckpt, name, masked=masked, stock=True)
        zero = _latent(host, mini_ckpt, name, masked=masked)
        if not torch.equal(stock, zero):
            failures.append(f"{name}: max |difference| {float((stock - zero).abs().max()):.3g}")
    assert not failures, "\n".join(failures)


def test_step_size_zero_is_the_stock_sampler_for_every_scheduler(host, mini_ckpt):
    import comfy.samplers
    failures = []
    for scheduler in comfy.samplers.KSampler.SCHEDULERS:
        for name in ("euler", "dpmpp_2m"):
            stock = _latent(host, mini_ckpt, name, scheduler=scheduler, stock=True)
            if not torch.equal(stock, _latent(host, mini_ckpt, name, scheduler=scheduler)):
                failures.append(f"{name}/{scheduler}")
    assert not failures, failures


def test_one_progress_bar_for_the_whole_run(host, mini_ckpt, monkeypatch):
    """The sampler's own progress bar, one for the whole run, updated once per step, 1..n of n (previews
    ride on those updates). Read at ProgressBar.update_absolute: ComfyUI 0.19 throttles what reaches
    the hook."""
    import comfy.utils
    updates = []  # (bar, value, total)
    real_update = comfy.utils.ProgressBar.update_absolute

    def update(bar, value, total=None, preview=None, **kw):
        updates.append((bar, value, total if total is not None else bar.total))
        return real_update(bar, value, total, preview, **kw)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", update)
    for name in ("euler", "heun", "dpmpp_2m_sde"):
        updates.clear()
        host.run(_graph(mini_ckpt, name, step_size=20.0), fresh=True)
        sampler_updates = [u for u in updates if u[2] == STEPS]
        assert len({id(bar) for bar, _, _ in sampler_updates}) == 1, (name, sampler_updates)
        reports = [(value, total) for _, value, total in sampler_updates]
        assert reports == [(i, STEPS) for i in range(1, STEPS + 1)], (name, reports)
