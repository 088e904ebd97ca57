"""attention.maps: attention probabilities, token softmax, concept maps, smoothing, sizes."""
import math

import pytest
import torch
import torch.nn.functional as F

from attention.maps import (
    concept_maps,
    downsample_level,
    excluded_token_columns,
    gaussian_smooth,
    gaussian_taps,
    head_mean_probs,
    resize_mask,
    token_softmax,
)


def test_head_mean_probs_equals_per_head_loop():
    torch.manual_seed(0)
    n_heads, head_dim = 4, 8
    q = torch.randn(2, 6, n_heads * head_dim)
    k = torch.randn(2, 5, n_heads * head_dim)
    expected = torch.zeros(2, 6, 5)
    for b in range(2):
        for h in range(n_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            scores = q[b, :, cols] @ k[b, :, cols].T / math.sqrt(head_dim)
            expected[b] += torch.softmax(scores, dim=-1) / n_heads
    assert torch.allclose(head_mean_probs(q, k, n_heads), expected, atol=1e-6)


def test_head_mean_probs_broadcasts_k_and_is_float32_and_differentiable():
    torch.manual_seed(1)
    q = torch.randn(3, 4, 16, dtype=torch.float16, requires_grad=True)
    k = torch.randn(1, 7, 16, dtype=torch.float16)
    probs = head_mean_probs(q, k, 2)
    assert probs.shape == (3, 4, 7) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4), atol=1e-5)
    expected_first = head_mean_probs(q[1:2].float(), k.float(), 2)
    assert torch.allclose(probs[1:2], expected_first, atol=1e-6)
    (grad,) = torch.autograd.grad(probs[..., 3].sum(), q)
    assert grad.abs().sum() > 0


def test_head_mean_probs_rejects_bad_heads():
    with pytest.raises(ValueError, match="n_heads"):
        head_mean_probs(torch.zeros(1, 2, 10), torch.zeros(1, 3, 10), 3)


def test_excluded_token_columns():
    assert excluded_token_columns(77) == (0, 76)
    assert excluded_token_columns(154) == (0, 77, 153)
    assert excluded_token_columns(231) == (0, 77, 154, 230)
    assert excluded_token_columns(1) == (0,)


def test_token_softmax_matches_attend_and_excite_slicing():
    torch.manual_seed(2)
    probs = torch.rand(2, 16, 77)
    probs = probs / probs.sum(-1, keepdim=True)
    ours = token_softmax(probs, excluded_token_columns(77))
    # A&E: drop first and last column, *100, softmax; index i-1 in the sliced tensor is token i.
    sliced = torch.softmax(probs[..., 1:-1] * 100, dim=-1)
    assert torch.all(ours[..., 0] == 0) and torch.all(ours[..., 76] == 0)
    assert torch.allclose(ours[..., 1:76], sliced, atol=1e-6)
    assert torch.allclose(ours.sum(-1), torch.ones(2, 16), atol=1e-5)
    for token in (1, 5, 40, 75):
        assert torch.allclose(ours[..., token], sliced[..., token - 1], atol=1e-6)


def test_token_softmax_excludes_chunk_starts_for_long_prompts():
    probs = torch.rand(1, 4, 154)
    out = token_softmax(probs, excluded_token_columns(154), temperature=10.0)
    for column in (0, 77, 153):
        assert torch.all(out[..., column] == 0)
    assert torch.allclose(out.sum(-1), torch.ones(1, 4), atol=1e-5)


def test_concept_maps_sums_group_tokens_in_row_major_order():
    height, width, n_tokens = 2, 3, 6
    token_probs = torch.arange(2 * height * width * n_tokens, dtype=torch.float32).view(2, height * width, n_tokens)
    maps = concept_maps(token_probs, [[2], [3, 4]], height, width)
    assert maps.shape == (2, 2, height, width)
    for b in range(2):
        for row in range(height):
            for col in range(width):
                pixel = row * width + col
                assert maps[b, 0, row, col] == token_probs[b, pixel, 2]
                assert maps[b, 1, row, col] == token_probs[b, pixel, 3] + token_probs[b, pixel, 4]


