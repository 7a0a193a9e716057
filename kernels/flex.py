"""FlexAttention (torch.nn.attention.flex_attention) for token-, block-causal and banded masks.

The mask is never a tensor of N² elements: a `BlockMask` lists, per block of 128 queries, the key
blocks any of its queries may see, split into full blocks (every pair allowed: no masking inside)
and partial ones (the mask rule, `mask_mod`, is applied element-wise). Blocks outside the
causal band are never computed. The block lists follow from the rule in closed form (queries see
one contiguous key range each, whose ends grow with the query), so building them costs
O((N / 128)²) and is done once per (shape, rule, device) and cached.

flex_attention is a compiled kernel: called eagerly it goes through `torch.compile` (a first
compile takes about a minute on CPU, then one per new shape); inside a compiled network it is
traced with the rest of the graph. torch 2.13 runs it forward and backward on CUDA, forward only
on CPU ("FlexAttention does not support backward on CPU").
"""
from __future__ import annotations

import functools
import math

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # flex_attention's default sparse block size


def _mask_mod(causal_block: int, window: int | None):
    def allowed(b, h, q_idx, kv_idx):
        lag = q_idx // causal_block - kv_idx // causal_block
        return (lag >= 0) if window is None else (lag >= 0) & (lag < window)

    return allowed


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(nbq, nbk) bool -> (counts (1, 1, nbq), indices (1, 1, nbq, nbk)): each row's True columns first."""
    counts = blocks.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


def build_block_mask(nq: int, nk: int, causal_block: int, window: int | None, device) -> BlockMask:
    """The BlockMask of the (banded) block-causal rule for Nq queries and Nk keys, top-left aligned."""
    nbq, nbk = math.ceil(nq / BLOCK), math.ceil(nk / BLOCK)
    q_first = torch.arange(nbq, device=device) * BLOCK
    q_last = torch.clamp(q_first + BLOCK, max=nq) - 1
    k_first = torch.arange(nbk, device=device) * BLOCK
    k_last = torch.clamp(k_first + BLOCK, max=nk) - 1

    def key_lo(i):  # first key visible to query i
        return torch.zeros_like(i) if window is None else torch.clamp(i // causal_block - window + 1, min=0) * causal_block

    def key_hi(i):  # last key visible to query i (may be before key_lo: no key)
        return (i // causal_block + 1) * causal_block - 1

    # any query of block r sees a key of block c: the union [lo(first), hi(last)] meets c's keys
    some = (k_last[None, :] >= key_lo(q_first)[:, None]) & (k_first[None, :] <= key_hi(q_last)[:, None])
    # every query sees every key: c's keys lie inside [lo(last), hi(first)], and both blocks are whole
    whole = ((q_last - q_first + 1) == BLOCK)[:, None] & ((k_last - k_first + 1) == BLOCK)[None, :]
    full = whole & (k_first[None, :] >= key_lo(q_last)[:, None]) & (k_last[None, :] <= key_hi(q_first)[:, None])
    partial = some & ~full
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=BLOCK,
                                    mask_mod=_mask_mod(causal_block, window), seq_lengths=(nq, nk))


@functools.lru_cache(maxsize=32)
def cached_block_mask(nq: int, nk: int, causal_block: int, window: int | None, device: str) -> BlockMask:
    return build_block_mask(nq, nk, causal_block, window, torch.device(device))


_compiled = None


def _compiled_flex():
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention)
    return _compiled


def flex_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal_block: int = 1,
                          window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Causal attention (block-causal for causal_block > 1, banded with `window`) over (B, heads, N,
    head_dim) tensors, top-left aligned as `ulvideo.attention.attention(causal=True, ...)`."""
    nq, nk = q.shape[-2], k.shape[-2]
    if torch.compiler.is_compiling():  # traced into the caller's graph (no cache lookups in a trace)
        mask = build_block_mask(nq, nk, causal_block, window, q.device)
        return flex_attention(q, k, v, block_mask=mask, scale=scale)
    mask = cached_block_mask(nq, nk, causal_block, window, str(q.device))
    return _compiled_flex()(q, k, v, block_mask=mask, scale=scale)
