"""Where each step of a sampler begins: the predicted schedule of (model call, sigma) of one run.

The guidance updates the latent a sampler holds at the start of a step, in place, just before the
model evaluation at that latent (the "state evaluation"); the sampler then integrates the step from
the updated latent with its own history and noise. Before a run's first model call, the sampler's
function, its parameters (eta, r, ...) and the run's sigmas predict which call evaluates each step's
state and at which sigma (predict_states); at each of those calls the sigma must be the predicted one,
or the run stops with a clear error (StateSchedule.on_call).
- one call per step (euler, lms, dpmpp_2m, the SDE multistep samplers, ...): call i, sigma_i;
- a second (or third) stage call unless the step ends at sigma 0: heun, dpm_2, dpmpp_sde, seeds_2,
  exp_heun_2_x0; seeds_3 (three); heunpp2 (one to three);
- the ancestral second-order samplers (dpm_2_ancestral, dpmpp_2s_ancestral and its CFG++ form) make
  their stage call unless the step goes down to 0 (sigma_down, from eta and the two sigmas: at a large
  eta, from about 1.7 to 2.3 depending on the schedule, every step is one call); their flow-model
  forms (dispatched on the model's sampling, as the samplers do) decide on their own downstep;
- dpm_fast: its own grid of floor(n/3)+1 steps in log sigma between the run's first and last nonzero
  sigma, orders 3, ..., 3, then 2, 1 or n%3 calls per step.
Samplers whose states cannot be predicted are refused where a run would guide: dpm_adaptive (it
accepts or rejects steps by its error estimate), the predictor-corrector methods whose model calls
never see the latent they continue from (uni_pc, uni_pc_bh2, sa_solver, sa_solver_pece), samplers of
other packs and s_churn > 0. A run that only records uses, for those, the first call at each sigma.
"""
from __future__ import annotations

import functools
import math

import torch

# Samplers whose model calls never see the corrected latent the sampler continues from.
UNGUIDABLE = {
    "sample_unipc": "uni_pc", "sample_unipc_bh2": "uni_pc_bh2",
    "sample_sa_solver": "sa_solver", "sample_sa_solver_pece": "sa_solver_pece",
}
ONE_CALL = {
    "sample_euler", "sample_euler_ancestral", "sample_euler_cfg_pp", "sample_euler_ancestral_cfg_pp", "sample_lms",
    "sample_dpmpp_2m", "sample_dpmpp_2m_cfg_pp", "sample_dpmpp_2m_sde", "sample_dpmpp_2m_sde_gpu",
    "sample_dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde_heun_gpu", "sample_dpmpp_3m_sde", "sample_dpmpp_3m_sde_gpu",
    "sample_ddpm", "sample_lcm", "sample_ipndm", "sample_ipndm_v", "sample_deis", "sample_res_multistep",
    "sample_res_multistep_cfg_pp", "sample_res_multistep_ancestral", "sample_res_multistep_ancestral_cfg_pp",
    "sample_gradient_estimation", "sample_gradient_estimation_cfg_pp", "sample_er_sde",
    "sample_euler_pp",  # SamplerEulerCFGpp's "regular" version (comfy_extras/nodes_advanced_samplers.py)
}
# extra stage calls unless the step ends at sigma 0
STAGES_UNLESS_LAST = {"sample_heun": 2, "sample_dpm_2": 2, "sample_dpmpp_sde": 2, "sample_dpmpp_sde_gpu": 2,
                      "sample_seeds_2": 2, "sample_exp_heun_2_x0": 2, "sample_exp_heun_2_x0_sde": 2,
                      "sample_seeds_3": 3}
# a midpoint call unless sigma_down is 0; the value says whether a flow model has its own form
ANCESTRAL_MIDPOINT = {"sample_dpm_2_ancestral": True, "sample_dpmpp_2s_ancestral": True,
                      "sample_dpmpp_2s_ancestral_cfg_pp": False}
