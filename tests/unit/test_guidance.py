"""attention.schedule and attention.guidance: step sizes, thresholds, config, one guided step."""
import math
import warnings
from types import MappingProxyType

import pytest
import torch

from attention.guidance import GuidanceConfig, guidance_losses, guided_step, refinement_measure
from attention.losses import attend_excite_loss, binarize, pair_overlap, retention_loss, segregation_loss
from attention.maps import concept_maps, excluded_token_columns, gaussian_smooth, token_softmax
from attention.schedule import (
    AE_REFINEMENT_POINTS,
    in_window,
    parse_thresholds,
    previous_fractions,
    refinement_threshold,
    schedule_fraction,
    step_size_at,
)

N_TOKENS = 8
TOKEN_GROUPS = ((2,), (4, 5))


def make_token_maps_fn(seed=0):
    """Toy differentiable stand-in for a UNet pass: per-pixel text logits are a fixed linear map of
    the latent's 4 channels, softmaxed over tokens (like attention), then A&E's token softmax and
    concept maps. maps_fn(z [B, 4, h, w]) -> [B, 2, h, w]."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(4, N_TOKENS, generator=generator)

    def maps_fn(z):
        batch, _, height, width = z.shape
        pixels = z.flatten(2).transpose(1, 2)  # [B, hw, 4]
        probs = torch.softmax(pixels @ weight, dim=-1)
        token_probs = token_softmax(probs, excluded_token_columns(N_TOKENS), temperature=10.0)
        return concept_maps(token_probs, TOKEN_GROUPS, height, width)

    return maps_fn


def sigmoid_maps_fn(z):
    """Concept c's map is sigmoid of latent channel c: [B, 4, h, w] -> [B, 2, h, w]."""
    return torch.sigmoid(z[:, :2])


# --- schedule -------------------------------------------------------------------------------


def edm_percent_to_sigma(p, sigma_min=0.03, sigma_max=14.6):
    """A model's noise clock written here (log-linear, ComfyUI's EDM form; ends as ComfyUI special-cases them)."""
    if p <= 0.0:
        return 999999999.9
    if p >= 1.0:
        return 0.0
    return math.exp(math.log(sigma_min) + (1.0 - p) * (math.log(sigma_max) - math.log(sigma_min)))


def full_run(n, sigma_min=0.03, sigma_max=14.6):
    """The states of a full n-step run placed like ComfyUI's "normal" scheduler: state i at fraction i/(n-1),
    from sigma_max down to sigma_min (the clock's special values at 0 and 1 are not states)."""
    return [math.exp(math.log(sigma_max) + i / (n - 1) * (math.log(sigma_min) - math.log(sigma_max)))
            for i in range(n)]


def test_step_sizes_follow_attend_and_excite():
    fractions = [schedule_fraction(s, edm_percent_to_sigma) for s in full_run(50)]
    assert fractions == pytest.approx([i / 49 for i in range(50)], abs=1e-9)
    sizes = [step_size_at(20.0, f) for f in fractions]
    # A&E's scale * sqrt(np.linspace(1.0, 0.5, 50)), written out
    assert sizes == pytest.approx([20.0 * math.sqrt(1.0 + (0.5 - 1.0) * i / 49) for i in range(50)], rel=1e-9)
    assert step_size_at(7.0, 0.0) == 7.0
    assert schedule_fraction(100.0, edm_percent_to_sigma) == pytest.approx(0.0, abs=1e-12)  # above the schedule
    assert schedule_fraction(0.0, edm_percent_to_sigma) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("steps, start, end, guided", [
    (50, 0.0, 0.5, list(range(25))),   # A&E: 25 of 50
    (20, 0.0, 0.5, list(range(10))),   # i/19 < 0.5
    (26, 0.0, 0.5, list(range(13))),   # i/25 < 0.5: 0..12 (the old count-based rule, i < 13: the same)
    (24, 0.0, 0.5, list(range(12))),   # i/23 < 0.5: 0..11
    (12, 0.2, 0.6, [3, 4, 5, 6]),     # 0.2 <= i/11 < 0.6
    (11, 0.0, 0.5, list(range(5))),    # state 5 on the end (5/10 = 0.5): not guided
    (11, 0.2, 0.6, [2, 3, 4, 5]),     # states on both bounds: the start's guided, the end's not
    (10, 0.0, 0.0, []),
    (10, 0.0, 1.0, list(range(10))),
])
@pytest.mark.parametrize("rounding", [0.0, 3e-8, -3e-8])
def test_guidance_window_on_the_noise_clock(steps, start, end, guided, rounding):
    """start <= f < end, for states whose sigmas the sampler holds in float32 (a state the scheduler puts on a
    bound may come a few 1e-8 above or below it: it is still on it)."""
    fractions = [schedule_fraction(s * (1 + rounding), edm_percent_to_sigma) for s in full_run(steps)]
    assert [i for i, f in enumerate(fractions) if in_window(f, start, end)] == guided


