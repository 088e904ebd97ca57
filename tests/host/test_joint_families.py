"""The joint-attention families beyond Flux.1 and SD3.5 (nodes/model_family.py's table), and the models
A-STAR refuses, through ComfyUI's loaders, text encoding and KSampler (execution.PromptExecutor).

Chroma: a random Chroma with 1 double + 1 single block at the real widths (Flux.1's blocks, hidden 3072,
24 heads of 128, context 4096, the 5-layer modulation approximator), written as raw diffusion-model keys and
loaded by UNETLoader (ComfyUI detects Chroma from the keys); its text encoder is ComfyUI's CLIPLoader
type "chroma" (PixArtTokenizer + pixart_te, T5-XXL alone, no padding) with a small random T5 of the exact
width. 64 px images: 4x4 image tokens. Chroma is not guidance-distilled: cfg 3, cond and uncond."""
from __future__ import annotations

import types

import pytest
import torch

from host.test_joint_attention import (GRID, BlockCounter, ListSink, QKCapture, check_example_outputs,
                                       check_lowered, check_records, guided_run, one_iteration, run_example)
from host.test_joint_attention import dit  # noqa: F401  (the module fixture of the test nodes)
from support import dit_models as D
from support import host as hosts
from support.graphs import guidance_settings
from support.joint_graphs import joint_graph, loaded_by_the_stock_loader, release, with_guidance

CHROMA_FILE = "astar-test-chroma-d1s1.safetensors"
PROMPT = "A Cat and a Frog"  # capitalised: T5 keeps case, the concepts are typed "cat, frog"
NEGATIVE = "blurry, low quality, ugly"  # as many T5 tokens as the prompt (8): cond and uncond share a batch


@pytest.fixture(scope="class")
def chroma(host, dit):
    D.build_chroma_checkpoint(hosts.models_dir() / "checkpoints" / CHROMA_FILE)
    dit["chroma_clip"] = D.chroma_clip(seed=0)
    yield dit
    release(host, dit, [k for k in list(dit) if k.startswith("chroma")])


def graph(*, hook=False, blocks="", capture="", sink="", text=PROMPT, steps=2, sampler="euler"):
    return joint_graph(CHROMA_FILE, "chroma_clip", text=text, negative=NEGATIVE, hook=hook, blocks=blocks,
                       capture=capture, sink=sink, steps=steps, sampler=sampler)


def guided_graph(steps=3, guided_steps=2, hook=False, capture="", sampler="euler", **settings):
    return with_guidance(graph(steps=steps, hook=hook, capture=capture, sampler=sampler), steps, guided_steps,
                         **settings)


def t5_ids(text):
    """Independent: transformers' T5 tokenization of `text` (the tokenizer files ComfyUI ships)."""
    from pathlib import Path
    from transformers import T5TokenizerFast
    import comfy.text_encoders.sd3_clip as sd3
    return T5TokenizerFast.from_pretrained(str(Path(sd3.__file__).parent / "t5_tokenizer"))(text)["input_ids"]


def span(ids, piece_ids):
    start = next(i for i in range(len(ids)) if ids[i:i + len(piece_ids)] == piece_ids)
    return tuple(range(start, start + len(piece_ids)))


def n_txt():
    return len(t5_ids(PROMPT))  # the prompt's tokens and the end token, no padding


