"""attention/saved_tensors.py: casts of frozen weights are recast at backward, not kept; gradients exact."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attention.saved_tensors import saved_tensor_policy


class CastLinear(torch.nn.Module):
    """A linear layer that stores fp16 weights and computes in fp32, casting at every forward as
    ComfyUI's manual-cast ops do. how: "to" (param.to(dtype)), "copy" (empty_like + copy_, the
    offload path), "to_then_scale" (a cast changed in place afterwards, as a LoRA weight_function does)."""

    def __init__(self, n_in, n_out, how="to", seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter((torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).half(),
                                         requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(n_out, generator=g).half(), requires_grad=False)
        self.how = how

    def forward(self, x):
        if self.how == "copy":
            w = torch.empty_like(self.weight, dtype=x.dtype)
            w.copy_(self.weight)
        else:
            w = self.weight.to(dtype=x.dtype)
            if self.how == "to_then_scale":
                w.mul_(2.0)
        return F.linear(x, w, self.bias.to(x.dtype))


def mlp(how, depth=3, width=64):
    layers = []
    for i in range(depth):
        layers += [CastLinear(width, width, how, seed=i), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers)


def grad_of(model, x, **policy):
    leaf = x.clone().requires_grad_(True)
    with saved_tensor_policy(**policy) as stats:
        loss = model(leaf).square().sum()
    (grad,) = torch.autograd.grad(loss, leaf)
    return grad, stats


@pytest.mark.parametrize("how", ["to", "copy"])
def test_weight_casts_are_recast_and_the_gradient_is_exact(how):
    model = mlp(how)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(9))
    reference, _ = grad_of(model, x, recast_weight_casts=False, copy_others=False)
    grad, stats = grad_of(model, x, recast_weight_casts=True, copy_others=False)
    assert torch.equal(grad, reference)
    weights = [m.weight for m in model if isinstance(m, CastLinear)]
    # Every layer's fp32 weight copy was handed to autograd and none of them was kept.
    assert stats.recast_count == len(weights)
    assert stats.recast_bytes == sum(w.numel() * 4 for w in weights)
    assert stats.kept_bytes < stats.recast_bytes  # what stays: activations, [4, 64] each


def test_a_cast_changed_in_place_is_kept_not_recast():
    """A cast modified after it was made (a LoRA weight_function) is no longer the parameter's cast."""
    model = mlp("to_then_scale")
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(9))
    reference, _ = grad_of(model, x, recast_weight_casts=False, copy_others=False)
    grad, stats = grad_of(model, x, recast_weight_casts=True, copy_others=False)
    assert stats.recast_count == 0
    assert torch.equal(grad, reference)
    # and the doubled weights are what the gradient used: compare with an explicit fp32 model
    explicit = [2.0 * m.weight.float() for m in model if isinstance(m, CastLinear)]
    leaf = x.clone().requires_grad_(True)
    h = leaf
    for w, m in zip(explicit, [m for m in model if isinstance(m, CastLinear)]):
        h = torch.tanh(F.linear(h, w, m.bias.float()))
    (expected,) = torch.autograd.grad(h.square().sum(), leaf)
    torch.testing.assert_close(grad, expected)


def test_casts_of_tensors_that_are_not_parameters_are_kept():
    table = torch.randn(64, 64).half()  # a plain tensor, not a parameter
    x = torch.randn(4, 64)
    leaf = x.clone().requires_grad_(True)
    with saved_tensor_policy(recast_weight_casts=True, copy_others=False) as stats:
        loss = (leaf @ table.to(torch.float32)).square().sum()
    (grad,) = torch.autograd.grad(loss, leaf)
    assert stats.recast_count == 0 and stats.kept_bytes > 0
    torch.testing.assert_close(grad, 2 * (x @ table.float()) @ table.float().T)


def test_a_weight_changed_before_backward_is_an_error():
    model = mlp("to", depth=1)
    leaf = torch.randn(2, 64).requires_grad_(True)
    with saved_tensor_policy(recast_weight_casts=True, copy_others=False):
        loss = model(leaf).sum()
    with torch.no_grad():
        model[0].weight.add_(1)
    with pytest.raises(RuntimeError, match="weight changed"):
        torch.autograd.grad(loss, leaf)


def test_copy_others_protects_saved_activations_from_in_place_adds():
    """ControlNet adds residuals in place to activations later layers saved; with copies the gradient
    is that of the values at save time, without them autograd refuses."""
    weight = torch.nn.Parameter(torch.randn(8, 8), requires_grad=False)
    residual = torch.randn(2, 8)

    def forward(leaf):
        h = leaf * 1.0
        out = torch.tanh(h)  # saves its result
        out2 = (out @ weight).sum()  # weight (a frozen parameter) saved, and `out`
        out += residual  # the in-place add after saving
        return out2 + out.sum()

    x = torch.randn(2, 8)
    leaf = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(forward(leaf), leaf)
    leaf = x.clone().requires_grad_(True)
    with saved_tensor_policy(recast_weight_casts=False, copy_others=True) as stats:
        loss = forward(leaf)
    (grad,) = torch.autograd.grad(loss, leaf)
    t = torch.tanh(x)
    expected = (1 - t ** 2) * (weight.sum(dim=1) + 1)  # d/dx [sum(tanh(x) W) + sum(tanh(x))]
    torch.testing.assert_close(grad, expected)
    # the parameter went by reference: only activations were copied
    assert 0 < stats.kept_bytes < 4 * weight.numel() + 4 * 2 * 8 * 3