@pytest.mark.parametrize("mu", [1.15, 3.2, 4.0])
def test_window_bounds_hold_for_float32_flow_schedules_at_high_shift(mu):
    """A flow model's noise table as ComfyUI builds it (shift mu: sigma(t) = e^mu / (e^mu + 1/t - 1) over 10000
    float32 timesteps) read by the "simple" scheduler (every 1000th entry for 10 steps): state i lies on the
    round fraction i/10, up to the float32 rounding, which near the noisy end at a high shift is worth ~2e-6 of
    the clock. A window ending on any of those fractions guides exactly the states before it."""
    e = math.exp(mu)
    table = (e / (e + 1 / (torch.arange(1, 10001) / 10000) - 1)).float()
    states = [float(table[-(1 + i * 1000)]) for i in range(10)]

    def clock(f):  # percent_to_sigma, in float64
        return e / (e + 1 / (1.0 - f) - 1) if f < 1 else 0.0
    fractions = [schedule_fraction(s, clock) for s in states]
    for end in (0.1, 0.2, 0.3, 0.4, 0.5):
        assert [i for i, f in enumerate(fractions) if in_window(f, 0.0, end)] == list(range(round(end * 10))), end
        assert [i for i, f in enumerate(fractions) if in_window(f, end, 1.0)] == list(range(round(end * 10), 10)), end


def test_a_run_below_the_window_guides_nothing():
    """Hires fix at denoise 0.5: the states of the second run all lie below sigma_at(0.5)."""
    second = [edm_percent_to_sigma(0.5 + 0.5 * i / 12) for i in range(1, 12)]
    assert not any(in_window(schedule_fraction(s, edm_percent_to_sigma), 0.0, 0.5) for s in second)


def refined(fractions, points=AE_REFINEMENT_POINTS):
    return {i: t for i, (f, prev) in enumerate(zip(fractions, previous_fractions(fractions)))
            if (t := refinement_threshold(f, prev, points)) is not None}


def test_refinement_points_are_fractions_of_the_noise_schedule():
    assert dict(AE_REFINEMENT_POINTS) == {0.0: 0.05, 0.2: 0.5, 0.4: 0.8}
    with pytest.raises(TypeError):
        AE_REFINEMENT_POINTS[0.5] = 0.1

    def run(n):
        return [schedule_fraction(s, edm_percent_to_sigma) for s in full_run(n)]
    assert refined(run(50)) == {0: 0.05, 10: 0.5, 20: 0.8}  # A&E's steps 0, 10, 20 of 50
    assert refined(run(20)) == {0: 0.05, 4: 0.5, 8: 0.8}  # i/19 >= 0.2, 0.4
    assert refined(run(12)) == {0: 0.05, 3: 0.5, 5: 0.8}
    # a second KSamplerAdvanced segment (steps 6-49 of 50) does not refine at point 0 again; 0.2 and 0.4
    # fall on the same states as in the full run
    assert {i + 6: t for i, t in refined(run(50)[6:]).items()} == {10: 0.5, 20: 0.8}
    # a run of one state (KSamplerAdvanced's first step of 50 alone, at timestep 981) takes point 0
    assert refined([0.018]) == {0: 0.05}
    # a run starting past 0.2 (img2img) takes 0.4 where the full run does, and not 0 or 0.2
    assert {i + 12: t for i, t in refined(run(50)[12:]).items()} == {20: 0.8}


def test_refinement_thresholds_parse():
    parsed = parse_thresholds(" 0:0.05, 0.2:0.5,0.4 : 0.8 ")
    assert isinstance(parsed, MappingProxyType) and dict(parsed) == {0.0: 0.05, 0.2: 0.5, 0.4: 0.8}
    assert dict(parse_thresholds("")) == {}
    with pytest.raises(ValueError, match=r"fraction of the noise schedule in \[0, 1\)"):
        parse_thresholds("10:0.5")  # a step index of the old format