class TestChroma:
    def test_loaded_by_the_stock_loader_hook_is_bit_identical_and_records_explicit_probabilities(self, host, chroma):
        from comfy.ldm.chroma.model import Chroma
        stock, model = loaded_by_the_stock_loader(host, graph(), "Chroma", "Chroma")
        net = model.model.diffusion_model
        assert type(net) is Chroma
        assert (len(net.double_blocks), len(net.single_blocks), net.hidden_size, net.num_heads) == (1, 1, 3072, 24)
        assert net.params.context_in_dim == 4096 and net.patch_size == 2
        assert hosts.pack_module("nodes.model_family").model_family(model) == "chroma"
        del model, net
        hooked = host.run(graph(hook=True))["sampler"][0]["samples"]  # default blocks, no sink
        assert torch.equal(stock, hooked)
        chroma["chroma_capture"], chroma["chroma_sink"] = QKCapture(n_txt=n_txt()), ListSink()
        recorded = host.run(graph(hook=True, blocks="double:all, single:all", capture="chroma_capture",
                                  sink="chroma_sink"))["sampler"][0]["samples"]
        assert torch.equal(stock, recorded)
        # cfg 3, cond and uncond in one batch: the records are the cond rows' explicit softmax
        assert all(len(c[3]) == 2 for c in chroma["chroma_capture"].calls)
        check_records(chroma["chroma_sink"], chroma["chroma_capture"], n_txt(), [("double", 0), ("single", 0)], steps=2)

    def test_concept_tokens_are_found_whatever_their_case(self, host, chroma):
        jt, tokens = hosts.pack_module("nodes.joint_tokens"), hosts.pack_module("attention.tokens")
        g = {"clip": {"class_type": "AStarTestClip", "inputs": {"name": "chroma_clip"}},
             "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
             "out": {"class_type": "PreviewAny", "inputs": {"source": ["pos", 0]}}}
        cond = host.run(g)["pos"][0]
        prompt = hosts.pack_module("nodes.prompt").prompt_tokens_of(cond)
        layout = jt.joint_token_layout(prompt, tokens.parse_concepts("cat, frog"), "chroma")
        ids = t5_ids(PROMPT)
        assert ids[-1] == 1 and cond[0][0].shape[1] == layout.n_tokens == len(ids)  # end token, no padding
        # the capitalised words' own pieces ("Frog" is two pieces, "frog" one)
        cat, frog = span(ids, t5_ids("Cat")[:-1]), span(ids, t5_ids("Frog")[:-1])
        assert t5_ids("cat")[:-1] != t5_ids("Cat")[:-1] and len(frog) == 2
        assert layout.groups == (cat, frog)
        assert layout.excluded == (len(ids) - 1,)
        with pytest.raises(ValueError, match=r"concept 'dog' is not in the prompt"):
            jt.joint_token_layout(prompt, tokens.parse_concepts("cat, dog"), "chroma")

    @pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
    def test_step_size_zero_is_the_stock_sampler_and_maps_are_recorded(self, host, chroma, sampler):
        stock = host.run(graph(steps=3, sampler=sampler))["sampler"][0]["samples"]
        latent, rec = guided_run(host, guided_graph(steps=3, guided_steps=2, sampler=sampler, step_size=0.0))
        assert torch.equal(stock, latent)
        assert rec.words == ["cat", "frog"] and rec.layers == [("double", 0)]  # the default: every double block
        maps = rec.maps()
        assert maps.shape == (3, 1, 1, 2) + GRID
        assert [s.step for s in rec.steps] == [0, 1, 2]

    @pytest.mark.parametrize("mode", ["astar", "attend_excite"])
    def test_one_update_lowers_the_loss_and_the_pass_stops_after_the_last_read_block(self, host, chroma, mode):
        name = f"chroma_count_{mode}"
        chroma[name] = counter = BlockCounter()
        _, rec = guided_run(host, guided_graph(steps=2, guided_steps=1, hook=True, capture=name, mode=mode,
                                               step_size=2.0, **one_iteration()))
        check_lowered(rec, 1, f"chroma {mode}")
        # both guidance passes stop once double block 0 is recorded, before the kernel under the hook runs
        assert [c for c in counter.calls if c[2]] == [], counter.calls

    def test_an_override_that_does_not_chain_is_an_error_at_the_first_guidance_pass(self, host, chroma, monkeypatch):
        """A node after A-STAR that replaces the attention override without calling A-STAR's: no attention call
        reaches the hook, and the run stops with an error saying so instead of sampling unguided."""
        import comfy.samplers
        steps_done = []
        real = comfy.samplers.KSAMPLER.sample
        monkeypatch.setattr(comfy.samplers.KSAMPLER, "sample",
                            lambda *a, **k: steps_done.append(1) or real(*a, **k))
        calls = []
        chroma["chroma_replacer"] = lambda func, *args, **kwargs: calls.append(1) or func(*args, **kwargs)
        g = guided_graph(steps=2, guided_steps=1, step_size=2.0)
        g["replace"] = {"class_type": "AStarTestReplaceOverride",
                        "inputs": {"model": ["apply", 0], "override": "chroma_replacer"}}
        g["sampler"]["inputs"]["model"] = ["replace", 0]
        with pytest.raises(hosts.GraphError, match="no attention call of this model reached ComfyUI's "
                                                   "optimized_attention_override"):
            host.run(g)
        assert calls, "the replacing override ran: the attention did reach an override, not A-STAR's"

    def test_a_lora_reaches_the_guidance_pass(self, host, chroma, tmp_path):
        """LoraLoaderModelOnly before A-STAR Apply: the guidance pass's losses equal those of a Chroma file with
        the LoRA merged into its weights here (each loaded alone by UNETLoader), and differ from the base's."""
        import safetensors.torch
        from support.models import merge_lora
        base_path = hosts.models_dir() / "checkpoints" / CHROMA_FILE
        lora_name, strength = "astar-test-chroma-d1s1-lora.safetensors", 0.8
        lora_path = D.build_joint_attention_lora(hosts.models_dir() / "loras" / lora_name, base_path, scale=2.0,
                                                 targets=D.FLUX_ATTENTION_WEIGHTS)
        merged, n_merged = merge_lora(safetensors.torch.load_file(str(base_path)),
                                      safetensors.torch.load_file(str(lora_path)), strength,
                                      lambda key: "lora_unet_" + key.removesuffix(".weight").replace(".", "_"))
        assert n_merged == 5  # img/txt qkv and proj of the double block, the single block's linear1
        merged_name = "astar-test-chroma-d1s1-merged-tmp.safetensors"
        merged_path = hosts.models_dir() / "checkpoints" / merged_name
        safetensors.torch.save_file({k: v.half() for k, v in merged.items()}, str(merged_path))
        del merged
        settings = dict(steps=2, guided_steps=1, step_size=2.0)

        def losses(rec):
            return rec.steps[0].losses["total"].detach().clone()

        try:
            _, base_rec = guided_run(host, guided_graph(**settings))
            g = guided_graph(**settings)
            g["lora"] = {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": ["model", 0], "lora_name": lora_name, "strength_model": strength}}
            g["apply"]["inputs"]["model"] = ["lora", 0]
            _, lora_rec = guided_run(host, g)
            release(host, chroma)  # never two Chroma models at once
            g = guided_graph(**settings)
            g["model"]["inputs"]["unet_name"] = merged_name
            _, merged_rec = guided_run(host, g)
        finally:
            release(host, chroma)
            merged_path.unlink(missing_ok=True)
        # the merged file is fp16 (as the LoRA patch casts to the model's dtype): 1e-3 relative
        torch.testing.assert_close(losses(lora_rec), losses(merged_rec), rtol=1e-3, atol=1e-6)
        assert ((losses(lora_rec) - losses(base_rec)).abs() > 1e-2 * losses(base_rec).abs()).all()

    def test_example_runs_headless(self, host, server, chroma):
        prompt, out = run_example(host, server, "astar_chroma", {
            "UNETLoader": {"inputs": {"unet_name": CHROMA_FILE, "weight_dtype": "default"}},
            "CLIPLoader": {"class_type": "AStarTestClip", "inputs": {"name": "chroma_clip"}}})
        check_example_outputs(prompt, out, layers=1)


# ------------------------------------------------------------------------------------------------
# Flux.2 Klein 4B (ComfyUI 0.19+)
# ------------------------------------------------------------------------------------------------

KLEIN_FILE = "astar-test-flux2-klein4b-d1s1.safetensors"
KLEIN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture(scope="class")
def klein(host, dit):
    import comfy.text_encoders.flux
    if not hasattr(comfy.text_encoders.flux, "KleinTokenizer"):
        pytest.skip("this ComfyUI has no Flux.2 Klein text encoder (ComfyUI 0.19+)")
    D.build_klein_checkpoint(hosts.models_dir() / "checkpoints" / KLEIN_FILE)
    dit["klein_clip"] = D.klein_clip(seed=0)
    yield dit
    release(host, dit, [k for k in list(dit) if k.startswith("klein")])


def klein_graph(*, hook=False, blocks="", capture="", sink="", steps=2, sampler="euler"):
    """Klein (distilled): cfg 1, one cond pass per step; 64 px -> a 4x4 latent of 128 channels, patch 1."""
    return joint_graph(KLEIN_FILE, "klein_clip", text=PROMPT, negative=NEGATIVE, latent="EmptyFlux2LatentImage",
                       cfg=1.0, hook=hook, blocks=blocks, capture=capture, sink=sink, steps=steps, sampler=sampler)


def klein_guided_graph(steps=3, guided_steps=2, hook=False, capture="", sampler="euler", **settings):
    return with_guidance(klein_graph(steps=steps, hook=hook, capture=capture, sampler=sampler), steps, guided_steps,
                         **settings)


def qwen_template_ids(text):
    """Independent: transformers' Qwen2 tokenization of the Klein chat template around `text`, as ComfyUI
    pads it (151643 up to 512 tokens); and the span of `text`'s own tokens found by decoding each prefix."""
    from pathlib import Path
    from transformers import Qwen2TokenizerFast
    import comfy.text_encoders.flux as flux_te
    tok = Qwen2TokenizerFast.from_pretrained(str(Path(flux_te.__file__).parent / "qwen25_tokenizer"))
    full = KLEIN_TEMPLATE.format(text)
    ids = tok(full)["input_ids"]
    enc = tok(full, return_offsets_mapping=True)
    start_char = full.index(text)
    span = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a >= start_char and b <= start_char + len(text)]
    return tok, ids + [151643] * (512 - len(ids)), (span[0], span[-1] + 1)


