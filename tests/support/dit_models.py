"""Random-weight Flux.1, Chroma and SD3.5 models, and small text encoders with the real tokenizers.

Built from ComfyUI's own classes (``comfy.supported_models``, ``comfy.model_base``, ``comfy.sd1_clip``,
``comfy.text_encoders``) with the per-tensor seeded values of ``support.models`` (same rule, same
bytes for the same seed), saved once as fp16 safetensors in the test-model cache:

* ``build_flux_checkpoint``: the Flux.1-dev diffusion model at its exact widths (hidden 3072, 24 heads
  of 128, in_channels 16 x 2x2 patches = 64, context 4096, vec 768, guidance embedding) with few
  blocks (default 1 double + 1 single: 0.55 B parameters, 1.1 GB). Raw diffusion-model keys, as
  UNETLoader reads them; ComfyUI detects it as Flux and counts its blocks from the keys.
* ``build_sd35_checkpoint``: the SD3.5-Medium MMDiT at its exact widths (hidden 1536, 24 heads,
  context 4096, adm 2048, RMS QK-norm, x-block self-attention in the first blocks) with 3 joint
  blocks. ComfyUI 0.3.75 derives an MMDiT's block count from its width (depth = hidden / 64 = 24)
  instead of counting blocks, so a file with fewer blocks cannot go through UNETLoader:
  ``load_sd35_model`` loads it as ComfyUI's loader does (model_detection, dtype choice, get_model,
  load_model_weights, ModelPatcher) with ``num_blocks`` set to the counted blocks. The position
  embedding is cut to 64x64 patches (Medium: 384x384), enough for 1024 px, to save 0.4 GB.
* ``build_zimage_checkpoint`` / ``zimage_clip``: Z-Image (NextDiT) at its exact widths with 2 main layers,
  and its Qwen3-4B encoder (ZImageTokenizer's chat template) as a small random Qwen3 of width 2560.
* ``build_joint_attention_lora``: a random LoRA on the joint-attention projections of such a file.
* ``build_vae16``: a random KL VAE with 16 latent channels (the Flux.1 / SD3 VAE layout), for the
  example workflows' VAE Decode.
* ``flux_clip`` / ``sd35_clip``: comfy.sd.CLIP objects with ComfyUI's real tokenizers (CLIP BPE,
  T5 sentencepiece) and small random encoders of the exact output widths: CLIP-L (768) and CLIP-G
  (1280) with 3 layers (SD3 reads the penultimate), T5 with d_model 4096 and 1 layer (4 heads, d_ff 512): ComfyUI's T5 loader
  always builds the 24-layer T5-XXL (t5_config_xxl.json, 4.7 B parameters), so these are built in
  memory, not loaded from a file (0.2 B parameters, mostly the two vocabulary embeddings).
Random initialisation as in support.models, except that every normalisation scale (QK RMSNorm,
T5 layer norm) is 1, so attention logits have a realistic spread, and floating buffers (SD3's
position embedding, which ComfyUI allocates uninitialised) are N(0, 0.5).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import models as M

FLUX_DEV = {
    "image_model": "flux", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 16, "qkv_bias": True, "in_channels": 16, "hidden_size": 3072, "context_in_dim": 4096,
    "patch_size": 2, "vec_in_dim": 768, "guidance_embed": True,
}
SD35_MEDIUM_WIDTH = 1536
SD35_POS_EMBED = 64


def _sd35_config(blocks: int, self_attn_blocks) -> dict:
    return {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": SD35_MEDIUM_WIDTH // 64,
        "input_size": None, "adm_in_channels": 2048,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": 4096, "out_features": SD35_MEDIUM_WIDTH}},
        "num_patches": SD35_POS_EMBED ** 2, "pos_embed_max_size": SD35_POS_EMBED, "qk_norm": "rms",
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": list(self_attn_blocks),
        "num_blocks": blocks,
    }


def _unit_norm_scales_(module: torch.nn.Module) -> None:
    """Scale parameters of every normalisation layer = 1 (ComfyUI's own RMSNorm classes are not in
    the torch norm types support.models recognises)."""
    with torch.no_grad():
        for mod in module.modules():
            if "norm" in type(mod).__name__.lower():
                for name, p in mod.named_parameters(recurse=False):
                    if name in ("weight", "scale"):
                        p.fill_(1.0)


def _random_model(config: dict, expected, seed: int, tag: str):
    """ComfyUI's model for a diffusion-model config (checked to be `expected`), fp16, random."""
    import comfy.model_detection
    mc = comfy.model_detection.model_config_from_unet_config(dict(config))
    if type(mc) is not expected:
        raise RuntimeError(f"ComfyUI does not take this config for {expected.__name__}: {type(mc).__name__}")
    mc.set_inference_dtype(torch.float16, None)
    net = mc.get_model({}, device=torch.device("cpu")).diffusion_model
    for name, buf in net.named_buffers():  # e.g. SD3's pos_embed, allocated uninitialised
        if buf.is_floating_point():
            M._normal_(buf, 0.5, torch.Generator().manual_seed(M._tensor_seed(seed, f"{tag}/{name}")))
    M._fill_random_(net, seed, tag)
    _unit_norm_scales_(net)
    return net


