"""Which states a guided run guides (issue 19, items 2, 3, 7): for every sampler and the stock custom-sampler
nodes, and for runs that cover part of the schedule (hires fix, a base/refiner split).

What the run did is read from three spies around the real code, independent of the pack's bookkeeping:
ComfyUI's KSAMPLER.sample (each run's sigmas, and the sampler's own progress callback: step i, its
sigma), KSamplerX0Inpaint.__call__ (every model call the sampler makes, at its sigma) and the pack's
guided_step (a guidance update). A guided state is a guidance update followed at once by the sampler's
model call on that latent and then by the sampler's report of that step at the same sigma. The expected
states come from the sampler's reports and ComfyUI's own percent_to_sigma (the window start <= f < end of
the model's noise schedule, as ConditioningSetTimestepRange reads it). Mini model at 32 px."""
from __future__ import annotations

import copy

import pytest
import torch

from support import host as hosts
from support.graphs import guidance_settings, sd15_graph

# "normal" places state i at i/3: states 1 and 2 guided; dpm_fast's own grid (14.6, 0.65): its second state
STEPS, START, END = 4, 0.2, 0.9
REFUSED = ("uni_pc", "uni_pc_bh2", "sa_solver", "sa_solver_pece", "dpm_adaptive")


@pytest.fixture
def events(monkeypatch):
    """The spied sequence: ("run", sigmas), ("call", sigma), ("guide",), ("report", i, sigma)."""
    import comfy.samplers
    log = []
    wrapper = hosts.pack_module("nodes.sampling_wrapper")
    real_sample, real_call, real_guided_step = (comfy.samplers.KSAMPLER.sample,
                                                comfy.samplers.KSamplerX0Inpaint.__call__, wrapper.guided_step)

    def sample(self, model_wrap, sigmas, *args, **kwargs):
        log.append(("run", [float(s) for s in sigmas]))
        function = self.sampler_function

        def reporting(model, x, sigmas, *a, callback=None, **kw):
            def report(info):
                log.append(("report", int(info["i"]), float(info["sigma"])))
                return callback(info) if callback is not None else None
            return function(model, x, sigmas, *a, callback=report, **kw)
        own = copy.copy(self)
        own.sampler_function = reporting
        return real_sample(own, model_wrap, sigmas, *args, **kwargs)

    def call(self, x, sigma, *args, **kwargs):
        log.append(("call", float(sigma.reshape(-1)[0])))
        return real_call(self, x, sigma, *args, **kwargs)

    def guided_step(*args, **kwargs):
        log.append(("guide",))
        return real_guided_step(*args, **kwargs)

    monkeypatch.setattr(comfy.samplers.KSAMPLER, "sample", sample)
    monkeypatch.setattr(comfy.samplers.KSamplerX0Inpaint, "__call__", call)
    monkeypatch.setattr(wrapper, "guided_step", guided_step)
    return log


def runs_of(log):
    """Per sampler run: (its sigmas, the reported states [(i, sigma)], the guided states [(i, sigma)])."""
    runs = []
    for k, event in enumerate(log):
        if event[0] == "run":
            runs.append((event[1], [], []))
        elif event[0] == "report":
            runs[-1][1].append(event[1:])
        elif event[0] == "guide":
            call, report = log[k + 1], log[k + 2]
            assert call[0] == "call" and report[0] == "report" and report[2] == call[1], \
                f"a guidance update not followed by the state's call and report: {log[k:k + 3]}"
            runs[-1][2].append(report[1:])
    return runs


def model_sampling(host, ckpt):
    """The checkpoint's model_sampling, as the loader node gives it."""
    out = host.run({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
                    "show": {"class_type": "PreviewAny", "inputs": {"source": ["ckpt", 2]}}})
    return out["ckpt"][0].get_model_object("model_sampling")


def window_states(sampling, reported, start=START, end=END):
    """The reported states in the window, by ComfyUI's percent_to_sigma of the model."""
    high, low = sampling.percent_to_sigma(start), sampling.percent_to_sigma(end)
    return [(i, s) for i, s in reported if low < s <= high]


def _ksampler_graph(ckpt, sampler_name, **kw):
    g = sd15_graph(ckpt, decode=False, steps=STEPS, sampler_name=sampler_name, seed=11, cfg=3.0, size=32,
                   step_size=20.0, **kw)
    g["sampler"]["inputs"].update(guidance_start=START, guidance_end=END)
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return g


