"""The sampling mechanism: a SAMPLER_SAMPLE wrapper that runs the guided early steps one sigma pair
at a time, updating the latent before each, then the remaining steps in one call.

Why this mechanism (README, design): it works with every KSAMPLER (single-step, multistep,
ancestral, SDE, second-order, dpm_fast/adaptive) because the sampler itself integrates each step;
the update is applied exactly to the latent the sampler holds; a denoise mask keeps working because
each segment goes through ComfyUI's own inpainting wrapper. Trade-off: across a segment boundary a
multistep sampler restarts its history (its first step is first-order again) and ancestral/SDE
noise is drawn from seed + segment index.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.samplers

from ..attention.capture import GuidancePasses, RunCapture
from ..attention.guidance import GuidanceConfig, guided_step
from ..attention.maps import resize_mask
from ..attention.recording import AttentionRecording
from ..attention.saved_tensors import saved_tensor_policy
from ..attention.schedule import step_sizes
from ..attention.tokens import ConceptSpec
from .patch import CAPTURES_KEY, control_modules, make_autograd_safe
from .prompt import PROMPT_KEY, prompt_tokens_of

WRAPPER_KEY = "astar_guidance"


def map_size(latent_hw, level):
    """Spatial size of the UNet activations `level` downsamplings below the latent (stride-2, pad 1)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def _active(entries, sigma) -> bool:
    """Whether any of the prompt's conditioning entries applies at this sigma (as ComfyUI decides
    with ConditioningSetTimestepRange's timestep_start/timestep_end)."""
    s = float(sigma)
    return any(not ("timestep_start" in c and s > float(c["timestep_start"])) and
               not ("timestep_end" in c and s < float(c["timestep_end"])) for c in entries)


def _shifted(callback, offset):
    if callback is None or offset == 0:
        return callback
    return lambda d: callback({**d, "i": d["i"] + offset})


def _casts_weights(module: torch.nn.Module) -> bool:
    """Whether some layer casts its weight at every forward (ComfyUI's manual cast and lowvram offload)."""
    return any(getattr(m, "comfy_cast_weights", False) for m in module.modules())


