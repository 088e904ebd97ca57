"""Qwen-Image (nodes/model_family.py's table) through ComfyUI's loaders, text encoding and KSampler.

A random Qwen-Image with 1 block at the real widths (24 heads of 128, context 3584, 64 input channels),
written as raw diffusion-model keys and loaded by UNETLoader (ComfyUI detects Qwen-Image from txt_norm); its
text encoder is ComfyUI's QwenImageTokenizer + te() (CLIPLoader type qwen_image) with a small random Qwen2.5 of
the exact width 3584. 64 px images: a [1, 16, 1, 8, 8] latent, 4x4 image tokens. Not distilled: cfg 3.

The template: the encoder drops the system turn and "<|im_start|>user\\n", so the context is the prompt's tokens
and "<|im_end|>\\n<|im_start|>assistant\\n" (5 tokens). A tokenizer min_length pads it (151643): the conditioning
then carries an attention mask, which ComfyUI 0.19+ hands to the attention as the fifth positional argument
(an additive float mask [B, 1, L]); 0.3.75's Qwen-Image does not pass it on (the padding takes part there).
"""
from __future__ import annotations

import pytest
import torch

from host.test_joint_attention import (GRID, BlockCounter, ListSink, QKCapture, check_example_outputs,
                                       check_lowered, check_records, guided_run, one_iteration, run_example)
from host.test_joint_families import dit  # noqa: F401  (the module fixture of the test nodes)
from support import dit_models as D
from support import host as hosts
from support.joint_graphs import joint_graph, loaded_by_the_stock_loader, release, with_guidance

QWEN_FILE = "astar-test-qwen-image-b1.safetensors"
PROMPT = "A Cat and a Frog"  # capitalised: the Qwen tokenizer keeps case, the concepts are typed "cat, frog"
NEGATIVE = "blurry, low quality, ugly"
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
            "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
            "<|im_start|>assistant\n")
PADDED = 64  # tokenizer min_length of the padded encoder: the whole template (45 tokens here) is shorter


@pytest.fixture(scope="class")
def qwen(host, dit):  # noqa: F811
    D.build_qwen_image_checkpoint(hosts.models_dir() / "checkpoints" / QWEN_FILE)
    dit["qwen_clip"] = clip = D.qwen_image_clip(seed=0)
    dit["qwen_clip_padded"] = padded = clip.clone()
    padded.set_tokenizer_option("qwen25_7b_min_length", PADDED)
    yield dit
    release(host, dit, [k for k in list(dit) if k.startswith("qwen")])


def graph(*, hook=False, blocks="", capture="", sink="", clip="qwen_clip", steps=2, sampler="euler"):
    return joint_graph(QWEN_FILE, clip, text=PROMPT, negative=NEGATIVE, hook=hook, blocks=blocks, capture=capture,
                       sink=sink, steps=steps, sampler=sampler)


def guided_graph(steps=3, guided_steps=2, hook=False, capture="", sampler="euler", clip="qwen_clip", **settings):
    return with_guidance(graph(steps=steps, hook=hook, capture=capture, sampler=sampler, clip=clip), steps,
                         guided_steps, **settings)


