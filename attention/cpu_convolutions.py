"""Which CPU convolution kernel a guidance pass runs on.

On CPU, PyTorch runs a float32 convolution on oneDNN, which reorders the weight into its blocked
layout at every call, forward and backward. A guidance pass runs the UNet at batch 1, and on a small
latent its deep layers have few pixels (SD1.5 at 256 px: 8x8 and 4x4 activations of 1280 channels),
so the reorder of a 1280x1280x3x3 weight costs more than the convolution: 53 ms against 12 ms on
PyTorch's direct kernel (im2col + GEMM), which needs no reorder. The direct kernel computes the same
sums in another order (the gradient agrees to 3e-6 relative). On larger latents the two break even
(512 px) and oneDNN wins a little (768 px), hence the size limit. Torch only.
"""
from __future__ import annotations

import contextlib

import torch

# Latents up to this many pixels (64 x 64: 512 px for an 8x VAE) are guided on the direct kernel.
DIRECT_MAX_LATENT_PIXELS = 64 * 64


def use_direct_kernel(latent: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    """Whether a guidance pass on `latent` ([B, C, H, W]) computed in `compute_dtype` runs its convolutions
    on the direct kernel: a float32 pass on the CPU, on a latent of at most DIRECT_MAX_LATENT_PIXELS.
    (Reduced-precision CPU convolutions stay on oneDNN, the only fast kernel for them.)"""
    return (latent.device.type == "cpu" and compute_dtype == torch.float32
            and latent.shape[-2] * latent.shape[-1] <= DIRECT_MAX_LATENT_PIXELS)


@contextlib.contextmanager
def direct_cpu_convolutions(enabled: bool = True):
    """While open (and `enabled`), CPU convolutions, and their backward, run on PyTorch's direct kernel
    instead of oneDNN. oneDNN's switch is process-wide: it is put back as it was when the context closes,
    also on an exception; ComfyUI runs one prompt at a time, so no other model call sees it."""
    if not enabled:
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before
