"""Random-weight Stable Diffusion models with the exact layouts ComfyUI loads.

No weights can be downloaded in the test environment, so the tests build their own models from
ComfyUI's own module classes (``comfy.supported_models``, ``comfy.model_base``, ``comfy.sd1_clip``,
``comfy.ldm``, ``comfy.cldm``) and fill every parameter with seeded random values:

* ``build_sd15_checkpoint``: an SD1.5 checkpoint (UNet + CLIP-L + VAE), fp16 safetensors, keys
  mapped by ``SD15.process_*_state_dict_for_saving`` exactly as ComfyUI's checkpoint saver does.
  ``layout="full"`` is the exact SD1.5 UNet (860M parameters); ``layout="mini"`` is a two-level UNet
  (latent and latent/2) that ComfyUI still detects as SD15.
* ``build_sd15_lora``: a kohya-format LoRA ("lora_unet_<diffusers name>", "lora_te_...") for it.
* ``build_sd15_controlnet``: a ControlNet in the ControlNet-1.x ("control_model.") format.
* ``build_sdxl_model``: the exact SDXL base UNet, built in memory (no file) as a ModelPatcher,
  plus ``sdxl_tokenizer`` and ``sdxl_conditioning`` (random CONDITIONING, no text encoders).
* ``build_sdxl_checkpoint``: a whole SDXL base checkpoint file (6.9 GB fp16), written tensor by
  tensor, for the server (the SDXL example workflow).
* ``build_sd21_checkpoint``: an SD2.1 768-v checkpoint (UNet + OpenCLIP ViT-H text encoder + VAE,
  2.4 GiB fp16), written tensor by tensor; ComfyUI reads it as SD20 with v-prediction.
* ``prepare_comfy_import``: puts a ComfyUI root on ``sys.path`` and forces CPU mode.

Determinism: every tensor is drawn from its own generator seeded with (seed, tensor name), in
float32, then stored in the target dtype, so the same seed always gives the same bytes. Files are
written atomically (temporary file, then rename) and reused when they already exist; the cache
folder is the caller's (see ``cache_path``; FACTORY_VERSION is part of the name, bump it whenever
the generated values change).

Initialisation (ComfyUI's ops skip init and some layers start at zero, which would kill
gradients): weights with two or more dims ~ N(0, 1/sqrt(fan_in)); biases ~ N(0, 0.02); norm
weights = 1; any other parameter ~ N(0, 0.02).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Optional, Union

import torch

PathLike = Union[str, os.PathLike]

DEFAULT_COMFYUI_ROOT = "/root/.cache/astar-comfyui/ComfyUI"
DEFAULT_MODEL_CACHE = "/root/.cache/astar-comfyui/test-models"
FACTORY_VERSION = 1

LAYOUTS = ("mini", "full")

# UNet configurations in the form comfy.model_detection.detect_unet_config returns them (the keys
# SD15.unet_config matches on are context_dim 768, model_channels 320, no linear proj, no adm).
_SD15_COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
_SD15_LAYOUTS = {
    # The exact SD1.5 UNet: 4 levels, 2 res blocks each, cross-attention on the first three.
    "full": {
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 2, 4, 4],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "transformer_depth_middle": 1,
    },
    # Two levels (latent, latent/2), one res block each, cross-attention everywhere. Blocks with
    # cross-attention: input 1 (latent), input 3, middle, output 0, 1 (latent/2), output 2, 3.
    "mini": {
        "num_res_blocks": [1, 1],
        "channel_mult": [1, 2],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
    },
}
_SDXL_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
# SD2.1 (768-v and 512 base): SD1.5's levels and depths, context 1024 (OpenCLIP ViT-H), linear
# proj_in/proj_out; SD20's unet_extra_config adds num_head_channels 64.
_SD21_UNET_CONFIG = dict(_SD15_COMMON, **_SD15_LAYOUTS["full"], context_dim=1024, use_linear_in_transformer=True)
# ComfyUI's SD20.model_type: v-prediction when this bias has a std above 0.09.
_SD2_V_PRED_BIAS = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_SD2_V_PRED_BIAS_STD = 0.25
# The SD1.x KL VAE (comfy.sd.VAE builds AutoencoderKL with this when it sees such a state dict).
_SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
    "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}

_BIAS_STD = 0.02
_CHUNK = 1 << 22  # elements drawn per generator call; part of the byte-exact recipe

_PREPARED_ROOT: Optional[Path] = None


# ----------------------------------------------------------------------------------------------
# ComfyUI import
# ----------------------------------------------------------------------------------------------

def _under(path: Optional[str], root: Path) -> bool:
    if not path:
        return False
    try:
        Path(path).resolve().relative_to(root)
        return True
    except ValueError:
        return False


def prepare_comfy_import(comfy_root: Optional[PathLike] = None) -> Path:
    """Make ``import comfy...`` work in-process, on CPU. Idempotent; returns the resolved root.

    ``comfy_root`` defaults to $COMFYUI_ROOT, then to DEFAULT_COMFYUI_ROOT. Puts the root first on
    sys.path, imports ComfyUI's top-level ``utils`` package (before anything can import ``nodes``,
    else ``utils`` may resolve to something else) and sets ``comfy.cli_args.args.cpu = True``
    before ``comfy.model_management`` is imported (the CUDA torch build would look for a driver).
    Raises if a different ComfyUI (or ``utils``) is already imported, or if
    comfy.model_management was already imported in GPU mode.
    """
    global _PREPARED_ROOT
    root = Path(comfy_root or os.environ.get("COMFYUI_ROOT") or DEFAULT_COMFYUI_ROOT).resolve()
    if _PREPARED_ROOT is not None:
        if root != _PREPARED_ROOT:
            raise RuntimeError(f"ComfyUI already prepared from {_PREPARED_ROOT}, not {root}")
        return root
    if not (root / "comfy" / "model_management.py").is_file():
        raise FileNotFoundError(f"not a ComfyUI root (no comfy/model_management.py): {root}")

    if not any(p and Path(p).resolve() == root for p in sys.path if isinstance(p, str)):
        sys.path.insert(0, str(root))

    for name in ("comfy", "utils"):
        mod = sys.modules.get(name)
        if mod is not None:
            where = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), None)
            if not _under(where, root):
                raise ImportError(f"module {name!r} is already imported from {where}, not from {root}")

    importlib.import_module("utils")
    for sub in sorted(p.stem for p in (root / "utils").glob("*.py") if p.stem != "__init__"):
        importlib.import_module(f"utils.{sub}")

    import comfy.options  # noqa: F401  (argument parsing stays disabled: parse_args([]))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True

    mm = sys.modules.get("comfy.model_management")
    if mm is not None and mm.cpu_state != mm.CPUState.CPU:
        raise RuntimeError("comfy.model_management was imported before CPU mode was set")
    _PREPARED_ROOT = root
    return root


def _ensure_comfy() -> None:
    """Prepare ComfyUI with the defaults unless the caller already imported it."""
    if _PREPARED_ROOT is None and "comfy.cli_args" not in sys.modules:
        prepare_comfy_import()


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

# ComfyUI's model folder names, so a server whose extra_model_paths points at the cache finds them.
_CACHE_FOLDERS = {"sd15": "checkpoints", "sd21": "checkpoints", "sd15-lora": "loras", "sd15-controlnet": "controlnet"}


def cache_path(cache_dir: PathLike, kind: str, layout: str = "", seed: int = 0,
               suffix: str = ".safetensors") -> Path:
    """A stable file name for a model in the cache, in ComfyUI's folder for its kind.

    kind "sd15" or "sd21" -> checkpoints/, "sd15-lora" -> loras/, "sd15-controlnet" -> controlnet/ (others
    at the top), e.g. ``<cache>/checkpoints/sd15-mini-s0-v1.safetensors``.
    """
    parts = [kind] + ([layout] if layout else []) + [f"s{seed}", f"v{FACTORY_VERSION}"]
    return Path(cache_dir) / _CACHE_FOLDERS.get(kind, "") / ("-".join(parts) + suffix)


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _tensor_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2 ** 63)


@torch.no_grad()
def _normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """Fill t in place with N(0, std), drawn in float32 chunks (no full-size float32 copy)."""
    flat = t.view(-1)
    n = flat.numel()
    buf = torch.empty(min(n, _CHUNK), dtype=torch.float32)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        b = buf[:m]
        b.normal_(0.0, std, generator=gen)
        flat[start:start + m].copy_(b)


_NORM_TYPES = tuple(t for t in (torch.nn.GroupNorm, torch.nn.LayerNorm, getattr(torch.nn, "RMSNorm", None),
                                 torch.nn.modules.batchnorm._NormBase) if t is not None)


@torch.no_grad()
def _fill_parameter_(t: torch.Tensor, seed: int, name: str, norm_weight: bool,
                     std: Optional[float] = None) -> None:
    """The rule for one parameter: a norm layer's weight is 1; anything else N(0, 1/sqrt(fan-in)) for
    matrices and kernels, N(0, _BIAS_STD) for vectors, from a generator seeded by (seed, name).
    std: draw N(0, std) instead (any parameter, norm weights included)."""
    if norm_weight and std is None:
        t.fill_(1.0)
        return
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    if std is None:
        std = 1.0 / math.sqrt(t[0].numel()) if t.dim() >= 2 else _BIAS_STD
    _normal_(t, std, gen)


def _fill_random_(module: torch.nn.Module, seed: int, tag: str) -> int:
    """Give every parameter of ``module`` finite seeded random values; returns the count filled."""
    count = 0
    for mname, mod in module.named_modules():
        is_norm = isinstance(mod, _NORM_TYPES)
        for pname, p in mod.named_parameters(recurse=False):
            if p.device.type == "meta":
                raise ValueError("cannot fill meta tensors")
            count += p.numel()
            _fill_parameter_(p.data, seed, f"{tag}/{mname}.{pname}", is_norm and pname == "weight")
    for name, b in module.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise RuntimeError(f"buffer {name} is not finite")
    return count


def _atomic_write(path: Path, write) -> Path:
    """write(tmp) into a temporary file in the same folder, then rename it to path (readable by all:
    safetensors creates 0600 files and the cache may be shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _atomic_save(sd: dict, path: Path) -> Path:
    """Save a state dict as safetensors via a temporary file in the same folder, then rename."""
    import comfy.utils
    sd = {k: (v if v.is_contiguous() else v.contiguous()) for k, v in sd.items()}
    return _atomic_write(path, lambda tmp: comfy.utils.save_torch_file(sd, str(tmp)))


def _detected_config(unet_config: dict, expected):
    """The comfy.supported_models config ComfyUI's own matcher picks for unet_config; it must be `expected`."""
    import comfy.model_detection
    mc = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    if type(mc) is not expected:
        raise RuntimeError(f"ComfyUI does not detect the {expected.__name__} config as {expected.__name__}: "
                           f"{type(mc).__name__}")
    return mc


def _checkpoint_state_dict(model, clip_sd: dict, vae_sd: dict) -> dict:
    """model.state_dict_for_saving with the text encoder's and VAE's state dicts, on either API:
    ComfyUI up to 0.3.x reads the UNet state dict itself; later versions (0.19 at least) take it as
    the first argument (``unet_state_dict``). Detected from the signature, not the version."""
    kwargs = {"clip_state_dict": clip_sd, "vae_state_dict": vae_sd}
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        kwargs["unet_state_dict"] = model.diffusion_model.state_dict()
    return model.state_dict_for_saving(**kwargs)


def _sd15_model_config(layout: str):
    """A comfy.supported_models.SD15 instance for the layout, chosen by ComfyUI's own matcher."""
    import comfy.supported_models
    _check_layout(layout)
    return _detected_config(dict(_SD15_COMMON, **_SD15_LAYOUTS[layout]), comfy.supported_models.SD15)


def sd15_unet_config(layout: str) -> dict:
    """The UNet config ComfyUI uses for a layout (SD15 extras such as num_heads included)."""
    _ensure_comfy()
    return dict(_sd15_model_config(layout).unet_config)


# ----------------------------------------------------------------------------------------------
# SD1.5
# ----------------------------------------------------------------------------------------------

def build_sd15_checkpoint(path: PathLike, layout: str = "mini", seed: int = 0) -> Path:
    """Write (or reuse) a random-weight SD1.5 checkpoint: UNet + CLIP-L + VAE, fp16 safetensors.

    Keys are exactly those ComfyUI's checkpoint saver writes (model.diffusion_model.*,
    cond_stage_model.transformer.text_model.*, first_stage_model.*), produced by
    BaseModel.state_dict_for_saving with SD15's process_*_state_dict_for_saving.
    """
    path = Path(path)
    _check_layout(layout)
    if path.exists():
        return path
    _ensure_comfy()
    import comfy.ldm.models.autoencoder

    cpu = torch.device("cpu")
    fp16 = torch.float16
    mc = _sd15_model_config(layout)
    mc.set_inference_dtype(fp16, None)
    model = mc.get_model({}, device=cpu)  # comfy.model_base.BaseModel with the UNetModel
    _fill_random_(model.diffusion_model, seed, "unet")

    clip_target = mc.clip_target()
    te = clip_target.clip(device=cpu, dtype=fp16, model_options={})  # sd1_clip.SD1ClipModel
    _fill_random_(te, seed, "clip")

    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(_SD_VAE_DDCONFIG), embed_dim=4)
    vae = vae.to(fp16)
    _fill_random_(vae, seed, "vae")

    sd = _checkpoint_state_dict(model, te.state_dict(), vae.state_dict())
    bad = [k for k, v in sd.items() if v.dtype != fp16]
    if bad:
        raise RuntimeError(f"non-fp16 tensors in checkpoint: {bad[:5]}")
    _atomic_save(sd, path)
    del sd, model, te, vae
    return path