def build_flux_checkpoint(path, double_blocks: int = 1, single_blocks: int = 1, seed: int = 0) -> Path:
    """Write (or reuse) a random Flux.1-dev diffusion model with few blocks (raw keys, fp16)."""
    path = Path(path)
    if path.exists():
        return path
    M._ensure_comfy()
    import comfy.supported_models
    cfg = dict(FLUX_DEV, depth=double_blocks, depth_single_blocks=single_blocks)
    import dataclasses
    from comfy.ldm.flux.model import FluxParams
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        cfg["txt_ids_dims"] = []  # ComfyUI 0.19+: which text-id axes carry positions; none for Flux.1
    net = _random_model(cfg, comfy.supported_models.Flux, seed, "flux")
    return _save_as_detected(net.state_dict(), path, comfy.supported_models.Flux,
                             depth=double_blocks, depth_single_blocks=single_blocks)


CHROMA = {  # ComfyUI's detection of a Chroma file (model_detection: distilled_guidance_layer present)
    "image_model": "chroma", "axes_dim": [16, 56, 56], "num_heads": 24, "mlp_ratio": 4.0, "theta": 10000,
    "out_channels": 64, "qkv_bias": True, "in_channels": 64, "hidden_size": 3072, "context_in_dim": 4096,
    "patch_size": 2, "in_dim": 64, "out_dim": 3072, "hidden_dim": 5120, "n_layers": 5,
}


def build_chroma_checkpoint(path, double_blocks: int = 1, single_blocks: int = 1, seed: int = 0) -> Path:
    """Write (or reuse) a random Chroma diffusion model with few blocks at the real widths (Flux.1's
    blocks: hidden 3072, 24 heads of 128, context 4096; the 5-layer 5120-wide modulation approximator;
    0.63 B parameters with 1 double + 1 single block). Raw keys, fp16, as UNETLoader reads them."""
    path = Path(path)
    if path.exists():
        return path
    M._ensure_comfy()
    import dataclasses
    import comfy.supported_models
    from comfy.ldm.chroma.model import ChromaParams
    cfg = dict(CHROMA, depth=double_blocks, depth_single_blocks=single_blocks)
    fields = {f.name for f in dataclasses.fields(ChromaParams)}
    cfg.update({k: v for k, v in (("txt_ids_dims", []), ("vec_in_dim", None)) if k in fields})  # ComfyUI 0.19+
    net = _random_model(cfg, comfy.supported_models.Chroma, seed, "chroma")
    return _save_as_detected(net.state_dict(), path, comfy.supported_models.Chroma,
                             depth=double_blocks, depth_single_blocks=single_blocks)