class TestFlux2Klein:
    def test_loaded_by_the_stock_loader_hook_is_bit_identical_and_records_explicit_probabilities(self, host, klein):
        stock, model = loaded_by_the_stock_loader(host, klein_graph(), "Flux2")
        net = model.model.diffusion_model
        assert (len(net.double_blocks), len(net.single_blocks), net.hidden_size, net.num_heads) == (1, 1, 3072, 24)
        assert net.params.context_in_dim == 7680 and net.patch_size == 1 and not net.params.guidance_embed
        assert hosts.pack_module("nodes.model_family").model_family(model) == "flux2_klein_4b"
        del model, net
        assert torch.equal(stock, host.run(klein_graph(hook=True))["sampler"][0]["samples"])
        klein["klein_capture"], klein["klein_sink"] = QKCapture(n_txt=512), ListSink()
        recorded = host.run(klein_graph(hook=True, blocks="double:all, single:all", capture="klein_capture",
                                        sink="klein_sink"))["sampler"][0]["samples"]
        assert torch.equal(stock, recorded)
        check_records(klein["klein_sink"], klein["klein_capture"], 512, [("double", 0), ("single", 0)], steps=2)

    def test_concept_tokens_inside_the_chat_template(self, host, klein):
        jt, tokens = hosts.pack_module("nodes.joint_tokens"), hosts.pack_module("attention.tokens")
        g = {"clip": {"class_type": "AStarTestClip", "inputs": {"name": "klein_clip"}},
             "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": PROMPT}},
             "out": {"class_type": "PreviewAny", "inputs": {"source": ["pos", 0]}}}
        cond = host.run(g)["pos"][0]
        prompt = hosts.pack_module("nodes.prompt").prompt_tokens_of(cond)
        layout = jt.joint_token_layout(prompt, tokens.parse_concepts("cat, frog"), "flux2_klein_4b")
        tok, ids, (lo, hi) = qwen_template_ids(PROMPT)
        assert prompt.ids["qwen3_4b"] == ids and cond[0][0].shape[1] == layout.n_tokens == 512
        names = tok.convert_ids_to_tokens(ids[lo:hi])
        assert names[0] == "A" and "ĠCat" in names and "ĠFrog" in names, names
        cat, frog = lo + names.index("ĠCat"), lo + names.index("ĠFrog")
        assert layout.groups == ((cat,), (frog,))
        # the template's tokens and the padding are left out of the token renormalisation
        assert layout.excluded == tuple(i for i in range(512) if not lo <= i < hi)
        # a word of the template is not a concept of the prompt
        with pytest.raises(ValueError, match=r"concept 'assistant' is not in the prompt"):
            jt.joint_token_layout(prompt, tokens.parse_concepts("cat, assistant"), "flux2_klein_4b")

    @pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
    def test_step_size_zero_is_the_stock_sampler_and_maps_are_recorded(self, host, klein, sampler):
        stock = host.run(klein_graph(steps=3, sampler=sampler))["sampler"][0]["samples"]
        latent, rec = guided_run(host, klein_guided_graph(steps=3, guided_steps=2, sampler=sampler, step_size=0.0))
        assert torch.equal(stock, latent)
        assert rec.words == ["cat", "frog"] and rec.layers == [("double", 0)]  # the default: every double block
        assert rec.maps().shape == (3, 1, 1, 2) + GRID
        assert [s.step for s in rec.steps] == [0, 1, 2]

    def test_example_runs_headless(self, host, server, klein):
        """astar_flux2_klein on the test models: UNETLoader, the small Qwen3 encoder in place of CLIPLoader,
        a random VAE of the Flux.2 layout (128-channel latents) in place of VAELoader's file."""
        import comfy.sd
        import comfy.utils
        path = D.build_vae_flux2(hosts.models_dir() / "vae" / "astar-test-vae-flux2.safetensors")
        klein["klein_vae"] = vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))  # as VAELoader loads it
        assert vae.latent_channels == 128
        prompt, out = run_example(host, server, "astar_flux2_klein", {
            "UNETLoader": {"inputs": {"unet_name": KLEIN_FILE, "weight_dtype": "default"}},
            "CLIPLoader": {"class_type": "AStarTestClip", "inputs": {"name": "klein_clip"}},
            "VAELoader": {"class_type": "AStarTestVAE", "inputs": {"name": "klein_vae"}}})
        check_example_outputs(prompt, out, layers=1)

    @pytest.mark.parametrize("single_pass", [False, True])
    def test_one_update_lowers_the_loss(self, host, klein, single_pass):
        name = f"klein_count_{single_pass}"
        klein[name] = counter = BlockCounter()
        _, rec = guided_run(host, klein_guided_graph(steps=2, guided_steps=1, hook=True, capture=name, step_size=2.0,
                                                     single_pass=single_pass, **one_iteration()))
        check_lowered(rec, 1, f"klein single_pass={single_pass}")
        if not single_pass:  # lean guidance passes: stopped once double block 0 is recorded
            assert [c for c in counter.calls if c[2]] == [], counter.calls