def test_every_sampler_guides_exactly_the_window_states_once(host, mini_ckpt, events):
    """Each sampler of the KSampler list guides exactly the states it reports inside the window, each once,
    with the update on the latent of the state's own model call; the ones A-STAR cannot place are refused
    by name before any model call."""
    import comfy.samplers
    failures = [_guided_states_failure(host, mini_ckpt, events, name, _ksampler_graph(mini_ckpt, name),
                                       f"cannot guide the sampler '{name}'.*euler" if name in REFUSED else None)
                for name in comfy.samplers.KSampler.SAMPLERS]
    assert not any(failures), "\n".join(filter(None, failures))


def _guided_states_failure(host, ckpt, events, label, g, refusal):
    """Runs g; what is wrong with its guided states (None when nothing): a refused run (refusal: the error's
    pattern) must stop before any model call; another must guide exactly its reported states in the window."""
    print("run", label, flush=True)
    events.clear()
    if refusal is not None:
        with pytest.raises(hosts.GraphError, match=refusal):
            host.run(g)
        return f"{label}: refused after a model call" if any(e[0] == "call" for e in events) else None
    host.run(g)
    (sigmas, reported, guided), = runs_of(events)
    expected = window_states(model_sampling(host, ckpt), reported)
    if not expected or guided != expected:
        return f"{label}: guided {guided}, expected {expected} (reported {reported})"
    return None


def _custom_graph(ckpt, sampler_node):
    """A-STAR Apply -> CFGGuider -> SamplerCustomAdvanced with the stock sampler node `sampler_node` (a
    (class, inputs) pair), BasicScheduler normal, STEPS steps."""
    g = sd15_graph(ckpt, decode=False, sampler="KSampler", steps=STEPS, seed=11, cfg=3.0, size=32)
    ks = g["sampler"]["inputs"]
    g["apply"] = {"class_type": "AStarApply", "inputs": {
        "model": ["ckpt", 0], **guidance_settings(steps=STEPS, guidance_start=START, guidance_end=END)}}
    g["noise"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 11}}
    g["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["apply", 0], "positive": ks["positive"],
                                                         "negative": ks["negative"], "cfg": 3.0}}
    g["select"] = {"class_type": sampler_node[0], "inputs": sampler_node[1]}
    g["sigmas"] = {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": "normal",
                                                              "steps": STEPS, "denoise": 1.0}}
    g["sampler"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
        "latent_image": ks["latent_image"]}}
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return g


def _stock_sampler_nodes(host):
    """(node, inputs) for every stock sampler node this host has, at its defaults, plus the parameters that
    change which model calls a step makes: eta (dpmpp_2s_ancestral's one-call branch above ~1.7, up to the
    node's maximum), r, solver types and orders."""
    mappings = host.nodes.NODE_CLASS_MAPPINGS
    cases = []

    def add(node, **inputs):
        if node not in mappings:
            return
        spec = mappings[node].INPUT_TYPES()
        defaults = {}
        for name, entry in {**spec.get("required", {})}.items():
            options = entry[1] if len(entry) > 1 else {}
            choices = entry[0] if isinstance(entry[0], list) else options.get("options")  # V1 list or V3 COMBO
            defaults[name] = options.get("default", choices[0] if choices else None)
        cases.append((node, {**defaults, **inputs}))
    add("KSamplerSelect", sampler_name="euler")
    for eta in (0.0, 0.5, 1.0, 2.0, 100.0):
        add("SamplerDPMPP_2S_Ancestral", eta=eta)
        add("SamplerEulerAncestral", eta=eta)
    for eta in (0.0, 1.0):
        add("SamplerEulerAncestralCFGPP", eta=eta)
    for r in (0.5, 1.0):
        add("SamplerDPMPP_SDE", r=r)
    for solver in ("midpoint", "heun"):
        add("SamplerDPMPP_2M_SDE", solver_type=solver)
    add("SamplerDPMPP_3M_SDE")
    for order in (1, 4):
        add("SamplerLMS", order=order)
    add("SamplerER_SDE")
    for solver, r in (("phi_1", 0.5), ("phi_2", 1.0)):
        add("SamplerSEEDS2", solver_type=solver, r=r, eta=0.0)
    for version in ("regular", "alternative"):
        add("SamplerEulerCFGpp", version=version)
    add("SamplerDPMAdaptative")
    add("SamplerSASolver", model=["ckpt", 0], use_pece=False, simple_order_2=False)
    add("SamplerLCMUpscale")
    return cases


def test_every_stock_sampler_node_guides_exactly_the_window_states_once(host, mini_ckpt, events):
    """SamplerCustomAdvanced with each stock sampler node and the parameters that change its calls: the
    window's states, each once; the nodes whose steps A-STAR cannot place are refused before any model call."""
    refused = ("SamplerDPMAdaptative", "SamplerSASolver", "SamplerLCMUpscale")
    failures = [_guided_states_failure(host, mini_ckpt, events, f"{node} {inputs}",
                                       _custom_graph(mini_ckpt, (node, inputs)),
                                       "cannot guide the sampler" if node in refused else None)
                for node, inputs in _stock_sampler_nodes(host)]
    assert not any(failures), "\n".join(filter(None, failures))