KLEIN_4B = {  # ComfyUI 0.19's detection of a Flux.2 file (double_stream_modulation_img), Klein 4B widths
    "image_model": "flux2", "axes_dim": [32, 32, 32, 32], "num_heads": 24, "mlp_ratio": 3.0, "theta": 2000,
    "out_channels": 128, "global_modulation": True, "mlp_silu_act": True, "qkv_bias": False, "ops_bias": False,
    "default_ref_method": "index", "ref_index_scale": 10.0, "txt_ids_dims": [3], "patch_size": 1,
    "in_channels": 128, "hidden_size": 3072, "context_in_dim": 7680, "vec_in_dim": None,
    "guidance_embed": False, "yak_mlp": False, "txt_norm": False,
}


def build_klein_checkpoint(path, double_blocks: int = 1, single_blocks: int = 1, seed: int = 0) -> Path:
    """Write (or reuse) a random Flux.2 Klein 4B diffusion model with few blocks at the real widths (hidden
    3072, 24 heads of 128, context 7680 = 3 Qwen3-4B layers, 128 latent channels, patch 1, no guidance
    embedding; 0.56 B parameters with 1 double + 1 single block). Raw keys, fp16. ComfyUI 0.19+."""
    path = Path(path)
    if path.exists():
        return path
    M._ensure_comfy()
    import comfy.supported_models
    cfg = dict(KLEIN_4B, depth=double_blocks, depth_single_blocks=single_blocks)
    net = _random_model(cfg, comfy.supported_models.Flux2, seed, "klein4b")
    return _save_as_detected(net.state_dict(), path, comfy.supported_models.Flux2, context_in_dim=7680,
                             depth=double_blocks, depth_single_blocks=single_blocks)


def klein_clip(seed: int = 0):
    """Flux.2 Klein 4B's text encoder as ComfyUI's CLIPLoader (type flux2, a Qwen3-4B file) makes it:
    comfy.text_encoders.flux's KleinTokenizer (chat template, 512 tokens) and klein_te, with the Qwen3-4B
    inside replaced, through the loader's "qwen3_4b_class" model option, by a small random Qwen3 of the exact
    width (hidden 2560, 3 layers, 2 heads, MLP 64; its 3 layers give the 3 x 2560 = 7680 output where the
    real model reads layers 9, 18, 27). ComfyUI 0.19+."""
    M._ensure_comfy()
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux_te
    import comfy.text_encoders.llama
    from comfy import sd1_clip

    class SmallQwen3(flux_te.Qwen3_4BModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            config = {"num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
                      "intermediate_size": 64}
            sd1_clip.SDClipModel.__init__(self, device=device, layer=[0, 1, 2], textmodel_json_config=config,
                                          dtype=dtype, special_tokens={"pad": 151643}, layer_norm_hidden_state=False,
                                          model_class=comfy.text_encoders.llama.Qwen3_4B, enable_attention_masks=True,
                                          return_attention_masks=True, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(flux_te.KleinTokenizer, flux_te.klein_te(model_type="qwen3_4b"))
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "qwen3_4b_class": SmallQwen3})
    M._fill_random_(clip.cond_stage_model, seed, "klein-te")
    _unit_norm_scales_(clip.cond_stage_model)
    return clip


QWEN_IMAGE = {"image_model": "qwen_image", "in_channels": 64}  # ComfyUI's detection: txt_norm.weight present


def build_qwen_image_checkpoint(path, blocks: int = 1, seed: int = 0) -> Path:
    """Write (or reuse) a random Qwen-Image diffusion model with few blocks at the real widths (24 heads of 128 =
    hidden 3072, context 3584 = Qwen2.5-VL-7B's width, 64 input channels = 16 latent channels x 2x2 patches;
    0.37 B parameters per block). Raw keys, fp16, as UNETLoader reads them."""
    path = Path(path)
    if path.exists():
        return path
    M._ensure_comfy()
    import comfy.supported_models
    net = _random_model(dict(QWEN_IMAGE, num_layers=blocks), comfy.supported_models.QwenImage, seed, "qwen-image")
    return _save_as_detected(net.state_dict(), path, comfy.supported_models.QwenImage, num_layers=blocks)