# ------------------------------------------------------------------------------------------------
# Models A-STAR cannot read: refused by the node, before sampling, with the reason
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_class, reason", [
    ("HiDream", "HiDream-I1's blocks put the image tokens first"),
    ("ErnieImage", "Ernie-Image: its attention calls ComfyUI.s optimized_attention without transformer_options"),
    ("ChromaRadiance", "Chroma Radiance works on pixels"),
    ("Flux2", "of Flux.2, A-STAR reads Klein 4B and 9B"),
])
def test_unreadable_models_are_refused_before_sampling(host, dit, model_class, reason):
    """A MODEL of ComfyUI's own class for such a model (an empty instance: the refusal reads only its class)
    through A-STAR Apply: the node raises, naming the model and the reason, before anything runs."""
    import comfy.model_base
    cls = getattr(comfy.model_base, model_class, None)
    if cls is None:
        pytest.skip(f"this ComfyUI has no {model_class} model")
    model = cls.__new__(cls)
    torch.nn.Module.__init__(model)  # an empty module of that class: no weights, no diffusion model
    patcher = types.SimpleNamespace(model=model, model_options={})
    dit[f"refused_{model_class}"] = patcher
    g = {"model": {"class_type": "AStarTestModel", "inputs": {"name": f"refused_{model_class}"}},
         "apply": {"class_type": "AStarApply", "inputs": {"model": ["model", 0],
                                                        **guidance_settings(guided_steps=1, steps=2)}},
         "out": {"class_type": "PreviewAny", "inputs": {"source": ["apply", 1]}}}
    with pytest.raises(hosts.GraphError, match=f"A-STAR cannot guide this model \\({model_class}\\): {reason}"):
        host.run(g)