def _meta_sd15_shapes(layout: str) -> tuple[dict, dict]:
    """Parameter shapes of the UNet (ldm keys) and the CLIP-L text encoder, built on 'meta'."""
    meta = torch.device("meta")
    mc = _sd15_model_config(layout)
    mc.set_inference_dtype(torch.float16, None)
    unet = mc.get_model({}, device=meta).diffusion_model
    te = mc.clip_target().clip(device=meta, dtype=torch.float16, model_options={})
    return ({k: tuple(v.shape) for k, v in unet.state_dict().items()},
            {k: tuple(v.shape) for k, v in te.state_dict().items()})


_UNET_LORA_TARGET = re.compile(
    r"\.(transformer_blocks\.\d+\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
    r"|transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)|proj_in|proj_out)\.weight$")


def build_sd15_lora(path: PathLike, layout: str = "mini", seed: int = 0, rank: int = 4,
                    text_encoder: bool = True, scale: float = 0.5) -> Path:
    """Write (or reuse) a random kohya-format LoRA for the SD1.5 layout.

    UNet modules: every SpatialTransformer's proj_in/proj_out and its blocks' attn1/attn2
    (to_q, to_k, to_v, to_out.0) and ff layers, named "lora_unet_<diffusers key>" (the names kohya
    trainers write; ComfyUI maps them with comfy.utils.unet_to_diffusers). Text encoder (if
    ``text_encoder``): q/k/v/out projections and mlp fc1/fc2 of all 12 CLIP-L layers,
    "lora_te_text_model_encoder_layers_<i>_<name>". Each module has lora_down [rank, in, ...],
    lora_up [out, rank, ...] and alpha = rank; the merged delta has about ``scale`` times the
    base weights' scale, so the output changes measurably. fp16 safetensors.
    """
    path = Path(path)
    _check_layout(layout)
    if path.exists():
        return path
    _ensure_comfy()
    import comfy.lora
    import comfy.utils

    unet_shapes, te_shapes = _meta_sd15_shapes(layout)
    ldm_to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(sd15_unet_config(layout)).items()}

    targets: list[tuple[str, tuple]] = []
    for key in sorted(unet_shapes):
        if not _UNET_LORA_TARGET.search(key):
            continue
        name = ldm_to_diffusers.get(key, key)  # fall back to the ldm name (also in the key map)
        targets.append(("lora_unet_" + name[: -len(".weight")].replace(".", "_"), unet_shapes[key]))
    if text_encoder:
        layer = 0
        while f"clip_l.transformer.text_model.encoder.layers.{layer}.mlp.fc1.weight" in te_shapes:
            for src, dst in comfy.lora.LORA_CLIP_MAP.items():
                key = f"clip_l.transformer.text_model.encoder.layers.{layer}.{src}.weight"
                targets.append((f"lora_te_text_model_encoder_layers_{layer}_{dst}", te_shapes[key]))
            layer += 1

    sd = {}
    for name, shape in targets:
        out_f, in_f, rest = shape[0], shape[1], tuple(shape[2:])
        gen = torch.Generator().manual_seed(_tensor_seed(seed, "lora/" + name))
        down = torch.empty((rank, in_f) + rest, dtype=torch.float32)
        up = torch.empty((out_f, rank) + tuple(1 for _ in rest), dtype=torch.float32)
        fan_in = in_f * math.prod(rest)
        down.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        up.normal_(0.0, scale / math.sqrt(rank), generator=gen)
        sd[f"{name}.lora_down.weight"] = down.half()
        sd[f"{name}.lora_up.weight"] = up.half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    return _atomic_save(sd, path)


