"""attention/joint.py: text-key probabilities of image queries, against an explicit softmax."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attention.joint import chunk_rows, text_key_probs


def explicit(q, k, txt, img, mask=None):
    """The whole softmax(q k^T / sqrt(d)) over every key, then the image rows and text columns,
    mean over heads (float64)."""
    logits = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    return logits.softmax(-1)[:, :, img[0]:img[1], txt[0]:txt[1]].mean(1)


def qk(batch=2, heads=3, n_txt=5, n_img=7, extra=0, d=8, seed=0, k_batch=None, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    n = n_txt + n_img + extra
    q = (torch.randn(batch, heads, n, d, generator=gen) * 2).to(dtype)
    k = (torch.randn(k_batch or batch, heads, n, d, generator=gen) * 2).to(dtype)
    return q, k


@pytest.mark.parametrize("chunk", [1, 17, 10 ** 9])  # one query per chunk, uneven chunks, one chunk
def test_values_equal_explicit_softmax(chunk):
    q, k = qk()
    got = text_key_probs(q, k, (0, 5), (5, 12), max_chunk_elements=chunk)
    assert got.shape == (2, 7, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), explicit(q, k, (0, 5), (5, 12)), rtol=1e-5, atol=1e-6)


def test_text_after_image_and_extra_tokens():
    # image first, text last, with 3 extra keys (e.g. Kontext reference tokens) in between
    q, k = qk(extra=3)
    got = text_key_probs(q, k, slice(10, 15), slice(0, 7), max_chunk_elements=40)
    torch.testing.assert_close(got.double(), explicit(q, k, (10, 15), (0, 7)), rtol=1e-5, atol=1e-6)
    # the text probabilities do not sum to 1: the image and extra keys take the rest
    assert (got.sum(-1) < 0.999).all()


@pytest.mark.parametrize("chunk", [1, 50, 10 ** 9])
def test_gradients_equal_explicit(chunk):
    q, k = qk(seed=1)
    weights = torch.randn(2, 7, 5, generator=torch.Generator().manual_seed(5))
    q1, k1 = q.clone().requires_grad_(), k.clone().requires_grad_()
    (text_key_probs(q1, k1, (0, 5), (5, 12), max_chunk_elements=chunk) * weights).sum().backward()
    q2, k2 = q.double().requires_grad_(), k.double().requires_grad_()
    (explicit(q2, k2, (0, 5), (5, 12)) * weights.double()).sum().backward()
    torch.testing.assert_close(q1.grad.double(), q2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(k1.grad.double(), k2.grad, rtol=1e-4, atol=1e-6)
    assert q1.grad[:, :, :5].abs().max() == 0  # text queries play no part


def test_gradcheck_fp64():
    q, k = qk(batch=1, heads=2, n_txt=3, n_img=4, d=4, seed=2, dtype=torch.float64)
    q.requires_grad_()
    k.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: text_key_probs(a, b, (0, 3), (3, 7), max_chunk_elements=16), (q, k))


def test_shared_keys_batch_one():
    q, k = qk(k_batch=1, seed=3)
    k1 = k.clone().requires_grad_()
    got = text_key_probs(q, k1, (0, 5), (5, 12), max_chunk_elements=30)
    torch.testing.assert_close(got.double(), explicit(q, k.expand(2, -1, -1, -1), (0, 5), (5, 12)), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    k2 = k.double().requires_grad_()
    explicit(q, k2.expand(2, -1, -1, -1), (0, 5), (5, 12)).sum().backward()
    assert k1.grad.shape == k.shape
    torch.testing.assert_close(k1.grad.double(), k2.grad, rtol=1e-4, atol=1e-6)


def test_masks_bool_and_additive():
    q, k = qk(seed=4)
    gen = torch.Generator().manual_seed(6)
    keep = torch.rand(2, 1, 12, 12, generator=gen) > 0.3
    keep[..., 0] = True  # every query keeps a key
    additive = torch.randn(1, 3, 1, 12, generator=gen)  # one row for every query
    for mask in (keep, additive):
        got = text_key_probs(q, k, (0, 5), (5, 12), mask=mask, max_chunk_elements=20)
        torch.testing.assert_close(got.double(), explicit(q, k, (0, 5), (5, 12), mask=mask), rtol=1e-5, atol=1e-6)


def test_half_inputs_computed_in_fp32():
    q, k = qk(seed=7, dtype=torch.float16)
    q.requires_grad_()
    got = text_key_probs(q, k, (0, 5), (5, 12), max_chunk_elements=25)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), explicit(q.detach(), k, (0, 5), (5, 12)), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert q.grad.dtype == torch.float16 and torch.isfinite(q.grad).all()


class LargestTensor(TorchDispatchMode):
    """Notes the element count of the largest tensor any torch op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_full_image_by_all_keys_tensor_forward_or_backward():
    batch, heads, n_txt, n_img, d = 1, 4, 16, 256, 8
    q, k = qk(batch, heads, n_txt, n_img, d=d, seed=8)
    q.requires_grad_()
    k.requires_grad_()
    full = batch * heads * n_img * (n_txt + n_img)  # [B, heads, n_img, L]
    budget = full // 8
    assert chunk_rows(batch, heads, n_txt + n_img, budget) == 32  # 8 chunks of queries
    with LargestTensor() as fwd:
        out = text_key_probs(q, k, (0, n_txt), (n_txt, n_txt + n_img), max_chunk_elements=budget)
    with LargestTensor() as bwd:
        out.sum().backward()
    assert fwd.largest <= budget and bwd.largest <= budget, (fwd.largest, bwd.largest, budget)
    assert fwd.largest == bwd.largest == budget  # the probe saw each chunk's logits, in both passes
    # the same probe sees the full tensor in the explicit computation (the probe can fail)
    with LargestTensor() as control:
        explicit(q, k, (0, n_txt), (n_txt, n_txt + n_img)).sum().backward()
    assert control.largest >= full