@pytest.mark.parametrize("text", ["0-0.05", "a:0.5", "0:high", "0:0.5, 0:0.6", "-0.1:0.5", "0.3:1.5", "1:0.5"])
def test_parse_thresholds_rejects_bad_text(text):
    with pytest.raises(ValueError, match="point|threshold"):
        parse_thresholds(text)


def test_parse_thresholds_error_shows_format():
    with pytest.raises(ValueError, match="0:0.05, 0.2:0.5, 0.4:0.8"):
        parse_thresholds("zero:0.1")


# --- config ---------------------------------------------------------------------------------


def test_config_defaults_are_attend_and_excite_values():
    config = GuidanceConfig()
    assert (config.mode, config.scale, config.start, config.end, config.max_refine_iters) == ("astar", 20.0, 0.0, 0.5, 20)
    assert dict(config.refine_points) == {0.0: 0.05, 0.2: 0.5, 0.4: 0.8}
    frozen = GuidanceConfig(refine_points={0.3: 0.4})
    assert isinstance(frozen.refine_points, MappingProxyType) and dict(frozen.refine_points) == {0.3: 0.4}
    with pytest.raises(AttributeError):
        config.scale = 1.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("mode", "excite"),
        ("segregation_weight", -1.0),
        ("retention_weight", float("nan")),
        ("start", -0.1),
        ("end", 1.5),
        ("scale", -0.1),
        ("refine", "yes"),
        ("refine_points", {0: 1.5}),
        ("refine_points", {-2: 0.5}),
        ("refine_points", {1.0: 0.5}),
        ("refine_points", [0.5]),
        ("max_refine_iters", -3),
        ("binarization", "mean"),
        ("fraction", 0.0),
        ("fraction", 1.5),
        ("smooth", 1),
    ],
)
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"GuidanceConfig.{field}"):
        GuidanceConfig(**{field: value})


def test_config_rejects_a_window_that_ends_before_it_starts():
    with pytest.raises(ValueError, match=r"GuidanceConfig.end \(0.2\) is before GuidanceConfig.start \(0.6\)"):
        GuidanceConfig(start=0.6, end=0.2)


# --- losses and measure -----------------------------------------------------------------------


def test_guidance_losses_astar_total_is_weighted_sum_on_smoothed_maps():
    torch.manual_seed(0)
    maps = torch.rand(2, 3, 8, 8)
    prev = (torch.rand(1, 3, 8, 8) > 0.5).float()
    config = GuidanceConfig(segregation_weight=0.7, retention_weight=2.0)
    losses = guidance_losses(maps, prev, config)
    assert set(losses) == {"segregation", "retention", "attend_excite", "total"}
    smoothed = gaussian_smooth(maps)
    assert torch.allclose(losses["segregation"], segregation_loss(smoothed))
    assert torch.allclose(losses["retention"], retention_loss(smoothed, prev))
    assert torch.allclose(losses["total"], 0.7 * segregation_loss(smoothed) + 2.0 * retention_loss(smoothed, prev))
    assert torch.allclose(losses["attend_excite"], attend_excite_loss(maps, smooth=True))
    first = guidance_losses(maps, None, config)
    assert torch.all(first["retention"] == 0)
    assert torch.allclose(first["total"], 0.7 * segregation_loss(smoothed))
    raw = guidance_losses(maps, None, GuidanceConfig(smooth=False))
    assert torch.allclose(raw["total"], segregation_loss(maps))


def test_guidance_losses_attend_excite_total():
    maps = torch.rand(2, 2, 8, 8)
    losses = guidance_losses(maps, None, GuidanceConfig(mode="attend_excite"))
    assert torch.allclose(losses["total"], attend_excite_loss(maps, smooth=True))
    assert losses["segregation"].shape == (2,) and losses["retention"].shape == (2,)


def test_refinement_measure():
    torch.manual_seed(1)
    maps = torch.rand(2, 2, 8, 8)
    ae = refinement_measure(maps, GuidanceConfig(mode="attend_excite"))
    assert torch.allclose(ae, gaussian_smooth(maps).amax(dim=(-2, -1)).min(dim=1).values.clamp(max=1.0))
    astar = refinement_measure(maps, GuidanceConfig())
    assert torch.allclose(astar, 1 - pair_overlap(gaussian_smooth(maps)))
    single = maps[:, :1]
    assert torch.allclose(refinement_measure(single, GuidanceConfig()), 1 - attend_excite_loss(single))


