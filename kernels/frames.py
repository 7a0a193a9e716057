"""Block-causal and banded attention as one unmasked SDPA call per query frame.

Under the block-causal rule (`ulvideo.attention`: key j visible to query i iff
block(j) <= block(i), and with a window of W blocks also block(i) - block(j) < W) every query of
frame f sees exactly the keys of frames max(0, f - W + 1) .. f: one contiguous range. So the
masked attention over N tokens is N / causal_block calls of torch's fused SDPA kernel without any
mask, each over its frame's queries and its key range, and the fully masked blocks are never
computed. Memory is O(N): no mask exists, and a call's scores live inside the fused kernel.

Backward on CPU (`_FramesCPU`): the forward keeps each frame's log-sum-exp from
`aten._scaled_dot_product_flash_attention_for_cpu`; the backward calls that kernel's backward per
frame and per chunk of at most KEY_CHUNK keys, giving it the frame's whole output and
log-sum-exp. That is exact: FlashAttention-2's backward (Dao 2023, arXiv 2307.08691, Alg. 2)
recomputes P = exp(S - L) from the saved L and uses D = rowsum(dO ∘ O) of the whole output, so
any subset of keys yields its own dK, dV and its share of dQ. Keeping chunks small bounds the
backward's workspace (else the last frame's dK, dV of all N keys would add 25 % to the O(N)
bound). Other devices run the plain autograd of SDPA per frame (correct; more transient memory).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Keys per backward call: the workspace is 2 x KEY_CHUNK keys' dK, dV, ~3 % of the O(N) bound at
# 16k tokens, while each call still runs a few hundred queries against thousands of keys.
KEY_CHUNK = 2048


def frame_ranges(nq: int, nk: int, causal_block: int, window: int | None,
                 past: int = 0) -> list[tuple[int, int, int, int]]:
    """(query start, query end, key start, key end) per query frame; an empty key range (ks >= ke)
    only where a frame sees no key at all (a window with more queries than keys). `past`: keys
    before the first query (a multiple of causal_block), i.e. query frame f is key frame
    f + past / causal_block (streaming: a chunk's frames after the cached ones)."""
    if past % causal_block:
        raise ValueError(f"past = {past} keys is not a whole number of {causal_block}-token frames")
    out = []
    for qs in range(0, nq, causal_block):
        f = (qs + past) // causal_block
        ks = 0 if window is None else min(nk, max(0, f - window + 1) * causal_block)
        out.append((qs, min(nq, qs + causal_block), ks, min(nk, (f + 1) * causal_block)))
    return out


class _FramesCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ranges, scale):
        b, h, nq, _ = q.shape
        out = torch.zeros_like(q)
        lse = torch.full((b, h, nq), float("inf"), device=q.device, dtype=torch.float32)
        for qs, qe, ks, ke in ranges:
            if ks < ke:
                o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], scale=scale)
                out[:, :, qs:qe] = o
                lse[:, :, qs:qe] = l
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ranges, ctx.scale = ranges, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for qs, qe, ks, ke in ctx.ranges:
            rows = slice(qs, qe)
            for cs in range(ks, ke, KEY_CHUNK):
                keys = slice(cs, min(ke, cs + KEY_CHUNK))
                gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    grad_out[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
                    lse[:, :, rows], 0.0, False, scale=ctx.scale)
                dq[:, :, rows] += gq
                dk[:, :, keys] += gk
                dv[:, :, keys] += gv
        return dq, dk, dv, None, None


def frames_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal_block: int,
                     window: int | None = None, scale: float | None = None, past: int = 0) -> torch.Tensor:
    """Block-causal (banded with `window`) attention over (B, heads, N, head_dim) tensors, top-left
    aligned as `ulvideo.attention.attention(causal=True, ...)`, or with `past` keys before the first
    query (see `frame_ranges`); rows with no key give 0."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    ranges = frame_ranges(q.shape[-2], k.shape[-2], causal_block, window, past)
    if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return _FramesCPU.apply(q, k, v, ranges, scale)
    outs = [F.scaled_dot_product_attention(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], scale=scale)
            if ks < ke else q.new_zeros(*q.shape[:2], qe - qs, v.shape[-1]) for qs, qe, ks, ke in ranges]
    return torch.cat(outs, dim=2)
