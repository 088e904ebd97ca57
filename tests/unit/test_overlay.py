"""nodes/overlay_drawing.py: map selection, normalisation, colour maps, overlays, timeline, overlap, loss plot."""
import pytest
import torch
import torch.nn.functional as F

from support.pack_modules import pack_module

_drawing = pack_module("nodes.overlay_drawing")
COLORMAPS = _drawing.COLORMAPS
colormap = _drawing.colormap
combined_overlay = _drawing.combined_overlay
concept_colors = _drawing.concept_colors
concept_heatmaps = _drawing.concept_heatmaps
label_height = _drawing.label_height
label_size = _drawing.label_size
loss_plot = _drawing.loss_plot
loss_table = _drawing.loss_table
normalize_maps = _drawing.normalize_maps
overlap_image = _drawing.overlap_image
pairwise_overlap = _drawing.pairwise_overlap
peak_attention = _drawing.peak_attention
select_maps = _drawing.select_maps
step_timeline = _drawing.step_timeline
upsample = _drawing.upsample
AttentionRecording = _drawing.AttentionRecording
StepRecord = _drawing.StepRecord

R = 16  # map side


def blob(y0, y1, x0, x1, value=1.0):
    m = torch.zeros(R, R)
    m[y0:y1, x0:x1] = value
    return m


def blob_maps(B=2):
    """[B, 2, R, R]: concept 0 a square top-left, concept 1 a square bottom-right (disjoint)."""
    m = torch.stack([blob(1, 6, 1, 6), blob(10, 15, 10, 15)])
    return m.unsqueeze(0).expand(B, -1, -1, -1).clone()


def make_recording(S=3, L=2, B=2, C=2, seed=0, losses=True, words=("cat", "frog")):
    """Blob maps scaled differently per step and layer, plus noise, so means are distinguishable."""
    g = torch.Generator().manual_seed(seed)
    base = blob_maps(B)[:, :C] if C <= 2 else torch.rand(B, C, R, R, generator=g)
    steps = []
    for s in range(S):
        maps = torch.stack([base * (0.2 + 0.1 * s + 0.3 * l) + 0.05 * torch.rand(B, C, R, R, generator=g)
                            for l in range(L)])
        ls = {}
        if losses and s < S - 1:  # the last step is unguided and has no losses
            ls = {"segregation": torch.rand(B, generator=g) * 0.5,
                  "retention": 0.5 + torch.rand(B, generator=g) * 0.5}
            ls["total"] = ls["segregation"] + ls["retention"]
        steps.append(StepRecord(step=s, sigma=14.6 / (s + 1), maps=maps, losses=ls,
                                iterations=1 if ls else 0))
    return AttentionRecording(words=list(words)[:C], layers=[("input", 7, 0), ("output", 3, 0)][:L],
                              steps=steps)


def direction(v):
    return v / v.norm()


# ---------------------------------------------------------------------------------------------
def test_concept_colors_distinct_and_cycling():
    c = concept_colors(12)
    assert c.shape == (12, 3) and c.min() >= 0 and c.max() <= 1
    assert torch.cdist(c[:10], c[:10]).add(torch.eye(10) * 9).min() > 0.2  # 10 distinct colours
    assert torch.equal(c[10], c[0]) and torch.equal(c[11], c[1])


@pytest.mark.parametrize("name", COLORMAPS)
def test_colormap_endpoints_and_range(name):
    v = torch.linspace(0, 1, 101)
    out = colormap(v, name)
    assert out.shape == (101, 3) and out.min() >= 0 and out.max() <= 1
    # out-of-range input is clamped to the endpoints
    assert torch.allclose(colormap(torch.tensor([-3.0, 7.0]), name), out[[0, -1]])