def qwen_image_clip(seed: int = 0):
    """Qwen-Image's text encoder as ComfyUI's CLIPLoader (type qwen_image) makes it: comfy.text_encoders.qwen_image's
    QwenImageTokenizer (chat template) and te(), with the Qwen2.5-VL-7B inside replaced, through the loader's
    "qwen25_7b_class" model option, by a small random Qwen2.5 of the exact width (hidden 3584, 2 layers, 2 heads of
    128, MLP 64; the vision tower, unused for text prompts, left out). Its output is [1, n, 3584] as the real one's."""
    M._ensure_comfy()
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_image as qwen_te
    from comfy import sd1_clip

    class TextOnlyQwen25VL(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):
            torch.nn.Module.__init__(self)
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.dtype = dtype

    class SmallQwen25(qwen_te.Qwen25_7BVLIModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            config = {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                      "intermediate_size": 64}
            sd1_clip.SDClipModel.__init__(self, device=device, layer="last", textmodel_json_config=config, dtype=dtype,
                                          special_tokens={"pad": 151643}, layer_norm_hidden_state=False,
                                          model_class=TextOnlyQwen25VL, enable_attention_masks=True,
                                          return_attention_masks=True, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(qwen_te.QwenImageTokenizer, qwen_te.te())
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "qwen25_7b_class": SmallQwen25})
    M._fill_random_(clip.cond_stage_model, seed, "qwen-image-te")
    _unit_norm_scales_(clip.cond_stage_model)
    return clip


def build_vae_wan21(path, dim: int = 8, seed: int = 0) -> Path:
    """Write (or reuse) a random Wan 2.1 VAE (Qwen-Image's VAE layout: 16 latent channels, causal 3D convolutions),
    narrow (ComfyUI's VAE loader reads the width from decoder.head.0.gamma; the real one has 96), fp16."""
    path = Path(path)
    if path.exists():
        return path
    M._ensure_comfy()
    import comfy.ldm.wan.vae
    vae = comfy.ldm.wan.vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    M._fill_random_(vae, seed, "vae-wan21")
    with torch.no_grad():  # Wan's RMS_norm scales are "gamma"
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    return M._atomic_save({k: v.half() for k, v in vae.state_dict().items()}, path)


ZIMAGE = {  # ComfyUI's detection of a Z-Image file (model_detection: Lumina 2 keys, dim 3840, cap_pad_token)
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560, "qk_norm": True,
    "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
    "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
}


def build_zimage_checkpoint(path, layers: int = 2, seed: int = 0) -> Path:
    """Write (or reuse) a random Z-Image (Turbo) diffusion model with few main layers at the real widths (NextDiT:
    dim 3840, 30 heads of 128, caption features 2560 = Qwen3-4B, 16 latent channels x 2x2 patches, text and image
    padded to multiples of 32 with learned tokens) and its 2 context-refiner and 2 noise-refiner layers (ComfyUI
    always builds two of each): 1.1 B parameters with 2 main layers. Raw keys, fp16, as UNETLoader reads them."""
    path = Path(path)
    if path.exists():
        return path
    M._ensure_comfy()
    import comfy.supported_models
    net = _random_model(dict(ZIMAGE, n_layers=layers), comfy.supported_models.ZImage, seed, "zimage")
    sd = net.state_dict()
    del net
    return _save_as_detected(sd, path, comfy.supported_models.ZImage, n_layers=layers, pad_tokens_multiple=32,
                             cap_feat_dim=2560)


