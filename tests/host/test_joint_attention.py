"""Joint-attention recording on Flux.1 and SD3.5 (nodes/joint_attention.py, nodes/joint_tokens.py),
through ComfyUI's loaders, text encoding and KSampler (execution.PromptExecutor).

Models: tests/support/dit_models.py (random Flux.1-dev with 1 double + 1 single block, loaded by
UNETLoader; random SD3.5-Medium-width MMDiT with 3 joint blocks; small random text encoders behind
ComfyUI's real tokenizers). 64 px images: Flux 4x4 image tokens + 256 T5 tokens; SD3 4x4 image
tokens + 77 CLIP + 77 T5 tokens."""
from __future__ import annotations

import pytest
import torch

from support import dit_models as D
from support import dit_nodes
from support import host as hosts

FLUX_FILE = "astar-test-flux1-dev-d1s1.safetensors"
PROMPT = "a cat and a frog"
GRID = (4, 4)  # 64 px -> 8x8 latent -> 2x2 patches


class QKCapture:
    """A test override (installed before the pack's hook, which chains to it): keeps q and k of every
    joint call with its block, found independently of the hook (Flux: ComfyUI's block_type/index;
    SD3: joint calls counted modulo the block count), and the cond/uncond order of the batch."""

    def __init__(self, n_txt: int, n_blocks: int | None = None):
        self.n_txt, self.n_blocks = n_txt, n_blocks
        self.calls, self.seen = [], 0

    def __call__(self, func, *args, **kwargs):
        options = kwargs["transformer_options"]
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        if not kwargs.get("skip_reshape", False):
            q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
        if q.shape[2] == self.n_txt + GRID[0] * GRID[1]:
            if self.n_blocks is None:
                key = (options["block_type"], options["block_index"])
            else:
                key, self.seen = ("joint", self.seen % self.n_blocks), self.seen + 1
            self.calls.append((key, q.detach().clone(), k.detach().clone(), list(options["cond_or_uncond"])))
        return func(*args, **kwargs)


class ListSink:
    def __init__(self):
        self.records = []

    def record(self, key, probs, grid_hw, step, **kwargs):
        self.records.append((key, probs.detach().clone(), tuple(grid_hw), step))


def explicit_text_probs(q, k, n_txt):
    """softmax(q k^T / sqrt(d)) over all keys, image rows x text columns, mean over heads."""
    logits = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    return logits.softmax(-1)[:, :, n_txt:, :n_txt].mean(1)


@pytest.fixture(scope="module")
def dit(host):
    objects = {}
    ids = dit_nodes.register(host.nodes, objects, hosts.pack_module("nodes.joint_attention"))
    yield objects
    dit_nodes.unregister(host.nodes, ids)
    objects.clear()


def _release(host, objects, names):
    """Drop one family's models before the next family's are built (the machine is small)."""
    import gc
    import comfy.model_management
    for name in names:
        objects.pop(name, None)
    host.executor.reset()
    comfy.model_management.unload_all_models()
    gc.collect()


@pytest.fixture(scope="class")
def flux(host, dit):
    D.build_flux_checkpoint(hosts.models_dir() / "checkpoints" / FLUX_FILE)
    dit["flux_clip"] = D.flux_clip(seed=0)
    yield dit
    _release(host, dit, ["flux_clip", "flux_capture", "flux_sink"])


@pytest.fixture(scope="class")
def sd35(host, dit):
    path = D.build_sd35_checkpoint(hosts.models_dir() / "dit" / "astar-test-sd35m-b3.safetensors")
    dit["sd35"] = D.load_sd35_model(path)
    dit["sd35_clip"] = D.sd35_clip(seed=0)
    yield dit
    _release(host, dit, ["sd35", "sd35_clip", "sd35_capture", "sd35_sink"])