class AStarSampling:
    """SAMPLER_SAMPLE wrapper. Holds the user's settings; everything about one run lives in that
    run's call. Fills `recording` (the node's ASTAR_ATTENTION output) when the run ends."""

    def __init__(self, specs: list[ConceptSpec], config: GuidanceConfig, level: int,
                 recording: AttentionRecording, layout_masks: torch.Tensor | None = None):
        self.specs = specs
        self.config = config
        self.level = level
        self.recording = recording
        self.layout_masks = layout_masks  # [N, H, W], mask n for concept n

    def __call__(self, executor, guider, sigmas, extra_args, callback, noise, *args, **kwargs):
        sampler = executor.class_obj
        if not hasattr(sampler, "sampler_function"):
            raise ValueError(f"A-STAR works with ComfyUI's KSAMPLER samplers; got {type(sampler).__name__}")
        positive = guider.conds.get("positive")
        prompt = prompt_tokens_of(positive)
        groups = prompt.locate(self.specs)
        words = [s.label for s in self.specs]
        # Only the conditioning entries of this prompt are read (ConditioningCombine adds others).
        entries = [c for c in positive if c.get(PROMPT_KEY) is prompt]
        source = {"uuids": frozenset(c["uuid"] for c in entries if "uuid" in c) or None, "n_tokens": prompt.length}
        run = RunCapture(self.level, words, groups, **source)
        run.sigmas = {i: float(s) for i, s in enumerate(sigmas[:-1])}
        log: dict[int, dict] = {}
        passes = GuidancePasses(self.level, **source)  # lean guidance passes (stop after the last read layer)
        self.recording.words, self.recording.layers, self.recording.steps = words, [], []
        transformer_options = extra_args["model_options"].setdefault("transformer_options", {})
        transformer_options[CAPTURES_KEY] = [run]

        original = sampler.sampler_function

        def segmented(model_k, x, sigmas, extra_args=None, callback=None, disable=None, **options):
            n = len(sigmas) - 1
            guided = min(self.config.guided_steps, n)
            alphas = step_sizes(self.config.scale, n) if guided else ()
            masks = None
            for i in range(guided):
                if _active(entries, sigmas[i]):
                    x, masks = self._guide(model_k, guider, positive, groups, x, sigmas[i], i, alphas[i], masks,
                                           extra_args, log, passes)
                else:
                    logging.info("A-STAR: step %d: the prompt is inactive at this sigma (timestep range); "
                                 "guidance skipped", i)
                x = original(model_k, x, sigmas[i:i + 2], extra_args={**extra_args, "seed": (extra_args.get("seed") or 0) + i},
                             callback=_shifted(callback, i), disable=disable, **options)
            if guided < n:
                rest_args = extra_args if guided == 0 else {**extra_args, "seed": (extra_args.get("seed") or 0) + guided}
                x = original(model_k, x, sigmas[guided:], extra_args=rest_args,
                             callback=_shifted(callback, guided), disable=disable, **options)
            return x

        sampler.sampler_function = segmented
        try:
            return executor(guider, sigmas, extra_args, callback, noise, *args, **kwargs)
        finally:
            sampler.sampler_function = original
            transformer_options.pop(CAPTURES_KEY, None)
            rec = run.to_recording(log)
            self.recording.layers, self.recording.steps = rec.layers, rec.steps

    def _layout(self, latent_hw, batch):
        if self.layout_masks is None:
            return None
        h, w = map_size(latent_hw, self.level)
        return {c: resize_mask(m, h, w) for c, m in enumerate(self.layout_masks) if float(m.max()) > 0}

    def _guide(self, model_k, guider, positive, groups, x, sigma, step, alpha, masks, extra_args, log, passes):
        """One guided step: returns (the updated latent the sampler continues from, the masks)."""
        model = guider.inner_model
        with torch.inference_mode(False):
            denoise_mask = extra_args.get("denoise_mask")
            if denoise_mask is not None:
                denoise_mask = denoise_mask.clone()
            # Ordinary copies of everything autograd will see (the inference-mode fix).
            controls = control_modules(positive)
            networks = [model, *controls]
            for module in networks:
                make_autograd_safe(module)
            # ControlNet adds its residuals in place (h += ctrl) to tensors the next layers have saved,
            # so autograd keeps copies of those; weights cast per forward are recast at backward.
            policy = {"recast_weight_casts": any(_casts_weights(m) for m in networks), "copy_others": bool(controls)}
            x = x.clone()
            sigma_b = sigma.clone().reshape(1).expand(x.shape[0])
            scale = 1.0 / model.model_sampling.calculate_input(sigma.clone(), torch.ones((), device=x.device, dtype=x.dtype))
            model_options = extra_args["model_options"]
            base_to = model_options.get("transformer_options", {})

            def maps_fn(z):
                capture = passes.capture()
                options = {**model_options, "transformer_options": {**base_to, CAPTURES_KEY: [capture]}}
                x_in = z * scale
                if denoise_mask is not None:
                    known = model.scale_latent_inpaint(x=x_in, sigma=sigma_b, noise=model_k.noise, latent_image=model_k.latent_image)
                    x_in = x_in * denoise_mask + known * (1.0 - denoise_mask)
                with saved_tensor_policy(**policy):
                    passes.run(capture, lambda: comfy.samplers.calc_cond_batch(model, [positive], x_in, sigma_b, options))
                try:
                    return capture.concept_maps(groups)
                except LookupError:
                    raise ValueError(
                        f"this UNet has no cross-attention layer at the chosen attention resolution "
                        f"(1/{8 * 2 ** self.level} of the image side); choose another resolution") from None

            result = guided_step(x / scale, maps_fn, step, alpha, masks, self.config,
                                 layout_masks=self._layout(x.shape[-2:], x.shape[0]),
                                 check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted)
            x_new = result.latent.to(x.dtype) * scale
        log[step] = {"losses": result.losses, "iterations": result.iterations, "trace": result.trace}
        if bool(result.skipped.any()):
            logging.warning("A-STAR: step %d: update skipped for sample(s) %s (non-finite loss or gradient)",
                            step, torch.nonzero(result.skipped).flatten().tolist())
        return x_new, result.masks