def test_colormap_known_values():
    assert torch.allclose(colormap(torch.tensor([0.0, 0.5, 1.0]), "gray"),
                          torch.tensor([[0.0] * 3, [0.5] * 3, [1.0] * 3]))
    jet = colormap(torch.tensor([0.0, 1.0]), "jet")
    assert torch.allclose(jet, torch.tensor([[0.0, 0.0, 0.5], [0.5, 0.0, 0.0]]))  # dark blue -> dark red
    vir = colormap(torch.tensor([0.0, 1.0]), "viridis")
    assert vir[0, 2] > vir[0, 1] and vir[1, 0] > 0.9 and vir[1, 1] > 0.85  # purple -> yellow
    inf = colormap(torch.tensor([0.0, 1.0]), "inferno")
    assert inf[0].max() < 0.05 and inf[1].min() > 0.6  # black -> pale yellow
    with pytest.raises(ValueError, match="jet"):
        colormap(torch.zeros(2), "rainbow")


def test_colormap_keeps_leading_shape():
    assert colormap(torch.rand(2, 3, 4, 5), "viridis").shape == (2, 3, 4, 5, 3)


# ---------------------------------------------------------------------------------------------
def test_select_maps_averages_exactly_the_selected_steps_and_layers():
    rec = make_recording(S=4, L=3)
    allm = rec.maps()  # [S, L, B, C, h, w]
    assert torch.allclose(select_maps(rec), allm.mean(dim=(0, 1)))
    assert torch.allclose(select_maps(rec, (1, 3), [0, 2]), allm[1:3][:, [0, 2]].mean(dim=(0, 1)))
    assert torch.allclose(select_maps(rec, (-2, None), [-1]), allm[2:, 2].mean(0))
    assert torch.allclose(select_maps(rec, (0, -1)), allm[:3].mean(dim=(0, 1)))
    assert torch.allclose(select_maps(rec, (2, 3), [1]), allm[2, 1])
    assert select_maps(rec).shape == (2, 2, R, R)


def test_select_maps_orders_steps_by_step_index():
    rec = make_recording(S=3)
    ordered = rec.maps()
    rec.steps = list(reversed(rec.steps))
    assert torch.allclose(select_maps(rec, (0, 1)), ordered[0].mean(0))


@pytest.mark.parametrize("rng,match", [((2, 2), "empty step selection"), ((3, None), "out of range"),
                                       ((0, 5), "out of range"), ((-4, None), "out of range")])
def test_select_maps_rejects_bad_step_ranges(rng, match):
    rec = make_recording(S=3)
    with pytest.raises(ValueError, match=match) as e:
        select_maps(rec, rng)
    assert "3 steps" in str(e.value)


def test_select_maps_rejects_bad_layers_and_empty_recording():
    rec = make_recording(L=2)
    with pytest.raises(ValueError, match=r"2 layers \(indices 0\.\.1\)"):
        select_maps(rec, layers=[2])
    with pytest.raises(ValueError, match="empty layer selection"):
        select_maps(rec, layers=[])
    with pytest.raises(ValueError, match="empty"):
        select_maps(AttentionRecording(words=["cat"]))


# ---------------------------------------------------------------------------------------------
def test_normalize_modes():
    m = torch.zeros(2, 2, 4, 4)
    m[0, 0, 0, 0], m[0, 1, 1, 1] = 0.4, 0.2
    m[1, 0, 2, 2] = 2.0  # raw value above 1, concept 1 of sample 1 all zero
    pc = normalize_maps(m, "per_concept")
    assert pc[0, 0, 0, 0] == 1 and pc[0, 1, 1, 1] == 1 and pc[1, 0, 2, 2] == 1
    assert torch.all(pc[1, 1] == 0)
    gl = normalize_maps(m, "global")
    assert gl[0, 0, 0, 0] == 1 and torch.isclose(gl[0, 1, 1, 1], torch.tensor(0.5))
    assert gl[1, 0, 2, 2] == 1
    no = normalize_maps(m, "none")
    assert no[0, 0, 0, 0] == pytest.approx(0.4) and no[1, 0, 2, 2] == 1  # clamped
    for out in (pc, gl, no):
        assert out.shape == m.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="per_concept"):
        normalize_maps(m, "max")


def test_upsample_shape_and_constant():
    assert upsample(torch.rand(2, 3, 16, 16), 64, 48).shape == (2, 3, 64, 48)
    assert torch.allclose(upsample(torch.full((1, 1, 4, 4), 0.3), 32, 32), torch.tensor(0.3))