def test_concepts_are_found_whatever_their_case_in_t5_contexts(host):
    """Flux (T5) and SD3 (CLIP-L/G + T5): "cat" is found in "A Cat and a Frog" with ComfyUI's own tokenizers;
    CLIP lowercases, T5 keeps case ("Cat" is another id, "Frog" two pieces), both name the same word."""
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    jt, tokens = hosts.pack_module("nodes.joint_tokens"), hosts.pack_module("attention.tokens")
    prompt_cls = hosts.pack_module("nodes.prompt").PromptTokens
    specs = tokens.parse_concepts("cat, frog")
    ids = t5_ids(PROMPT)
    cat, frog = span(ids, t5_ids("Cat")[:-1]), span(ids, t5_ids("Frog")[:-1])
    flux_tok = comfy.text_encoders.flux.FluxTokenizer()
    layout = jt.joint_token_layout(prompt_cls(PROMPT, flux_tok.tokenize_with_weights(PROMPT), flux_tok), specs, "flux")
    assert layout.groups == (cat, frog) and layout.n_tokens == 256
    sd3_tok = comfy.text_encoders.sd3_clip.SD3Tokenizer()
    layout = jt.joint_token_layout(prompt_cls(PROMPT, sd3_tok.tokenize_with_weights(PROMPT), sd3_tok), specs, "sd3")
    # CLIP: start token, "a", "cat", "and", "a", "frog" -> cat at 2, frog at 5; T5 after the 77 CLIP positions
    assert layout.groups == ((2,) + tuple(77 + p for p in cat), (5,) + tuple(77 + p for p in frog))