def zimage_clip(seed: int = 0):
    """Z-Image's text encoder as ComfyUI's CLIPLoader (type lumina2, a Qwen3-4B file) makes it:
    comfy.text_encoders.z_image's ZImageTokenizer (chat template, no padding) and te(), with the Qwen3-4B
    inside replaced, through the loader's "qwen3_4b_class" model option, by a small random Qwen3 of the exact
    width (hidden 2560, 3 layers, 2 heads, MLP 64), read like the real one at its second-to-last layer."""
    M._ensure_comfy()
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.llama
    import comfy.text_encoders.z_image as z_te
    from comfy import sd1_clip

    class SmallQwen3(z_te.Qwen3_4BModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            config = {"num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
                      "intermediate_size": 64}
            sd1_clip.SDClipModel.__init__(self, device=device, layer="hidden", layer_idx=-2,
                                          textmodel_json_config=config, dtype=dtype, special_tokens={"pad": 151643},
                                          layer_norm_hidden_state=False, model_class=comfy.text_encoders.llama.Qwen3_4B,
                                          enable_attention_masks=True, return_attention_masks=True,
                                          model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(z_te.ZImageTokenizer, z_te.te())
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "qwen3_4b_class": SmallQwen3})
    M._fill_random_(clip.cond_stage_model, seed, "zimage-te")
    _unit_norm_scales_(clip.cond_stage_model)
    return clip


def build_sd35_checkpoint(path, blocks: int = 3, self_attn_blocks=(0, 1), seed: int = 0) -> Path:
    """Write (or reuse) a random SD3.5-Medium-width MMDiT with `blocks` joint blocks, the x-block
    self-attention (Medium has it in blocks 0-12) in `self_attn_blocks` (raw keys, fp16)."""
    path = Path(path)
    if path.exists():
        return path
    M._ensure_comfy()
    import comfy.supported_models
    net = _random_model(_sd35_config(blocks, self_attn_blocks), comfy.supported_models.SD3, seed, "sd35")
    return M._atomic_save(net.state_dict(), path)


SD3_ATTENTION_WEIGHTS = (".attn.qkv.weight", ".attn.proj.weight")
FLUX_ATTENTION_WEIGHTS = ("_attn.qkv.weight", "_attn.proj.weight", "single_blocks.0.linear1.weight")


def build_joint_attention_lora(path, model_path, rank: int = 4, scale: float = 0.5, seed: int = 0,
                               targets: tuple = SD3_ATTENTION_WEIGHTS) -> Path:
    """Write (or reuse) a random LoRA for the joint-attention projections (every ``attn.qkv`` and
    ``attn.proj`` of both streams of SD3; ``targets``: the weight-name endings, FLUX_ATTENTION_WEIGHTS for
    Flux/Chroma's double-block qkv/proj and single block 0's fused qkv+MLP) of the diffusion model in ``model_path``, in the generic key format
    ComfyUI maps for any model ("lora_unet_<key with _>"): lora_down [rank, in], lora_up [out, rank],
    alpha = rank; the delta has about ``scale`` times the base weights' scale. fp16 safetensors."""
    import math
    from safetensors import safe_open
    path = Path(path)
    if path.exists():
        return path
    sd = {}
    with safe_open(str(model_path), framework="pt") as f:
        targets = [(k, f.get_slice(k).get_shape()) for k in sorted(f.keys())
                   if k.endswith(targets)]
    for key, (out_f, in_f) in targets:
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        gen = torch.Generator().manual_seed(M._tensor_seed(seed, "lora/" + name))
        down = torch.empty(rank, in_f).normal_(0.0, 1.0 / math.sqrt(in_f), generator=gen)
        up = torch.empty(out_f, rank).normal_(0.0, scale / math.sqrt(rank), generator=gen)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down.half(), up.half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    return M._atomic_save(sd, path)