def test_concept_maps_rejects_bad_groups():
    token_probs = torch.rand(1, 4, 5)
    with pytest.raises(ValueError, match="empty"):
        concept_maps(token_probs, [[1], []], 2, 2)
    with pytest.raises(ValueError, match="outside"):
        concept_maps(token_probs, [[5]], 2, 2)
    with pytest.raises(ValueError, match="pixels"):
        concept_maps(token_probs, [[1]], 2, 3)


def test_gaussian_taps_have_attend_and_excite_quirk():
    taps = gaussian_taps(3, 0.5)
    assert torch.allclose(taps, torch.tensor([0.212, 0.576, 0.212]), atol=5e-4)
    textbook = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) ** 2 / (2 * 0.5**2))
    assert not torch.allclose(taps, textbook / textbook.sum(), atol=1e-2)


def test_gaussian_smooth_of_delta_is_outer_product_of_taps():
    image = torch.zeros(1, 1, 7, 7)
    image[0, 0, 3, 3] = 1.0
    smoothed = gaussian_smooth(image)
    taps = torch.tensor([0.21194156, 0.57611688, 0.21194156])
    expected = torch.zeros(7, 7)
    expected[2:5, 2:5] = torch.outer(taps, taps)
    assert torch.allclose(smoothed[0, 0], expected, atol=1e-6)


def test_gaussian_smooth_uses_reflect_padding():
    torch.manual_seed(3)
    maps = torch.rand(2, 3, 5, 6)
    taps = gaussian_taps(3, 0.5)
    kernel = torch.outer(taps, taps).view(1, 1, 3, 3)
    padded = F.pad(maps.view(6, 1, 5, 6), (1, 1, 1, 1), mode="reflect")
    expected = F.conv2d(padded, kernel).view(2, 3, 5, 6)
    assert torch.allclose(gaussian_smooth(maps), expected, atol=1e-6)
    # Reflect padding mirrors pixel (1, 1) into all four diagonal neighbours of the corner (0, 0);
    # zero or replicate padding would give taps[0]**2 once.
    delta = torch.zeros(1, 1, 4, 4)
    delta[0, 0, 1, 1] = 1.0
    assert torch.allclose(gaussian_smooth(delta)[0, 0, 0, 0], 4 * taps[0] ** 2, atol=1e-6)


def test_gaussian_smooth_small_maps_do_not_fail():
    assert gaussian_smooth(torch.ones(1, 2, 1, 1)).shape == (1, 2, 1, 1)
    assert torch.allclose(gaussian_smooth(torch.ones(1, 2, 1, 1)), torch.ones(1, 2, 1, 1))


def test_downsample_level():
    assert downsample_level((64, 64), (64, 64)) == 0
    assert downsample_level((64, 64), (16, 16)) == 2
    assert downsample_level((128, 96), (32, 24)) == 2
    assert downsample_level((65, 65), (33, 33)) == 1
    assert downsample_level((65, 65), (17, 17)) == 2
    assert downsample_level((65, 63), (9, 8)) == 3


def test_resize_mask_area():
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1.0
    mask[0, 4] = 1.0
    resized = resize_mask(mask, 2, 2)
    assert resized.shape == (1, 2, 2)
    assert torch.allclose(resized[0], torch.tensor([[1.0, 1 / 16], [1.0, 0.0]]))
    batch = resize_mask(torch.ones(3, 4, 4, dtype=torch.uint8), 2, 2)
    assert batch.shape == (3, 2, 2) and batch.dtype == torch.float32 and torch.all(batch == 1)
    with pytest.raises(ValueError):
        resize_mask(torch.ones(1, 1, 4, 4), 2, 2)