def merge_lora(weights: dict, lora: dict, strength: float, lora_name) -> tuple[dict, int]:
    """Weights with a LoRA merged in, computed independently of ComfyUI: W + strength * alpha / rank *
    up @ down (flattened, reshaped to W: linear and conv), kept in float32 (a loader casts it to the dtype
    the model runs in, as ComfyUI's LoRA patch does). lora_name(key) -> the LoRA module name of a weight
    key. Returns (merged weights, number of weights merged)."""
    merged, count = {}, 0
    for key, w in weights.items():
        name = lora_name(key) if key.endswith(".weight") else None
        if name is not None and f"{name}.lora_up.weight" in lora:
            up, down = lora[f"{name}.lora_up.weight"].float(), lora[f"{name}.lora_down.weight"].float()
            delta = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
            w = w.float() + strength * float(lora[f"{name}.alpha"]) / up.shape[1] * delta
            count += 1
        merged[key] = w
    return merged, count


def lora_key_count(path: PathLike, part: Optional[str] = None) -> int:
    """Number of LoRA modules (lora_down/lora_up pairs) in a file; ``part`` = "unet" or "te"."""
    from safetensors import safe_open
    prefix = {None: "", "unet": "lora_unet_", "te": "lora_te"}[part]
    with safe_open(str(path), framework="pt") as f:
        return sum(1 for k in f.keys() if k.endswith(".lora_down.weight") and k.startswith(prefix))