def graph(family, *, hook=False, blocks="", capture="", sink="", installs=1, text=PROMPT, steps=2):
    if family == "flux":
        model = {"class_type": "UNETLoader", "inputs": {"unet_name": FLUX_FILE, "weight_dtype": "default"}}
        clip, cfg = "flux_clip", 1.0  # Flux dev: cfg 1, one (cond) pass per step
    else:
        model = {"class_type": "AStarTestModel", "inputs": {"name": "sd35"}}
        clip, cfg = "sd35_clip", 3.0  # cond and uncond in one batch
    g = {
        "model": model,
        "clip": {"class_type": "AStarTestClip", "inputs": {"name": clip}},
        "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "blurry"}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    source = ["model", 0]
    if hook:
        g["hook"] = {"class_type": "AStarTestJointHook", "inputs": {"model": source, "blocks": blocks, "capture": capture,
                                                                   "sink": sink, "installs": installs}}
        source = ["hook", 0]
    g["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": source, "seed": 3, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    g["out"] = {"class_type": "PreviewAny", "inputs": {"source": ["sampler", 0]}}
    return g


def sampled(host, g):
    """The sampled latent. Each run of a test differs from the previous one in some node input, so
    ComfyUI re-runs the sampler but keeps the loaded model (one copy of the Flux weights in memory)."""
    return host.run(g)["sampler"][0]["samples"]


def check_records(sink, capture, n_txt, blocks, steps):
    """Every recorded block of every step equals the explicit softmax of the cond chunk's q and k."""
    calls = [c for c in capture.calls if c[0] in blocks]
    assert len(sink.records) == len(calls) == len(blocks) * steps, (len(sink.records), len(calls))
    for (key, probs, grid, step), (ckey, q, k, chunks) in zip(sink.records, calls):
        assert key == ckey and grid == GRID
        cond = chunks.index(0)
        size = q.shape[0] // len(chunks)
        rows = slice(cond * size, (cond + 1) * size)
        want = explicit_text_probs(q[rows], k[rows], n_txt)
        assert probs.shape == (size, GRID[0] * GRID[1], n_txt) and probs.dtype == torch.float32
        torch.testing.assert_close(probs.double(), want, rtol=1e-4, atol=1e-6)
        if len(chunks) > 1:  # the uncond chunk's maps differ: picking the cond rows matters
            other = slice((1 - cond) * size, (2 - cond) * size)
            assert (explicit_text_probs(q[other], k[other], n_txt) - want).abs().max() > 1e-3
    assert [r[3] for r in sink.records] == [s for s in range(steps) for _ in blocks]


def test_default_blocks_and_block_errors(host):
    ja = hosts.pack_module("nodes.joint_attention")
    assert ja.parse_blocks(ja.DEFAULT_BLOCKS["flux"], {"double": 19, "single": 38}) == tuple(("double", i) for i in range(19))
    assert ja.parse_blocks(ja.DEFAULT_BLOCKS["sd3"], {"joint": 24}) == tuple(("joint", i) for i in range(4, 17))
    assert ja.parse_blocks("single:36-40, double:18", {"double": 19, "single": 38}) == \
        (("double", 18), ("single", 36), ("single", 37))
    with pytest.raises(ValueError, match="select no block of this model, which has 3 joint blocks"):
        ja.parse_blocks(ja.DEFAULT_BLOCKS["sd3"], {"joint": 3})
    with pytest.raises(ValueError, match="'triple:0' is not understood.*double, single"):
        ja.parse_blocks("triple:0", {"double": 19, "single": 38})
    with pytest.raises(ValueError, match="reversed"):
        ja.parse_blocks("joint:9-4", {"joint": 24})

    class NotDiT:
        model = type("M", (), {"diffusion_model": torch.nn.Linear(1, 1)})()
    with pytest.raises(ValueError, match="need a Flux or SD3/SD3.5 model.*Linear"):
        ja.add_joint_attention_hook(NotDiT())


def encoded_prompt(host, family, text):
    clip = "flux_clip" if family == "flux" else "sd35_clip"
    g = {"clip": {"class_type": "AStarTestClip", "inputs": {"name": clip}},
         "pos": {"class_type": "AStarTextEncode", "inputs": {"clip": ["clip", 0], "text": text}},
         "out": {"class_type": "PreviewAny", "inputs": {"source": ["pos", 0]}}}
    conditioning = host.run(g)["pos"][0]
    return conditioning, hosts.pack_module("nodes.prompt").prompt_tokens_of(conditioning)


def t5_positions(text, word):
    """Independent: the word's sub-tokens found in transformers' T5 tokenization of the prompt."""
    from pathlib import Path
    from transformers import T5TokenizerFast
    import comfy.text_encoders.sd3_clip as sd3
    tok = T5TokenizerFast.from_pretrained(str(Path(sd3.__file__).parent / "t5_tokenizer"))
    ids, pattern = tok(text)["input_ids"], tok(word)["input_ids"][:-1]
    start = next(i for i in range(len(ids)) if ids[i:i + len(pattern)] == pattern)
    return list(range(start, start + len(pattern))), len(ids) - 1  # positions, end token position


def layout_of(host, family, concepts="cat, frog"):
    jt, tokens = hosts.pack_module("nodes.joint_tokens"), hosts.pack_module("attention.tokens")
    cond, prompt = encoded_prompt(host, family, PROMPT)
    return cond, jt.joint_token_layout(prompt, tokens.parse_concepts(concepts), family)


def check_missing_word(host, family):
    with pytest.raises(ValueError, match=r"concept 'dog' is not in the prompt\. The prompt's tokens are: .*cat"):
        layout_of(host, family, "cat, dog")


class TestFlux:
    def test_hook_is_bit_identical_and_records_explicit_probabilities(self, host, flux):
        import comfy.supported_models
        from comfy.ldm.flux.model import Flux
        outputs = host.run(graph("flux"), fresh=True)
        stock = outputs["sampler"][0]["samples"]
        model = outputs["model"][0]  # as UNETLoader loaded the file: detected as Flux, blocks counted
        net = model.model.diffusion_model
        assert type(model.model.model_config) is comfy.supported_models.Flux and isinstance(net, Flux)
        assert (len(net.double_blocks), len(net.single_blocks), net.hidden_size, net.num_heads) == (1, 1, 3072, 24)
        assert net.params.guidance_embed and net.params.context_in_dim == 4096 and net.in_channels == 64
        del outputs, model, net
        hooked = sampled(host, graph("flux", hook=True))  # default blocks, no sink: nothing recorded
        assert torch.equal(stock, hooked)
        flux["flux_capture"], flux["flux_sink"] = QKCapture(n_txt=256), ListSink()
        recorded = sampled(host, graph("flux", hook=True, blocks="double:all, single:all", capture="flux_capture",
                                       sink="flux_sink"))
        assert torch.equal(stock, recorded)  # recording never changes the output
        check_records(flux["flux_sink"], flux["flux_capture"], 256, [("double", 0), ("single", 0)], steps=2)

    def test_concept_tokens(self, host, flux):
        cond, layout = layout_of(host, "flux")
        (cat, end), (frog, _) = t5_positions(PROMPT, "cat"), t5_positions(PROMPT, "frog")
        assert layout.n_tokens == cond[0][0].shape[1] == 256
        assert layout.groups == (tuple(cat), tuple(frog))
        assert layout.excluded == tuple(range(end, 256))  # end token and padding
        layout.check_context(256)
        layout.check_context(512)  # a context ComfyUI repeated to a longer negative's length
        check_missing_word(host, "flux")

    def test_maps_from_records_follow_the_token_layout(self, host, flux):
        """The sink of attention/joint.py turns records into concept maps over the layout's tokens."""
        joint = hosts.pack_module("attention.joint")
        _, layout = layout_of(host, "flux")
        sink = flux.get("flux_sink")  # the records of the recording test above (same prompt)
        if sink is None or not sink.records:
            pytest.skip("needs the Flux recording test's records")
        capture = joint.JointCapture(n_tokens=layout.n_tokens)
        for key, probs, grid, step in sink.records[:2]:  # step 0: double 0 and single 0
            capture.record(key, probs, grid, step)
        maps = capture.concept_maps(layout.groups, layout.excluded, smoothing=False)
        mean = (sink.records[0][1] + sink.records[1][1]).double() / 2
        keep = [i for i in range(256) if i not in layout.excluded]
        soft = torch.softmax(100 * mean[..., keep], -1)
        want = torch.stack([soft[..., [keep.index(p) for p in g]].sum(-1) for g in layout.groups], 1)
        torch.testing.assert_close(maps.double(), want.reshape(1, 2, *GRID), rtol=1e-5, atol=1e-6)


class GraphQKCapture(QKCapture):
    """QKCapture that keeps q and k attached to the autograd graph."""

    def __call__(self, func, *args, **kwargs):
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        q, k = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in args[:2])
        if q.shape[2] == self.n_txt + GRID[0] * GRID[1]:
            self.calls.append((("joint", self.seen % self.n_blocks), q, k, [0]))
            self.seen += 1
        return func(*args, **kwargs)


class TestSD35:
    def test_hook_is_bit_identical_and_records_explicit_probabilities(self, host, sd35):
        import comfy.supported_models
        net = sd35["sd35"].model.diffusion_model
        assert type(sd35["sd35"].model.model_config) is comfy.supported_models.SD3
        assert (len(net.joint_blocks), net.hidden_size, net.joint_blocks[0].x_block.attn.num_heads) == (3, 1536, 24)
        assert [b.x_block.x_block_self_attn for b in net.joint_blocks] == [True, True, False]
        host.executor.reset()
        stock = sampled(host, graph("sd3"))
        hooked = sampled(host, graph("sd3", hook=True, blocks="joint:all"))
        assert torch.equal(stock, hooked)
        # blocks 0 and 1 have SD3.5 Medium's extra image-only self-attention: its calls are not counted;
        # the hook is installed twice (the second replaces the first: no double records)
        sd35["sd35_capture"], sd35["sd35_sink"] = QKCapture(n_txt=154, n_blocks=3), ListSink()
        recorded = sampled(host, graph("sd3", hook=True, blocks="joint:1-2", capture="sd35_capture", sink="sd35_sink",
                                       installs=2))
        assert torch.equal(stock, recorded)
        check_records(sd35["sd35_sink"], sd35["sd35_capture"], 154, [("joint", 1), ("joint", 2)], steps=2)

    def test_concept_tokens(self, host, sd35):
        cond, layout = layout_of(host, "sd3")
        (cat, end), (frog, _) = t5_positions(PROMPT, "cat"), t5_positions(PROMPT, "frog")
        assert layout.n_tokens == cond[0][0].shape[1] == 154
        # CLIP: start token at 0, "a cat and a frog" at 1-5, end token at 6, then padding; T5 from 77
        assert layout.groups == ((2,) + tuple(77 + p for p in cat), (5,) + tuple(77 + p for p in frog))
        assert layout.excluded == (0,) + tuple(range(6, 77)) + tuple(range(77 + end, 154))
        with pytest.raises(ValueError, match="has 154"):
            layout.check_context(200)
        check_missing_word(host, "sd3")

    def test_maps_are_differentiable_to_the_latent(self, sd35):
        """A guidance-style pass outside the sampler: latent with grad -> model with the hook and a
        JointCapture sink -> concept maps -> loss; the gradient on the latent equals the one from an
        explicit softmax of the same pass's q and k. A complete sink stops the forward (StopForward)."""
        ja, joint, jt, tokens, capture_mod = (hosts.pack_module(m) for m in (
            "nodes.joint_attention", "attention.joint", "nodes.joint_tokens", "attention.tokens", "attention.capture"))
        clip = sd35["sd35_clip"]
        with torch.inference_mode(False):
            tokens_ = clip.tokenize(PROMPT)
            cond = clip.encode_from_tokens_scheduled(tokens_)
            prompt = hosts.pack_module("nodes.prompt").PromptTokens(PROMPT, tokens_, clip.tokenizer)
            layout = jt.joint_token_layout(prompt, tokens.parse_concepts("cat, frog"), "sd3")
            patcher = sd35["sd35"].clone()
            qk = GraphQKCapture(n_txt=154, n_blocks=3)
            patcher.model_options.setdefault("transformer_options", {})[ja.OVERRIDE_KEY] = qk
            ja.add_joint_attention_hook(patcher, "joint:0, joint:2")
            sink = joint.JointCapture(n_tokens=layout.n_tokens)
            options = {**patcher.model_options["transformer_options"], "wrappers": patcher.wrappers,
                       ja.SINKS_KEY: [sink], "cond_or_uncond": [0]}
            x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
            weights = torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)

            def forward():
                return patcher.model.apply_model(x, torch.tensor([0.8]), c_crossattn=cond[0][0],
                                                 y=cond[0][1]["pooled_output"], transformer_options=options)
            forward()
            assert sink.keys == [("joint", 0), ("joint", 2)]
            loss = (sink.concept_maps(layout.groups, layout.excluded) * weights).sum()
            grad = torch.autograd.grad(loss, x, retain_graph=True)[0]

            reference = joint.JointCapture(n_tokens=layout.n_tokens)
            for key, q, k, _ in qk.calls:
                if key in sink.keys:
                    reference.record(key, explicit_text_probs(q, k, 154).float(), GRID, None)
            ref_loss = (reference.concept_maps(layout.groups, layout.excluded) * weights).sum()
            ref_grad = torch.autograd.grad(ref_loss, x)[0]
            torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-6)
            assert grad.abs().max() > 0
            torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-3 * ref_grad.abs().max().item())

            class Complete(joint.JointCapture):
                complete = True
            done = Complete()
            options[ja.SINKS_KEY] = [done]
            with torch.no_grad(), pytest.raises(capture_mod.StopForward):
                forward()
            assert done.keys == [("joint", 0)]  # stopped right after the first recorded block