# ---------------------------------------------------------------------------------------------
def test_combined_overlay_puts_each_blob_in_its_colour():
    maps = blob_maps(2)
    black = torch.zeros(2, 64, 64, 3)
    out = combined_overlay(black, maps, opacity=1.0, labels=False)
    assert out.shape == (2, 64, 64, 3)
    colors = concept_colors(2)
    for b in range(2):
        p0 = out[b, 14, 14]   # centre of blob 0 (map rows 1..5 -> image rows 4..23)
        p1 = out[b, 50, 50]   # centre of blob 1 (map rows 10..14 -> image rows 40..59)
        assert torch.allclose(direction(p0), direction(colors[0]), atol=1e-4)
        assert torch.allclose(direction(p1), direction(colors[1]), atol=1e-4)
        assert torch.allclose(p0, colors[0], atol=1e-4)  # alpha 1 at the blob centre
        assert torch.all(out[b, 50, 10] == 0) and torch.all(out[b, 10, 50] == 0)  # background stays black
        assert torch.all(out[b, 32, 32] == 0)


def test_combined_overlay_mixes_overlaps_additively_and_keeps_image_elsewhere():
    m = torch.stack([blob(0, 16, 0, 16), blob(0, 16, 0, 16)]).unsqueeze(0)  # both everywhere
    img = torch.full((1, 8, 8, 3), 0.2)
    out = combined_overlay(img, m, opacity=0.5, labels=False)
    expected = (concept_colors(2).sum(0) * 0.5).clamp(0, 1)  # image fully covered (alpha sum 1)
    assert torch.allclose(out[0, 4, 4], expected, atol=1e-5)
    out0 = combined_overlay(img, torch.zeros(1, 2, R, R), opacity=0.5, labels=False)
    assert torch.allclose(out0, img)


def test_combined_overlay_legend_only_in_corner():
    maps, img = blob_maps(2), torch.rand(2, 96, 96, 3)
    plain = combined_overlay(img, maps, 0.5, labels=False)
    labelled = combined_overlay(img, maps, 0.5, words=["cat", "frog"])
    diff = (plain - labelled).abs().amax(-1) > 0
    assert diff.any()
    lh = label_height(1)
    assert not diff[:, 2 * lh + 3 * 2 + 1:].any()  # two lines (plus padding), nothing below


def test_batch_broadcast_and_mismatch():
    maps = blob_maps(2)
    assert combined_overlay(torch.rand(1, 32, 32, 3), maps, 0.5).shape == (2, 32, 32, 3)
    assert combined_overlay(torch.rand(3, 32, 32, 3), maps[:1], 0.5).shape == (3, 32, 32, 3)
    with pytest.raises(ValueError, match="3 images .* batch 2"):
        concept_heatmaps(torch.rand(3, 32, 32, 3), maps, ["a", "b"], "jet", 0.5)


# ---------------------------------------------------------------------------------------------
def test_heatmaps_shape_range_and_order():
    maps = blob_maps(2)
    maps[1] = maps[1].flip(-1)  # sample 1: concept 0 top-right, concept 1 bottom-left
    img = torch.rand(2, 64, 64, 3)
    out = concept_heatmaps(img, maps, ["cat", "frog"], "gray", 1.0, labels=False)
    assert out.shape == (4, 64, 64, 3) and out.min() >= 0 and out.max() <= 1
    # index b*C + c; gray colour map at opacity 1 shows the map itself
    centres = {"tl": (14, 14), "br": (50, 50), "tr": (14, 50), "bl": (50, 14)}
    for i, where in enumerate(["tl", "br", "tr", "bl"]):  # (b0,c0), (b0,c1), (b1,c0), (b1,c1)
        for name, (y, x) in centres.items():
            assert out[i, y, x].min() == 1 if name == where else out[i, y, x].max() == 0
    half = concept_heatmaps(img, maps, ["cat", "frog"], "gray", 0.5, labels=False)
    assert torch.allclose(half[0, 50, 50], img[0, 50, 50] * 0.5, atol=1e-6)