def build_sd15_controlnet(path: PathLike, layout: str = "mini", seed: int = 0) -> Path:
    """Write (or reuse) a random ControlNet (comfy.cldm.cldm.ControlNet) matching the layout.

    ControlNet-1.x checkpoint format: "control_model." + input_blocks / middle_block /
    zero_convs / input_hint_block / middle_block_out, 3 hint channels (an RGB image at 8x the
    latent size). The zero convs get random values, so the control changes the UNet output.
    comfy.controlnet.load_controlnet detects it by 'control_model.zero_convs.0.0.weight' and reads
    the layout back with model_detection. fp16 safetensors.
    """
    path = Path(path)
    _check_layout(layout)
    if path.exists():
        return path
    _ensure_comfy()
    import comfy.cldm.cldm
    import comfy.ops

    cfg = sd15_unet_config(layout)
    cfg.pop("out_channels")
    cfg["hint_channels"] = 3
    net = comfy.cldm.cldm.ControlNet(**cfg, dtype=torch.float16, device=torch.device("cpu"),
                                     operations=comfy.ops.disable_weight_init)
    _fill_random_(net, seed, "controlnet")
    sd = {"control_model." + k: v for k, v in net.state_dict().items()}
    return _atomic_save(sd, path)


# ----------------------------------------------------------------------------------------------
# SDXL (in memory)
# ----------------------------------------------------------------------------------------------