# samplers that move a flow model's first sigma 1 off 1 (offset_first_sigma_for_snr)
OFFSET_FIRST_SIGMA = {"sample_dpmpp_sde", "sample_dpmpp_sde_gpu", "sample_dpmpp_2m_sde", "sample_dpmpp_2m_sde_gpu",
                      "sample_dpmpp_2m_sde_heun", "sample_dpmpp_2m_sde_heun_gpu", "sample_dpmpp_3m_sde",
                      "sample_dpmpp_3m_sde_gpu", "sample_er_sde", "sample_seeds_2", "sample_seeds_3",
                      "sample_exp_heun_2_x0", "sample_exp_heun_2_x0_sde"}
HAS_CHURN = {"sample_euler", "sample_heun", "sample_dpm_2", "sample_heunpp2"}
DPM_FAST = "dpm_fast_function"  # comfy.samplers.ksampler("dpm_fast")
NOT_PREDICTED = {"dpm_adaptive_function": "dpm_adaptive"}
# a state's sigma must equal the prediction to this relative tolerance (dpm_fast recomputes its grid)
SIGMA_RTOL = 1e-5


def function_name(sampler_function) -> str:
    """The name of a KSAMPLER's function (through functools.partial)."""
    while isinstance(sampler_function, functools.partial):
        sampler_function = sampler_function.func
    return getattr(sampler_function, "__name__", type(sampler_function).__name__)


def bound_keywords(sampler_function) -> dict:
    """The keyword arguments bound to a KSAMPLER's function by functools.partial (outermost wins), which
    reach the sampler as its parameters (eta, s_churn, ...) besides the KSAMPLER's extra_options."""
    chain = []
    while isinstance(sampler_function, functools.partial):
        chain.append(sampler_function.keywords)
        sampler_function = sampler_function.func
    bound = {}
    for keywords in reversed(chain):
        bound.update(keywords)
    return bound


def display_name(name: str) -> str:
    """The sampler's name as ComfyUI lists it (sample_euler -> euler)."""
    return UNGUIDABLE.get(name) or NOT_PREDICTED.get(name) or name.removeprefix("sample_").removesuffix("_function")


class UnguidableSampler(ValueError):
    pass


class StatesUnknown(Exception):
    """The states of this run cannot be predicted (the message says why)."""


def refusal(name: str, reason: str, guidable_names) -> UnguidableSampler:
    """A clear error for a sampler that cannot be guided, naming the ones that can."""
    return UnguidableSampler(
        f"A-STAR cannot guide the sampler '{display_name(name)}': {reason} Use another sampler (for example "
        f"{', '.join(guidable_names)}), or set guidance_end to 0 (or a window this run does not reach) to only "
        "record attention.")


def _is_flow(model_sampling) -> bool:
    import comfy.model_sampling
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def _state_sigmas(name, sigmas: torch.Tensor, model_sampling) -> torch.Tensor:
    if name in OFFSET_FIRST_SIGMA:
        import comfy.k_diffusion.sampling as k
        if hasattr(k, "offset_first_sigma_for_snr"):
            return k.offset_first_sigma_for_snr(sigmas, model_sampling)
    return sigmas


def _heunpp2_calls(values: list[float]) -> list[int]:
    end, counts = values[-1], []
    for i in range(len(values) - 1):
        counts.append(1 if values[i + 1] == end else 2 if values[i + 2] == end else 3)
    return counts


def _ancestral_calls(name, sigmas: torch.Tensor, eta: float, flow: bool) -> list[int]:
    """Calls per step of an ancestral midpoint sampler: its midpoint is skipped where sigma_down is 0
    (computed as the sampler computes it)."""
    import comfy.k_diffusion.sampling as k
    counts = []
    for i in range(len(sigmas) - 1):
        if flow and name == "sample_dpmpp_2s_ancestral":
            down_is_zero = bool(sigmas[i + 1] == 0)
        elif flow:  # dpm_2_ancestral_RF
            down_is_zero = bool(sigmas[i + 1] * (1 + (sigmas[i + 1] / sigmas[i] - 1) * eta) == 0)
        else:
            down_is_zero = bool(k.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)[0] == 0)
        counts.append(1 if down_is_zero else 2)
    return counts


