"""The real host: the pack loads, a plain SD1.5 graph runs, and the inference-mode trap is real."""
from __future__ import annotations

import shutil

import pytest
import torch

from support import host as hosts
from support.graphs import sd15_graph

PACK_NODES = ["AStarTextEncode", "AStarApply", "AStarKSampler", "AStarAttentionRecorder", "AStarAttentionOverlay"]


def test_server_lists_pack_nodes(server):
    info = server.get("/object_info")
    missing = [n for n in PACK_NODES if n not in info]
    assert not missing, f"pack nodes missing from /object_info: {missing}\n{server.log()[-3000:]}"
    inputs = info["AStarKSampler"]["input"]["required"]
    for name in ("seed", "steps", "cfg", "sampler_name", "scheduler", "positive", "negative", "latent_image", "denoise",
                 "concepts", "mode", "guidance_start", "guidance_end"):
        assert name in inputs, name
    for name, spec in inputs.items():
        assert spec[1].get("tooltip") if len(spec) > 1 else False, f"input {name} has no tooltip"


def test_server_runs_plain_sd15_graph(server, mini_ckpt):
    graph = sd15_graph(mini_ckpt, sampler="KSampler", steps=2)
    graph["neg"]["class_type"] = "CLIPTextEncode"
    entry = server.run(graph)
    images = entry["outputs"]["save"]["images"]
    assert len(images) == 1
    png = server.get(f"/view?filename={images[0]['filename']}&type=output&subfolder={images[0]['subfolder']}", raw=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


class _BackwardThroughUNet:
    """Test-only node: a gradient w.r.t. the latent through the loaded UNet, inside the executor."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "apply_fix": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, model, apply_fix, **kwargs):
        import comfy.model_management
        from support.host import InProcessHost  # noqa: F401  (the pack module is found via sys.modules)
        comfy.model_management.load_models_gpu([model])
        unet = model.model.diffusion_model
        if apply_fix:
            import sys
            pack = next(m for n, m in sys.modules.items() if n.endswith("astar_pack.nodes.autograd_weights"))
            pack.make_autograd_safe(model.model)
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.randn(1, 4, 8, 8, requires_grad=True)
            ctx = torch.randn(1, 77, 768)
            out = unet(x, torch.tensor([500.0]), context=ctx)
            (grad,) = torch.autograd.grad(out.square().mean(), x)
        return (float(grad.abs().sum()),)


def test_inference_mode_trap_and_fix(host, mini_ckpt):
    """Inside PromptExecutor a backward through checkpoint-loaded weights fails; the pack's fix cures it."""
    trap_name = "astar-test-trap.safetensors"  # a fresh loader entry: weights never touched by the fix
    ckpts = hosts.models_dir() / "checkpoints"
    if not (ckpts / trap_name).exists():
        shutil.copyfile(ckpts / mini_ckpt, ckpts / trap_name)
    host.nodes.NODE_CLASS_MAPPINGS["AStarTestBackward"] = _BackwardThroughUNet

    def graph(fix):
        return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": trap_name}},
                "bw": {"class_type": "AStarTestBackward", "inputs": {"model": ["ckpt", 0], "apply_fix": fix}},
                "out": {"class_type": "PreviewAny", "inputs": {"source": ["bw", 0]}}}

    with pytest.raises(hosts.GraphError, match="[Ii]nference tensors"):
        host.run(graph(False))
    out = host.run(graph(True))
    assert out["bw"][0] > 0
