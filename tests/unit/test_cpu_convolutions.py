"""attention/cpu_convolutions.py: which kernel a guidance pass's CPU convolutions run on, and that the
gradient it gives is oneDNN's up to summation order."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attention.cpu_convolutions import DIRECT_MAX_LATENT_PIXELS, direct_cpu_convolutions, use_direct_kernel

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def conv_kernels(enabled_context: bool) -> tuple[set[str], torch.Tensor]:
    """Names of the aten convolution kernels that ran for a forward and input-gradient backward of a
    batch-1 1280-channel 3x3 convolution on 8x8 pixels (an SD1.5 UNet layer at 256 px), and the gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1280, 8, 8, generator=g).requires_grad_(True)
    w = torch.randn(1280, 1280, 3, 3, generator=g) / 100.0
    with torch.profiler.profile() as prof, direct_cpu_convolutions(enabled_context):
        (grad,) = torch.autograd.grad(F.conv2d(x, w, padding=1).square().sum(), x)
    names = {e.key for e in prof.key_averages()}
    return {n for n in names if "conv" in n and n.startswith("aten::") and ("mkldnn" in n or "slow" in n)}, grad


def test_direct_kernel_runs_forward_and_backward_and_matches_onednn():
    kernels, direct = conv_kernels(True)
    assert kernels == {"aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"}
    reference_kernels, reference = conv_kernels(False)  # PyTorch's choice for this call: oneDNN
    assert "aten::mkldnn_convolution" in reference_kernels
    assert not any("slow" in k for k in reference_kernels)
    rel = float((direct - reference).abs().max() / reference.abs().max())
    assert rel < 1e-5, rel


def test_switch_is_put_back_also_after_an_error():
    assert torch.backends.mkldnn.enabled
    with pytest.raises(KeyError):
        with direct_cpu_convolutions(True):
            assert not torch.backends.mkldnn.enabled
            raise KeyError("boom")
    assert torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # a user's own setting is kept too
    try:
        with direct_cpu_convolutions(True):
            pass
        assert not torch.backends.mkldnn.enabled
    finally:
        torch.backends.mkldnn.enabled = True


@pytest.mark.parametrize("shape, dtype, device, expected", [
    ((1, 4, 32, 32), torch.float32, "cpu", True),   # 256 px
    ((2, 4, 64, 64), torch.float32, "cpu", True),   # 512 px: the limit
    ((1, 4, 64, 65), torch.float32, "cpu", False),
    ((1, 4, 96, 96), torch.float32, "cpu", False),  # 768 px: oneDNN is faster
    ((1, 4, 32, 32), torch.bfloat16, "cpu", False),  # reduced precision: only oneDNN is fast
    ((1, 4, 32, 32), torch.float32, "meta", False),  # not the CPU
])
def test_use_direct_kernel(shape, dtype, device, expected):
    assert DIRECT_MAX_LATENT_PIXELS == 64 * 64
    assert use_direct_kernel(torch.empty(shape, device=device), dtype) is expected
