"""Self-checks of the random-weight model factory (tests/support/models.py) against a real ComfyUI.

Environment: COMFYUI_ROOT (default /root/.cache/astar-comfyui/ComfyUI) and ASTAR_TEST_MODELS, the
model cache (default /root/.cache/astar-comfyui/test-models; files go to its checkpoints/, loras/ and
controlnet/ folders, see models.cache_path). The first run builds about 2.9 GB of files there (about
25 s); the SDXL check builds its UNet in memory every time (15-45 s, about 6 GB peak RSS).
Deselect it with -m "not sdxl". Run the whole file in about 1-1.5 min on 2 idle cores.
"""

from __future__ import annotations

import gc
import hashlib
import os
from pathlib import Path

import pytest

from . import models as M

COMFY_ROOT = Path(os.environ.get("COMFYUI_ROOT") or M.DEFAULT_COMFYUI_ROOT)
CACHE = Path(os.environ.get("ASTAR_TEST_MODELS") or M.DEFAULT_MODEL_CACHE)

if not (COMFY_ROOT / "comfy" / "model_management.py").is_file():
    pytest.skip(f"no ComfyUI at {COMFY_ROOT} (set COMFYUI_ROOT or run tools/setup.sh)",
                allow_module_level=True)

M.prepare_comfy_import(COMFY_ROOT)

import torch  # noqa: E402

import comfy.controlnet  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
from comfy.ldm.modules.attention import SpatialTransformer  # noqa: E402

# SD1.5 blocks with cross-attention (METHOD.md), and their size relative to the latent side.
SD15_FULL_ATTN = {
    ("input", 1): 1, ("input", 2): 1, ("input", 4): 2, ("input", 5): 2, ("input", 7): 4,
    ("input", 8): 4, ("middle", 0): 8, ("output", 3): 4, ("output", 4): 4, ("output", 5): 4,
    ("output", 6): 2, ("output", 7): 2, ("output", 8): 2, ("output", 9): 1, ("output", 10): 1,
    ("output", 11): 1,
}
SD15_MINI_ATTN = {
    ("input", 1): 1, ("input", 3): 2, ("middle", 0): 2, ("output", 0): 2, ("output", 1): 2,
    ("output", 2): 1, ("output", 3): 1,
}
# SDXL: block -> (size divisor relative to the latent side, transformer blocks).
SDXL_ATTN = {
    ("input", 4): (2, 2), ("input", 5): (2, 2), ("input", 7): (4, 10), ("input", 8): (4, 10),
    ("middle", 0): (4, 10), ("output", 0): (4, 10), ("output", 1): (4, 10), ("output", 2): (4, 10),
    ("output", 3): (2, 2), ("output", 4): (2, 2), ("output", 5): (2, 2),
}
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "cond_stage_model.transformer.text_model.",
                       "first_stage_model.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _release():
    """After the caller dropped its references: free what ComfyUI's model manager still holds."""
    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.cleanup_models()


def _block_key(module_name: str):
    """'input_blocks.7.1' -> ('input', 7); 'middle_block.1' -> ('middle', 0)."""
    parts = module_name.split(".")
    if parts[0] == "middle_block":
        return ("middle", 0)
    return (parts[0].split("_")[0], int(parts[1]))


def _record_attention_layers(diffusion_model):
    """Forward pre-hooks on every SpatialTransformer: block key -> (spatial size, depth)."""
    seen, handles = {}, []
    for name, mod in diffusion_model.named_modules():
        if isinstance(mod, SpatialTransformer):
            def hook(m, args, _key=_block_key(name)):
                seen[_key] = (tuple(args[0].shape[-2:]), len(m.transformer_blocks))
            handles.append(mod.register_forward_pre_hook(hook))
    return seen, handles