def test_heatmap_labels_change_only_the_label_strip():
    maps, img = blob_maps(2), torch.rand(2, 80, 100, 3)
    words = ["cat", "a frog"]
    plain = concept_heatmaps(img, maps, words, "jet", 0.5, labels=False)
    labelled = concept_heatmaps(img, maps, words, "jet", 0.5)
    for i in range(4):
        h, w = label_size(words[i % 2], 80, 100)
        diff = (plain[i] - labelled[i]).abs().amax(-1) > 0
        assert diff[:h, :w].any()
        diff[:h, :w] = False
        assert not diff.any()
        # the strip is opaque: dark background, text drawn in the concept's colour
        strip = labelled[i, :h, :w]
        assert (strip.amax(-1) == 0).float().mean() > 0.5
        col = concept_colors(2)[i % 2]
        lit = strip[strip.amax(-1) > 0.5]
        assert len(lit) and torch.allclose(direction(lit.mean(0)), direction(col), atol=0.05)
    assert label_size("cat", 512, 512)[0] == 2 * label_size("cat", 128, 128)[0]  # scaled up on big images


# ---------------------------------------------------------------------------------------------
def test_pairwise_overlap_disjoint_is_zero():
    ov = pairwise_overlap(blob_maps(2))
    assert ov.shape == (2, 1, R, R) and torch.all(ov == 0)


def test_pairwise_overlap_peaks_in_intersection_and_pair_order():
    a = blob(2, 10, 2, 10) * 0.8
    b = blob(6, 14, 6, 14)
    c = torch.zeros(R, R)
    m = torch.stack([a, b, c]).unsqueeze(0) + 0.01 * torch.rand(1, 3, R, R)
    ov = pairwise_overlap(m)
    assert ov.shape == (1, 3, R, R)  # pairs (0,1), (0,2), (1,2)
    y, x = divmod(int(ov[0, 0].argmax()), R)
    assert 6 <= y < 10 and 6 <= x < 10
    assert torch.allclose(ov[0, 0], torch.minimum(m[0, 0], m[0, 1]))
    assert torch.allclose(ov[0, 2], torch.minimum(m[0, 1], m[0, 2]))
    assert ov[0, 1].max() < 0.02 and ov[0, 0].max() > 0.79


def test_overlap_image_shapes_and_label():
    m = torch.rand(2, 3, R, R)
    img = torch.rand(2, 64, 64, 3)
    out = overlap_image(img, m, "jet", 0.5, words=["cat", "frog", "dog"])
    assert out.shape == (6, 64, 64, 3) and out.min() >= 0 and out.max() <= 1
    plain = overlap_image(img, m, "jet", 0.5, labels=False)
    h, w = label_size("cat x frog", 64, 64)
    diff = (out[0] - plain[0]).abs().amax(-1) > 0
    assert diff[:h, :w].any() and not diff[h:].any()
    one = overlap_image(img, m[:, :1], "jet", 0.5, labels=False)  # single concept: no pair
    assert one.shape == (2, 64, 64, 3) and torch.allclose(one, img)


# ---------------------------------------------------------------------------------------------
def test_timeline_shape_and_columns_show_their_step():
    S, C, cell = 4, 2, 8
    rec = make_recording(S=S, L=2, C=C)
    # move concept 0's blob each step: step s has a single hot pixel in column 3*s + 1
    for s, st in enumerate(rec.steps):
        st.maps[:, :, 0] = 0
        st.maps[:, :, 0, 5, 3 * s + 1] = 0.9
    out = step_timeline(rec, None, "none", cell=cell, colormap_name="gray", labels=False)
    assert out.shape == (2, C * cell, S * cell, 3)
    allm = rec.maps().mean(1)  # [S, B, C, h, w]
    for s in range(S):
        expected = colormap(upsample(allm[s], cell, cell), "gray")  # [B, C, cell, cell, 3]
        for c in range(C):
            got = out[:, c * cell:(c + 1) * cell, s * cell:(s + 1) * cell]
            assert torch.allclose(got, expected[:, c], atol=1e-6)
    # the hot pixel moves right with the step: brightest column of row 0's cells follows it
    cols = [int(out[0, :cell, s * cell:(s + 1) * cell, 0].amax(0).argmax()) for s in range(S)]
    assert cols == sorted(cols) and len(set(cols)) == S


