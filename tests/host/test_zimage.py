"""Z-Image (Turbo) through ComfyUI's loaders, text encoding and KSampler (execution.PromptExecutor).

A random Z-Image (NextDiT) at the real widths (dim 3840, 30 heads of 128, caption features 2560) with its 2
context-refiner and 2 noise-refiner layers and 2 main layers, loaded by UNETLoader (ComfyUI detects Z-Image
from the keys); its text encoder is ComfyUI's ZImageTokenizer (Qwen3 chat template, no padding) with a small
random Qwen3 of width 2560. 64 px images: 4x4 image tokens, padded by the model with learned tokens to 32;
the 13 text tokens of the templated prompt are padded to 32 too. Every forward pass calls attention 6 times:
the 2 context-refiner calls (the 32 text slots alone), the 2 noise-refiner calls (the 32 image slots alone),
then the 2 main layers on [32 text slots, 32 image slots]. Turbo is distilled: cfg 1, one cond pass per step.
"""
from __future__ import annotations

import pytest
import torch

from host.test_joint_attention import (GRID, ListSink, check_example_outputs, check_lowered,
                                       guided_run, one_iteration, run_example)
from host.test_joint_families import dit  # noqa: F401  (the test nodes' fixture)
from support import dit_models as D
from support import host as hosts
from support.graphs import guidance_settings
from support.joint_graphs import joint_graph, loaded_by_the_stock_loader, release, with_guidance

ZIMAGE_FILE = "astar-test-zimage-l2.safetensors"
PROMPT = "A Cat and a Frog"  # capitalised: Qwen's BPE keeps case, the concepts are typed "cat, frog"
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
N_TXT = 13  # the templated prompt's Qwen3 tokens (checked against transformers' tokenizer below)
SLOTS = 32  # NextDiT pads the text and the image tokens each to a multiple of 32
N_IMG = GRID[0] * GRID[1]
LAYERS = [("double", 0), ("double", 1)]


@pytest.fixture(scope="class")
def zimage(host, dit):  # noqa: F811
    import comfy.supported_models
    if not hasattr(comfy.supported_models, "ZImage"):
        pytest.skip("this ComfyUI has no Z-Image model")
    D.build_zimage_checkpoint(hosts.models_dir() / "checkpoints" / ZIMAGE_FILE)
    dit["zimage_clip"] = D.zimage_clip(seed=0)
    yield dit
    release(host, dit, [k for k in list(dit) if k.startswith("zimage")])


def graph(*, hook=False, blocks="", capture="", sink="", steps=2, sampler="euler"):
    return joint_graph(ZIMAGE_FILE, "zimage_clip", text=PROMPT, cfg=1.0, hook=hook, blocks=blocks, capture=capture,
                       sink=sink, steps=steps, sampler=sampler)


def guided_graph(steps=3, guided_steps=2, hook=False, capture="", sampler="euler", **settings):
    return with_guidance(graph(steps=steps, hook=hook, capture=capture, sampler=sampler), steps, guided_steps,
                         **settings)


class CallCapture:
    """A test override (the pack's hook chains to it): keeps the length, q and k of every attention call of
    the model, refiners included, the block index ComfyUI put in transformer_options (None where it puts
    none: every call in ComfyUI 0.3.75), and whether autograd was on (a guidance pass)."""

    def __init__(self):
        self.calls = []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, *args, **kwargs):
        options = kwargs["transformer_options"]
        q, k = args[0], args[1]
        self.calls.append((q.shape[2], options.get("block_index"), q.detach().clone(), k.detach().clone(),
                           torch.is_grad_enabled()))
        return func(*args, **kwargs)


def explicit_probs(q, k):
    """Independent: softmax(q k^T / sqrt(d)) over all 64 keys (the padding slots take part, as in the model),
    the 16 image rows (after the 32 text slots) x the 13 prompt-template columns, mean over heads."""
    logits = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    return logits.softmax(-1)[:, :, SLOTS:SLOTS + N_IMG, :N_TXT].mean(1)