def _one_step(model, positive, seed=0, side=64):
    """One euler step with cfg 1 (positive only) from pure noise: the model's x0 prediction."""
    latent = torch.zeros((1, 4, side // 8, side // 8))
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 1, 1.0, "euler", "normal", positive, [], latent,
                               disable_pbar=True, seed=seed)


def _rel_change(a, b):
    return ((a - b).abs().mean() / a.abs().mean()).item()


@pytest.fixture(scope="module")
def mini_path():
    return M.build_sd15_checkpoint(M.cache_path(CACHE, "sd15", "mini"), "mini")


@pytest.fixture(scope="module")
def full_path():
    return M.build_sd15_checkpoint(M.cache_path(CACHE, "sd15", "full"), "full")


@pytest.fixture(scope="module")
def sd21_path():
    return M.build_sd21_checkpoint(M.cache_path(CACHE, "sd21"))


@pytest.fixture(scope="module")
def lora_path():
    return M.build_sd15_lora(M.cache_path(CACHE, "sd15-lora", "mini"), "mini")


@pytest.fixture(scope="module")
def controlnet_path():
    return M.build_sd15_controlnet(M.cache_path(CACHE, "sd15-controlnet", "mini"), "mini")


@pytest.mark.parametrize("layout", M.LAYOUTS)
def test_checkpoint_file_layout(request, layout):
    from safetensors import safe_open
    path = request.getfixturevalue(f"{layout}_path")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
        unet_params = sum(int(torch.Size(f.get_slice(k).get_shape()).numel())
                          for k in keys if k.startswith("model.diffusion_model."))
    assert dtypes == {"F16"}
    assert all(k.startswith(CHECKPOINT_PREFIXES) for k in keys)
    for prefix in CHECKPOINT_PREFIXES:
        assert any(k.startswith(prefix) for k in keys), prefix
    if layout == "full":
        assert unet_params == 859_520_964  # the SD1.5 UNet
    else:
        assert 50e6 < unet_params < 200e6


class _LoadedSD15:
    """A loaded checkpoint plus the results of one recorded forward/backward at 64 px (random
    conditioning of the model's context width: SD1.5's 768 unless told)."""

    def __init__(self, path: Path, cond=None):
        self.model, self.clip, self.vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
        self.model.model.requires_grad_(False)
        dm = self.model.model.diffusion_model
        seen, handles = _record_attention_layers(dm)
        try:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn((1, 4, 8, 8), generator=gen).requires_grad_(True)
            sigma = self.model.model.model_sampling.sigmas[500].reshape(1)
            if cond is None:
                cond = M.sd15_conditioning(1, seed=0)[0][0]
            with torch.inference_mode(False), torch.enable_grad():
                denoised = self.model.model.apply_model(x, sigma, c_crossattn=cond)
                # EPS model: denoised = x - eps * sigma (for a v model, eps is a linear function of its
                # prediction). The loss is taken on the UNet's own prediction, so a dead UNet (zero
                # output conv) gives a zero gradient.
                eps = (x - denoised) / sigma
                (grad,) = torch.autograd.grad(eps.float().square().mean(), x)
        finally:
            for h in handles:
                h.remove()
        self.attn = seen
        self.out, self.grad = eps.detach(), grad


@pytest.fixture(scope="module")
def mini(mini_path):
    loaded = _LoadedSD15(mini_path)
    yield loaded
    del loaded
    _release()


@pytest.fixture(scope="class")
def full(full_path):
    loaded = _LoadedSD15(full_path)
    yield loaded
    del loaded
    _release()


def _check_loaded(loaded, expected_attn, config="SD15"):
    assert type(loaded.model.model.model_config).__name__ == config
    assert type(loaded.model.model) is comfy.model_base.BaseModel
    assert loaded.clip is not None and loaded.vae is not None
    assert {k: v[0] for k, v in loaded.attn.items()} == {
        k: (8 // d, 8 // d) for k, d in expected_attn.items()}
    assert all(depth == 1 for _, depth in loaded.attn.values())
    assert loaded.out.shape == (1, 4, 8, 8)
    assert torch.isfinite(loaded.out).all()
    assert 0.05 < loaded.out.float().std() < 20  # a sane, non-constant noise prediction
    assert torch.isfinite(loaded.grad).all()
    assert loaded.grad.abs().max() > 0
    assert loaded.grad.abs().mean() > 1e-8


def test_mini_loads_as_sd15_with_two_levels(mini):
    _check_loaded(mini, SD15_MINI_ATTN)
    sizes = {v[0] for v in mini.attn.values()}
    assert sizes == {(8, 8), (4, 4)}  # exactly two resolution levels: latent and latent/2


class TestFull:
    def test_full_loads_as_sd15_with_method_block_map(self, full):
        _check_loaded(full, SD15_FULL_ATTN)
        inputs = sorted(i for b, i in full.attn if b == "input")
        outputs = sorted(i for b, i in full.attn if b == "output")
        assert inputs == [1, 2, 4, 5, 7, 8] and outputs == list(range(3, 12))

    def test_full_vae_decodes(self, full):
        gen = torch.Generator().manual_seed(1)
        images = full.vae.decode(torch.randn((1, 4, 8, 8), generator=gen))
        assert images.shape[-3:] == (64, 64, 3)
        assert torch.isfinite(images).all() and images.float().std() > 0


@pytest.fixture(scope="class")
def sd21(sd21_path):
    gen = torch.Generator().manual_seed(0)
    loaded = _LoadedSD15(sd21_path, cond=torch.randn((1, 77, 1024), generator=gen))
    yield loaded
    del loaded
    _release()


class TestSD21:
    def test_sd21_file_layout(self, sd21_path):
        from safetensors import safe_open
        with safe_open(str(sd21_path), framework="pt") as f:
            keys = set(f.keys())
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
            unet_params = sum(int(torch.Size(f.get_slice(k).get_shape()).numel())
                              for k in keys if k.startswith("model.diffusion_model."))
            bias = f.get_tensor("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias")
        # fp16 but CLIP's logit_scale, which ComfyUI's saver writes as it holds it (fp32)
        assert {k for k, d in dtypes.items() if d != "F16"} == {"cond_stage_model.model.logit_scale"}
        assert unet_params == 865_910_724  # the SD2.1 UNet
        # The text encoder in the OpenCLIP layout a real SD2.1 file has: fused qkv, 24 layers, no v_pred key.
        te = "cond_stage_model.model."
        assert {te + "token_embedding.weight", te + "text_projection", te + "ln_final.weight",
                te + "transformer.resblocks.23.attn.in_proj_weight"} <= keys
        assert te + "transformer.resblocks.24.attn.in_proj_weight" not in keys
        assert "v_pred" not in keys and all(k.startswith(("model.diffusion_model.", te, "first_stage_model."))
                                             for k in keys)
        assert torch.std(bias.float(), unbiased=False) > 0.09  # ComfyUI's 768-v rule, met on purpose

    def test_sd21_loads_as_sd2_v_prediction(self, sd21, sd21_path):
        _check_loaded(sd21, SD15_FULL_ATTN, config="SD20")
        base = sd21.model.model
        assert base.model_type == comfy.model_base.ModelType.V_PREDICTION
        assert isinstance(base.model_sampling, comfy.model_sampling.V_PREDICTION)
        unet = base.diffusion_model
        attn2 = unet.output_blocks[11][1].transformer_blocks[0].attn2
        assert attn2.heads == 5 and attn2.to_k.in_features == 1024  # 64-channel heads, OpenCLIP-H context
        assert isinstance(unet.input_blocks[1][1].proj_in, torch.nn.Linear)
        # Every text-encoder tensor of the file reached ComfyUI's SD2 CLIP (OpenCLIP -> HF names).
        h = sd21.clip.cond_stage_model.clip_h.transformer.text_model
        assert len(h.encoder.layers) == 24 and h.embeddings.token_embedding.weight.shape == (49408, 1024)
        from safetensors import safe_open
        with safe_open(str(sd21_path), framework="pt") as f:
            qkv = f.get_tensor("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight")
            emb = f.get_tensor("cond_stage_model.model.token_embedding.weight")
        assert torch.equal(h.encoder.layers[23].self_attn.k_proj.weight.to(qkv.dtype), qkv[1024:2048])
        assert torch.equal(h.embeddings.token_embedding.weight.to(emb.dtype), emb)

    def test_sd21_tokenizer_pads_with_zero_and_encodes(self, sd21):
        tokens = sd21.clip.tokenize("a cat and a frog")
        assert set(tokens) == {"h"}
        ids = [t[0] for t in tokens["h"][0]]
        # start, a cat and a frog, end, then 70 pads of id 0 (SD1.5's CLIP-L pads with the end id 49407)
        assert len(ids) == 77 and ids[0] == 49406 and ids[6] == 49407 and ids[7:] == [0] * 70
        cond = sd21.clip.encode_from_tokens(tokens)
        assert cond.shape == (1, 77, 1024) and torch.isfinite(cond).all() and cond.float().std() > 0

    def test_sd21_vae_decodes(self, sd21):
        gen = torch.Generator().manual_seed(1)
        images = sd21.vae.decode(torch.randn((1, 4, 8, 8), generator=gen))
        assert images.shape[-3:] == (64, 64, 3)
        assert torch.isfinite(images).all() and images.float().std() > 0


def test_mini_vae_decodes(mini):
    gen = torch.Generator().manual_seed(1)
    images = mini.vae.decode(torch.randn((1, 4, 8, 8), generator=gen))
    assert images.shape[-3:] == (64, 64, 3)
    assert torch.isfinite(images).all() and images.float().std() > 0


def test_same_seed_same_bytes(mini_path, lora_path, controlnet_path, tmp_path):
    again = M.build_sd15_checkpoint(tmp_path / "mini.safetensors", "mini", seed=0)
    assert _sha256(again) == _sha256(mini_path)
    cn = M.build_sd15_controlnet(tmp_path / "cn.safetensors", "mini", seed=0)
    assert _sha256(cn) == _sha256(controlnet_path)
    lora0 = M.build_sd15_lora(tmp_path / "lora0.safetensors", "mini", seed=0)
    lora1 = M.build_sd15_lora(tmp_path / "lora1.safetensors", "mini", seed=1)
    assert _sha256(lora0) == _sha256(lora_path)
    assert _sha256(lora1) != _sha256(lora0)
    # An existing file is reused, not rebuilt.
    mtime = os.stat(again).st_mtime_ns
    assert M.build_sd15_checkpoint(again, "mini", seed=5) == again
    assert os.stat(again).st_mtime_ns == mtime


def test_lora_applies_and_changes_output(mini, lora_path):
    lora = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
    model_l, clip_l = comfy.sd.load_lora_for_models(mini.model, mini.clip, lora, 1.0, 1.0)
    n_unet, n_te = M.lora_key_count(lora_path, "unet"), M.lora_key_count(lora_path, "te")
    assert n_unet > 0 and n_te > 0 and M.lora_key_count(lora_path) == n_unet + n_te
    assert len(model_l.patches) == n_unet
    assert len(clip_l.patcher.patches) == n_te

    positive = M.sd15_conditioning(1, seed=3)
    base = _one_step(mini.model, positive)
    with_lora = _one_step(model_l, positive)
    assert torch.isfinite(with_lora).all()
    assert _rel_change(base, with_lora) > 0.05

    tokens = mini.clip.tokenize("a cat and a frog")
    c0 = mini.clip.encode_from_tokens(tokens)
    c1 = clip_l.encode_from_tokens(tokens)
    assert torch.isfinite(c1).all() and _rel_change(c0, c1) > 0.05
    del model_l, clip_l
    _release()


def test_controlnet_loads_and_changes_output(mini, controlnet_path):
    cnet = comfy.controlnet.load_controlnet(str(controlnet_path))
    assert isinstance(cnet, comfy.controlnet.ControlNet)
    # Every tensor of the file reached the control model (ComfyUI loads with strict=False).
    from safetensors.torch import load_file
    stored = load_file(str(controlnet_path))
    loaded = cnet.control_model.state_dict()
    assert len(loaded) == len(stored)
    for k, v in stored.items():
        assert torch.equal(loaded[k[len("control_model."):]].to(v.dtype), v), k

    gen = torch.Generator().manual_seed(4)
    hint = torch.rand((1, 3, 64, 64), generator=gen)  # an IMAGE, moved to [B, C, H, W]
    cond = M.sd15_conditioning(1, seed=3)[0][0]
    c_net = cnet.copy().set_cond_hint(hint, 1.0, (0.0, 1.0))
    base = _one_step(mini.model, [[cond, {}]])
    controlled = _one_step(mini.model, [[cond, {"control": c_net, "control_apply_to_uncond": False}]])
    assert torch.isfinite(controlled).all()
    assert _rel_change(base, controlled) > 0.05
    del cnet, c_net
    _release()


@pytest.mark.sdxl
def test_sdxl_model():
    _release()  # collect earlier models before the 5 GB build
    model = M.build_sdxl_model(seed=0)
    try:
        assert isinstance(model.model, comfy.model_base.SDXL)
        assert type(model.model.model_config) is comfy.supported_models.SDXL
        assert model.model.diffusion_model.dtype == torch.float16
        # ComfyUI's own detector reads the built UNet back as SDXL base.
        detected = comfy.model_detection.detect_unet_config(model.model.diffusion_model.state_dict(), "")
        assert type(comfy.model_detection.model_config_from_unet_config(detected)) is comfy.supported_models.SDXL
        assert comfy.utils.calculate_parameters(model.model.diffusion_model.state_dict()) == 2_567_463_684

        tokens = M.sdxl_tokenizer().tokenize_with_weights("a cat and a frog")
        assert set(tokens) == {"g", "l"}
        assert [t for t, _ in tokens["g"][0][:7]] == [t for t, _ in tokens["l"][0][:7]]

        seen, handles = _record_attention_layers(model.model.diffusion_model)
        try:
            out = _one_step(model, M.sdxl_conditioning(1, seed=0, width=64, height=64))
        finally:
            for h in handles:
                h.remove()
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
        assert seen == {k: ((8 // d, 8 // d), depth) for k, (d, depth) in SDXL_ATTN.items()}
    finally:
        del model
        _release()