def template_ids(text, min_length=None):
    """Independent: transformers' Qwen2 tokenization of Qwen-Image's template around `text` (padded with 151643 to
    min_length); the index where the context starts (after "<|im_start|>user\\n", found from the characters); and
    the span of `text`'s own tokens, from the offsets."""
    from pathlib import Path
    from transformers import Qwen2TokenizerFast
    import comfy.text_encoders.qwen_image as qwen_te
    tok = Qwen2TokenizerFast.from_pretrained(str(Path(qwen_te.__file__).parent / "qwen25_tokenizer"))
    full = TEMPLATE.format(text)
    enc = tok(full, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    at = full.index(text)
    user_end = full.index("<|im_start|>user\n") + len("<|im_start|>user\n")
    start = next(i for i, (a, _) in enumerate(offsets) if a >= user_end)
    own = [i for i, (a, b) in enumerate(offsets) if a >= at and b <= at + len(text)]
    ids = ids + [151643] * max(0, (min_length or 0) - len(ids))
    return tok, ids, start, (own[0], own[-1] + 1)


class MaskCapture(QKCapture):
    """QKCapture that also keeps the attention mask of each joint call (the fifth positional argument, or mask=)."""

    def __call__(self, func, *args, **kwargs):
        n = len(self.calls)
        out = super().__call__(func, *args, **kwargs)
        if len(self.calls) > n:
            mask = args[4] if len(args) > 4 else kwargs.get("mask")
            self.calls[-1] = self.calls[-1] + (None if mask is None else mask.detach().clone(),)
        return out


def masked_text_probs(q, k, n_txt, mask):
    """softmax(q k^T / sqrt(d) + mask) over all keys (mask [B, 1, L] additive, as ComfyUI's kernels read a 3-dim
    mask: one row for every query and head), image rows x text columns, mean over heads."""
    logits = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits + mask.double().unsqueeze(1)
    return logits.softmax(-1)[:, :, n_txt:, :n_txt].mean(1)


def n_txt(min_length=None):
    _, ids, start, _ = template_ids(PROMPT, min_length)
    return len(ids) - start


class TestQwenImage:
    def test_loaded_by_the_stock_loader_hook_is_bit_identical_and_records_explicit_probabilities(self, host, qwen):
        from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
        stock, model = loaded_by_the_stock_loader(host, graph(), "QwenImage", "QwenImage")
        net = model.model.diffusion_model
        assert type(net) is QwenImageTransformer2DModel
        assert (len(net.transformer_blocks), net.inner_dim, net.transformer_blocks[0].attn.heads) == (1, 3072, 24)
        assert net.txt_in.weight.shape[1] == 3584 and net.patch_size == 2
        assert hosts.pack_module("nodes.model_family").model_family(model) == "qwen_image"
        del model, net
        assert torch.equal(stock, host.run(graph(hook=True))["sampler"][0]["samples"])  # default blocks, no sink
        qwen["qwen_capture"], qwen["qwen_sink"] = QKCapture(n_txt=n_txt()), ListSink()
        recorded = host.run(graph(hook=True, blocks="double:all", capture="qwen_capture",
                                  sink="qwen_sink"))["sampler"][0]["samples"]
        assert torch.equal(stock, recorded)
        check_records(qwen["qwen_sink"], qwen["qwen_capture"], n_txt(), [("double", 0)], steps=2)

    def test_a_padded_prompt_records_the_softmax_with_the_models_mask(self, host, qwen):
        """A min_length tokenizer pads the context: on ComfyUI 0.19+ the attention gets an additive mask (fifth
        positional argument) that takes the padding out of the softmax, and the records are that masked softmax,
        the padding's columns 0; on 0.3.75 the model passes no mask and the records are the plain softmax."""
        import comfy.ldm.qwen_image.model as qwen_model
        passes_mask = "attn_mask" in qwen_model.Attention.forward.__code__.co_varnames
        n, n_plain = n_txt(PADDED), n_txt()
        assert n > n_plain
        stock = host.run(graph(clip="qwen_clip_padded"))["sampler"][0]["samples"]
        qwen["qwen_mcapture"], qwen["qwen_msink"] = MaskCapture(n_txt=n), ListSink()
        recorded = host.run(graph(hook=True, blocks="double:all", capture="qwen_mcapture", sink="qwen_msink",
                                  clip="qwen_clip_padded"))["sampler"][0]["samples"]
        assert torch.equal(stock, recorded)
        sink = qwen["qwen_msink"]
        calls = [c for c in qwen["qwen_mcapture"].calls if 0 in c[3]]  # the negative is padded too: any batching
        assert len(sink.records) == len(calls) == 2
        for (key, probs, grid, _), (ckey, q, k, chunks, mask) in zip(sink.records, calls):
            assert key == ckey == ("double", 0) and grid == GRID
            size = q.shape[0] // len(chunks)
            rows = slice(chunks.index(0) * size, (chunks.index(0) + 1) * size)
            q, k = q[rows], k[rows]
            if not passes_mask:
                assert mask is None
                torch.testing.assert_close(probs.double(), masked_text_probs(q, k, n, None), rtol=1e-4, atol=1e-6)
                continue
            mask = mask[rows]
            assert mask.shape == (size, 1, n + GRID[0] * GRID[1]), mask.shape
            assert (mask[:, 0, n_plain:n] < -1e4).all() and (mask[:, 0, :n_plain] == 0).all()
            want = masked_text_probs(q, k, n, mask)
            torch.testing.assert_close(probs.double(), want, rtol=1e-4, atol=1e-6)
            assert probs[..., n_plain:].abs().max() < 1e-12
            # the mask matters: without it the padding takes a share and every other column is smaller
            assert (masked_text_probs(q, k, n, None) - want).abs().max() > 1e-2
        # the token layout covers the padded context; the padding is left out of the token renormalisation
        jt, tokens = hosts.pack_module("nodes.joint_tokens"), hosts.pack_module("attention.tokens")
        g = {"clip": {"class_type": "AStarTestClip", "inputs": {"name": "qwen_clip_padded"}},
             "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
             "out": {"class_type": "PreviewAny", "inputs": {"source": ["pos", 0]}}}
        cond = host.run(g)["pos"][0]
        layout = jt.joint_token_layout(hosts.pack_module("nodes.prompt").prompt_tokens_of(cond),
                                       tokens.parse_concepts("cat, frog"), "qwen_image")
        assert cond[0][0].shape[1] == layout.n_tokens == n and cond[0][1]["attention_mask"].shape == (1, n)
        assert set(range(n_plain, n)) <= set(layout.excluded)

    def test_concept_tokens_inside_the_chat_template(self, host, qwen):
        jt, tokens = hosts.pack_module("nodes.joint_tokens"), hosts.pack_module("attention.tokens")
        g = {"clip": {"class_type": "AStarTestClip", "inputs": {"name": "qwen_clip"}},
             "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
             "out": {"class_type": "PreviewAny", "inputs": {"source": ["pos", 0]}}}
        cond = host.run(g)["pos"][0]
        prompt = hosts.pack_module("nodes.prompt").prompt_tokens_of(cond)
        layout = jt.joint_token_layout(prompt, tokens.parse_concepts("cat, frog"), "qwen_image")
        tok, ids, start, (lo, hi) = template_ids(PROMPT)
        assert prompt.ids["qwen25_7b"] == ids
        # ComfyUI's encoder output is the context from `start` on: the prompt and the 5 tokens after it
        assert cond[0][0].shape[1] == layout.n_tokens == len(ids) - start and lo == start and hi == len(ids) - 5
        names = tok.convert_ids_to_tokens(ids[lo:hi])
        assert names[0] == "A" and "ĠCat" in names and "ĠFrog" in names, names
        cat, frog = names.index("ĠCat"), names.index("ĠFrog")  # context positions: the prompt starts it
        assert layout.groups == ((cat,), (frog,))
        assert layout.excluded == tuple(range(hi - start, len(ids) - start))
        # words of the template (the dropped system turn, the kept assistant turn) are not concepts of the prompt
        for word in ("describe", "assistant"):
            with pytest.raises(ValueError, match=rf"concept '{word}' is not in the prompt"):
                jt.joint_token_layout(prompt, tokens.parse_concepts(f"cat, {word}"), "qwen_image")

    def test_step_size_zero_is_the_stock_sampler_and_maps_are_recorded(self, host, qwen):
        stock = host.run(graph(steps=3))["sampler"][0]["samples"]
        latent, rec = guided_run(host, guided_graph(steps=3, guided_steps=2, step_size=0.0))
        assert torch.equal(stock, latent)
        assert rec.words == ["cat", "frog"] and rec.layers == [("double", 0)]  # the default: every block
        assert rec.maps().shape == (3, 1, 1, 2) + GRID
        assert [s.step for s in rec.steps] == [0, 1, 2]

    @pytest.mark.parametrize("mode, clip", [("astar", "qwen_clip"), ("attend_excite", "qwen_clip"),
                                            ("astar", "qwen_clip_padded")])  # padded: the mask in the guidance pass
    def test_one_update_lowers_the_loss_and_the_pass_stops_after_the_last_read_block(self, host, qwen, mode, clip):
        name = f"qwen_count_{mode}_{clip}"
        qwen[name] = counter = BlockCounter()
        _, rec = guided_run(host, guided_graph(steps=2, guided_steps=1, hook=True, capture=name, mode=mode, clip=clip,
                                               step_size=2.0, **one_iteration()))
        check_lowered(rec, 1, f"qwen-image {mode} {clip}")
        # both guidance passes stop once block 0 is recorded, before the kernel under the hook runs
        assert [c for c in counter.calls if c[2]] == [], counter.calls

    def test_example_runs_headless(self, host, server, qwen):
        """astar_qwen_image on the test models: UNETLoader, the small Qwen2.5 encoder in place of CLIPLoader, a
        narrow random Wan 2.1 VAE (Qwen-Image's VAE layout) in place of VAELoader's file."""
        import comfy.sd
        import comfy.utils
        path = D.build_vae_wan21(hosts.models_dir() / "vae" / "astar-test-vae-wan21.safetensors")
        qwen["qwen_vae"] = vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))  # as VAELoader loads it
        assert vae.latent_channels == 16 and vae.latent_dim == 3
        prompt, out = run_example(host, server, "astar_qwen_image", {
            "UNETLoader": {"inputs": {"unet_name": QWEN_FILE, "weight_dtype": "default"}},
            "CLIPLoader": {"class_type": "AStarTestClip", "inputs": {"name": "qwen_clip"}},
            "VAELoader": {"class_type": "AStarTestVAE", "inputs": {"name": "qwen_vae"}}})
        check_example_outputs(prompt, out, layers=1)