# --- guided_step ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["astar", "attend_excite"])
def test_guided_step_lowers_the_loss(mode):
    torch.manual_seed(2)
    z = torch.randn(3, 4, 8, 8)
    maps_fn = make_token_maps_fn()
    config = GuidanceConfig(mode=mode, smooth=True)
    prev = binarize(gaussian_smooth(maps_fn(z)))
    result = guided_step(z, maps_fn, step_size=0.5, prev_masks=prev, config=config)
    before = guidance_losses(maps_fn(z), prev, config)["total"]
    after = guidance_losses(maps_fn(result.latent), prev, config)["total"]
    assert torch.allclose(result.losses["total"], before)
    assert torch.all(after < before)
    assert result.iterations == 1 and not result.skipped.any()
    assert result.latent.shape == z.shape and not result.latent.requires_grad
    assert torch.allclose(result.maps, maps_fn(z))
    assert torch.equal(result.masks, binarize(gaussian_smooth(maps_fn(z))))


def test_guided_step_update_is_plain_gradient_step():
    torch.manual_seed(3)
    z = torch.randn(2, 4, 6, 6)
    maps_fn = make_token_maps_fn(1)
    config = GuidanceConfig(smooth=False)
    leaf = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(segregation_loss(maps_fn(leaf)).sum(), leaf)
    result = guided_step(z, maps_fn, 3.0, None, config)
    assert torch.allclose(result.latent, z - 3.0 * grad, atol=1e-6)


def test_guided_step_samples_are_independent():
    torch.manual_seed(4)
    z = torch.randn(3, 4, 6, 6)
    maps_fn = make_token_maps_fn(2)
    config = GuidanceConfig()
    together = guided_step(z, maps_fn, 2.0, None, config).latent
    alone = guided_step(z[1:2], maps_fn, 2.0, None, config).latent
    assert torch.allclose(together[1:2], alone, atol=1e-6)


def test_guided_step_without_step_or_weights_keeps_latent_and_reports():
    torch.manual_seed(5)
    z = torch.randn(2, 4, 6, 6)
    maps_fn = make_token_maps_fn()
    for step_size, config in ((0.0, GuidanceConfig()), (5.0, GuidanceConfig(segregation_weight=0, retention_weight=0))):
        result = guided_step(z, maps_fn, step_size, None, config)
        assert torch.equal(result.latent, z)
        assert result.iterations == 0
        assert torch.allclose(result.losses["segregation"], segregation_loss(gaussian_smooth(maps_fn(z))))
        assert result.masks.shape == (2, 2, 6, 6)


def test_refinement_follows_attend_and_excites_loop():
    """A&E's loop tests the loss of the latent *before* each update: a sample keeps refining until
    the latent before its last update had reached the threshold (one update past it); a sample
    already above it waits for the regular step. Reference: the loop written out below."""
    z = torch.zeros(2, 4, 6, 6)
    z[0, :2] = 4.0  # sample 0: both concepts near 1, already above the threshold
    z[1, :2] = -1.0  # sample 1: peaks ~0.27, below it
    threshold, alpha = 0.5, 60.0
    config = GuidanceConfig(mode="attend_excite", refine=True, max_refine_iters=20)
    seen = []

    def recording_maps_fn(latent):
        seen.append(latent.detach().clone())
        return sigmoid_maps_fn(latent)

    result = guided_step(z, recording_maps_fn, alpha, None, config, refine_threshold=threshold)

    # A&E (per sample): while loss > 1 - threshold: iteration += 1; forward; update; (cap). Then forward, update.
    def ae_loss(latent):
        return attend_excite_loss(gaussian_smooth(sigmoid_maps_fn(latent)), smooth=False)

    def update(latent):
        leaf = latent.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(ae_loss(leaf).sum(), leaf)
        return (leaf - alpha * grad).detach()

    expected, iterations = [], []
    for sample in z.split(1):
        latent, loss, n = sample, ae_loss(sample), 0
        while loss > 1 - threshold:
            n += 1
            loss = ae_loss(latent)
            latent = update(latent)
            if n >= 20:
                break
        expected.append(update(latent))
        iterations.append(n)
    assert iterations[0] == 0 and iterations[1] >= 2
    assert result.iterations == max(iterations) + 1
    assert torch.allclose(result.latent, torch.cat(expected), atol=1e-5)
    assert all(torch.equal(latent[0], z[0]) for latent in seen[:-1])  # sample 0 waits for the regular step


