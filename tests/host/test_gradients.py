"""The guidance pass's gradient through what users put around the model (nodes/gradient_path.py): networks
that patches bring (ComfyUI's Hypernetwork and GLIGEN loaders, an IPAdapter-style attn2 replace), hook-
scheduled LoRA, fp8 layers, GGUF-style quantized weights, torch.compile. Through the real executor
(inference mode) on the mini SD1.5 checkpoint; each case either guides with the gradient it should or is
refused with an error that names the cause."""
from __future__ import annotations

import pytest
import torch

from support import host as hosts
from support.graphs import sd15_graph

SEED = 7300  # no graph of another test file is served from the executor's cache
SETTINGS = dict(size=64, resolution="1/16", steps=2, guided_steps=1)


def graph(ckpt, **kw):
    kw = {**SETTINGS, **kw}
    kw["seed"] = SEED + kw.get("seed", 0)
    g = sd15_graph(ckpt, decode=False, **kw)
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return g


def sampled(host, g):
    """(latent samples, recording) of the graph's sampler; every node runs again."""
    out = host.run(g, fresh=True)["sampler"]
    return out[0]["samples"], out[1]


def assert_same_update(reference, other):
    """Two guided steps from the same latent took the same update, to float rounding: 1e-5 of its size (an
    update that misses a term of the gradient, or a zero step, is off by a large part of it)."""
    (z_ref, new_ref), (z, new) = reference, other
    assert torch.equal(z, z_ref)
    update_ref, update = new_ref - z_ref, new - z
    scale = float(update_ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(update, update_ref, rtol=0, atol=1e-5 * scale)


@pytest.fixture
def guided_steps(monkeypatch):
    """Every guided step's (latent before, latent after) as guided_step returned it."""
    guided = hosts.pack_module("nodes.sampling_wrapper")
    real, steps = guided.guided_step, []

    def spy(z, *args, **kwargs):
        result = real(z, *args, **kwargs)
        steps.append((z.detach().clone(), result.latent.detach().clone()))
        return result

    monkeypatch.setattr(guided, "guided_step", spy)
    return steps


# ------------------------------------------------------------------------------------------------
# Hypernetworks (ComfyUI's HypernetworkLoader)
# ------------------------------------------------------------------------------------------------

HYPERNETWORK = "astar-test-hypernetwork.pt"


def hypernetwork_state(zero_output: bool) -> dict:
    """A Hypernetwork as ComfyUI's loader reads it ({dim: [k's network, v's network]}, each Linear-ReLU-Linear)
    for the mini UNet's attention dims (320 and 640 for attn1, the 768 context for attn2). zero_output: the
    last layers are zero, so each network adds exactly 0 to k and v."""
    g = torch.Generator().manual_seed(5)
    sd = {"activation_func": "relu", "is_layer_norm": False, "use_dropout": False}
    for dim in (320, 640, 768):
        pair = []
        for _ in range(2):
            last = torch.zeros(dim, 2 * dim) if zero_output else torch.randn(dim, 2 * dim, generator=g) / (2 * dim) ** 0.5
            pair.append({"linear.0.weight": torch.randn(2 * dim, dim, generator=g) / dim ** 0.5,
                         "linear.0.bias": torch.randn(2 * dim, generator=g) * 0.02,
                         "linear.1.weight": last, "linear.1.bias": torch.zeros(dim) if zero_output else
                         torch.randn(dim, generator=g) * 0.02})
        sd[dim] = pair
    return sd


@pytest.fixture
def hypernetwork(host, monkeypatch, work_dir):
    """HypernetworkLoader reads HYPERNETWORK from memory (its format nests dicts, which only a pickle holds:
    no file is unpickled here); returns the switch between a zero-output and a random Hypernetwork."""
    import comfy.utils
    import folder_paths
    folder = work_dir / "hypernetworks"
    folder.mkdir(exist_ok=True)
    (folder / HYPERNETWORK).write_bytes(b"")  # listed by folder_paths; its contents come from below
    folder_paths.add_model_folder_path("hypernetworks", str(folder))
    choice = {"zero_output": True}
    real = comfy.utils.load_torch_file

    def load(path, *args, **kwargs):
        if str(path).endswith(HYPERNETWORK):
            return hypernetwork_state(choice["zero_output"])
        return real(path, *args, **kwargs)

    monkeypatch.setattr(comfy.utils, "load_torch_file", load)
    return choice


def with_hypernetwork(g):
    g["hn"] = {"class_type": "HypernetworkLoader",
               "inputs": {"model": ["ckpt", 0], "hypernetwork_name": HYPERNETWORK, "strength": 1.0}}
    g["sampler"]["inputs"]["model"] = ["hn", 0]
    return g


@pytest.mark.parametrize("single_pass", [False, True])
def test_a_hypernetwork_is_guided_through(host, mini_ckpt, hypernetwork, guided_steps, single_pass):
    """ComfyUI's HypernetworkLoader builds its Linear layers under inference mode and patches attn1 and attn2.
    A Hypernetwork whose output is zero leaves the model's function unchanged: the guided update equals the
    plain model's (to the last bits: autograd sums the gradient's branches in another order), and so do the maps
    (before the fix, the first guided step failed with "Inference tensors cannot be saved for backward"). A random one runs too, the guidance pass reading the patched attention
    (other maps), and the Hypernetwork's layers are left as they were (a plain run after it is the same)."""
    kw = dict(single_pass=single_pass, seed=1)
    _, plain_rec = sampled(host, graph(mini_ckpt, **kw))
    hypernetwork["zero_output"] = True
    _, zero_rec = sampled(host, with_hypernetwork(graph(mini_ckpt, **kw)))
    assert_same_update(*guided_steps[:2])
    torch.testing.assert_close(zero_rec.steps[0].maps, plain_rec.steps[0].maps, rtol=1e-5, atol=1e-7)

    hypernetwork["zero_output"] = False
    patched, rec = sampled(host, with_hypernetwork(graph(mini_ckpt, **kw)))
    assert rec.steps[0].iterations == 1 and torch.isfinite(patched).all()
    assert not torch.allclose(rec.steps[0].maps, plain_rec.steps[0].maps, atol=1e-4)
    patcher = host.cached_output("hn").outputs[0][0]
    for fn in patcher.model_options["transformer_options"]["patches"]["attn2_patch"]:
        for module in fn.hypernet.values():  # unfrozen again after the pass, as the loader left them
            assert all(p.requires_grad for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# IPAdapter-style attn2 replace that brings its own projections
# ------------------------------------------------------------------------------------------------

class _ImagePromptReplace:
    """A test double built like IPAdapter's Attn2Replace (read in cubiq/ComfyUI_IPAdapter_plus): one object
    per layer holds lists of callbacks and of keyword dicts; the dicts hold the adapter network (its k/v
    projections per layer) and the image embedding, both made under inference mode by the node. The output
    is attention(q, k, v) + weight * attention(q, to_k(embeds), to_v(embeds))."""

    def __init__(self, callback, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def __call__(self, q, k, v, extra_options, **kw):
        import comfy.ldm.modules.attention as attention
        out = attention.optimized_attention(q, k, v, extra_options["n_heads"])
        for callback, kwargs in zip(self.callback, self.kwargs):
            out = out + callback(q, extra_options, **kwargs)
        return out


def _image_prompt_attention(q, extra_options, adapter=None, embeds=None, weight=1.0, key=None, **kwargs):
    import comfy.ldm.modules.attention as attention
    layer = adapter.layers[key]
    cond = embeds.to(q.dtype).expand(q.shape[0], -1, -1)
    return weight * attention.optimized_attention(q, layer["to_k"](cond), layer["to_v"](cond), extra_options["n_heads"])


class ImagePromptAdapterNode(hosts.Attn2ReplaceNode):
    """Test-only node: MODEL -> a clone with an _ImagePromptReplace on every cross-attention layer."""

    weight = 1.0

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "weight": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0})}}

    def patch(self, model, weight):
        import comfy.ldm.modules.attention as attention
        g = torch.Generator().manual_seed(9)
        adapter = torch.nn.Module()
        adapter.layers = torch.nn.ModuleDict()
        embeds = torch.randn(1, 4, 768, generator=g)  # 4 image tokens
        patched = model.clone()
        unet = patched.model.diffusion_model
        for name, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
            for i, block in enumerate(blocks):
                for layer in block:
                    if isinstance(layer, attention.SpatialTransformer):
                        for t, tb in enumerate(layer.transformer_blocks):
                            inner = tb.attn2.to_k.weight.shape[0]
                            key = f"{name}_{i}_{t}"
                            adapter.layers[key] = torch.nn.ModuleDict(
                                {"to_k": torch.nn.Linear(768, inner, bias=False), "to_v": torch.nn.Linear(768, inner, bias=False)})
                            for p in adapter.layers[key].parameters():
                                p.copy_(torch.randn(p.shape, generator=g) / 768 ** 0.5)
                            patched.set_model_attn2_replace(
                                _ImagePromptReplace(_image_prompt_attention, adapter=adapter, embeds=embeds,
                                                    weight=weight, key=key), name, i, t)
        return (patched,)


