"""The sampling mechanism: a SAMPLER_SAMPLE wrapper under which the user's sampler runs once, over the
whole schedule, and the latent it holds is updated in place at the start of each guided step.

Which states are guided, how far and where refinement runs are decided on the model's noise clock
(attention/schedule.py), so every run of a patched model (hires fix, refiner, KSamplerAdvanced
segments) guides only where a full txt2img run would. The sampler's function is given a model that, at
the model call that evaluates a step's latent (predicted before the run by sampler_steps.py, checked
at each such call), first takes the guidance step on that very tensor, then calls the real model. The sampler integrates every step itself, from the updated latent, keeping its history
(multistep), its noise sampler (ancestral, SDE) and its second-order corrections: with step size 0
the run is the stock run, bit for bit. The sampler object is never changed: a copy carries the
wrapped function down the rest of ComfyUI's wrapper chain.
"""
from __future__ import annotations

import contextlib
import dataclasses
import copy
import logging
import math

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers

from ..attention.capture import GuidancePasses, RunCapture
from ..attention.cpu_convolutions import direct_cpu_convolutions, use_direct_kernel
from ..attention.guidance import GuidanceConfig, guided_step
from ..attention.maps import gaussian_smooth, resize_mask
from ..attention.recording import AttentionRecording
from ..attention.saved_tensors import saved_tensor_policy
from ..attention.schedule import (FRACTION_TOLERANCE, in_window, previous_fractions, refinement_threshold,
                                  schedule_fraction, step_size_at)
from ..attention.tokens import ConceptSpec
from .autograd_weights import casts_weights, control_modules, gradient_to_input, make_autograd_safe
from .gradient_path import GradientWatch, hook_swapped_weights, patch_networks, without_compile
from .prompt import PROMPT_KEY, context_tokens, missing_concepts_error, prompt_tokens_of
from .sampler_steps import (UNGUIDABLE, NOT_PREDICTED, StateSchedule, StatesUnknown, bound_keywords, function_name,
                            predict_states, refusal, SIGMA_RTOL)
from .transformer_options import CAPTURES_KEY, STEP_KEY

WRAPPER_KEY = "astar_guidance"


@dataclasses.dataclass(frozen=True)
class Handover:
    """Where a run ended, for a run of the same patched model that starts there (the next KSamplerAdvanced
    segment): it continues the schedule as one run would, with the refinement points already passed and
    the retention masks of the last guided step."""
    sigma: float  # the sigma the run ended at
    shape: tuple  # its latent's shape
    fraction: float  # its last state's fraction of the noise schedule
    masks: torch.Tensor | None  # retention masks of its last guided step


def _active(entries, sigma) -> bool:
    """Whether any of the prompt's conditioning entries applies at this sigma (as ComfyUI decides
    with ConditioningSetTimestepRange's timestep_start/timestep_end)."""
    s = float(sigma)
    return any(not ("timestep_start" in c and s > float(c["timestep_start"])) and
               not ("timestep_end" in c and s < float(c["timestep_end"])) for c in entries)


def guidable_sampler_names() -> list[str]:
    refused = set(UNGUIDABLE.values()) | set(NOT_PREDICTED.values())
    return [n for n in comfy.samplers.KSampler.SAMPLERS if n not in refused]


class AStarSampling:
    """SAMPLER_SAMPLE wrapper. Holds the user's settings; everything about one run lives in that
    run's call (a _GuidedRun). Each run appends its AttentionRecording to `recordings`.

    reader: how the model's text attention is read (readers.py: map size, layers, token layout).
    single_pass: the sampler's own model call supplies the maps and the gradient (SinglePass) instead of
    a guidance pass of its own (TwoPasses). lean: guidance passes stop after the last read layer."""

    def __init__(self, specs: list[ConceptSpec], config: GuidanceConfig, recordings: list, reader,
                 layout_masks: torch.Tensor | None = None, lean: bool = True, single_pass: bool = False):
        self.specs = specs
        self.config = config
        self.recordings = recordings
        self.reader = reader
        self.layout_masks = layout_masks  # [N, H, W], mask n for concept n
        self.strategy = SinglePass() if single_pass else TwoPasses()
        self.lean = lean and self.strategy.lean
        # latent size -> the read layers a full guidance pass found, so later runs start lean (a wrong
        # entry only costs one full pass: a pass that records other layers runs in full and re-learns)
        self.learned_layers: dict[tuple, tuple] = {}
        self.handover: Handover | None = None  # the last run's end (one prompt runs at a time)

    def __call__(self, executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
        sampler = executor.class_obj
        if not hasattr(sampler, "sampler_function"):
            raise ValueError(f"A-STAR works with ComfyUI's KSAMPLER samplers; got {type(sampler).__name__}")
        name = function_name(sampler.sampler_function)
        run = _GuidedRun(self, guider, sigmas, extra_args, name)
        own = copy.copy(sampler)  # the user's sampler object is shared: never change it
        own.sampler_function = run.wrap(sampler.sampler_function)
        rest = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            own.sample, own, executor.wrappers, idx=executor.idx + 1)
        try:
            result = rest.execute(guider, sigmas, extra_args, callback, noise, *args, **kwargs)
        finally:
            self.recordings.append(run.recording())
            self.handover = None  # a run that failed leaves nothing to continue
        self.handover = run.end()
        return result


