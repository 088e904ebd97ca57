"""attention.capture.RunCapture: what a run keeps per step (issue 19, item 6).

A finished step keeps only what the recording shows (its layers' concept maps and its maps as the loss
sees them), never the layers' [B, h*w, T] probabilities: the memory held grows by exactly those maps per
step, so its peak does not depend on h*w*T times the number of steps."""
import torch

from attention.capture import RunCapture

B, H, W, T, LAYERS = 2, 16, 16, 77, 4
GROUPS = [[2], [5, 6]]


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from obj through attributes, dicts, lists and tuples (each once)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return tensor_bytes(vars(obj), seen)
    return 0


def layer_probs(step, layer):
    generator = torch.Generator().manual_seed(1000 * step + layer)
    return torch.softmax(torch.randn(B, H * W, T, generator=generator) * 3, dim=-1)


def run(steps):
    """Records `steps` steps of LAYERS layers; returns (peak bytes held, the capture)."""
    capture = RunCapture(level=1, words=["cat", "frog"], token_groups=GROUPS, n_tokens=T)
    peak = 0
    for step in range(steps):
        capture.sigmas[step] = 10.0 - step
        for layer in range(LAYERS):
            capture.record(("input", layer, 0), layer_probs(step, layer), (H, W), step)
            peak = max(peak, tensor_bytes(capture))
    return peak, capture


def explicit_loss_maps(step):
    """Mean of the layers' probabilities, A&E's softmax(100 * p[..., 1:-1]), the concepts' columns summed."""
    mean = torch.stack([layer_probs(step, layer) for layer in range(LAYERS)]).mean(0)
    soft = torch.softmax(mean[..., 1:-1] * 100, dim=-1)  # column j of soft is token j + 1
    maps = torch.stack([soft[..., [t - 1 for t in group]].sum(-1) for group in GROUPS], dim=1)
    return maps.reshape(B, len(GROUPS), H, W)


def test_peak_memory_does_not_grow_with_the_probabilities_of_finished_steps():
    peak_10, _ = run(10)
    peak_40, _ = run(40)
    shown_per_step = (LAYERS + 1) * B * len(GROUPS) * H * W * 4  # layers' maps + the loss view, float32
    probs_per_step = B * H * W * T * 4
    assert 5 * shown_per_step < probs_per_step  # so keeping the probabilities would show
    assert peak_40 - peak_10 == 30 * shown_per_step, (peak_40 - peak_10, shown_per_step, probs_per_step)


def test_loss_maps_are_the_mean_of_the_layers_then_the_token_softmax():
    _, capture = run(3)
    rec = capture.to_recording()
    assert [s.step for s in rec.steps] == [0, 1, 2] and [s.sigma for s in rec.steps] == [10.0, 9.0, 8.0]
    for s in rec.steps:
        torch.testing.assert_close(s.loss_maps, explicit_loss_maps(s.step), rtol=1e-5, atol=1e-6)
        assert s.maps.shape == (LAYERS, B, len(GROUPS), H, W)