def test_timeline_labels_layout_and_normalisation_over_steps():
    S, C, cell = 3, 2, 32
    rec = make_recording(S=S, C=C)
    lab = step_timeline(rec, [0], "per_concept", cell=cell, colormap_name="gray")
    lh = label_height(1)
    assert lab.shape == (2, lh + C * (lh + cell), S * cell, 3)
    plain = step_timeline(rec, [0], "per_concept", cell=cell, colormap_name="gray", labels=False)
    for c in range(C):
        y = lh + c * (lh + cell) + lh
        assert torch.equal(lab[:, y:y + cell], plain[:, c * cell:(c + 1) * cell])
    # per_concept normalises each concept by its max over all steps (not per step), so attention
    # that grows (or fades) over the steps stays visible: maps grow with the step here
    m = rec.maps()[:, 0]  # layer 0: [S, B, C, h, w]
    m = m / m.amax(dim=(0, 3, 4), keepdim=True)
    for s in range(S):
        expected = colormap(upsample(m[s], cell, cell), "gray")
        for c in range(C):
            got = plain[:, c * cell:(c + 1) * cell, s * cell:(s + 1) * cell]
            assert torch.allclose(got, expected[:, c], atol=1e-5)
    peaks = [float(plain[0, :cell, s * cell:(s + 1) * cell].max()) for s in range(S)]
    assert peaks[0] < peaks[1] < peaks[2]
    # global: both concepts of a sample share one scale
    gl = step_timeline(rec, [0], "global", cell=cell, colormap_name="gray", labels=False)
    mg = rec.maps()[:, 0]
    mg = mg / mg.amax(dim=(0, 2, 3, 4), keepdim=True)
    assert torch.allclose(gl[:, cell:2 * cell, :cell], colormap(upsample(mg[0], cell, cell), "gray")[:, 1],
                          atol=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        step_timeline(rec, None, "weird")


# ---------------------------------------------------------------------------------------------
def test_peak_attention_matches_direct_max():
    rec = make_recording(S=3, L=2)
    expected = rec.maps().mean(1).flatten(-2).amax(-1)
    assert torch.allclose(peak_attention(rec), expected)


def test_loss_plot_size_and_content():
    rec = make_recording(S=5)
    img = loss_plot(rec, width=400, height=200)
    assert img.shape == (1, 200, 400, 3) and img.min() >= 0 and img.max() <= 1
    non_white = (img[0] < 0.99).any(-1)
    assert non_white.float().mean() > 0.02
    # the peak of concept 0 is drawn in its colour (dashed line)
    c0 = concept_colors(2)[0]
    assert ((img[0] - c0).abs().amax(-1) < 0.02).sum() > 20


def test_loss_plot_without_losses_and_single_step():
    rec = make_recording(S=1, losses=False)
    img = loss_plot(rec)
    assert img.shape == (1, 256, 512, 3) and (img[0] < 0.99).any()
    with pytest.raises(ValueError, match="at least"):
        loss_plot(rec, width=50, height=20)


def test_loss_table_lists_losses_steps_and_samples():
    rec = make_recording(S=3, B=2)
    text = loss_table(rec)
    for name in ("segregation", "retention", "total", "sigma", "iters", "peak cat", "peak frog"):
        assert name in text
    lines = text.splitlines()
    rows = [ln.split() for ln in lines[3:]]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    seg = rec.steps[0].losses["segregation"]
    assert f"{float(seg.mean()):.4f}" in lines[3]
    assert f"[{float(seg[0]):.4f}, {float(seg[1]):.4f}]" in lines[3]  # per-sample values when B > 1
    assert "-" in rows[2]  # last step has no losses
    single = loss_table(make_recording(S=2, B=1))
    assert "[" not in single.splitlines()[3]