def build_sdxl_model(seed: int = 0, dtype: torch.dtype = torch.float16):
    """The exact SDXL base UNet (comfy.model_base.SDXL) with random weights, as a ModelPatcher.

    Nothing is written to disk. Parameters are allocated directly in ``dtype`` and filled in place
    (peak RSS about the size of the weights: 5.1 GB in fp16); on CPU ComfyUI computes in float32
    through its manual-cast ops, as it does for a loaded fp16 checkpoint. Hold only one at a time.
    """
    _ensure_comfy()
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    mc = _detected_config(_SDXL_UNET_CONFIG, comfy.supported_models.SDXL)
    load_device = mm.get_torch_device()
    manual_cast = mm.unet_manual_cast(dtype, load_device, mc.supported_inference_dtypes)
    mc.set_inference_dtype(dtype, manual_cast)
    model = mc.get_model({}, device=mm.unet_offload_device())
    _fill_random_(model.diffusion_model, seed, "sdxl-unet")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device,
                                            offload_device=mm.unet_offload_device())


_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def build_sdxl_checkpoint(path: PathLike, seed: int = 0) -> Path:
    """Write (or reuse) a random-weight SDXL base checkpoint: UNet + CLIP-L + CLIP-G + VAE, fp16.

    Keys are those ComfyUI's checkpoint saver writes for SDXL (model.diffusion_model.*,
    conditioner.embedders.0.* for CLIP-L, conditioner.embedders.1.model.* for CLIP-G in the
    OpenCLIP layout, first_stage_model.*), from SDXL.state_dict_for_saving. The file is 6.9 GB, so
    it is written by ``_write_streamed_checkpoint`` (peak memory: the text encoders and VAE, about
    1.8 GB). The UNet's values are those of ``build_sdxl_model(seed)``: same names, same
    generators, same rule.
    """
    path = Path(path)
    if path.exists():
        return path
    _ensure_comfy()
    import comfy.supported_models
    return _write_streamed_checkpoint(path, _detected_config(_SDXL_UNET_CONFIG, comfy.supported_models.SDXL),
                                      seed, "sdxl")