def _expected_sigmas(sampling, steps, start, end, denoise=1.0, first=0, last=None):
    """The states first..last-1 of a KSampler run written from ComfyUI's scheduler, in the window by
    percent_to_sigma."""
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", int(steps / denoise))[-(steps + 1):]
    states = [float(s) for s in sigmas[:-1]][first:last]
    high, low = sampling.percent_to_sigma(start), sampling.percent_to_sigma(end)
    return [s for s in states if low < s <= high]


def test_hires_fix_guides_only_where_a_full_run_does(host, mini_ckpt, events):
    """One patched MODEL into two KSamplers, the second at denoise 0.5 on the upscaled latent (the hires fix):
    the first run guides its states in the window; the second only its states above sigma_at(end), which a
    full run also guides (with window 0-0.5 it would guide none)."""
    steps, end = 12, 0.6
    g = sd15_graph(mini_ckpt, decode=False, sampler="KSampler", steps=steps, seed=5, cfg=3.0, size=32)
    ks = g["sampler"]["inputs"]
    g["apply"] = {"class_type": "AStarApply", "inputs": {
        "model": ["ckpt", 0], **guidance_settings(steps=steps, guidance_start=0.0, guidance_end=end)}}
    ks["model"] = ["apply", 0]
    g["upscale"] = {"class_type": "LatentUpscale", "inputs": {"samples": ["sampler", 0], "upscale_method": "nearest-exact",
                                                              "width": 48, "height": 48, "crop": "disabled"}}
    g["hires"] = {"class_type": "KSampler", "inputs": {**ks, "latent_image": ["upscale", 0], "denoise": 0.5}}
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["hires", 0]}}
    out = host.run(g)
    first, second = runs_of(events)
    guided = [[s for _, s in run[2]] for run in (first, second)]
    # written from ComfyUI's schedules: 12 states i/11 (0..6 below 0.6); the hires run's 12 states are the last
    # of a 24-step schedule, i/23 for i = 12..23 (12 and 13 below 0.6)
    sampling = model_sampling(host, mini_ckpt)
    expected_first = _expected_sigmas(sampling, steps, 0.0, end)
    expected_second = _expected_sigmas(sampling, steps, 0.0, end, denoise=0.5)
    assert len(expected_first) == 7 and len(expected_second) == 2
    assert guided[0] == pytest.approx(expected_first, rel=1e-6)
    assert guided[1] == pytest.approx(expected_second, rel=1e-6)
    rec = out["apply"][1][-1]  # the hires run's recording: its guided steps at those sigmas too
    assert [s.sigma for s in rec.steps if s.iterations] == pytest.approx(expected_second, rel=1e-6)


def test_hires_fix_with_the_default_window_guides_nothing_in_the_second_run(host, mini_ckpt, events):
    steps = 12
    g = sd15_graph(mini_ckpt, decode=False, sampler="KSampler", steps=steps, seed=5, cfg=3.0, size=32)
    ks = g["sampler"]["inputs"]
    g["apply"] = {"class_type": "AStarApply", "inputs": {
        "model": ["ckpt", 0], **guidance_settings(steps=steps, guidance_start=0.0, guidance_end=0.5)}}
    ks["model"] = ["apply", 0]
    g["hires"] = {"class_type": "KSampler", "inputs": {**ks, "latent_image": ["sampler", 0], "denoise": 0.5}}
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["hires", 0]}}
    host.run(g)
    first, second = runs_of(events)
    assert len(first[2]) == 6 and second[2] == []


