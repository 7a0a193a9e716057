"""xformers `memory_efficient_attention` behind the (B, heads, N, head_dim) convention.

xformers has no CPU kernels; `ulvideo.attention` imports this module only for CUDA tensors.
xformers wants (B, N, heads, head_dim) and an additive float bias instead of a bool mask. Token
causal masking uses `LowerTriangularMask` (top-left aligned, like SDPA's is_causal); any other mask
is materialised as a bias, whose last dim xformers needs aligned to 8 elements, so it is allocated
padded and sliced. Rows with no allowed key: same treatment as the SDPA path (attend everything,
then zero the output), because kernels return NaN there.
"""
from __future__ import annotations

import math

import torch

from ulvideo.kernels.reference import dense_mask


def _bias_from_mask(allowed: torch.Tensor, b: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    nq, nk = allowed.shape[-2:]
    allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
    lead = allowed.shape[:2]
    padded = torch.zeros(*lead, nq, math.ceil(nk / 8) * 8, device=allowed.device, dtype=dtype)
    bias = padded[..., :nk]
    bias.masked_fill_(~allowed, float("-inf"))
    return bias.expand(b, h, nq, nk)


def xformers_attention(q, k, v, *, mask=None, causal=False, causal_block=1, scale=None):
    """memory_efficient_attention on (B, heads, N, head_dim) tensors -> (B, heads, Nq, head_dim)."""
    import xformers.ops as xops

    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    # (B, nh, N, hs) -> (B, N, nh, hs): a view; xformers accepts strided inputs with a unit last stride.
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))
    if mask is None and (not causal or causal_block == 1):
        bias = xops.LowerTriangularMask() if causal else None
        out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, scale=scale)
        return out.transpose(1, 2)
    allowed = dense_mask(mask, causal, causal_block, nq, nk, q.device)
    has_key = allowed.any(dim=-1, keepdim=True)
    bias = _bias_from_mask(allowed | ~has_key, b, h, q.dtype)
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, scale=scale).transpose(1, 2)
    return out * has_key.to(out.dtype)