def build_vae16(path, seed: int = 0) -> Path:
    """Write (or reuse) a random KL VAE with 16 latent channels, the layout of the Flux.1 and SD3 VAEs
    (ComfyUI's VAE loader reads the channels from decoder.conv_in), fp16."""
    path = Path(path)
    if path.exists():
        return path
    M._ensure_comfy()
    import comfy.ldm.models.autoencoder
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(M._SD_VAE_DDCONFIG, z_channels=16), embed_dim=16)
    vae = vae.to(torch.float16)
    M._fill_random_(vae, seed, "vae16")
    return M._atomic_save(vae.state_dict(), path)


def build_vae_flux2(path, seed: int = 0) -> Path:
    """Write (or reuse) a random KL VAE in the Flux.2 VAE layout ComfyUI 0.19 detects (32 latent channels and a
    latent batch norm over 2x2 patches, "bn.running_mean": 128-channel latents at 1/16), fp16. The batch norm's
    statistics are 0 and 1 (a random variance could be negative)."""
    path = Path(path)
    if path.exists():
        return path
    M._ensure_comfy()
    import comfy.ldm.models.autoencoder
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(
        ddconfig=dict(M._SD_VAE_DDCONFIG, z_channels=32, batch_norm_latent=True), embed_dim=32).to(torch.float16)
    M._fill_random_(vae, seed, "vae-flux2")
    with torch.no_grad():
        vae.bn.running_mean.zero_()
        vae.bn.running_var.fill_(1.0)
    return M._atomic_save(vae.state_dict(), path)


def _save_as_detected(sd: dict, path, model_config, **expected) -> Path:
    """Save a diffusion-model state dict once ComfyUI's own detection reads it back as `model_config` (a
    comfy.supported_models class) with the `expected` unet-config values."""
    found = detected(sd)
    if type(found[0]) is not model_config or any(found[1].get(k) != v for k, v in expected.items()):
        raise RuntimeError(f"ComfyUI does not read the file back as this {model_config.__name__} {expected}: {found}")
    return M._atomic_save(sd, path)


def detected(sd: dict):
    """(model config, unet config) ComfyUI's model_detection reads from a diffusion-model state dict."""
    import comfy.model_detection
    return comfy.model_detection.model_config_from_unet(sd, ""), comfy.model_detection.detect_unet_config(sd, "")


def count_joint_blocks(sd: dict) -> int:
    import comfy.model_detection
    return comfy.model_detection.count_blocks(list(sd.keys()), "joint_blocks.{}.")


def load_sd35_model(path):
    """A ModelPatcher for a file of build_sd35_checkpoint, loaded as comfy.sd.load_diffusion_model
    does, except that the MMDiT gets the file's block count (num_blocks) instead of hidden/64."""
    M._ensure_comfy()
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    sd = comfy.utils.load_torch_file(str(path))
    mc, _ = detected(sd)
    mc.unet_config["num_blocks"] = count_joint_blocks(sd)
    load_device = mm.get_torch_device()
    unet_dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(sd),
                               supported_dtypes=list(mc.supported_inference_dtypes),
                               weight_dtype=comfy.utils.weight_dtype(sd))
    mc.set_inference_dtype(unet_dtype, mm.unet_manual_cast(unet_dtype, load_device, mc.supported_inference_dtypes))
    model = mc.get_model(sd, "").to(mm.unet_offload_device())
    model.load_model_weights(sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


# ----------------------------------------------------------------------------------------------
# Text encoders: small random encoders behind ComfyUI's real tokenizers
# ----------------------------------------------------------------------------------------------

def _json(name: str) -> dict:
    import json
    import comfy.sd1_clip
    return json.loads((Path(comfy.sd1_clip.__file__).parent / name).read_text())


def _clip_l(device, dtype, model_options, **kwargs):
    from comfy import sd1_clip
    return sd1_clip.SDClipModel(device=device, dtype=dtype, model_options=model_options,
                                textmodel_json_config=dict(_json("sd1_clip_config.json"), num_hidden_layers=3), **kwargs)


def _clip_g(device, dtype, model_options):
    from comfy import sd1_clip
    return sd1_clip.SDClipModel(device=device, dtype=dtype, layer="hidden", layer_idx=-2,
                                textmodel_json_config=dict(_json("clip_config_bigg.json"), num_hidden_layers=3),
                                special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                                return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})


