"""Every sampler x scheduler pair runs a 3-step guided generation on the mini model (32 px: the cost
scales with pixels, and 387 pairs x 2 runs must fit in CI)."""
from __future__ import annotations

import pytest
import torch


from support.graphs import sd15_graph




def test_sampler_list_is_complete(host):
    import comfy.samplers
    assert len(comfy.samplers.KSampler.SAMPLERS) >= 40 and len(comfy.samplers.KSampler.SCHEDULERS) >= 9


@pytest.fixture(scope="module")
def schedulers(host):
    import comfy.samplers
    return list(comfy.samplers.KSampler.SCHEDULERS)


def _latent(host, ckpt, sampler_name, scheduler, guided):
    g = sd15_graph(ckpt, decode=False, steps=3, guided_steps=guided, sampler_name=sampler_name, scheduler=scheduler,
                   seed=11, cfg=1.0, step_size=2.0, size=32)
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return host.run(g)["sampler"][0]["samples"]


def test_every_sampler_and_scheduler(host, mini_ckpt, schedulers):
    import comfy.samplers
    failures = []
    for sampler_name in comfy.samplers.KSampler.SAMPLERS:
        for scheduler in schedulers:
            try:
                guided = _latent(host, mini_ckpt, sampler_name, scheduler, 2)
                plain = _latent(host, mini_ckpt, sampler_name, scheduler, 0)
            except Exception as e:  # collect every broken pair, then fail once with the list
                failures.append(f"{sampler_name}/{scheduler}: {type(e).__name__}: {e}")
                continue
            if not torch.isfinite(guided).all():
                failures.append(f"{sampler_name}/{scheduler}: non-finite output")
            elif torch.equal(guided, plain):
                failures.append(f"{sampler_name}/{scheduler}: guided output equals the unguided one")
    assert not failures, "\n".join(failures)