class PlainAttentionNode(hosts.Attn2ReplaceNode):
    """Test-only node: the same replace slots computing ComfyUI's attention only (the adapter's baseline)."""

    def replace(self, q, k, v, extra_options, **kwargs):
        import comfy.ldm.modules.attention as attention
        return attention.optimized_attention(q, k, v, extra_options["n_heads"])


@pytest.mark.parametrize("single_pass", [False, True])
def test_an_attention_replace_that_brings_its_own_projections_is_guided_through(host, mini_ckpt, guided_steps,
                                                                                single_pass):
    """An IPAdapter-style replace: with weight 0 its branch adds exactly 0, so the guided update equals that of
    a replace computing the attention alone (to float rounding) and the maps are the same (before the fix:
    "Inference tensors cannot be saved for backward" at the first guided step); with weight 1 the guided run
    reads the adapted attention."""
    host.nodes.NODE_CLASS_MAPPINGS["AStarTestImagePrompt"] = ImagePromptAdapterNode
    host.nodes.NODE_CLASS_MAPPINGS["AStarTestPlainAttention"] = PlainAttentionNode
    kw = dict(single_pass=single_pass, seed=2)
    g = graph(mini_ckpt, **kw)
    g["plain"] = {"class_type": "AStarTestPlainAttention", "inputs": {"model": ["ckpt", 0]}}
    g["sampler"]["inputs"]["model"] = ["plain", 0]
    _, plain_rec = sampled(host, g)
    results = {}
    for weight in (0.0, 1.0):
        g = graph(mini_ckpt, **kw)
        g["ip"] = {"class_type": "AStarTestImagePrompt", "inputs": {"model": ["ckpt", 0], "weight": weight}}
        g["sampler"]["inputs"]["model"] = ["ip", 0]
        results[weight] = sampled(host, g)
    assert_same_update(*guided_steps[:2])
    torch.testing.assert_close(results[0.0][1].steps[0].maps, plain_rec.steps[0].maps, rtol=1e-5, atol=1e-7)
    assert results[1.0][1].steps[0].iterations == 1
    assert not torch.allclose(results[1.0][1].steps[0].maps, plain_rec.steps[0].maps, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Hook-scheduled LoRA (CreateHookLora + SetClipHooks)
# ------------------------------------------------------------------------------------------------

HOOK_LORA = "astar-test-sd15-mini-hook-lora.safetensors"


@pytest.fixture(scope="module")
def hook_lora(host):
    from support.models import build_sd15_lora
    build_sd15_lora(hosts.models_dir() / "loras" / HOOK_LORA, layout="mini", seed=3, text_encoder=False)
    return HOOK_LORA


@pytest.mark.parametrize("single_pass", [False, True])
def test_hook_lora_guides_with_the_weights_of_the_conds_group(host, mini_ckpt, hook_lora, guided_steps, single_pass):
    """A LoRA hooked onto the positive prompt only (CreateHookLora + SetClipHooks): ComfyUI runs the cond with
    the LoRA's weights and the uncond with the base weights, swapping them in place. The guided update of
    the first step (which reads the cond only) equals that of the model with the LoRA merged
    (LoraLoaderModelOnly). Before the fix, in single-pass mode the cond's gradient was taken with the
    uncond's weights, swapped in after the forward (the update differed by about its own size)."""
    kw = dict(single_pass=single_pass, seed=3, negative="blurry")
    hooked = graph(mini_ckpt, **kw)
    hooked["hooks"] = {"class_type": "CreateHookLora",
                       "inputs": {"lora_name": hook_lora, "strength_model": 1.0, "strength_clip": 0.0}}
    hooked["clip_hooked"] = {"class_type": "SetClipHooks", "inputs": {
        "clip": ["ckpt", 1], "apply_to_conds": True, "schedule_clip": False, "hooks": ["hooks", 0]}}
    hooked["pos"]["inputs"]["clip"] = ["clip_hooked", 0]
    sampled(host, hooked)
    merged = graph(mini_ckpt, **kw)
    merged["lora"] = {"class_type": "LoraLoaderModelOnly",
                      "inputs": {"model": ["ckpt", 0], "lora_name": hook_lora, "strength_model": 1.0}}
    merged["sampler"]["inputs"]["model"] = ["lora", 0]
    sampled(host, merged)
    base = graph(mini_ckpt, **kw)
    sampled(host, base)
    (z_h, new_h), (z_m, new_m), (z_b, new_b) = guided_steps
    assert torch.equal(z_h, z_m) and torch.equal(z_h, z_b)  # the same noise: the first step's latent
    update_h, update_m, update_b = new_h - z_h, new_m - z_m, new_b - z_b
    assert float(update_m.abs().max()) > 0
    # the LoRA changes the update by a sizeable part of it; the merged and hooked weights are the same values
    assert float((update_m - update_b).abs().max()) > 0.05 * float(update_m.abs().max())
    torch.testing.assert_close(update_h, update_m, rtol=0, atol=1e-4 * float(update_m.abs().max()))



# ------------------------------------------------------------------------------------------------
# GLIGEN (ComfyUI's GLIGENLoader + GLIGENTextBoxApply)
# ------------------------------------------------------------------------------------------------

def build_gligen(path, ckpt_path, alpha: float) -> None:
    """A random GLIGEN model for the mini UNet, in the layout ComfyUI's load_gligen reads: one gated
    self-attention fuser per transformer block (keyed by the block's UNet name, sized by its channels), a
    position net over the 768-dim CLIP-L pooled text. alpha: the fusers' gates (tanh(0) = 0: no effect)."""
    import comfy.gligen
    from safetensors import safe_open
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(11)
    sd = {}

    def add(prefix, module):
        for name, p in module.state_dict().items():
            if name.startswith("alpha_"):
                value = torch.tensor(alpha)
            elif name.startswith("norm") and name.endswith("weight"):
                value = torch.ones(p.shape)
            elif p.dim() >= 2:
                value = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
            else:
                value = torch.randn(p.shape, generator=g) * 0.02
            sd[prefix + name] = value.contiguous()

    marker = ".transformer_blocks.0.attn1.to_q.weight"
    with safe_open(str(ckpt_path), "pt") as f:
        blocks = {k[len("model.diffusion_model."):-len(marker)]: f.get_slice(k).get_shape()[0]
                  for k in f.keys() if k.startswith("model.diffusion_model.") and k.endswith(marker)}
    for block, channels in blocks.items():
        add(f"{block}.transformer_blocks.0.fuser.", comfy.gligen.GatedSelfAttentionDense(channels, 768, 8, channels // 8))
    add("position_net.", comfy.gligen.PositionNet(768, 768))
    save_file(sd, str(path))


@pytest.fixture
def gligen(host, mini_ckpt, work_dir):
    """File names of a GLIGEN model with closed gates (no effect) and one with open gates."""
    import folder_paths
    folder = work_dir / "gligen"
    folder.mkdir(exist_ok=True)
    folder_paths.add_model_folder_path("gligen", str(folder))
    names = {}
    for alpha in (0.0, 0.5):
        names[alpha] = f"astar-test-gligen-{alpha}.safetensors"
        if not (folder / names[alpha]).exists():
            build_gligen(folder / names[alpha], hosts.models_dir() / "checkpoints" / mini_ckpt, alpha)
    return names


@pytest.mark.parametrize("single_pass", [False, True])
def test_gligen_is_guided_through(host, mini_ckpt, gligen, guided_steps, single_pass):
    """GLIGEN's position net runs in each model call (ComfyUI computes the box embedding there) and its gated
    attention is a middle_patch of every transformer block; both are loaded under inference mode. Closed gates
    leave the model's function unchanged: the guided update equals the plain model's (to float rounding; before
    the fix: "Inference tensors cannot be saved for backward"); open gates change the guidance pass's maps."""
    kw = dict(single_pass=single_pass, seed=4)
    _, plain_rec = sampled(host, graph(mini_ckpt, **kw))
    recs = {}
    for alpha, name in gligen.items():
        g = graph(mini_ckpt, **kw)
        g["gligen"] = {"class_type": "GLIGENLoader", "inputs": {"gligen_name": name}}
        g["box"] = {"class_type": "GLIGENTextBoxApply", "inputs": {
            "conditioning_to": ["pos", 0], "clip": ["ckpt", 1], "gligen_textbox_model": ["gligen", 0],
            "text": "a cat", "width": 32, "height": 32, "x": 0, "y": 0}}
        g["sampler"]["inputs"]["positive"] = ["box", 0]
        recs[alpha] = sampled(host, g)[1]
    assert_same_update(*guided_steps[:2])
    torch.testing.assert_close(recs[0.0].steps[0].maps, plain_rec.steps[0].maps, rtol=1e-5, atol=1e-7)
    assert recs[0.5].steps[0].iterations == 1
    assert not torch.allclose(recs[0.5].steps[0].maps, plain_rec.steps[0].maps, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# fp8 matrix multiplication (ComfyUI's fp8 ops, with its fp8-compute switch on: torch's fp8 matmul,
# _scaled_mm, also runs on a CPU, so ComfyUI's own layers and QuantizedTensor run here as on a GPU)
# ------------------------------------------------------------------------------------------------

SCALED_FP8 = "astar-test-sd15-mini-scaled-fp8.safetensors"


@pytest.fixture
def fp8_compute(monkeypatch, host):
    """ComfyUI's --supports-fp8-compute: it picks its fp8 matmul layers as on a GPU that computes in fp8."""
    import comfy.model_management
    monkeypatch.setattr(comfy.model_management, "SUPPORT_FP8_OPS", True)


@pytest.fixture(scope="module")
def scaled_fp8_ckpt(host, mini_ckpt):
    """The mini checkpoint with its UNet's linear layers stored as scaled fp8 (weight / scale in
    float8_e4m3fn, per-layer scale_weight and scale_input, and the `scaled_fp8` marker), as scaled-fp8 files
    are published; ComfyUI then computes those layers in fp8 where fp8 compute is supported."""
    import os
    from safetensors.torch import load_file, save_file
    path = hosts.models_dir() / "checkpoints" / SCALED_FP8
    if not path.exists():
        sd = load_file(str(hosts.models_dir() / "checkpoints" / mini_ckpt))
        prefix = "model.diffusion_model."
        for key in [k for k in sd if k.startswith(prefix) and k.endswith(".weight") and sd[k].dim() == 2]:
            w = sd[key].float()
            scale = w.abs().max() / 448.0
            sd[key] = (w / scale).to(torch.float8_e4m3fn)
            layer = key[:-len(".weight")]
            sd[layer + ".scale_weight"] = scale.reshape(())
            sd[layer + ".scale_input"] = torch.tensor(1.0)
        sd[prefix + "scaled_fp8"] = torch.empty((), dtype=torch.float8_e4m3fn)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file(sd, str(tmp))
        os.replace(tmp, path)
    return SCALED_FP8


def fp8_graph(kind, mini_ckpt, scaled_ckpt):
    """fast: the mini UNet in fp8 through Load Diffusion Model's fp8_e4m3fn_fast (ComfyUI's fp8_ops);
    scaled: the scaled-fp8 checkpoint (fp8 weights with scales; mixed-precision QuantizedTensor layers in
    ComfyUI 0.19)."""
    if kind == "scaled":
        return graph(scaled_ckpt, seed=5)
    g = graph(mini_ckpt, seed=5)
    g["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": mini_ckpt, "weight_dtype": "fp8_e4m3fn_fast"}}
    g["sampler"]["inputs"]["model"] = ["unet", 0]
    return g


@pytest.mark.parametrize("kind", ["fast", "scaled"])
def test_fp8_matmul_layers_guide_with_a_gradient_or_are_refused(host, mini_ckpt, scaled_fp8_ckpt, monkeypatch,
                                                                guided_steps, kind):
    """The same fp8 weights with fp8 compute (ComfyUI's fp8 matmul layers, QuantizedTensor inputs) and without
    it (ComfyUI casts them to fp32 per layer: the reference). Where ComfyUI's layers give the latent's
    gradient (fp8_ops fall back to the cast path when their input requires grad; 0.19's quantized layers
    have a backward, QuantLinearFunc), the guided update equals the reference's to fp8 rounding (layers that
    carry no gradient, such as the text's k and v, still multiply in fp8). Where they do not (0.3.75's
    scaled-fp8 layers quantize the input with an out= clamp that autograd refuses), the run is refused at
    the first guided step with an error that names the layer and the fix, instead of torch's message."""
    import comfy.model_management
    import comfy.ops
    g = fp8_graph(kind, mini_ckpt, scaled_fp8_ckpt)
    sampled(host, g)  # the reference: no fp8 compute
    monkeypatch.setattr(comfy.model_management, "SUPPORT_FP8_OPS", True)
    if kind == "scaled" and not hasattr(comfy.ops, "QuantLinearFunc"):
        with pytest.raises(hosts.GraphError, match="compute without one") as info:
            sampled(host, g)
        assert "scaled_fp8_op.Linear" in str(info.value) and "weight_dtype" in str(info.value)
        return
    sampled(host, g)
    (z_ref, new_ref), (z, new) = guided_steps
    assert torch.equal(z, z_ref)
    update_ref, update = new_ref - z_ref, new - z
    error = float((update - update_ref).abs().max()) / float(update_ref.abs().max())
    print(kind, "relative error", error)
    assert error < 0.2, error


# ------------------------------------------------------------------------------------------------
# GGUF-quantized layers (a test double of the ComfyUI-GGUF pack's GGMLTensor and GGMLOps layers)
# ------------------------------------------------------------------------------------------------

class _GGUFWeight(torch.Tensor):
    """A test double of GGUF's GGMLTensor (read in city96/ComfyUI-GGUF, ops.py): a torch.Tensor subclass
    holding a file's raw tensor data, its quantization type and logical shape as Python attributes; its
    detach() and clone() return the tensor itself, as GGMLTensor's do, and to() keeps the attributes."""

    @staticmethod
    def make(data, qtype, shape):
        t = torch.Tensor._make_subclass(_GGUFWeight, data, False)
        t.qtype, t.logical_shape = qtype, shape
        return t

    def detach(self, *args, **kwargs):
        return self

    def clone(self, *args, **kwargs):
        return self

    def to(self, *args, **kwargs):
        new = super().to(*args, **kwargs)
        new.qtype, new.logical_shape = getattr(self, "qtype", None), getattr(self, "logical_shape", None)
        return new


Q8_BLOCK = 32


def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """GGUF's Q8_0 layout: blocks of 32 values as one fp16 scale (2 bytes) then 32 int8 quants; raw uint8."""
    blocks = w.float().reshape(-1, Q8_BLOCK)
    scale = (blocks.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-8)
    quants = torch.round(blocks / scale).clamp(-127, 127).to(torch.int8)
    return torch.cat([scale.half().view(torch.uint8), quants.view(torch.uint8)], dim=1).contiguous()


def dequantize(t: torch.Tensor, dtype) -> torch.Tensor:
    """As GGUF's dequantize_tensor: F32/F16 data are cast (the same tensor when the dtype matches), Q8_0
    blocks are scale * quants."""
    if t.qtype == "F32":
        return torch.Tensor(t.to(dtype))  # GGUF's get_weight drops the subclass the same way
    raw = t.view(torch.uint8).reshape(-1, 2 + Q8_BLOCK)
    scale, quants = raw[:, :2].contiguous().view(torch.float16), raw[:, 2:].contiguous().view(torch.int8)
    return (scale.to(dtype) * quants.to(dtype)).reshape(t.logical_shape)


def gguf_linear_class():
    import comfy.ops

    class GGUFLinear(comfy.ops.manual_cast.Linear):
        """Built like GGUF's GGMLOps.Linear: weights as _GGUFWeight parameters (requires_grad False), cast
        per forward (comfy_cast_weights), dequantized in forward_comfy_cast_weights."""

        def __init__(self, weight, bias, qtype):
            torch.nn.Module.__init__(self)
            self.in_features, self.out_features = weight.shape[1], weight.shape[0]
            data = quantize_q8_0(weight) if qtype == "Q8_0" else weight.float().contiguous()
            self.weight = torch.nn.Parameter(_GGUFWeight.make(data, qtype, weight.shape), requires_grad=False)
            self.bias = torch.nn.Parameter(_GGUFWeight.make(bias.float(), "F32", bias.shape), requires_grad=False)
            self.comfy_cast_weights = True

        def forward_comfy_cast_weights(self, input, *args, **kwargs):
            return torch.nn.functional.linear(input, dequantize(self.weight, input.dtype),
                                              dequantize(self.bias, input.dtype))

    return GGUFLinear


def test_gguf_quantized_layers_give_the_gradient_of_their_dequantized_weights(host):
    """GGUF layers dequantize their weights in each forward; their F32 tensors (biases, norms, small layers)
    pass through as the loaded (inference-mode) tensor itself, and GGMLTensor's clone() returns itself, so
    the pack's inference-mode fix kept them as they were and the first guided step failed ("Inference
    tensors cannot be saved for backward"). Now they become ordinary tensors of the same class, attributes
    and memory, and the gradient with respect to the input equals that of plain layers holding the
    dequantized weights. CPU test double of the pack's tensor type (its kernels are plain torch)."""
    weights = hosts.pack_module("nodes.autograd_weights")
    saved = hosts.pack_module("attention.saved_tensors")
    linear = gguf_linear_class()
    g = torch.Generator().manual_seed(12)
    shapes = [(64, 32, "Q8_0"), (32, 64, "F32"), (16, 32, "Q8_0")]
    with torch.inference_mode():  # as the GGUF loader node runs in ComfyUI's executor
        layers = [linear(torch.randn(o, i, generator=g) / i ** 0.5, torch.randn(o, generator=g) * 0.1, q)
                  for o, i, q in shapes]
        model = torch.nn.Sequential(layers[0], torch.nn.Tanh(), layers[1], torch.nn.Tanh(), layers[2])
    x = torch.randn(3, 32, generator=g)
    before = [(type(p), p.data_ptr(), p.qtype) for p in model.parameters()]
    with torch.inference_mode(False):
        weights.make_autograd_safe(model)
        assert [(type(p), p.data_ptr(), p.qtype) for p in model.parameters()] == before  # aliased, not copied
        assert not any(p.is_inference() for p in model.parameters())
        leaf = x.clone().requires_grad_(True)
        with weights.gradient_to_input([model]), saved.saved_tensor_policy(
                recast_weight_casts=weights.casts_weights(model), copy_others=False), torch.enable_grad():
            loss = model(leaf).square().sum()
            (grad,) = torch.autograd.grad(loss, leaf)
        plain = [torch.nn.Linear(1, 1) for _ in layers]
        for p, q in zip(plain, layers):
            p.weight = torch.nn.Parameter(dequantize(q.weight, torch.float32).clone(), requires_grad=False)
            p.bias = torch.nn.Parameter(dequantize(q.bias, torch.float32).clone(), requires_grad=False)
        reference_model = torch.nn.Sequential(plain[0], torch.nn.Tanh(), plain[1], torch.nn.Tanh(), plain[2])
        leaf = x.clone().requires_grad_(True)
        (reference,) = torch.autograd.grad(reference_model(leaf).square().sum(), leaf)
    torch.testing.assert_close(grad, reference, rtol=1e-6, atol=1e-6)
    assert float(grad.abs().max()) > 0


# ------------------------------------------------------------------------------------------------
# torch.compile (ComfyUI's TorchCompileModel)
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's "eager" backend whatever TorchCompileModel asks for: dynamo captures the
    UNet as it does for inductor, without inductor's C++ code generation (minutes on this CPU). Counts the
    graphs dynamo hands the backend and the grad mode they were captured in."""
    import torch._dynamo
    torch._dynamo.reset()
    real, captured = torch.compile, []

    def backend(gm, example_inputs):
        captured.append(torch.is_grad_enabled())
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model=None, **kw: real(model, backend=backend))
    yield captured
    torch._dynamo.reset()


def test_a_compiled_model_is_guided_through_its_eager_modules(host, mini_ckpt, eager_compile, guided_steps):
    """TorchCompileModel swaps a compiled copy of the UNet in for each model call. The guidance pass runs the
    eager UNet (the same modules and weights): its update equals the uncompiled model's to float rounding,
    and dynamo never captured a graph with gradients on (the sampler's own calls stay compiled)."""
    kw = dict(seed=6)
    sampled(host, graph(mini_ckpt, **kw))
    g = graph(mini_ckpt, **kw)
    g["compile"] = {"class_type": "TorchCompileModel", "inputs": {"model": ["ckpt", 0], "backend": "inductor"}}
    g["sampler"]["inputs"]["model"] = ["compile", 0]
    sampled(host, g)
    assert eager_compile and not any(eager_compile), eager_compile  # compiled, never for the guidance pass
    assert_same_update(*guided_steps)


@pytest.mark.parametrize("weight_dtype", ["float8_e4m3fn", "bfloat16"])
def test_a_layer_that_cuts_the_gradient_is_named_with_the_fix_for_its_kind(host, weight_dtype):
    """GradientWatch names the layer whose output lost its input's gradient; the fp8 advice (load in another
    weight dtype) only for fp8 weights, else the advice for a kernel without a backward (SageAttention-like)."""
    watch_type = hosts.pack_module("nodes.gradient_path").GradientWatch

    class Detaching(torch.nn.Module):  # a kernel without a backward
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2, 2, dtype=getattr(torch, weight_dtype)), requires_grad=False)

        def forward(self, x):
            return x.detach() * 2

    x = torch.ones(2, requires_grad=True)
    with watch_type() as watch:
        Detaching()(x)
    with pytest.raises(ValueError, match="Detaching layers compute without one") as info:
        watch.check()
    fp8_advice = "fp8_e4m3fn_fast" in str(info.value)
    assert fp8_advice == (weight_dtype == "float8_e4m3fn"), str(info.value)
    assert ("SageAttention" in str(info.value)) != fp8_advice


def test_the_gradient_watch_reads_a_layers_first_tensor_argument(host):
    """A layer whose input (its first tensor argument) requires grad and whose output does not is a cut; a layer
    given a tensor that requires grad only for its dtype (Qwen-Image's timestep embedding takes the image tokens so)
    after an input without grad is not."""
    gp = hosts.pack_module("nodes.gradient_path")

    class Detached(torch.nn.Module):  # computes outside autograd, as an fp8 matmul layer does
        def forward(self, x):
            return x.detach() * 2

    class DtypeOnly(torch.nn.Module):  # the timestep embedding's shape: (timestep, hidden_states)
        def forward(self, t, like):
            return (t * 3).to(like.dtype)

    x = torch.ones(2, 3, requires_grad=True)
    with gp.GradientWatch() as watch:
        DtypeOnly()(torch.ones(2), x)
    watch.check()
    cut = Detached()
    with gp.GradientWatch() as watch:
        cut(x)
    assert watch.cut == [cut]
    with pytest.raises(ValueError, match="compute without one"):
        watch.check()