def build_sd21_checkpoint(path: PathLike, seed: int = 0) -> Path:
    """Write (or reuse) a random-weight SD2.1 768-v checkpoint: UNet + OpenCLIP ViT-H text encoder
    + VAE, fp16 (2.4 GiB).

    The exact SD2.1 UNet (SD1.5's levels and depths with context 1024, 64-channel heads, linear
    proj_in/proj_out; 866M parameters), ComfyUI's SD2 text encoder (OpenCLIP ViT-H text tower:
    1024 wide, 24 layers; its tokenizer pads with 0) and the SD VAE. Keys are those ComfyUI's saver
    writes for SD20 (model.diffusion_model.*, cond_stage_model.model.* in the OpenCLIP layout,
    first_stage_model.*). ComfyUI detects it as ``SD20`` and, like a real 768-v file (no ``v_pred``
    key), reads it as v-prediction because the std of
    ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` exceeds 0.09: that bias is drawn with
    std _SD2_V_PRED_BIAS_STD on purpose (the default bias std, 0.02, would make it an EPS model).
    """
    path = Path(path)
    if path.exists():
        return path
    _ensure_comfy()
    import comfy.model_base
    import comfy.supported_models
    mc = _detected_config(_SD21_UNET_CONFIG, comfy.supported_models.SD20)
    bias = torch.tensor([_SD2_V_PRED_BIAS_STD, -_SD2_V_PRED_BIAS_STD])  # std exactly _SD2_V_PRED_BIAS_STD
    if mc.model_type({_SD2_V_PRED_BIAS: bias}) != comfy.model_base.ModelType.V_PREDICTION:  # ComfyUI's rule
        raise RuntimeError(f"ComfyUI would not read std {_SD2_V_PRED_BIAS_STD} of {_SD2_V_PRED_BIAS} as 768-v")
    return _write_streamed_checkpoint(path, mc, seed, "sd21", unet_std={_SD2_V_PRED_BIAS: _SD2_V_PRED_BIAS_STD})


