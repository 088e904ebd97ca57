"""Text-key attention probabilities of image queries in joint (MMDiT / Flux) attention.

In a joint-attention block the text and image tokens form one sequence of L = n_txt + n_img (+ any
extra tokens) queries and keys, and each query's softmax runs over all L keys. A concept map is the
probability an image query gives to the concept's text keys, so what A-STAR needs from such a block
is the [n_img, n_txt] slice of the softmax, averaged over heads: text_key_probs.

Memory: the full probabilities of a block are [B, heads, n_img, L] (Flux at 1024 px: 24 heads x
4096 x 4608 floats = 1.8 GB per image in fp32). text_key_probs never builds them: it walks the image
queries in chunks, keeps only each query's log-sum-exp over all keys and its text slice, and its
backward recomputes one chunk's logits at a time (a custom autograd Function), so the largest
intermediate is one chunk of [B, heads, chunk, L] in the forward and in the backward.
Torch only, no ComfyUI.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


# Default budget for one chunk's logits, in elements (2^24 fp32 = 64 MiB).
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _span(name: str, span, length: int) -> tuple[int, int]:
    """(start, stop) of a token range given as a slice or a pair; checked against length."""
    if isinstance(span, slice):
        if span.step not in (None, 1):
            raise ValueError(f"{name} must be a contiguous range, got step {span.step}")
        start, stop = span.start or 0, length if span.stop is None else span.stop
    else:
        start, stop = span
    start, stop = int(start), int(stop)
    if not 0 <= start < stop <= length:
        raise ValueError(f"{name} token range [{start}, {stop}) is empty or outside the {length} tokens")
    return start, stop


def chunk_rows(batch: int, heads: int, n_keys: int, max_elements: int) -> int:
    """How many queries one chunk may hold so that its logits [batch, heads, rows, n_keys] have at
    most max_elements elements (at least 1 query)."""
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    return max(1, max_elements // max(1, batch * heads * n_keys))


def _mask_rows(mask: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    """Rows [start, stop) of an attention mask broadcastable to [B, heads, Lq, Lk] (a mask with one
    query row applies to every query)."""
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., start:stop, :]


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for every input dtype, except fp64 when an input is fp64 (exact gradient checks)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunk_logits(q_chunk, k, scale, mask):
    """Logits [B, H, c, L] of a chunk of queries (in k's dtype, fp32 or fp64), with the mask applied
    as the model does."""
    logits = torch.matmul(q_chunk.to(k.dtype), k.transpose(-1, -2)) * scale
    if mask is None:
        return logits
    if mask.dtype == torch.bool:
        return logits.masked_fill(~mask, float("-inf"))
    return logits + mask.to(logits.dtype)


class _TextKeyProbs(torch.autograd.Function):
    """Head-mean softmax probabilities of image queries on the text keys, chunked over queries.

    forward(q_img [B, H, N, d], k [B or 1, H, L, d], txt (start, stop), scale, mask, rows)
        -> [B, N, T] fp32. Saves q_img, k and the per-query log-sum-exp [B, H, N] only.
    backward: with P = softmax over all L keys, O[b,i,t] = mean_h P[b,h,i,txt+t] and G = dLoss/dO,
        dLogits = P * (g - r) where g is G/H on the text columns (0 elsewhere) and
        r[b,h,i] = sum_t G[b,i,t]/H * P[b,h,i,txt+t]; dq = scale * dLogits @ k and
        dk = scale * dLogits^T @ q, recomputed one chunk of queries at a time."""

    @staticmethod
    def forward(ctx, q_img, k, txt, scale, mask, rows):
        t0, t1 = txt
        kf = k.to(_work_dtype(q_img, k))
        heads = q_img.shape[1]
        out, lses = [], []
        for start in range(0, q_img.shape[2], rows):
            stop = min(start + rows, q_img.shape[2])
            logits = _chunk_logits(q_img[:, :, start:stop], kf, scale, _mask_rows(mask, start, stop))
            lse = torch.logsumexp(logits, dim=-1)  # [B, H, c]
            out.append(torch.exp(logits[..., t0:t1] - lse.unsqueeze(-1)).sum(1) / heads)
            lses.append(lse)
            del logits
        ctx.save_for_backward(q_img, k, torch.cat(lses, dim=-1))
        ctx.txt, ctx.scale, ctx.mask, ctx.rows = txt, scale, mask, rows
        return torch.cat(out, dim=1)

    @staticmethod
    @once_differentiable  # a second derivative is not needed by the guidance (and raises clearly)
    def backward(ctx, grad_out):
        q_img, k, lse = ctx.saved_tensors
        t0, t1 = ctx.txt
        scale, mask, rows = ctx.scale, ctx.mask, ctx.rows
        heads = q_img.shape[1]
        kf = k.to(_work_dtype(q_img, k))
        need_q, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_q = torch.empty(q_img.shape, dtype=kf.dtype, device=q_img.device) if need_q else None
        grad_k = torch.zeros(q_img.shape[0], *kf.shape[1:], dtype=kf.dtype, device=kf.device) if need_k else None
        g_all = grad_out.to(kf.dtype) / heads  # [B, N, T]
        for start in range(0, q_img.shape[2], rows):
            stop = min(start + rows, q_img.shape[2])
            q_chunk = q_img[:, :, start:stop].to(kf.dtype)
            logits = _chunk_logits(q_chunk, kf, scale, _mask_rows(mask, start, stop))
            probs = torch.exp(logits - lse[:, :, start:stop].unsqueeze(-1))  # [B, H, c, L]
            del logits
            g = g_all[:, start:stop].unsqueeze(1)  # [B, 1, c, T]
            text_term = probs[..., t0:t1] * g  # P * g on the text columns, [B, H, c, T]
            r = text_term.sum(-1, keepdim=True)  # [B, H, c, 1]
            d_logits = probs.mul_(-r)  # -P * r everywhere, in place (no second chunk-size tensor)
            d_logits[..., t0:t1] += text_term
            del text_term
            d_logits.mul_(scale)
            if need_q:
                grad_q[:, :, start:stop] = torch.matmul(d_logits, kf)
            if need_k:
                grad_k += torch.matmul(d_logits.transpose(-1, -2), q_chunk)
            del d_logits, probs
        if need_k and k.shape[0] != grad_k.shape[0]:
            grad_k = grad_k.sum(0, keepdim=True)  # k was shared by the batch
        return (grad_q.to(q_img.dtype) if need_q else None,
                grad_k.to(k.dtype) if need_k else None, None, None, None, None)


def text_key_probs(q: torch.Tensor, k: torch.Tensor, txt, img, *, scale: float | None = None,
                   mask: torch.Tensor | None = None,
                   max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Head-mean attention probabilities of the image queries on the text keys.

    q: [B, heads, L, d] queries and k: [B or 1, heads, L, d] keys of one joint-attention call (after
    any RoPE / QK-norm, exactly as handed to the attention kernel). txt, img: the text and image token
    ranges of the sequence, each a slice or a (start, stop) pair (Flux and SD3: text first,
    txt = (0, n_txt), img = (n_txt, n_txt + n_img)). scale: the logit scale, default 1/sqrt(d).
    mask: optional attention mask as the kernel gets it, broadcastable to [B, heads, L, L] (bool:
    True = attend; float: added to the logits).

    Returns [B, n_img, n_txt] float32 (float64 for float64 inputs): softmax(q k^T * scale) over all L keys (text and image), rows
    of the image queries, columns of the text keys, mean over heads. Computed in fp32 in chunks of
    image queries whose logits hold at most max_chunk_elements elements (fp64 inputs: in fp64); no [B, heads, n_img, L]
    tensor is ever built, in the forward or in the backward. Differentiable with respect to q and k
    (the gradient is that of the explicit computation).
    """
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B, heads, L, d], got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k disagree on heads or head size: {tuple(q.shape)} vs {tuple(k.shape)}")
    if k.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"k batch must be 1 or {q.shape[0]} (the q batch), got {k.shape[0]}")
    n_keys = k.shape[2]
    txt = _span("text", txt, n_keys)
    img = _span("image", img, q.shape[2])
    if scale is None:
        scale = q.shape[-1] ** -0.5
    rows = chunk_rows(q.shape[0], q.shape[1], n_keys, max_chunk_elements)
    q_img = q[:, :, img[0]:img[1]]
    if mask is not None:
        mask = mask.detach()
        if mask.dim() >= 2 and mask.shape[-2] != 1:
            mask = mask[..., img[0]:img[1], :]
    return _TextKeyProbs.apply(q_img, k, txt, float(scale), mask, rows)