@pytest.mark.parametrize("call, message", [
    (lambda q, k: text_key_probs(q[0], k, (0, 5), (5, 12)), "must be \\[B, heads, L, d\\]"),
    (lambda q, k: text_key_probs(q, k[:, :2], (0, 5), (5, 12)), "disagree on heads"),
    (lambda q, k: text_key_probs(q, k, (5, 5), (5, 12)), "text token range \\[5, 5\\) is empty"),
    (lambda q, k: text_key_probs(q, k, (0, 5), (5, 40)), "image token range \\[5, 40\\) .* outside"),
    (lambda q, k: text_key_probs(q, torch.cat([k, k, k]), (0, 5), (5, 12)), "k batch must be 1 or 2"),
    (lambda q, k: text_key_probs(q, k, slice(0, 5, 2), (5, 12)), "contiguous"),
])
def test_bad_input_is_named(call, message):
    q, k = qk()
    with pytest.raises(ValueError, match=message):
        call(q, k)


def test_guidance_capture_of_joint_blocks_maps_and_errors():
    """The guidance pass's collector on joint-block records: mean over blocks of the folded
    probabilities (a context repeated to a longer cond's length), token softmax over the kept tokens."""
    from attention.capture import GuidanceCapture
    gen = torch.Generator().manual_seed(9)
    probs = [torch.rand(1, 6, 8, generator=gen) / 8 for _ in range(2)]  # 2 blocks, 2x3 grid, 8 tokens
    cap = GuidanceCapture(level=None, n_tokens=4, excluded=(0, 3))  # a prompt of 4 tokens repeated twice
    for i, p in enumerate(probs):
        cap.record(("double", i), p, (2, 3), 0)
    maps = cap.concept_maps([[1], [2]])
    folded = (probs[0][..., :4] + probs[0][..., 4:] + probs[1][..., :4] + probs[1][..., 4:]) / 2
    soft = torch.softmax(100 * folded[..., 1:3], -1)  # tokens 1 and 2 kept
    torch.testing.assert_close(maps, soft.transpose(1, 2).reshape(1, 2, 2, 3))
    assert cap.keys == [("double", 0), ("double", 1)]
    with pytest.raises(ValueError, match="differ in map size"):
        cap.record(("single", 0), probs[0], (3, 2), 0)
    with pytest.raises(LookupError, match="no selected attention layer or block ran"):
        GuidanceCapture(level=None).concept_maps([[1], [2]])