def _write_streamed_checkpoint(path: Path, mc, seed: int, tag: str, unet_std: Optional[dict] = None) -> Path:
    """Write the checkpoint of model config `mc` (UNet + its text encoders + the SD VAE, fp16) with the
    keys ``mc``'s model writes with state_dict_for_saving. The UNet is built on the 'meta' device and
    its tensors are drawn and written one at a time (safetensors layout written directly: header,
    then the data in header order), so peak memory is the text encoders and the VAE. Generators are
    named "<tag>-unet/<name>", "<tag>-clip/...", "<tag>-vae/..."; unet_std: UNet parameter name ->
    the std to draw it with instead of the rule's."""
    import json as _json
    import comfy.ldm.models.autoencoder

    cpu, meta, fp16 = torch.device("cpu"), torch.device("meta"), torch.float16
    unet_std = dict(unet_std or {})
    mc.set_inference_dtype(fp16, None)
    model = mc.get_model({}, device=meta)
    unet = model.diffusion_model
    te = mc.clip_target().clip(device=cpu, dtype=fp16, model_options={})
    _fill_random_(te, seed, f"{tag}-clip")
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(_SD_VAE_DDCONFIG), embed_dim=4).to(fp16)
    _fill_random_(vae, seed, f"{tag}-vae")
    sd = _checkpoint_state_dict(model, te.state_dict(), vae.state_dict())
    del te, vae

    unet_prefix = "model.diffusion_model."
    missing = set(unet_std) - {k[len(unet_prefix):] for k in sd if k.startswith(unet_prefix)}
    if missing:
        raise KeyError(f"no such UNet parameter: {sorted(missing)}")
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, t in sd.items():
        if t.device.type == "meta" and not key.startswith(unet_prefix):
            raise RuntimeError(f"unexpected meta tensor outside the UNet: {key}")
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise RuntimeError(f"{key}: dtype {t.dtype} not handled")
        size = t.numel() * t.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    head = _json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned

    norm_modules = {name for name, mod in unet.named_modules() if isinstance(mod, _NORM_TYPES)}

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little"))
            f.write(head)
            for key, t in sd.items():
                if t.device.type == "meta":  # a UNet parameter: drawn as _fill_random_ draws it
                    name = key[len(unet_prefix):]
                    mname, _, pname = name.rpartition(".")
                    t = torch.empty(t.shape, dtype=fp16)
                    _fill_parameter_(t, seed, f"{tag}-unet/{mname}.{pname}",
                                     mname in norm_modules and pname == "weight", unet_std.get(name))
                f.write(_tensor_bytes(t))

    return _atomic_write(path, write)


def sdxl_tokenizer():
    """ComfyUI's SDXL tokenizer (clip_g + clip_l); ``.tokenize_with_weights(text)`` gives {"g", "l"}."""
    _ensure_comfy()
    import comfy.sdxl_clip
    return comfy.sdxl_clip.SDXLTokenizer(embedding_directory=None, tokenizer_data={})


def sdxl_conditioning(batch: int = 1, seed: int = 0, width: int = 1024, height: int = 1024,
                      tokens: int = 77) -> list:
    """A random SDXL CONDITIONING: [[cond [B, tokens, 2048], {"pooled_output": [B, 1280], ...}]].

    Values ~ N(0, 1) (float32), seeded; width/height/target size go to the size embedding.
    """
    gen = torch.Generator().manual_seed(_tensor_seed(seed, "sdxl-conditioning"))
    cond = torch.randn((batch, tokens, 2048), generator=gen)
    pooled = torch.randn((batch, 1280), generator=gen)
    return [[cond, {"pooled_output": pooled, "width": width, "height": height, "crop_w": 0,
                    "crop_h": 0, "target_width": width, "target_height": height}]]


def sd15_conditioning(batch: int = 1, seed: int = 0, tokens: int = 77) -> list:
    """A random SD1.5 CONDITIONING: [[cond [B, tokens, 768], {}]], values ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(_tensor_seed(seed, "sd15-conditioning"))
    return [[torch.randn((batch, tokens, 768), generator=gen), {}]]


__all__ = [
    "DEFAULT_COMFYUI_ROOT", "DEFAULT_MODEL_CACHE", "FACTORY_VERSION", "LAYOUTS",
    "prepare_comfy_import", "cache_path", "sd15_unet_config",
    "build_sd15_checkpoint", "build_sd15_lora", "merge_lora", "lora_key_count", "build_sd15_controlnet",
    "build_sdxl_model", "build_sdxl_checkpoint", "build_sd21_checkpoint", "sdxl_tokenizer", "sdxl_conditioning", "sd15_conditioning",
]