def test_refinement_stops_at_the_cap():
    z = torch.full((1, 4, 6, 6), -6.0)
    config = GuidanceConfig(mode="attend_excite", refine=True, max_refine_iters=3)
    calls = []

    def counting_maps_fn(latent):
        calls.append(1)
        return sigmoid_maps_fn(latent)

    result = guided_step(z, counting_maps_fn, 1.0, None, config, refine_threshold=0.99)
    assert result.iterations == 4 and len(calls) == 4
    # Without a threshold at this step, or with refine off, only the regular step runs.
    assert guided_step(z, sigmoid_maps_fn, 1.0, None, config).iterations == 1
    no_refine = GuidanceConfig(mode="attend_excite", refine=False)
    assert guided_step(z, sigmoid_maps_fn, 1.0, None, no_refine, refine_threshold=0.99).iterations == 1


def test_refinement_in_astar_mode_uses_pair_overlap():
    z = torch.zeros(1, 4, 6, 6)  # both concepts identical: pair overlap 1, measure 0
    config = GuidanceConfig(refine=True, max_refine_iters=2, smooth=False)
    calls = []

    def maps_fn(latent):
        calls.append(1)
        return torch.sigmoid(latent[:, :2] + torch.tensor([1.0, -1.0]).view(1, 2, 1, 1) * latent[:, 2:3])

    guided_step(z, maps_fn, 1.0, None, config, refine_threshold=0.5)
    assert len(calls) == 3  # cap of 2 refinement steps, then the regular step's forward


def test_nan_sample_is_left_unchanged_and_reported():
    torch.manual_seed(6)
    z = torch.randn(3, 4, 6, 6)
    poison = torch.tensor([1.0, float("nan"), 1.0]).view(3, 1, 1, 1)
    maps_fn = make_token_maps_fn()

    def nan_maps_fn(latent):
        return maps_fn(latent) * poison

    config = GuidanceConfig()
    with pytest.warns(RuntimeWarning, match=r"sample\(s\) \[1\]"):
        result = guided_step(z, nan_maps_fn, 2.0, None, config)
    assert result.skipped.tolist() == [False, True, False]
    assert torch.equal(result.latent[1], z[1])
    assert torch.isfinite(result.latent).all()
    clean = guided_step(z[[0, 2]], maps_fn, 2.0, None, config).latent
    assert torch.allclose(result.latent[[0, 2]], clean, atol=1e-6)


def test_infinite_gradient_with_finite_loss_is_skipped():
    z = torch.randn(2, 4, 6, 6)

    def maps_fn(latent):
        # Sample 1's maps are sqrt(0): value 0 (finite loss) but an infinite derivative.
        bump = torch.stack([torch.zeros_like(latent[0, :2]), torch.sqrt(latent[1, :2] - latent[1, :2].detach())])
        return sigmoid_maps_fn(latent) + bump

    with pytest.warns(RuntimeWarning):
        result = guided_step(z, maps_fn, 1.0, None, GuidanceConfig(mode="attend_excite"))
    assert torch.isfinite(result.losses["total"]).all()
    assert result.skipped.tolist() == [False, True]
    assert torch.equal(result.latent[1], z[1]) and not torch.equal(result.latent[0], z[0])
    # Refinement does not retry a skipped sample: one refinement attempt, then the regular step.
    refine = GuidanceConfig(mode="attend_excite", refine=True, max_refine_iters=5)
    z[0] = 10.0  # sample 0 already above the threshold
    with pytest.warns(RuntimeWarning):
        refined = guided_step(z, maps_fn, 1.0, None, refine, refine_threshold=0.99)
    assert refined.iterations == 2 and refined.skipped.tolist() == [False, True]


def test_check_interrupt_runs_before_every_forward_and_propagates():
    z = torch.full((1, 4, 6, 6), -6.0)
    config = GuidanceConfig(mode="attend_excite", refine=True, max_refine_iters=5)
    events = []

    def maps_fn(latent):
        events.append("forward")
        return sigmoid_maps_fn(latent)

    def check_interrupt():
        events.append("check")
        if events.count("check") == 3:
            raise KeyboardInterrupt("user stopped")

    with pytest.raises(KeyboardInterrupt, match="user stopped"):
        guided_step(z, maps_fn, 1.0, None, config, refine_threshold=0.99, check_interrupt=check_interrupt)
    assert events == ["check", "forward", "check", "forward", "check"]