class _GuidedRun:
    """One sampler run: finds each step's start, guides the steps in the window, records maps."""

    def __init__(self, owner: AStarSampling, guider, sigmas, extra_args, sampler_name: str):
        self.owner = owner
        self.config = owner.config
        self.guider = guider
        self.sampler_name = sampler_name
        self.sigmas = [float(s) for s in sigmas]
        self.positive = guider.conds.get("positive")
        prompt = prompt_tokens_of(self.positive)
        if not owner.specs:  # an empty concepts widget: said now that the prompt is known, before any work
            raise missing_concepts_error(prompt.text)
        # Only the conditioning entries of this prompt are read (ConditioningCombine adds others).
        self.entries = [c for c in self.positive if c.get(PROMPT_KEY) is prompt]
        self.groups, excluded, n_context = owner.reader.locate(
            prompt, owner.specs, next((n for n in map(context_tokens, self.entries) if n), None))
        source = {"uuids": frozenset(c["uuid"] for c in self.entries if "uuid" in c) or None,
                  "n_tokens": n_context, "excluded": excluded}
        level = owner.reader.level
        self.capture = RunCapture(level, [s.label for s in owner.specs], self.groups, **source)
        self.passes = GuidancePasses(level, lean=owner.lean, **source)
        self.log: dict[int, dict] = {}
        self.masks = None
        self.base_options = extra_args["model_options"]
        sampling = guider.inner_model.model_sampling
        self.percent_to_sigma = sampling.percent_to_sigma
        self.schedule: StateSchedule | None = None  # made when the sampler's function is called
        self.fractions: list[float] = []
        self.previous: list[float] = []
        self.shape: tuple = ()

    def guides(self, sigma_max: float, sigma_min: float) -> bool:
        """Whether a run whose states lie in [sigma_min, sigma_max] may take a guidance step."""
        first, last = (schedule_fraction(s, self.percent_to_sigma) for s in (sigma_max, sigma_min))
        lowest = max(first, self.config.start - FRACTION_TOLERANCE)  # the first place of the run in_window may take
        return (self.config.moves and self.config.end > self.config.start
                and lowest <= last and in_window(lowest, self.config.start, self.config.end))

    def plan(self, model_k, sigmas, options: dict, shape: tuple = ()) -> None:
        """Predict the run's states before its first model call; refuse a sampler whose states cannot be
        placed when this run would guide."""
        try:
            states = predict_states(self.sampler_name, sigmas, options, self.guider.inner_model.model_sampling)
        except StatesUnknown as unknown:
            nonzero = [s for s in self.sigmas[:-1] if s > 0]  # the states; the last sigma is where the run ends
            if nonzero and self.guides(max(nonzero), min(nonzero)):
                raise refusal(self.sampler_name, str(unknown), guidable_sampler_names()) from None
            states = None  # records only: the first call at each sigma
        self.schedule = StateSchedule(self.sampler_name, self.sigmas, states)
        state_sigmas = [s for _, s in states] if states is not None else self.sigmas[:-1]
        self.fractions = [schedule_fraction(s, self.percent_to_sigma) for s in state_sigmas]
        self.previous = previous_fractions(self.fractions)
        self.shape = shape
        before = self.owner.handover  # the model's previous run, until this one ends
        if before is not None and self.fractions and before.shape == shape and \
                math.isclose(before.sigma, self.sigmas[0], rel_tol=SIGMA_RTOL):
            self.previous[0] = before.fraction
            self.masks = before.masks

    def end(self) -> Handover | None:
        """Where this run ended, for a run that continues from there."""
        if not self.fractions or self.sigmas[-1] <= 0:
            return None
        return Handover(self.sigmas[-1], self.shape, self.fractions[-1], self.masks)

    # --- the sampler's side -------------------------------------------------------------------
    def wrap(self, sampler_function):
        bound = bound_keywords(sampler_function)  # a sampler's parameters may come bound (functools.partial)

        def guided_sampler_function(model, x, sigmas, *args, extra_args=None, callback=None, **kwargs):
            self.plan(model, sigmas, {**bound, **kwargs}, tuple(x.shape))
            return sampler_function(_GuidedModel(model, self), x, sigmas, *args, extra_args=extra_args,
                                    callback=callback, **kwargs)
        return guided_sampler_function

    def model_call(self, model, x, sigma, extra_args):
        """What the sampler's model call does: guide first when it evaluates a step's latent."""
        sigma0 = sigma.reshape(-1)[0]
        sigma_value = float(sigma0)
        step = self.schedule.on_call(sigma_value)
        if step is None:
            return model(x, sigma, **extra_args)
        self.capture.sigmas[step] = sigma_value
        if in_window(self.fractions[step], self.config.start, self.config.end):
            if _active(self.entries, sigma_value):
                x_new, output = self._guide(model, x, sigma, step, extra_args)
                if x_new is not None:
                    x.copy_(x_new)  # in place: the sampler continues from this very tensor
                if output is not None:  # single pass: the call already ran, at the latent before the update
                    return output
            else:
                logging.info("A-STAR: step %d: the prompt is inactive at this sigma (timestep range); "
                             "guidance skipped", step)
        options = extra_args.get("model_options", self.base_options)
        transformer_options = {**options.get("transformer_options", {}), CAPTURES_KEY: [self.capture], STEP_KEY: step}
        return model(x, sigma, **{**extra_args, "model_options": {**options, "transformer_options": transformer_options}})

    # --- the guidance step --------------------------------------------------------------------
    def _layout(self, latent_hw):
        masks = self.owner.layout_masks
        if masks is None:
            return None
        h, w = self.owner.reader.map_size(latent_hw)
        return {c: resize_mask(m, h, w) for c, m in enumerate(masks) if float(m.max()) > 0}

    def _model_input(self, model_k, x, sigma, extra_args):
        """The latent the model call sees: with a denoise mask, the sampler's latent composed with the
        noised input latent, after any denoise_mask_function (Differential Diffusion), as ComfyUI's
        KSamplerX0Inpaint composes it. Differentiable in x."""
        mask = extra_args.get("denoise_mask")
        if mask is None:
            return x
        options = extra_args.get("model_options", self.base_options)
        if "denoise_mask_function" in options:
            mask = options["denoise_mask_function"](sigma, mask, extra_options={"model": model_k.inner_model,
                                                                                 "sigmas": model_k.sigmas})
        mask = mask.clone()
        model = self.guider.inner_model
        known = model.scale_latent_inpaint(x=x.detach(), sigma=sigma, noise=model_k.noise.clone(),
                                           latent_image=model_k.latent_image.clone())
        return x * mask + known.detach() * (1.0 - mask)

    def _guide(self, model_k, x, sigma_call, step, extra_args):
        """One guided step on the sampler's latent x (ComfyUI's x). Returns (the updated latent, or None when
        nothing moved (step size 0): the sampler's latent then stays bit for bit what it was; the model call's
        output when the owner's strategy ran the sampler's call (SinglePass), else None)."""
        config = self.config
        strategy = self.owner.strategy
        sigma = sigma_call.reshape(-1)[0]
        model = self.guider.inner_model
        with torch.inference_mode(False):
            controls = control_modules(self.positive)
            fraction = self.fractions[step]
            threshold = refinement_threshold(fraction, self.previous[step], config.refine_points)
            # The update is A&E's on the UNet input latent z = x * c_in (the diffusers latent):
            # z - alpha * grad_z L is, in ComfyUI's x = z / c_in, x - alpha / c_in^2 * grad_x L. Taken on x,
            # so the guidance pass sees exactly the latent of the sampler's model call.
            c_in = float(model.model_sampling.calculate_input(sigma, torch.ones((), device=x.device, dtype=x.dtype)))
            alpha = step_size_at(config.scale, fraction) / c_in ** 2
            moves = alpha > 0 and config.moves
            options = strategy.pass_options(extra_args.get("model_options", self.base_options), moves)
            networks = [model, *controls, *patch_networks(options, self.positive)]
            for module in networks:
                make_autograd_safe(module)
            # ControlNet adds its residuals in place (h += ctrl), and joint blocks their outputs (img += ...),
            # to tensors that earlier layers have saved, so autograd keeps copies of those; weights cast per
            # forward are recast at backward.
            policy = {"recast_weight_casts": any(casts_weights(m) for m in networks),
                      "copy_others": bool(controls) or self.owner.reader.adds_in_place,
                      "copied": hook_swapped_weights(self.guider.model_patcher, model)}
            x = x.clone()
            held = {}

            def maps_fn(z):  # z: a latent in ComfyUI's x space
                capture = self.passes.capture()
                guidance_pass = strategy.pass_on(self, model_k, z, sigma_call, step, extra_args, options, capture)

                def forward():
                    held["output"] = guidance_pass()
                with saved_tensor_policy(**policy), GradientWatch() as watch:
                    self.passes.run(capture, forward)
                watch.check()  # a layer that cut the latent's gradient: an error, never a silently wrong step
                try:
                    return capture.concept_maps(self.groups)
                except LookupError:
                    raise ValueError(self.owner.reader.read_failure) from None

            size = tuple(x.shape[-2:])
            if self.passes.layers is None:
                self.passes.layers = self.owner.learned_layers.get(size) or self.owner.reader.planned_layers(size)
            compute_dtype = model.manual_cast_dtype or model.get_dtype()
            direct = strategy.direct_kernels and use_direct_kernel(x, compute_dtype)
            with gradient_to_input(networks) if moves else contextlib.nullcontext(), direct_cpu_convolutions(direct):
                result = guided_step(x, maps_fn, alpha, self.masks,
                                     config, refine_threshold=threshold, layout_masks=self._layout(x.shape[-2:]),
                                     check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                                     label=f"step {step}")
            moved = ~result.skipped if result.iterations else torch.zeros_like(result.skipped)
            x_new = torch.where(moved.view(-1, *([1] * (x.dim() - 1))), result.latent.to(x.dtype), x)
        if self.passes.layers is not None:
            self.owner.learned_layers[size] = self.passes.layers
        self.masks = result.masks
        self.log[step] = {"losses": result.losses, "iterations": result.iterations, "trace": result.trace,
                          "maps": result.maps}
        if bool(result.skipped.any()):
            logging.warning("A-STAR: step %d: update skipped for sample(s) %s (non-finite loss or gradient)",
                            step, torch.nonzero(result.skipped).flatten().tolist())
        output = held.get("output")
        return (x_new if bool(moved.any()) else None), (output.detach() if output is not None else None)

    def recording(self) -> AttentionRecording:
        smooth = gaussian_smooth if self.config.smooth else (lambda m: m)
        return self.capture.to_recording(self.log, smooth=smooth)