def _dpm_fast_states(sigmas: torch.Tensor) -> tuple[list[int], list[float]]:
    """dpm_fast's own steps (comfy.samplers.ksampler's dpm_fast_function -> DPMSolver.dpm_solver_fast)."""
    n = len(sigmas) - 1
    sigma_min = sigmas[-1] if sigmas[-1] != 0 else sigmas[-2]
    t_start, t_end = -torch.as_tensor(sigmas[0]).log(), -torch.as_tensor(sigma_min).log()
    m = math.floor(n / 3) + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1, device=sigmas.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    return orders, [float(t.neg().exp()) for t in ts[:len(orders)]]


def predict_states(name: str, sigmas: torch.Tensor, options: dict, model_sampling) -> list[tuple[int, float]]:
    """[(call index, sigma)] of each step's state evaluation, in step order, for the sampler function
    `name` called with `options` (its keyword arguments) on `sigmas`. Raises StatesUnknown."""
    if name in UNGUIDABLE:
        raise StatesUnknown("it is a predictor-corrector method whose model calls never see the latent it "
                            "continues from, so a guidance update could not land on it.")
    if name in NOT_PREDICTED:
        raise StatesUnknown("it accepts or rejects each of its own steps by an error estimate, so which model "
                            "call starts a step is not known before the run.")
    if name in HAS_CHURN and float(options.get("s_churn", 0.0) or 0.0) > 0:
        raise StatesUnknown("with s_churn > 0 it evaluates each step at a raised noise level after adding noise.")
    values = [float(s) for s in sigmas]
    n = len(values) - 1
    states = [float(s) for s in _state_sigmas(name, sigmas, model_sampling)[:n]]
    if name == DPM_FAST:
        if n < 1:
            return []
        counts, states = _dpm_fast_states(sigmas)
    elif name in ONE_CALL:
        counts = [1] * n
    elif name in STAGES_UNLESS_LAST:
        counts = [1 if values[i + 1] == 0 else STAGES_UNLESS_LAST[name] for i in range(n)]
    elif name == "sample_heunpp2":
        counts = _heunpp2_calls(values)
    elif name in ANCESTRAL_MIDPOINT:
        flow = ANCESTRAL_MIDPOINT[name] and _is_flow(model_sampling)
        counts = _ancestral_calls(name, sigmas, float(options.get("eta", 1.0)), flow)
    else:
        raise StatesUnknown(f"A-STAR has no rule for which model call of '{name}' starts a step (a sampler of "
                            "another pack, or one that resizes the latent as it goes).")
    starts = [0] + list(torch.tensor(counts[:-1], dtype=torch.long).cumsum(0).tolist()) if counts else []
    return list(zip(starts, states))


class StateSchedule:
    """The predicted states of one run, checked as its model calls come.

    on_call(sigma) -> the step index (0-based) when this call is a step's state evaluation, else None;
    raises RuntimeError when a predicted state call comes at another sigma. Without a prediction (a run
    that only records), the first call at each sigma of the run is taken as that step's state."""

    def __init__(self, sampler: str, sigmas: list[float], states: list[tuple[int, float]] | None):
        self.sampler = sampler
        self.sigmas = [float(s) for s in sigmas]
        self.states = states
        self.by_call = {call: (step, sigma) for step, (call, sigma) in enumerate(states)} if states is not None else None
        self.calls = 0
        self.next_step = 0

    def state_sigma(self, step: int) -> float:
        return self.states[step][1] if self.states is not None else self.sigmas[step]

    def on_call(self, sigma: float) -> int | None:
        call = self.calls
        self.calls += 1
        if self.by_call is None:
            # The first call evaluates the initial latent, whatever its sigma (log-SNR samplers move a flow
            # model's sigma 1 to 0.9999).
            if self.next_step < len(self.sigmas) - 1 and (call == 0 or sigma == self.sigmas[self.next_step]):
                self.next_step += 1
                return self.next_step - 1
            return None
        hit = self.by_call.get(call)
        if hit is None:
            return None
        step, expected = hit
        if not math.isclose(sigma, expected, rel_tol=SIGMA_RTOL, abs_tol=0.0):
            raise RuntimeError(
                f"A-STAR: the sampler '{display_name(self.sampler)}' evaluated model call {call} at sigma "
                f"{sigma:.6g}, where A-STAR expected the start of step {step} at sigma {expected:.6g}: its steps "
                "do not run as predicted for these settings, so guidance would land on the wrong latent. "
                "Use another sampler or set guidance_end to 0.")
        return step
