"""What a guidance pass's gradient must flow through besides the diffusion model and its ControlNets, and what
can cut it: networks that patches bring (Hypernetworks, GLIGEN, IPAdapter-style attention replaces), weights
that ComfyUI's hook scheduling swaps in place, torch.compile's wrapper, and layers whose output loses the
gradient of their input (fp8 matrix multiplication). See docs/gradients.md."""
from __future__ import annotations

import functools
import inspect
import types

import torch

import comfy.utils

# How deep the walk from a patch callable goes to find the networks it runs: a replace object (1), its list of
# callbacks' keyword dicts (2, 3), the network there (4). Bounded, so a walk never wanders through the whole
# object graph of ComfyUI.
_WALK_DEPTH = 5
_ATOMS = (torch.Tensor, str, bytes, int, float, bool, complex, type(None), type, types.ModuleType)
# torch.compile's APPLY_MODEL wrapper key (comfy_api.torch_helpers.torch_compile.COMPILE_KEY)
COMPILE_WRAPPER_KEY = "torch.compile"
FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, name))


def _walk(obj, found: list, seen: set, depth: int) -> None:
    if depth > _WALK_DEPTH or isinstance(obj, _ATOMS) or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        found.append(obj)
        return
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif isinstance(obj, functools.partial):
        items = [obj.func, *obj.args, *obj.keywords.values()]
    elif inspect.ismethod(obj):
        items = [obj.__self__, obj.__func__]
    elif inspect.isfunction(obj):  # a closure's captured objects (a network a patch function closes over)
        items = []
        for cell in obj.__closure__ or ():
            try:
                items.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
    elif hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        _walk(item, found, seen, depth + 1)


def patch_networks(model_options: dict, conds) -> list[torch.nn.Module]:
    """Networks that run inside a guidance pass without being part of the diffusion model: those held by the
    patch callables of model_options (attn1/attn2/middle patches and replaces: Hypernetworks, IPAdapter's
    projections, PuLID/InstantID-style attention patches), by model_function_wrapper, and by the sampler conds
    (GLIGEN's position net and gated attention, carried in cond["gligen"]). Found by walking the callables'
    attributes, closures and containers; each network once, in the order found."""
    roots = []
    transformer_options = model_options.get("transformer_options", {})
    roots.append(transformer_options.get("patches", {}))
    roots.append(transformer_options.get("patches_replace", {}))
    roots.append(model_options.get("model_function_wrapper"))
    roots.extend(c.get("gligen") for c in conds or [])
    found, seen = [], set()
    for root in roots:
        _walk(root, found, seen, 0)
    unique = []
    for module in found:
        if all(module is not u for u in unique):
            unique.append(module)
    return unique


def hook_swapped_weights(model_patcher, model) -> list[torch.Tensor]:
    """Parameters of `model` (ComfyUI's BaseModel) that hook scheduling (CreateHookLora, SetClipHooks, hook
    keyframes) overwrites between the cond groups of one model call. ComfyUI writes them with `.data.copy_()`,
    which leaves the version counter as it was: a reference saved for backward would silently give the next
    group's weights, so a guidance pass keeps copies of these (saved_tensor_policy's `copied`)."""
    keys = {key for patches in getattr(model_patcher, "hook_patches", {}).values() for key in patches}
    weights = []
    for key in sorted(keys):
        try:
            weight = comfy.utils.get_attr(model, key)
        except AttributeError:
            continue
        if isinstance(weight, torch.Tensor):
            weights.append(weight)
    return weights


def without_compile(model_options: dict) -> dict:
    """model_options whose model call runs the diffusion model as it is, not the torch.compile'd copy that
    TorchCompileModel swaps in (an APPLY_MODEL wrapper): the guidance pass differentiates the eager modules,
    with the same weights. The options are not changed; the copy shares everything but the wrapper table."""
    transformer_options = model_options.get("transformer_options", {})
    wrappers = transformer_options.get("wrappers", {})
    if not any(COMPILE_WRAPPER_KEY in by_key for by_key in wrappers.values()):
        return model_options
    kept = {kind: {key: w for key, w in by_key.items() if key != COMPILE_WRAPPER_KEY}
            for kind, by_key in wrappers.items()}
    return {**model_options, "transformer_options": {**transformer_options, "wrappers": kept}}


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, torch.Tensor)), None)
    return None


class GradientWatch:
    """Context over a guidance pass's forward that notes every layer whose output has lost the gradient its
    input carried: a layer computing outside autograd (fp8 matrix multiplication through ComfyUI's
    QuantizedTensor, whose tensors never require grad; any pack's kernel without a backward). Such a cut can
    leave the maps differentiable through residual paths, with a gradient that is silently wrong; `check()`
    turns it into an error. A global module forward hook, in place only while the context is open."""

    def __init__(self):
        self.cut: list[torch.nn.Module] = []
        self.entered: torch.nn.Module | None = None  # the last layer whose forward began
        self._handles = ()

    def _enter(self, module, args):
        self.entered = module

    def _hook(self, module, args, output):
        if not torch.is_grad_enabled():
            return
        # the layer's input is its first tensor argument; others may be there for their dtype or device only
        # (Qwen-Image's timestep embedding takes the image tokens for their dtype: its output rightly has no grad)
        first = _first_tensor(args)
        if first is None or not first.requires_grad:
            return
        out = _first_tensor(output)
        if out is not None and out.is_floating_point() and not out.requires_grad:
            self.cut.append(module)

    def __enter__(self) -> GradientWatch:
        self._handles = (torch.nn.modules.module.register_module_forward_pre_hook(self._enter),
                         torch.nn.modules.module.register_module_forward_hook(self._hook))
        return self

    def __exit__(self, kind, error, trace) -> bool:
        for handle in self._handles:
            handle.remove()
        # a layer whose kernel refuses autograd outright (ComfyUI 0.3's fp8 input quantization clamps with out=)
        if isinstance(error, RuntimeError) and self.entered is not None and \
                any(s in str(error) for s in ("automatic differentiation", "derivative for")):
            raise ValueError(self._message(self.entered)) from error
        return False

    def check(self) -> None:
        """Raises ValueError naming the first layer (the innermost: hooks run as forwards end) that cut it."""
        if self.cut:
            raise ValueError(self._message(self.cut[0]))

    @staticmethod
    def _message(module: torch.nn.Module) -> str:
        layer = type(module)
        weight = getattr(module, "weight", None)
        is_tensor = isinstance(weight, torch.Tensor)
        stored = f", weights stored as {type(weight).__name__} {weight.dtype}" if is_tensor else ""
        start = (f"A-STAR needs a gradient through the model, but its {layer.__module__}.{layer.__qualname__} "
                 f"layers compute without one{stored}")
        if is_tensor and weight.dtype in FP8_DTYPES:
            return (start + " (in fp8 matrix multiplication, ComfyUI quantizes each layer's input into a tensor "
                    "autograd cannot follow). Load the model for A-STAR in a weight dtype that computes in "
                    "fp16/bf16/fp32: Load Diffusion Model with weight_dtype 'default' or 'fp8_e4m3fn' (not "
                    "'fp8_e4m3fn_fast'), a checkpoint that is not fp8-scaled/mixed-precision, or start ComfyUI "
                    "without '--fast fp8_matrix_mult'. Or set the step size to 0.")
        return (start + " (a kernel without a backward: an attention or matrix-multiplication kernel that "
                "another pack or a launch option puts in, such as SageAttention, or a quantized layer). Run the "
                "model without it for A-STAR (e.g. start ComfyUI without that attention option, or load the model "
                "unquantized), or set the step size to 0.")