def test_layout_masks_replace_retention_masks_from_the_first_step():
    torch.manual_seed(7)
    z = torch.randn(2, 4, 8, 8)
    maps_fn = make_token_maps_fn()
    layout = torch.zeros(1, 8, 8)
    layout[0, :, :4] = 1.0
    config = GuidanceConfig()
    first = guided_step(z, maps_fn, 1.0, None, config, layout_masks={1: layout})
    expected_masks = torch.zeros(2, 2, 8, 8)
    expected_masks[:, 1] = layout
    smoothed = gaussian_smooth(maps_fn(z))
    assert torch.allclose(first.losses["retention"], retention_loss(smoothed, expected_masks))
    assert torch.all(first.losses["retention"] > 0)
    # Later steps: the layout wins over the previous step's binarised mask for its concept only.
    prev = torch.ones(2, 2, 8, 8)
    later = guided_step(z, maps_fn, 1.0, prev, config, layout_masks={1: layout[0]})
    expected_masks[:, 0] = 1.0
    assert torch.allclose(later.losses["retention"], retention_loss(smoothed, expected_masks))
    # A layout mask drawn at another resolution is area-resized to the maps.
    big = layout.repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)
    resized = guided_step(z, maps_fn, 1.0, None, config, layout_masks={1: big})
    assert torch.allclose(resized.losses["retention"], first.losses["retention"])
    with pytest.raises(ValueError, match="concept 5"):
        guided_step(z, maps_fn, 1.0, None, config, layout_masks={5: layout})


def test_guided_step_works_under_inference_mode():
    z = torch.randn(1, 4, 6, 6)
    maps_fn = make_token_maps_fn()
    with torch.inference_mode():
        inference_z = z.clone()
        result = guided_step(inference_z, maps_fn, 1.0, None, GuidanceConfig())
    assert not torch.equal(result.latent, z)


def test_guided_step_rejects_bad_step_size():
    with pytest.raises(ValueError, match="step_size"):
        guided_step(torch.zeros(1, 4, 2, 2), sigmoid_maps_fn, float("nan"), None, GuidanceConfig())


def test_guided_step_emits_no_warning_when_all_finite():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guided_step(torch.randn(2, 4, 6, 6), make_token_maps_fn(), 1.0, None, GuidanceConfig())


@pytest.mark.parametrize("mode", ["astar", "attend_excite"])
def test_a_step_without_a_gradient_path_is_an_error_not_a_zero_step(mode):
    """Maps computed without a path to the latent (as behind a layer that quantizes its input into a tensor
    without autograd, ComfyUI's fp8 matmul): a step meant to move raises instead of leaving the latent as it
    was; at step size 0 the same maps are a plain no-op."""
    torch.manual_seed(6)
    z = torch.randn(1, 4, 6, 6)
    maps_fn = make_token_maps_fn()

    def cut(latent):
        return maps_fn(latent.detach())  # the forward loses the latent's gradient

    config = GuidanceConfig(mode=mode)
    with pytest.raises(ValueError, match="no gradient path"):
        guided_step(z, cut, 5.0, None, config)
    assert torch.equal(guided_step(z, cut, 0.0, None, config).latent, z)


def test_a_loss_that_depends_on_something_else_but_not_the_latent_is_an_error():
    """Maps that require grad through another tensor (a pack's weight left trainable) but not through the
    latent: the gradient with respect to the latent is missing, which is an error too."""
    z = torch.randn(1, 4, 6, 6)
    maps_fn = make_token_maps_fn()
    stray = torch.zeros((), requires_grad=True)
    with pytest.raises(ValueError, match="no gradient path"):
        guided_step(z, lambda latent: maps_fn(latent.detach()) + stray, 5.0, None, GuidanceConfig())


def test_a_loss_constant_by_construction_is_a_no_op():
    """One concept at the first step (astar mode): no pair to segregate and no retention mask yet. The loss
    does not depend on the latent by construction, not for a lack of gradient path: the latent is kept."""
    z = torch.randn(1, 4, 6, 6)
    maps_fn = make_token_maps_fn()
    result = guided_step(z, lambda latent: maps_fn(latent)[:, :1], 5.0, None, GuidanceConfig())
    assert torch.equal(result.latent, z) and result.iterations == 1
