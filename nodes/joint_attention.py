"""Reading the text-key attention of joint-attention models (model_family.py's table) in ComfyUI.

Where ComfyUI (0.3.75) lets a pack see a joint block's attention: both families call
`comfy.ldm.modules.attention.optimized_attention(q, k, v, heads, ..., transformer_options=...)`
once per joint block, and that function (like every attention kernel ComfyUI registers) is wrapped by
`wrap_attn`, which hands the call to `transformer_options["optimized_attention_override"]` when that
key is set, as `override(func, q, k, v, heads, ..., transformer_options=..., **kwargs)`.
- Flux (comfy/ldm/flux): q, k, v are [B, heads, L, d] after RoPE and QK-norm (skip_reshape=True),
  text tokens first (L = n_txt + n_img (+ Kontext reference tokens)); forward_orig sets
  transformer_options["block_type"] ("double" / "single") and ["block_index"] before each block.
- SD3 / SD3.5 (comfy/ldm/modules/diffusionmodules/mmdit.py, _block_mixing): q, k, v are
  [B, L, heads*d] (context tokens first, then image tokens); transformer_options carry no block
  index in 0.3.75, so the joint calls of a forward pass are counted (a per-pass counter that the
  APPLY_MODEL wrapper below puts in the pass's transformer_options). SD3.5 Medium's extra image-only
  self-attention (x_block.attn2, blocks 0-12) also goes through the override; its calls have only the
  image tokens and are neither recorded nor counted.
- Z-Image (comfy/ldm/lumina/model.py NextDiT): q, k [B, heads, L, d] (skip_reshape),
  one stream of [caption padded to a multiple of 32, image tokens padded to a multiple of 32] in its main
  layers, after text-only (context_refiner) and image-only (noise_refiner) layers whose shorter calls
  are neither counted nor recorded; the main layers are counted (0.3.75 sets no block index there).
Neither the number of text tokens nor the image grid reaches the attention call, so an APPLY_MODEL
wrapper (which sees the latent and the context) puts them, with the counter, into a copy of the
pass's transformer_options, and only in passes that carry a sink.

What it hands the sinks of a pass (transformer_options[CAPTURES_KEY], attention/capture.py's AttentionSink,
through transformer_options.hand_to_sinks as the UNet patch does): key = (block type, index), e.g.
("double", i) / ("single", i) for Flux, ("joint", i) for SD3; probs [B, n_img, n_txt] float32 (the
head-mean softmax probabilities of the image queries on the text keys, softmax over all keys;
differentiable when q/k require grad); size = the (h, w) image-token grid (row-major). Nothing is
recorded, and the previous override (or ComfyUI's attention) is called with the very same arguments,
when no sink is present: outputs are bit-identical to a model without the hook.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import comfy.patcher_extension

from ..attention.joint import text_key_probs
from .model_family import JOINT_FAMILY_TABLE, JointFamily, joint_family
from .transformer_options import CAPTURES_KEY, OVERRIDE_KEY, PASS_KEY, hand_to_sinks

WRAPPER_KEY = "astar_joint_attention"  # key of the APPLY_MODEL wrapper

# Defaults per family (the reasons are in nodes/model_family.py's table). A block list beyond the
# model's blocks is clipped to them.
DEFAULT_BLOCKS = {name: family.default_blocks for name, family in JOINT_FAMILY_TABLE.items()}


@dataclass
class JointPass:
    """Layout of one forward pass: n_txt text tokens first, then the grid_hw image tokens
    (row-major); joint_calls counts the joint-attention calls seen so far (SD3 block index);
    reached counts every attention call that reached the hook. text_slots: where the image tokens
    start when the model pads the text with learned tokens (Z-Image: to a multiple of 32; those
    keys are attended to but are not the prompt's, so they are not recorded); None: at n_txt."""

    n_txt: int
    grid_hw: tuple[int, int]
    joint_calls: int = 0
    reached: int = 0
    text_slots: int | None = None

    @property
    def n_img(self) -> int:
        return self.grid_hw[0] * self.grid_hw[1]

    @property
    def img_start(self) -> int:
        return self.n_txt if self.text_slots is None else self.text_slots


def block_counts(model_patcher) -> dict[str, int]:
    """Number of blocks of each type: {"double": n, "single": m} (Flux) or {"joint": n} (SD3)."""
    return joint_family(model_patcher).block_counts(model_patcher.model.diffusion_model)


_BLOCK_ITEM = re.compile(r"^(?P<type>[a-z]+)\s*:\s*(?P<range>all|\d+(?:\s*-\s*\d+)?)$")


def parse_blocks(text: str, counts: dict[str, int]) -> tuple[tuple[str, int], ...]:
    """Blocks named as "double:all, single:0-37" / "joint:4-16" -> sorted (type, index) keys.

    Types are those of `counts` (block_counts); "all" is every block of that type; ranges are
    inclusive and clipped to the model's blocks. Raises ValueError for an unknown type, a malformed
    item, or a list that selects no block of this model."""
    keys, asked = set(), []
    for item in (p.strip().lower() for p in text.split(",")):
        if not item:
            continue
        m = _BLOCK_ITEM.match(item)
        if not m or m.group("type") not in counts:
            raise ValueError(
                f"block item '{item}' is not understood: write TYPE:all, TYPE:N or TYPE:A-B with TYPE "
                f"one of {', '.join(counts)} (e.g. '{next(iter(counts))}:all')")
        kind, rng = m.group("type"), m.group("range")
        if rng == "all":
            lo, hi = 0, counts[kind] - 1
        else:
            ends = [int(x) for x in rng.split("-")]
            lo, hi = ends[0], ends[-1]
            if lo > hi:
                raise ValueError(f"block range '{item}' is reversed: write {kind}:{hi}-{lo}")
        asked.append(item)
        keys |= {(kind, i) for i in range(lo, min(hi, counts[kind] - 1) + 1)}
    if not keys:
        have = ", ".join(f"{n} {kind} blocks (0-{n - 1})" for kind, n in counts.items())
        raise ValueError(f"the blocks '{text}' select no block of this model, which has {have}")
    return tuple(sorted(keys))


def _normalise_mask(mask):
    """A mask as ComfyUI's kernels read it, broadcastable to [B, heads, Lq, Lk]."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask.unsqueeze(0).unsqueeze(0)
    if mask.dim() == 3:
        return mask.unsqueeze(1)
    return mask


_ATTENTION_ARGS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


class JointAttentionOverride:
    """ComfyUI's optimized_attention_override: records the text-key probabilities of the chosen
    joint blocks for the sinks of the pass, then calls the previous override (or ComfyUI's attention
    function) with exactly the arguments it got."""

    def __init__(self, family: JointFamily, blocks, previous=None):
        self.family = family
        self.blocks = frozenset(blocks)
        self.previous = previous

    def __call__(self, func, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        sinks = options.get(CAPTURES_KEY)
        layout = options.get(PASS_KEY)
        if sinks and layout is not None:
            layout.reached += 1
            self._record(sinks, layout, options, {**dict(zip(_ATTENTION_ARGS, args)), **kwargs})
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _block_key(self, layout: JointPass, options):
        if not self.family.counted:
            return options.get("block_type"), options.get("block_index")
        key = (self.family.blocks[0][0], layout.joint_calls)
        layout.joint_calls += 1
        return key

    def _record(self, sinks, layout: JointPass, options, call):
        q, k, heads = call["q"], call["k"], call["heads"]
        if not call.get("skip_reshape", False):  # [B, L, heads*d] -> [B, heads, L, d]
            q = q.unflatten(-1, (heads, -1)).transpose(1, 2)
            k = k.unflatten(-1, (heads, -1)).transpose(1, 2)
        if q.shape[2] < layout.img_start + layout.n_img:
            return  # not a joint call (SD3.5's image-only attn2, Z-Image's refiners): neither counted nor recorded
        key = self._block_key(layout, options)
        if key not in self.blocks:
            return
        chunk = q.shape[0] // len(options.get("cond_or_uncond") or [0])
        mask = _normalise_mask(call.get("mask"))
        txt, img = (0, layout.n_txt), (layout.img_start, layout.img_start + layout.n_img)

        def chunk_probs(j):
            rows = slice(j * chunk, (j + 1) * chunk)
            m = mask[rows] if mask is not None and mask.shape[0] == q.shape[0] else mask
            return text_key_probs(q[rows], k[rows] if k.shape[0] == q.shape[0] else k, txt, img, mask=m)

        hand_to_sinks(sinks, sinks, options, key, layout.grid_hw, chunk_probs)


NO_ATTENTION_REACHED = (
    "A-STAR: no attention call of this model reached ComfyUI's optimized_attention_override, where A-STAR reads "
    "the joint attention, so guidance would do nothing. Either the model calls attention without "
    "transformer_options (it cannot be guided), or a node applied after A-STAR replaced the attention override "
    "without calling the one before it: apply such nodes before A-STAR.")


class JointLayoutWrapper:
    """APPLY_MODEL wrapper: in a pass that carries sinks, gives the attention override the pass's
    layout (text token count, image grid) and a fresh joint-call counter, in a copy of the pass's
    transformer_options. Passes without sinks go through untouched. A pass with sinks in which no
    attention call reached the hook raises NO_ATTENTION_REACHED: guidance would otherwise do nothing.
    text_multiple: the model pads the text to a multiple of this many tokens (NextDiT's pad_tokens_multiple).
    unread_conds: the family's JointFamily.unread_conds; a pass with sinks that has one raises."""

    def __init__(self, patch_size: int, register_tokens: int = 0, text_multiple: int | None = None,
                 unread_conds=(), label: str = ""):
        self.patch_size = patch_size
        self.register_tokens = register_tokens
        self.text_multiple = text_multiple
        self.unread_conds = tuple(unread_conds)
        self.label = label

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        options = transformer_options if transformer_options is not None else {}
        if options.get(CAPTURES_KEY) and c_crossattn is not None:
            for name, why in self.unread_conds:
                if kwargs.get(name) is not None:
                    raise ValueError(f"A-STAR cannot guide this {self.label} run: {why}, while A-STAR reads the "
                                     "prompt's tokens at the start of the joint sequence. Run A-STAR without them.")
            p = self.patch_size
            grid = (math.ceil(x.shape[-2] / p), math.ceil(x.shape[-1] / p))
            n_txt = c_crossattn.shape[1] + self.register_tokens
            slots = -(-n_txt // self.text_multiple) * self.text_multiple if self.text_multiple else None
            layout = JointPass(n_txt, grid, text_slots=slots)
            out = executor(x, t, c_concat, c_crossattn, control, {**options, PASS_KEY: layout}, **kwargs)
            if not layout.reached:
                raise ValueError(NO_ATTENTION_REACHED)
            return out
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


def add_joint_attention_hook(model_patcher, blocks: str | None = None) -> tuple[tuple[str, int], ...]:
    """Install the recording hook on a (cloned) joint-attention MODEL (install_joint_attention_hook) with the
    blocks named by `blocks` as parse_blocks reads them; None = the family's default blocks. Returns the
    block keys that will be recorded."""
    family = joint_family(model_patcher)
    if family is None:
        raise ValueError("joint-attention maps need a joint-attention model (Flux.1, Flux.2 Klein, Chroma, SD3/SD3.5, "
                         "Qwen-Image, Z-Image); this is a UNet model: its cross-attention is read by the UNet patch")
    keys = parse_blocks(family.default_blocks if blocks is None else blocks, block_counts(model_patcher))
    install_joint_attention_hook(model_patcher, family, keys)
    return keys


def install_joint_attention_hook(model_patcher, family: JointFamily, keys) -> None:
    """Install the hook on a (cloned) MODEL of `family`, reading the blocks `keys`: the attention override,
    chained to an override already in its transformer_options, and the layout wrapper (installing it again
    on a hooked model replaces the block choice)."""
    net = model_patcher.model.diffusion_model
    options = model_patcher.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE_KEY)
    if isinstance(previous, JointAttentionOverride):  # installed again: replace, never record twice
        previous = previous.previous
    options[OVERRIDE_KEY] = JointAttentionOverride(family, keys, previous=previous)
    model_patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    model_patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
        JointLayoutWrapper(int(net.patch_size), int(getattr(net, "register_length", 0) or 0),
                           getattr(net, "pad_tokens_multiple", None), family.unread_conds, family.label))