def test_base_refiner_split_guides_the_full_runs_states(host, mini_ckpt, events):
    """KSamplerAdvanced base (steps 0-6 of 12, leftover noise) then a refiner KSamplerAdvanced (6-12) with a
    separately patched model: together they guide exactly the states a full 12-step run guides, each once."""
    steps, split = 12, 6
    g = sd15_graph(mini_ckpt, decode=False, sampler="KSampler", steps=steps, seed=5, cfg=3.0, size=32)
    ks = g["sampler"]["inputs"]
    settings = guidance_settings(steps=steps, guidance_start=START, guidance_end=END)
    g["base_apply"] = {"class_type": "AStarApply", "inputs": {"model": ["ckpt", 0], **settings}}
    g["refiner_apply"] = {"class_type": "AStarApply", "inputs": {"model": ["ckpt", 0], **settings}}
    common = {k: ks[k] for k in ("cfg", "sampler_name", "scheduler", "positive", "negative")}
    g["sampler"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "model": ["base_apply", 0], "add_noise": "enable", "noise_seed": 5, "steps": steps,
        "latent_image": ks["latent_image"], "start_at_step": 0, "end_at_step": split,
        "return_with_leftover_noise": "enable"}}
    g["refiner"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "model": ["refiner_apply", 0], "add_noise": "disable", "noise_seed": 5, "steps": steps,
        "latent_image": ["sampler", 0], "start_at_step": split, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["refiner", 0]}}
    host.run(g)
    base, refiner = runs_of(events)
    # 12 states at i/11: START 0.2 <= f < END 0.9 -> states 3..9; the base runs 0..5, the refiner 6..11
    sampling = model_sampling(host, mini_ckpt)
    expected_base = _expected_sigmas(sampling, steps, START, END, last=split)
    expected_refiner = _expected_sigmas(sampling, steps, START, END, first=split)
    assert len(expected_base) == 3 and len(expected_refiner) == 4
    assert [s for _, s in base[2]] == pytest.approx(expected_base, rel=1e-6)
    assert [s for _, s in refiner[2]] == pytest.approx(expected_refiner, rel=1e-6)


def test_denoise_zero_returns_the_input_latent_with_an_empty_recording(host, mini_ckpt):
    """As the stock KSampler: denoise 0 runs nothing and returns the input latent."""
    g = sd15_graph(mini_ckpt, decode=False, steps=3, seed=3, size=32)
    g["sampler"]["inputs"]["denoise"] = 0.0
    g["stock"] = {"class_type": "KSampler", "inputs": {
        k: v for k, v in g["sampler"]["inputs"].items() if k in (
            "model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image",
            "denoise")}}
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    g["stock_out"] = {"class_type": "PreviewAny", "inputs": {"source": ["stock", 0]}}
    out = host.run(g)
    latent, rec = out["sampler"]
    assert torch.equal(latent["samples"], out["stock"][0]["samples"])
    assert torch.equal(latent["samples"], out["latent"][0]["samples"])
    assert rec.steps == [] and rec.words == ["cat", "frog"]


def test_a_split_on_the_same_patched_model_guides_as_the_full_run(host, mini_ckpt):
    """KSamplerAdvanced 0-5 (leftover noise) then 5-12 on the same patched model, the window spanning the split,
    karras (uneven gaps), refinement on with a point the first segment passed at its last state: the second segment
    continues the first one's retention masks and passed refinement points, so the final latent is the full
    run's. Tolerance: the split's stock round trip (latent scaling in and out between the two samplers)."""
    steps, split = 12, 5

    def latent(step_size, segments):
        g = sd15_graph(mini_ckpt, decode=False, sampler="KSampler", steps=steps, seed=9, cfg=3.0, size=32)
        ks = g["sampler"]["inputs"]
        # karras 12 steps: states 3, 4, 5, 6 at f = 0.238, 0.353, 0.493, 0.654: the point 0.34 is passed at state 4;
        # a second segment from state 5 that guessed its previous state one gap back (0.332) would take it again
        settings = guidance_settings(steps=steps, guidance_start=0.0, guidance_end=0.9, step_size=step_size,
                                     refine="on", refine_thresholds="0:0.05, 0.34:0.5", mode="astar")
        g["apply"] = {"class_type": "AStarApply", "inputs": {"model": ["ckpt", 0], **settings}}
        common = {k: ks[k] for k in ("cfg", "positive", "negative")}
        source = ks["latent_image"]
        for n, (first, last) in enumerate(segments):
            g[f"segment{n}"] = {"class_type": "KSamplerAdvanced", "inputs": {
                **common, "model": ["apply", 0], "sampler_name": "euler", "scheduler": "karras",
                "add_noise": "enable" if n == 0 else "disable", "noise_seed": 9, "steps": steps,
                "latent_image": source, "start_at_step": first, "end_at_step": last,
                "return_with_leftover_noise": "enable" if last < steps else "disable"}}
            source = [f"segment{n}", 0]
        del g["sampler"]
        g["out"] = {"class_type": "PreviewAny", "inputs": {"source": source}}
        return host.run(g, fresh=True)[source[0]][0]["samples"]

    full, halves = [(0, steps)], [(0, split), (split, steps)]
    round_trip = float((latent(0.0, full) - latent(0.0, halves)).abs().max())
    guided_full, guided_split = latent(20.0, full), latent(20.0, halves)
    moved = float((guided_full - latent(0.0, full)).abs().max())
    assert moved > 1e3 * max(round_trip, 1e-7), (moved, round_trip)  # the guidance is far above the tolerance
    torch.testing.assert_close(guided_split, guided_full, rtol=0, atol=10 * max(round_trip, 1e-7))