def qwen_template_ids(text):
    """Independent: transformers' Qwen2 tokenization of Z-Image's chat template around `text` (no padding), and
    the span of `text`'s own tokens found from the character offsets."""
    from pathlib import Path
    from transformers import Qwen2TokenizerFast
    import comfy.text_encoders.z_image as z_te
    tok = Qwen2TokenizerFast.from_pretrained(str(Path(z_te.__file__).parent / "qwen25_tokenizer"))
    full = TEMPLATE.format(text)
    enc = tok(full, return_offsets_mapping=True)
    start = full.index(text)
    span = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a >= start and b <= start + len(text)]
    return tok, enc["input_ids"], (span[0], span[-1] + 1)


class TestZImage:
    def test_loaded_by_the_stock_loader_hook_is_bit_identical_and_records_explicit_probabilities(self, host, zimage):
        from comfy.ldm.lumina.model import NextDiT
        stock, model = loaded_by_the_stock_loader(host, graph(), "Lumina2", "ZImage")
        net = model.model.diffusion_model
        assert type(net) is NextDiT
        assert (len(net.layers), len(net.context_refiner), len(net.noise_refiner), net.dim) == (2, 2, 2, 3840)
        assert net.cap_embedder[-1].in_features == 2560 and net.pad_tokens_multiple == SLOTS and net.patch_size == 2
        assert hosts.pack_module("nodes.model_family").model_family(model) == "zimage"
        del model, net
        assert torch.equal(stock, host.run(graph(hook=True))["sampler"][0]["samples"])  # default blocks, no sink
        zimage["zimage_capture"], zimage["zimage_sink"] = capture, sink = CallCapture(), ListSink()
        recorded = host.run(graph(hook=True, blocks="double:all", capture="zimage_capture",
                                  sink="zimage_sink"))["sampler"][0]["samples"]
        assert torch.equal(stock, recorded)
        # per pass: context refiner x2 (text slots), noise refiner x2 (image slots), the 2 main layers (joint)
        assert [c[0] for c in capture.calls] == [SLOTS] * 4 + [2 * SLOTS] * 2 + [SLOTS] * 4 + [2 * SLOTS] * 2
        joint = [c for c in capture.calls if c[0] == 2 * SLOTS]
        assert [c[1] for c in joint] in ([None] * 4, [0, 1, 0, 1])  # 0.3.75: no block index; 0.19: the layer
        # only the main layers are read, each record the explicit softmax of that layer's q and k
        assert [(r[0], r[3]) for r in sink.records] == [(key, step) for step in range(2) for key in LAYERS]
        for (key, probs, grid, step), (_, _, q, k, _) in zip(sink.records, joint):
            assert grid == GRID and probs.shape == (1, N_IMG, N_TXT) and probs.dtype == torch.float32
            torch.testing.assert_close(probs.double(), explicit_probs(q, k), rtol=1e-4, atol=1e-6)

    def test_concept_tokens_inside_the_chat_template(self, host, zimage):
        jt, tokens = hosts.pack_module("nodes.joint_tokens"), hosts.pack_module("attention.tokens")
        g = {"clip": {"class_type": "AStarTestClip", "inputs": {"name": "zimage_clip"}},
             "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
             "out": {"class_type": "PreviewAny", "inputs": {"source": ["pos", 0]}}}
        cond = host.run(g)["pos"][0]
        prompt = hosts.pack_module("nodes.prompt").prompt_tokens_of(cond)
        layout = jt.joint_token_layout(prompt, tokens.parse_concepts("cat, frog"), "zimage")
        tok, ids, (lo, hi) = qwen_template_ids(PROMPT)
        assert prompt.ids["qwen3_4b"] == ids and cond[0][0].shape[1] == layout.n_tokens == len(ids) == N_TXT
        names = tok.convert_ids_to_tokens(ids[lo:hi])
        assert names[0] == "A" and "ĠCat" in names and "ĠFrog" in names, names
        assert layout.groups == ((lo + names.index("ĠCat"),), (lo + names.index("ĠFrog"),))
        # the template's tokens are left out of the token renormalisation (the model's padding slots never
        # reach the records: the first test)
        assert layout.excluded == tuple(i for i in range(N_TXT) if not lo <= i < hi)
        with pytest.raises(ValueError, match=r"concept 'assistant' is not in the prompt"):
            jt.joint_token_layout(prompt, tokens.parse_concepts("cat, assistant"), "zimage")

    def test_step_size_zero_is_the_stock_sampler_and_maps_are_recorded(self, host, zimage):
        stock = host.run(graph(steps=2))["sampler"][0]["samples"]
        latent, rec = guided_run(host, guided_graph(steps=2, guided_steps=1, step_size=0.0))
        assert torch.equal(stock, latent)
        assert rec.words == ["cat", "frog"] and rec.layers == LAYERS  # the default: every main layer
        assert rec.maps().shape == (2, 2, 1, 2) + GRID
        assert [s.step for s in rec.steps] == [0, 1]

    @pytest.mark.parametrize("mode", ["astar", "attend_excite"])
    def test_one_update_lowers_the_loss_and_the_pass_stops_after_the_last_read_block(self, host, zimage, mode):
        name = f"zimage_count_{mode}"
        zimage[name] = counter = CallCapture()
        _, rec = guided_run(host, guided_graph(steps=2, guided_steps=1, hook=True, capture=name, mode=mode,
                                               step_size=2.0, joint_blocks="double:0", **one_iteration()))
        check_lowered(rec, 1, f"zimage {mode}")
        assert rec.layers == [("double", 0)]
        # the two lean guidance passes (before and after the update) read layer 0 only: each runs the 4 refiner
        # calls and stops at layer 0, before its kernel (under the hook) runs; the sampler's passes run all 6
        grad = [c[0] for c in counter.calls if c[4]]
        assert grad == [SLOTS] * 8, grad
        assert len(counter.calls) - len(grad) == 2 * 6

    def test_reference_latents_are_an_error_not_a_misread_map(self, host, zimage):
        """ComfyUI 0.19's NextDiT puts the tokens of reference latents (ReferenceLatent on the prompt, Z-Image Omni)
        before the prompt's: a guided run with them stops with an error saying so (0.3.75 ignores them)."""
        import inspect
        from comfy.ldm.lumina.model import NextDiT
        if "ref_latents" not in inspect.signature(NextDiT._forward).parameters:
            pytest.skip("this ComfyUI's Z-Image takes no reference latents")
        g = guided_graph(steps=2, guided_steps=1, step_size=2.0)
        g["ref"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["pos", 0], "latent": ["latent", 0]}}
        g["sampler"]["inputs"]["positive"] = ["ref", 0]
        with pytest.raises(hosts.GraphError, match=r"cannot guide this Z-Image run: reference latents .* put their own "
                                                   r"caption and image tokens before the prompt's"):
            host.run(g)

    def test_example_runs_headless(self, host, server, zimage):
        prompt, out = run_example(host, server, "astar_zimage", {
            "UNETLoader": {"inputs": {"unet_name": ZIMAGE_FILE, "weight_dtype": "default"}},
            "CLIPLoader": {"class_type": "AStarTestClip", "inputs": {"name": "zimage_clip"}}})
        check_example_outputs(prompt, out, layers=2)


