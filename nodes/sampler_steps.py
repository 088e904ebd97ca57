"""Where each step of a sampler begins: which model evaluation sees the latent of step i.

The guidance updates the latent a sampler holds at the start of a step, in place, just before the
model evaluation at that latent (the "state evaluation"); the sampler then integrates the step from
the updated latent with its own history and noise. Samplers differ only in how the state
evaluation is recognised among their model calls:
- by sigma (most): the first call at sigma_i after step i-1's (step 0: the run's first call); the
  extra calls of second-order and SDE samplers (dpm_2, dpmpp_sde, seeds, ...) fall at intermediate
  sigmas;
- by count (heun, heunpp2, dpm_2_ancestral, dpmpp_2s_ancestral, exp_heun_2_x0 and its SDE form): their
  extra calls fall on the next schedule sigma (Heun's corrector; the ancestral midpoint
  sqrt(sigma_i * sigma_down) is sigma_i+1 itself when eta = 1; exp_heun_2_x0's stage at r = 1), so step
  i begins at a call number known from the schedule;
- after each progress callback (dpm_fast, dpm_adaptive): their own time grid, one callback per
  solver step, reported after the step.
Predictor-corrector samplers that never evaluate the latent they continue from (uni_pc,
uni_pc_bh2, sa_solver, sa_solver_pece) cannot be guided this way: they are refused by name.
Pure Python; the sampler is known by its function's name.
"""
from __future__ import annotations

import functools

# Samplers whose model calls never see the corrected latent the sampler continues from.
UNGUIDABLE = {
    "sample_unipc": "uni_pc", "sample_unipc_bh2": "uni_pc_bh2",
    "sample_sa_solver": "sa_solver", "sample_sa_solver_pece": "sa_solver_pece",
}
COUNTED = ("sample_heun", "sample_heunpp2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
           "sample_dpmpp_2s_ancestral_cfg_pp", "sample_exp_heun_2_x0", "sample_exp_heun_2_x0_sde")
OWN_GRID = ("dpm_fast_function", "dpm_adaptive_function", "sample_dpm_fast", "sample_dpm_adaptive")
# Samplers whose progress callback reports another tensor than the latent of the step.
CALLBACK_REPORTS_OTHER_X = ("sample_ipndm", "sample_ipndm_v", "sample_deis")


def function_name(sampler_function) -> str:
    """The name of a KSAMPLER's function (through functools.partial)."""
    while isinstance(sampler_function, functools.partial):
        sampler_function = sampler_function.func
    return getattr(sampler_function, "__name__", type(sampler_function).__name__)


class UnguidableSampler(ValueError):
    pass


def refuse_unguidable(name: str, guidable_names) -> None:
    """A clear error for a sampler that cannot be guided, naming the ones that can."""
    if name in UNGUIDABLE:
        raise UnguidableSampler(
            f"A-STAR cannot guide the sampler '{UNGUIDABLE[name]}': it is a predictor-corrector method whose "
            "model calls never see the latent it continues from, so a guidance update could not land on it. "
            f"Use another sampler (for example {', '.join(guidable_names)}), or set guidance_end to 0 to "
            "only record attention.")


def evaluations_per_step(name: str, sigmas: list[float]) -> list[int]:
    """Model calls of each step of a COUNTED sampler for this schedule: one, plus a second where the
    next sigma is not 0 (heun's corrector, the ancestral samplers' midpoint, exp_heun_2_x0's second
    stage; heunpp2 below)."""
    n = len(sigmas) - 1
    if name != "sample_heunpp2":
        return [1 if sigmas[i + 1] == 0 else 2 for i in range(n)]
    end = sigmas[-1]
    counts = []
    for i in range(n):
        if sigmas[i + 1] == end:
            counts.append(1)
        elif sigmas[i + 2] == end:
            counts.append(2)
        else:
            counts.append(3)
    return counts


class StepTracker:
    """Sees every model call and callback of one sampler run; says which call starts which step.

    on_call(sigma) -> the step index (0-based) when this call is a step's state evaluation, else None.
    on_callback(i) after the sampler reports step i. position(step, sigma) is the step's place in the
    schedule (its index; fractional for samplers with their own time grid)."""

    def __init__(self, name: str, sigmas: list[float]):
        self.name = name
        self.sigmas = [float(s) for s in sigmas]
        self.n_steps = len(self.sigmas) - 1
        self.rule = "count" if name in COUNTED else "callback" if name in OWN_GRID else "sigma"
        self.next_step = 0
        self.calls = 0
        self._awaiting_state = True  # "callback" rule: the next call starts a step
        if self.rule == "count":
            starts, total = {}, 0
            for i, count in enumerate(evaluations_per_step(name, self.sigmas)):
                starts[total] = i
                total += count
            self._starts = starts

    def on_call(self, sigma: float) -> int | None:
        call = self.calls
        self.calls += 1
        if self.rule == "count":
            return self._starts.get(call)
        if self.rule == "callback":
            if not self._awaiting_state:
                return None
            self._awaiting_state = False
            step = self.next_step
            self.next_step += 1
            return step
        # The first call evaluates the initial latent, whatever its sigma: samplers working in log-SNR
        # move a flow model's sigma 1 to 0.9999 (offset_first_sigma_for_snr).
        if self.next_step < self.n_steps and (call == 0 or sigma == self.sigmas[self.next_step]):
            step = self.next_step
            self.next_step += 1
            return step
        return None

    def on_callback(self, step: int) -> None:
        self._awaiting_state = True

    @property
    def checks_callback_x(self) -> bool:
        """Whether the progress callback of a step reports the very latent of its state evaluation."""
        return self.rule == "sigma" and self.name not in CALLBACK_REPORTS_OTHER_X
