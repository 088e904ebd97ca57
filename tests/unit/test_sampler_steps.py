"""nodes/sampler_steps.py: the predicted (call, sigma) of each step's state, checked at each such call."""
import pytest
import torch

from support.pack_modules import pack_module

steps = pack_module("nodes.sampler_steps")
SIGMAS = torch.tensor([14.6, 6.0, 2.0, 0.5, 0.0])


def test_one_call_samplers_start_each_step_at_its_call():
    assert steps.predict_states("sample_euler", SIGMAS, {}, None) == [
        (0, pytest.approx(14.6)), (1, 6.0), (2, 2.0), (3, 0.5)]


def test_heun_adds_a_corrector_call_except_on_the_step_to_zero():
    # calls: 14.6, 6.0 (corrector) | 6.0, 2.0 | 2.0, 0.5 | 0.5 (to 0: Euler)
    assert [c for c, _ in steps.predict_states("sample_heun", SIGMAS, {}, None)] == [0, 2, 4, 6]


@pytest.mark.parametrize("name, options, reason", [
    ("dpm_adaptive_function", {}, "accepts or rejects"),
    ("sample_unipc", {}, "predictor-corrector"),
    ("sample_heun", {"s_churn": 1.0}, "s_churn"),
    ("sample_from_another_pack", {}, "no rule.*another pack"),
])
def test_unpredictable_states_are_named(name, options, reason):
    with pytest.raises(steps.StatesUnknown, match=reason):
        steps.predict_states(name, SIGMAS, options, None)


def test_a_predicted_state_call_at_another_sigma_stops_the_run():
    schedule = steps.StateSchedule("sample_heun", SIGMAS.tolist(), [(0, 14.6), (2, 6.0)])
    assert schedule.on_call(14.6) == 0
    assert schedule.on_call(6.0) is None  # the corrector, not a state
    with pytest.raises(RuntimeError, match=r"'heun' evaluated model call 2 at sigma 2.*step 1 at sigma 6"):
        schedule.on_call(2.0)


def test_without_a_prediction_the_first_call_at_each_sigma_is_the_state():
    schedule = steps.StateSchedule("sample_unipc", SIGMAS.tolist(), None)
    assert [schedule.on_call(s) for s in (14.59, 6.0, 6.0, 2.0)] == [0, 1, None, 2]


def test_bound_keywords_are_what_the_sampler_function_receives():
    """Parameters bound with functools.partial (as a pack may build its KSAMPLER) reach the sampler as the
    partial's call passes them: the outer binding wins."""
    import functools

    def sample_dpmpp_2s_ancestral(model, x, sigmas, **kwargs):
        return kwargs

    function = functools.partial(functools.partial(sample_dpmpp_2s_ancestral, eta=1.0, s_noise=0.5), eta=2.0)
    assert steps.bound_keywords(function) == function(None, None, None) == {"eta": 2.0, "s_noise": 0.5}
    assert steps.bound_keywords(sample_dpmpp_2s_ancestral) == {}
