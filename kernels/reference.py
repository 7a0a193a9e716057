"""Naive softmax attention: the reference every backend is tested against.

It materialises the full (B, heads, Nq, Nk) score matrix, so it is O(N²) in memory; use it for tests
and as the baseline of `benchmarks/attention.py`, never in a model.
"""
from __future__ import annotations

import math

import torch


def causal_allowed(nq: int, nk: int, causal_block: int, device=None, window: int | None = None) -> torch.Tensor:
    """(Nq, Nk) bool, True where query i may attend key j: block(j) <= block(i), block = index // causal_block,
    and with a `window` of W blocks also block(i) - block(j) < W (banded: blocks block(i) - W + 1 .. block(i)).

    Top-left aligned like `torch.nn.functional.scaled_dot_product_attention(is_causal=True)`:
    query 0 sees key 0, whatever Nk is. causal_block = 1 is token-causal; causal_block = tokens per
    frame is block-causal in time (all tokens of frames <= the query's frame).
    """
    qi = torch.arange(nq, device=device) // causal_block
    kj = torch.arange(nk, device=device) // causal_block
    lag = qi[:, None] - kj[None, :]
    return (lag >= 0) if window is None else (lag >= 0) & (lag < window)


def dense_mask(mask: torch.Tensor | None, causal: bool, causal_block: int, nq: int, nk: int, device,
               window: int | None = None) -> torch.Tensor | None:
    """Combine a broadcastable bool mask and the (banded) causal rule into one bool mask (None if neither)."""
    if causal:
        c = causal_allowed(nq, nk, causal_block, device, window)
        return c if mask is None else (mask & c)
    return mask


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_block: int = 1,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale + log mask) v; rows with no allowed key give 0 (not NaN).

    compute_dtype=torch.float64 gives the reference used by the agreement tests.
    """
    out_dtype = q.dtype
    if compute_dtype is not None:
        q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, nh, Nq, Nk)
    allowed = dense_mask(mask, causal, causal_block, q.shape[-2], k.shape[-2], q.device, window)
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # A row that may attend nothing has max -inf; subtracting 0 there keeps exp at exactly 0.
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(p, v).to(out_dtype)