@pytest.mark.parametrize("model_class, reason", [
    ("Lumina2", "of ComfyUI's Lumina 2 models, A-STAR reads Z-Image"),
    ("ZImagePixelSpace", "Z-Image pixel space works on pixels"),
])
def test_other_lumina2_models_are_refused_before_sampling(host, dit, model_class, reason):  # noqa: F811
    """A Lumina2-class model without Z-Image's Qwen3-4B caption width (Lumina Image 2.0, NewBie), and Z-Image's
    pixel-space variant: A-STAR Apply raises, naming the model and the reason, before anything runs."""
    import types
    import comfy.model_base
    cls = getattr(comfy.model_base, model_class, None)
    if cls is None:
        pytest.skip(f"this ComfyUI has no {model_class} model")
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)  # an empty module of that class: no diffusion model, no caption width
    dit[f"refused_{model_class}"] = types.SimpleNamespace(model=model, model_options={})
    g = {"model": {"class_type": "AStarTestModel", "inputs": {"name": f"refused_{model_class}"}},
         "apply": {"class_type": "AStarApply", "inputs": {"model": ["model", 0],
                                                        **guidance_settings(guided_steps=1, steps=2)}},
         "out": {"class_type": "PreviewAny", "inputs": {"source": ["apply", 1]}}}
    with pytest.raises(hosts.GraphError, match=f"A-STAR cannot guide this model \\({model_class}\\): {reason}"):
        host.run(g)