class TwoPasses:
    """How a guided step gets its maps by default (A-STAR's and A&E's): a guidance pass of the prompt's cond
    branch alone, stopped after the last read layer, gives the maps and the gradient; the sampler's call
    then evaluates the updated latent."""

    lean = True  # a pass of its own may stop after the last read layer
    direct_kernels = True  # and may run on faster CPU kernels than the sampler's (attention/cpu_convolutions.py)

    @staticmethod
    def pass_options(options: dict, moves: bool) -> dict:
        """The pass differentiates the eager modules, never torch.compile's copy."""
        return without_compile(options)

    @staticmethod
    def pass_on(run: "_GuidedRun", model_k, z, sigma_call, step, extra_args, options, capture):
        """The guidance pass on latent z (the sampler's denoise mask composed in, as its call would), to run
        with `capture` reading; it returns None (the sampler's call comes after the update)."""
        sigma = sigma_call.reshape(-1)[0].clone().reshape(1).expand(z.shape[0])
        call_options = {**options, "transformer_options": {
            **options.get("transformer_options", {}), CAPTURES_KEY: [capture], STEP_KEY: step}}
        x_in = run._model_input(model_k, z, sigma, extra_args)

        def forward():
            comfy.samplers.calc_cond_batch(run.guider.inner_model, [run.positive], x_in, sigma, call_options)
        return forward


