"""attention.losses: A-STAR's Eq. 2 and 3, the Attend-and-Excite loss, binarisation."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from attention.losses import (
    attend_excite_loss,
    binarize,
    pair_overlap,
    retention_loss,
    segregation_loss,
    soft_overlap,
)


def _maps(*planes):
    """[1, C, h, w] from C nested lists."""
    return torch.tensor([planes], dtype=torch.float32)


def _overlap_by_hand(a, b):
    """sum min / sum (a + b), pixel by pixel in Python."""
    flat_a, flat_b = a.flatten().tolist(), b.flatten().tolist()
    return sum(min(x, y) for x, y in zip(flat_a, flat_b)) / sum(x + y for x, y in zip(flat_a, flat_b))


def test_soft_overlap_disjoint_identical_and_partial():
    left = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    right = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert soft_overlap(left, right).item() == 0.0
    assert soft_overlap(left, left).item() == pytest.approx(0.5)
    a = torch.tensor([[0.8, 0.2], [0.0, 0.4]])
    b = torch.tensor([[0.5, 0.5], [0.3, 0.0]])
    # min: 0.5 + 0.2 + 0 + 0 = 0.7; sum: 1.4 + 1.3 = 2.7
    assert soft_overlap(a, b).item() == pytest.approx(0.7 / 2.7, abs=1e-6)


def test_soft_overlap_reduces_last_two_dims_only():
    a, b = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    out = soft_overlap(a, b)
    assert out.shape == (2, 3)
    assert out[1, 2].item() == pytest.approx(_overlap_by_hand(a[1, 2], b[1, 2]), abs=1e-6)


def test_soft_overlap_of_zero_maps_is_zero_not_nan():
    assert soft_overlap(torch.zeros(3, 3), torch.zeros(3, 3)).item() == 0.0


def test_segregation_two_concepts():
    disjoint = _maps([[1.0, 0.0]], [[0.0, 1.0]])
    identical = _maps([[0.3, 0.6]], [[0.3, 0.6]])
    partial = _maps([[0.8, 0.2], [0.0, 0.4]], [[0.5, 0.5], [0.3, 0.0]])
    assert segregation_loss(disjoint).tolist() == [0.0]
    assert segregation_loss(identical).item() == pytest.approx(0.5)
    assert segregation_loss(partial).item() == pytest.approx(0.7 / 2.7, abs=1e-6)


def test_segregation_three_concepts_is_sum_over_pairs():
    torch.manual_seed(0)
    maps = torch.rand(2, 3, 4, 4)
    expected = [
        sum(_overlap_by_hand(maps[b, m], maps[b, n]) for m in range(3) for n in range(m))
        for b in range(2)
    ]
    assert torch.allclose(segregation_loss(maps), torch.tensor(expected), atol=1e-6)
    identical = torch.ones(1, 3, 2, 2)
    assert segregation_loss(identical).item() == pytest.approx(1.5)


def test_segregation_and_pair_overlap_zero_for_one_concept():
    assert segregation_loss(torch.rand(3, 1, 4, 4)).tolist() == [0.0, 0.0, 0.0]
    assert pair_overlap(torch.rand(2, 1, 4, 4)).tolist() == [0.0, 0.0]


def test_pair_overlap_is_mean_of_twice_the_overlap():
    torch.manual_seed(1)
    maps = torch.rand(1, 3, 3, 3)
    pairs = list(itertools.combinations(range(3), 2))
    expected = sum(2 * _overlap_by_hand(maps[0, m], maps[0, n]) for m, n in pairs) / len(pairs)
    assert pair_overlap(maps).item() == pytest.approx(expected, abs=1e-6)
    assert pair_overlap(torch.ones(1, 2, 3, 3)).item() == pytest.approx(1.0)
    assert pair_overlap(_maps([[1.0, 0.0]], [[0.0, 1.0]])).item() == 0.0


def test_retention_with_mask_on_the_support():
    # Map values 0.6 and 0.2 on a 2-pixel support; the mask is exactly that support.
    maps = _maps([[0.6, 0.2], [0.0, 0.0]])
    masks = _maps([[1.0, 1.0], [0.0, 0.0]])
    # min: 0.6 + 0.2 = 0.8; sum: 0.8 + 2 = 2.8
    assert retention_loss(maps, masks).item() == pytest.approx(1 - 0.8 / 2.8, abs=1e-6)


def test_retention_floor_is_one_half_for_maps_in_unit_range():
    mask = _maps([[1.0, 1.0], [0.0, 0.0]])
    perfect = mask.clone()  # A == B: overlap 0.5, loss 0.5, the best a binary mask allows
    assert retention_loss(perfect, mask).item() == pytest.approx(0.5)
    torch.manual_seed(2)
    for _ in range(20):
        random_maps = torch.rand(1, 1, 2, 2)
        assert retention_loss(random_maps, mask).item() >= 0.5 - 1e-6


def test_retention_sums_concepts_skips_empty_masks_and_broadcasts():
    torch.manual_seed(3)
    maps = torch.rand(2, 3, 4, 4)
    masks = (torch.rand(1, 3, 4, 4) > 0.5).float()
    masks[0, 2] = 0.0
    expected = [sum(1 - _overlap_by_hand(maps[b, m], masks[0, m]) for m in range(2)) for b in range(2)]
    assert torch.allclose(retention_loss(maps, masks), torch.tensor(expected), atol=1e-6)


def test_retention_does_not_differentiate_the_mask():
    maps = torch.rand(1, 2, 3, 3, requires_grad=True)
    masks = torch.ones(1, 2, 3, 3, requires_grad=True)
    retention_loss(maps, masks).sum().backward()
    assert maps.grad is not None and masks.grad is None


def _reference_attend_excite(maps, smooth):
    """Independent A&E loss: explicit 3x3 kernel from the textbook-looking-but-quirky formula,
    reflect pad, conv, then a Python loop over concepts taking max(0, 1 - peak)."""
    x = torch.arange(3, dtype=torch.float32) - 1.0
    g = torch.exp(-((x / (2 * 0.5)) ** 2))
    kernel = torch.outer(g, g)
    kernel = (kernel / kernel.sum()).view(1, 1, 3, 3)
    out = []
    for b in range(maps.shape[0]):
        worst = 0.0
        for c in range(maps.shape[1]):
            image = maps[b, c][None, None]
            if smooth:
                image = F.conv2d(F.pad(image, (1, 1, 1, 1), mode="reflect"), kernel)
            worst = max(worst, max(0.0, 1.0 - image.max().item()))
        out.append(worst)
    return torch.tensor(out)


@pytest.mark.parametrize("smooth", [True, False])
def test_attend_excite_loss_matches_reference(smooth):
    torch.manual_seed(4)
    maps = torch.rand(4, 3, 16, 16) ** 3
    maps[1, 2] = 0.0  # one missing concept
    maps[2] = 2.0  # every peak above 1: max(0, .) keeps the loss at 0, not -1
    expected = _reference_attend_excite(maps, smooth)
    assert torch.allclose(attend_excite_loss(maps, smooth=smooth), expected, atol=1e-6)
    assert attend_excite_loss(maps, smooth=smooth)[1].item() == pytest.approx(1.0)


def test_attend_excite_loss_gradient_reaches_only_the_weakest_concept():
    maps = torch.full((1, 2, 4, 4), 0.1)
    maps[0, 0, 1, 1] = 0.9
    maps.requires_grad_(True)
    attend_excite_loss(maps, smooth=False).sum().backward()
    assert maps.grad[0, 0].abs().sum() == 0
    assert maps.grad[0, 1].abs().sum() > 0


def test_binarize_fraction_and_otsu_separate_modes():
    torch.manual_seed(5)
    foreground = torch.zeros(8, 8, dtype=torch.bool)
    foreground[2:6, 1:4] = True
    values = torch.where(foreground, 0.8 + 0.1 * torch.rand(8, 8), 0.05 + 0.1 * torch.rand(8, 8))
    maps = values.expand(2, 3, 8, 8).clone()
    for method in ("fraction", "otsu"):
        masks = binarize(maps, method=method)
        assert masks.shape == maps.shape and masks.dtype == maps.dtype
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(masks.bool(), foreground.expand(2, 3, 8, 8)), method


def test_binarize_fraction_threshold_is_relative_to_each_map():
    maps = _maps([[0.2, 0.1, 0.05, 0.0]], [[1.0, 0.5, 0.49, 0.0]])
    assert binarize(maps, "fraction", 0.5)[0].tolist() == [[[1.0, 1.0, 0.0, 0.0]], [[1.0, 1.0, 0.0, 0.0]]]
    assert binarize(maps, "fraction", 0.25)[0, 0].tolist() == [[1.0, 1.0, 1.0, 0.0]]


def test_binarize_otsu_on_unbalanced_bimodal_map():
    values = torch.tensor([0.0] * 50 + [0.1] * 10 + [0.7] * 3 + [0.75] * 1).view(1, 1, 8, 8)
    assert binarize(values, "otsu").flatten().tolist() == [0.0] * 60 + [1.0] * 4


def test_binarize_otsu_differs_from_fraction_with_an_outlier_peak():
    # Otsu splits background from the whole 0.3 plateau (between-class variance 0.0209 against 0.0135
    # for isolating the peak); half-of-max keeps only the peak.
    values = torch.tensor([0.0] * 50 + [0.3] * 13 + [1.0]).view(1, 1, 8, 8)
    assert binarize(values, "otsu").sum().item() == 14
    assert binarize(values, "fraction", 0.5).sum().item() == 1


def test_binarize_constant_and_nonfinite_maps():
    assert torch.all(binarize(torch.full((1, 1, 3, 3), 0.3), "otsu") == 1)
    maps = torch.rand(1, 2, 3, 3)
    maps[0, 1] = float("nan")
    for method in ("fraction", "otsu"):
        masks = binarize(maps, method)
        assert torch.all(masks[0, 1] == 0) and masks[0, 0].sum() > 0


def test_binarize_is_detached():
    maps = torch.rand(1, 2, 3, 3, requires_grad=True)
    assert not binarize(maps).requires_grad


def test_binarize_rejects_unknown_method():
    with pytest.raises(ValueError, match="fraction.*otsu"):
        binarize(torch.rand(1, 1, 2, 2), method="mean")