def _t5(device, dtype, model_options):
    import comfy.text_encoders.t5
    from comfy import sd1_clip
    config = dict(_json("text_encoders/t5_config_xxl.json"), num_layers=1, num_heads=4, d_ff=512)
    return sd1_clip.SDClipModel(device=device, dtype=dtype, layer="last", textmodel_json_config=config,
                                special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                                enable_attention_masks=False, return_attention_masks=False,
                                model_options={**model_options, "model_name": "t5xxl"})


def _small_clip(kind: str, seed: int):
    """comfy.sd.CLIP of ComfyUI's Flux or SD3 text-encoder class, with small random encoders."""
    M._ensure_comfy()
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip

    if kind == "flux":
        class SmallFluxClip(comfy.text_encoders.flux.FluxClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
                torch.nn.Module.__init__(self)
                self.clip_l = _clip_l(device, dtype, model_options, return_projected_pooled=False)
                self.t5xxl = _t5(device, dtype, model_options)
                self.dtypes = {dtype}
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.flux.FluxTokenizer, SmallFluxClip)
    else:
        class SmallSD3Clip(comfy.text_encoders.sd3_clip.SD3ClipModel):
            def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
                torch.nn.Module.__init__(self)
                self.clip_l = _clip_l(device, dtype, model_options, layer="hidden", layer_idx=-2,
                                      layer_norm_hidden_state=False, return_projected_pooled=False)
                self.clip_g = _clip_g(device, dtype, model_options)
                self.t5xxl = _t5(device, dtype, model_options)
                self.t5_attention_mask = False
                self.dtypes = {dtype}
        target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.sd3_clip.SD3Tokenizer, SmallSD3Clip)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    M._fill_random_(clip.cond_stage_model, seed, f"{kind}-te")
    _unit_norm_scales_(clip.cond_stage_model)
    return clip


def chroma_clip(seed: int = 0):
    """Chroma's text encoder as ComfyUI's CLIPLoader (type chroma) makes it, comfy.text_encoders.pixart_t5's
    PixArtTokenizer and pixart_te, with the T5 inside replaced, through the loader's own "t5xxl_class"
    model option, by a small random T5 of the exact output width (d_model 4096, 1 layer)."""
    M._ensure_comfy()
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5 as pixart
    import comfy.text_encoders.t5
    from comfy import sd1_clip

    class SmallPixArtT5(pixart.T5XXLModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
            config = dict(_json("text_encoders/t5_config_xxl.json"), num_layers=1, num_heads=4, d_ff=512)
            sd1_clip.SDClipModel.__init__(self, device=device, dtype=dtype, layer="last", textmodel_json_config=config,
                                          special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                                          enable_attention_masks=False, return_attention_masks=False,
                                          model_options={**model_options, "model_name": "t5xxl"})

    target = comfy.supported_models_base.ClipTarget(pixart.PixArtTokenizer, pixart.pixart_te())
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32, "t5xxl_class": SmallPixArtT5})
    M._fill_random_(clip.cond_stage_model, seed, "chroma-te")
    _unit_norm_scales_(clip.cond_stage_model)
    return clip


def flux_clip(seed: int = 0):
    """Flux text encoders (CLIP-L + T5, small, random) behind ComfyUI's FluxTokenizer."""
    return _small_clip("flux", seed)


def sd35_clip(seed: int = 0):
    """SD3 text encoders (CLIP-L + CLIP-G + T5, small, random) behind ComfyUI's SD3Tokenizer."""
    return _small_clip("sd3", seed)