def test_no_policy_is_a_plain_context():
    with saved_tensor_policy(recast_weight_casts=False, copy_others=False) as stats:
        pass
    assert stats.kept_bytes == stats.recast_bytes == stats.recast_count == 0


@pytest.mark.parametrize("recast_weight_casts,copy_others", [(True, False), (False, True), (True, True)])
def test_branches_backward_does_not_reach_are_freed(recast_weight_casts, copy_others):
    """The lean pass leaves graph branches that backward never visits. Their saved outputs must not
    keep themselves alive (a pack hook returning the output itself would, through its grad_fn)."""
    import gc
    import weakref
    leaf = torch.randn(3, 5).requires_grad_(True)
    with saved_tensor_policy(recast_weight_casts, copy_others):
        used = (leaf * 2.0).square().sum()
        unused = torch.tanh(leaf * 3.0)  # saves its own output; nothing below uses it
    freed = weakref.ref(unused)
    torch.autograd.grad(used, leaf)
    del unused
    gc.collect()
    assert freed() is None


def test_a_saved_activation_changed_in_place_is_an_error():
    """Without copies, a tensor modified after autograd saved it would silently give a wrong gradient."""
    leaf = torch.randn(4).requires_grad_(True)
    with saved_tensor_policy(recast_weight_casts=True, copy_others=False):
        out = torch.tanh(leaf * 1.0)
        loss = out.square().sum()  # saves out
        out.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, leaf)


class GatheredLinear(torch.nn.Module):
    """Serves its weight as ComfyUI 0.19+ serves offloaded weights: copied, in its own dtype, into a
    view of a byte buffer that the next layers reuse (a per-stream cast buffer, or dynamic VRAM's
    memory); autograd then saves a view of that view (the transposed weight)."""

    def __init__(self, n, buffer, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(n, n, generator=g) / n ** 0.5, requires_grad=False)
        self.buffer = buffer

    def forward(self, x):
        size = self.weight.numel() * self.weight.element_size()
        served = self.buffer[:size].view(self.weight.dtype).view(self.weight.shape)
        served.copy_(self.weight)
        return torch.tanh(F.linear(x, served))


def test_weights_served_from_a_reused_buffer_are_recast():
    buffer = torch.empty(64 * 64 * 4, dtype=torch.uint8)
    model = torch.nn.Sequential(*[GatheredLinear(64, buffer, seed=i) for i in range(3)])
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(9))
    h = leaf = x.clone().requires_grad_(True)
    for layer in model:
        h = torch.tanh(F.linear(h, layer.weight))
    (reference,) = torch.autograd.grad(h.square().sum(), leaf)
    # The premise: as served, each layer's saved weight is overwritten by the next layer's.
    leaf = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="inplace"):
        torch.autograd.grad(model(leaf).square().sum(), leaf)
    grad, stats = grad_of(model, x, recast_weight_casts=True, copy_others=False)
    assert stats.recast_count == 3
    assert torch.equal(grad, reference)


def test_a_reused_buffer_view_that_is_no_cast_is_kept_and_checked():
    """Data written into the buffer from something other than a frozen parameter is not recast; when
    the buffer is reused before backward, that is an error, not a wrong gradient."""
    buffer = torch.empty(64 * 4, dtype=torch.uint8)
    table = torch.randn(8, 8)  # a plain tensor, not a parameter
    leaf = torch.randn(2, 8).requires_grad_(True)
    with saved_tensor_policy(recast_weight_casts=True, copy_others=False) as stats:
        served = buffer[:256].view(torch.float32).view(8, 8)
        served.copy_(table)
        loss = F.linear(leaf, served).square().sum()
        buffer.zero_()
    assert stats.recast_count == 0
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(loss, leaf)


@pytest.mark.parametrize("recast", [False, True])
@pytest.mark.parametrize("how", ["plain", "to"])
def test_weights_swapped_in_place_after_the_forward_are_copied_when_saved(how, recast):
    """ComfyUI's hook-scheduled LoRA writes each cond group's weights with `.data.copy_()`, which leaves the
    version counter as it was: between a forward (cond group A) and its backward, another group's forward
    (B) overwrites them unseen. Weights listed in `copied` are saved as copies, so the gradient is group A's;
    saved by reference (the default) it would silently be B's, which the reference below shows."""
    g = torch.Generator().manual_seed(3)
    dtype = torch.float32 if how == "plain" else torch.float16
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 16, generator=g).to(dtype)
    weight = torch.nn.Parameter(a.clone(), requires_grad=False)
    x = torch.randn(3, 16, generator=g)

    def run(**policy):
        weight.data.copy_(a)
        leaf = x.clone().requires_grad_(True)
        with saved_tensor_policy(**policy):
            hidden = F.linear(leaf, weight.to(torch.float32))
            loss = F.linear(torch.tanh(hidden), weight.to(torch.float32)).square().sum()
        weight.data.copy_(b)  # the next cond group's weights, as ComfyUI's copy_to_param writes them
        (grad,) = torch.autograd.grad(loss, leaf)
        return grad

    leaf = x.clone().requires_grad_(True)
    wa = a.to(torch.float32)
    (expected,) = torch.autograd.grad(F.linear(torch.tanh(F.linear(leaf, wa)), wa).square().sum(), leaf)
    torch.testing.assert_close(run(recast_weight_casts=recast, copy_others=False, copied=[weight]), expected,
                               rtol=0, atol=0)
    if how == "plain" or recast:  # by reference (or recast from the parameter): group B's weights
        assert not torch.allclose(run(recast_weight_casts=recast, copy_others=False), expected, atol=1e-3)
