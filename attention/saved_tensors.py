"""What autograd keeps for the backward of a guidance pass. Torch only.

A model whose weights are stored in another dtype or on another device than it computes in casts
each weight at every forward (ComfyUI's manual cast: fp16/bf16/fp8 weights on a CPU or on a GPU
without that dtype, and every module lowvram offloading left off the GPU). The matmul or convolution
then saves the cast copy for the backward of the latent's gradient, so a guidance pass would hold a
second, compute-dtype copy of every weight up to the last recorded layer (SDXL with fp16 weights on
CPU: 4.3 GB). `saved_tensor_policy` keeps a reference to the frozen parameter instead and casts it
again when the backward needs it: the same conversions of the same values, so the gradient is exact.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode


@dataclass
class SavedTensorStats:
    """Tensors autograd was handed during one pass: kept as they are, or recast at backward."""

    kept_bytes: int = 0
    recast_bytes: int = 0
    recast_count: int = 0


def _frozen_parameter(t: torch.Tensor) -> bool:
    return isinstance(t, torch.nn.Parameter) and not t.requires_grad


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] element offsets of t in its storage."""
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    return t.storage_offset(), last


class _CastLedger(TorchFunctionMode):
    """Notes which tensors are unmodified casts (dtype and/or device) of frozen parameters: results of
    `param.to(...)` and of `fresh.copy_(param)` (ComfyUI's cast_to), and casts of those.

    A cast may also be a view into a buffer that the model reuses for the next layers' weights
    (ComfyUI 0.19+ gathers offloaded weights into per-stream cast buffers, and dynamic VRAM copies
    them into views of its own VRAM): autograd then saves another view of the same memory (the
    transposed weight), so such casts are also found by where they lie (`source_within`)."""

    def __init__(self, copied: frozenset = frozenset()):
        super().__init__()
        self._copied = copied  # ids of parameters that are overwritten in place without a version bump
        self._casts: dict[int, tuple] = {}  # id(cast) -> (weakref to it, its _version, parameter, conversions)
        self._in_buffers: dict[int, list[int]] = {}  # storage data_ptr -> ids of casts that are views into it

    def source_within(self, t: torch.Tensor):
        """(parameter, conversions, cast) when t lies inside a noted cast that is a view into a
        buffer, the cast unmodified since (a reused buffer bumps the version of all its views)."""
        ids = self._in_buffers.get(t.untyped_storage().data_ptr())
        if not ids:
            return None
        first, last = _span(t)
        for cid in reversed(ids):  # the latest cast written there first
            entry = self._casts.get(cid)
            cast = entry[0]() if entry is not None else None
            if cast is None or cast._version != entry[1] or cast.dtype != t.dtype:
                continue
            lo, hi = _span(cast)
            if lo <= first and last <= hi:
                return entry[2], entry[3], cast
        return None

    def source(self, t: torch.Tensor):
        """(parameter, ((device, dtype), ...)) when t is that parameter or an unmodified cast of it, else None."""
        if _frozen_parameter(t):
            return (t, ()) if id(t) not in self._copied else None
        entry = self._casts.get(id(t))
        if entry is None or entry[0]() is not t or entry[1] != t._version:
            return None  # not a cast, or modified in place since (a LoRA weight_function, say)
        return entry[2], entry[3]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.to:
            src, dst = args[0], out
        elif func is torch.Tensor.copy_ and len(args) >= 2 and isinstance(args[1], torch.Tensor) \
                and args[0].shape == args[1].shape:
            src, dst = args[1], out
        else:
            return out
        if dst is not src and isinstance(dst, torch.Tensor) and type(dst) is torch.Tensor:
            origin = self.source(src)
            if origin is not None:
                param, conversions = origin
                self._casts[id(dst)] = (weakref.ref(dst), dst._version, param,
                                        conversions + ((dst.device, dst.dtype),))
                if dst._base is not None:
                    self._in_buffers.setdefault(dst.untyped_storage().data_ptr(), []).append(id(dst))
        return out