class SinglePass:
    """single_pass: the sampler's own model call (cond and uncond, denoise mask), run with gradients, gives the
    maps and the gradient, and its output, from the latent before the update, is what the sampler gets."""

    lean = False  # the sampler needs the whole call
    direct_kernels = False  # the sampler's own call: stock kernels

    @staticmethod
    def pass_options(options: dict, moves: bool) -> dict:
        """Eager modules where a gradient is taken; at step size 0 the sampler's own (compiled) call, stock."""
        return without_compile(options) if moves else options

    @staticmethod
    def pass_on(run: "_GuidedRun", model_k, z, sigma_call, step, extra_args, options, capture):
        """The sampler's call on latent z, to run with `capture` and the run's recording reading; it returns
        the call's output."""
        call_options = {**options, "transformer_options": {
            **options.get("transformer_options", {}), CAPTURES_KEY: [capture, run.capture], STEP_KEY: step}}
        return lambda: model_k(z, sigma_call, **{**extra_args, "model_options": call_options})


class _GuidedModel:
    """The model a sampler function is given: ComfyUI's KSamplerX0Inpaint, with guidance before the
    calls that evaluate a step's latent. Everything else (inner_model, sigmas, ...) is the original's."""

    def __init__(self, model_k, run: _GuidedRun):
        self._model_k = model_k
        self._run = run

    def __call__(self, x, sigma, **extra_args):
        return self._run.model_call(self._model_k, x, sigma, extra_args)

    def __getattr__(self, name):
        return getattr(self._model_k, name)