class _Recast:
    """Stands in a saved tensor's place: the parameter, the conversions that made the cast, and where
    in the cast the saved tensor lies (autograd often saves a view, e.g. the transposed weight)."""

    __slots__ = ("param", "version", "conversions", "layout", "view")

    def __init__(self, param: torch.Tensor, conversions: tuple, cast: torch.Tensor, saved: torch.Tensor):
        self.param, self.version, self.conversions = param, param._version, conversions
        self.layout = (cast.size(), cast.stride())
        self.view = None if saved is cast else \
            (saved.size(), saved.stride(), saved.storage_offset() - cast.storage_offset())

    def tensor(self) -> torch.Tensor:
        if self.param._version != self.version:
            raise RuntimeError("a weight changed between a guidance pass's forward and its backward")
        t = self.param.detach()
        for device, dtype in self.conversions:
            t = t.to(device=device, dtype=dtype)
        size, stride = self.layout
        if t.stride() != stride or t.storage_offset() != 0:
            t = torch.empty_strided(size, stride, dtype=t.dtype, device=t.device).copy_(t)
        return t if self.view is None else t.as_strided(*self.view)


class _Kept:
    """A saved tensor kept as it is. Held detached: a pack hook that returns a saved *output* itself
    makes a reference cycle through its grad_fn that outlives the graph wherever backward does not
    reach (the lean pass leaves such branches), leaking it. Detached, autograd no longer checks its
    version, so this does."""

    __slots__ = ("data", "version")

    def __init__(self, t: torch.Tensor):
        self.data, self.version = t.detach(), t._version

    def tensor(self) -> torch.Tensor:
        if self.data._version != self.version:
            raise RuntimeError("a tensor saved for the guidance gradient was modified in place after it was "
                               "saved (by the model, by another node's patch, or by ComfyUI reusing a weight "
                               "buffer under VRAM pressure: with dynamic VRAM, start ComfyUI with "
                               "--disable-dynamic-vram); the gradient cannot be computed")
        return self.data


class saved_tensor_policy:  # noqa: N801 (used as a context manager, like torch's own contexts)
    """Context for a guidance pass's forward; `with saved_tensor_policy(...) as stats` gives the pass's
    SavedTensorStats (also at `.stats`), filled while it runs.

    recast_weight_casts: keep casts of frozen parameters as references (see the module's docstring);
    it watches every torch call of the forward, so turn it on only where weights are cast.
    copy_others: autograd keeps its own copy of every other tensor it saves, frozen parameters
    excepted (needed where the model adds to saved activations in place: ControlNet's `h += control`).
    copied: parameters overwritten in place between the forward and the backward without a version bump
    (ComfyUI's hook-scheduled weights, swapped with `.data.copy_()` between cond groups): autograd keeps a
    copy of them (and of views of them) when saved, and their casts are kept as they are, never recast.
    """

    def __init__(self, recast_weight_casts: bool, copy_others: bool, copied=()):
        self.recast_weight_casts, self.copy_others = recast_weight_casts, copy_others
        self.copied = frozenset(id(t) for t in copied)
        self.stats = SavedTensorStats()
        self._stack = None

    def __enter__(self) -> SavedTensorStats:
        if not (self.recast_weight_casts or self.copy_others or self.copied):
            return self.stats
        ledger = _CastLedger(self.copied) if self.recast_weight_casts else None
        stats, copy_others, copied = self.stats, self.copy_others, self.copied

        def pack(t: torch.Tensor):
            base = t if t._base is None else t._base  # autograd often saves a view (a transposed weight)
            if id(base) in copied:
                stats.kept_bytes += t.numel() * t.element_size()
                return t.detach().clone()
            if _frozen_parameter(base):
                return t  # a reference: nothing is held twice, and weights are never changed in place
            origin, cast = (ledger.source(base), base) if ledger is not None else (None, None)
            if origin is None and ledger is not None and base is not t:
                found = ledger.source_within(t)  # a weight served from a reused cast buffer
                if found is not None:
                    origin, cast = found[:2], found[2]
            if origin is not None:
                stats.recast_bytes += cast.numel() * cast.element_size()
                stats.recast_count += 1
                return _Recast(*origin, cast=cast, saved=t)
            stats.kept_bytes += t.numel() * t.element_size()
            if copy_others:
                return t.detach().clone()
            return _Kept(t)

        def unpack(saved):
            return saved.tensor() if isinstance(saved, (_Recast, _Kept)) else saved

        self._stack = contextlib.ExitStack()
        if ledger is not None:
            self._stack.enter_context(ledger)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, unpack))
        return self.stats

    def __exit__(self, *exc) -> bool:
        if self._stack is not None:
            self._stack.close()
            self._stack = None
        return False
