"""O(N)-memory attention in plain PyTorch: online softmax over key chunks, recomputing backward.

Any device, any bool mask broadcastable to (B, heads, Nq, Nk), token- or block-causal, banded. Memory is
q, k, v, out, a float32 log-sum-exp per query, plus one (B, heads, block_q, block_k) score block;
the (Nq, Nk) matrix is never formed, in the forward or the backward.

Forward: the online-softmax recurrence of FlashAttention (Dao et al. 2022, arXiv 2205.14135,
Alg. 1; Milakov & Gimelshein 2018): per query chunk keep a running row max m, running sum l and an
unnormalised accumulator, rescaled by exp(m_old - m_new) whenever the max grows.
Backward: FlashAttention-2 (Dao 2023, arXiv 2307.08691, Alg. 2): from the saved logsumexp L,
recompute P = exp(S - L) chunk by chunk; dV += Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - D) with
D = rowsum(dO ∘ O), dQ += dS K · scale, dK += dSᵀ Q · scale.

A query row with no allowed key has l = 0: its output is 0 and its logsumexp is stored as +inf,
so the recomputed P is exactly 0 there and no gradient flows (no NaN).
"""
from __future__ import annotations

import math

import torch

# Chunk sizing. A score block holds about Nk * head_dim / 4 float32 elements per (batch, head):
# with the mask slice that is ~1.25 * Nk * head_dim bytes of workspace per (batch, head), 0.08x
# of q, k, v and out in float32 (0.16x in 16-bit), which keeps the peak within 1.2x of the O(N)
# bound at long N. Short sequences get at least MIN_BLOCK_ELEMENTS per block over all
# (batch, heads) (4 MiB), so they run in few, large matmuls.
MIN_BLOCK_ELEMENTS = 1 << 20
BLOCK_K = 1024


def default_blocks(b: int, h: int, nq: int, nk: int, d: int) -> tuple[int, int]:
    """(block_q, block_k): key chunks of BLOCK_K, query chunks sized by the workspace target."""
    block_k = min(nk, BLOCK_K)
    per_head = max(nk * d // 4, MIN_BLOCK_ELEMENTS // max(1, b * h))
    block_q = max(16, per_head // block_k)
    block_q = 1 << int(math.log2(block_q))  # a power of two keeps the matmuls regular
    return min(nq, block_q), block_k


def _as_4d(mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is None:
        return None
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _block_mask(mask, causal, causal_block, window, qs, qe, ks, ke, device):
    """Allowed-mask for the score block [qs:qe, ks:ke], None when everything is allowed."""
    allowed = None
    if mask is not None:
        rows = slice(qs, qe) if mask.shape[-2] > 1 else slice(None)
        cols = slice(ks, ke) if mask.shape[-1] > 1 else slice(None)
        allowed = mask[..., rows, cols]
    # Causal: the block is entirely visible when its last key's block <= its first query's block
    # (and, with a window, its last query's block - its first key's block < window).
    inside = (ke - 1) // causal_block <= qs // causal_block and (
        window is None or (qe - 1) // causal_block - ks // causal_block < window)
    if causal and not inside:
        qi = torch.arange(qs, qe, device=device) // causal_block
        kj = torch.arange(ks, ke, device=device) // causal_block
        lag = qi[:, None] - kj[None, :]
        c = (lag >= 0) if window is None else (lag >= 0) & (lag < window)
        allowed = c if allowed is None else allowed & c
    return allowed


def _key_range(causal, causal_block, window, qs, qe, nk, block_k):
    """The key chunks' starts any query in [qs, qe) may see: causal ends the range after the last
    query's block, a window starts it at the first query's block - window + 1 (chunk-aligned)."""
    if not causal:
        return range(0, nk, block_k)
    end = min(nk, ((qe - 1) // causal_block + 1) * causal_block)
    start = 0 if window is None else max(0, (qs // causal_block - window + 1) * causal_block)
    return range(start // block_k * block_k, end, block_k)


class _Workspace:
    """Float32 score blocks allocated once per call and reused at every step.

    Allocating a fresh multi-MiB block per step let glibc's malloc fragment the heap: on some runs
    the resident peak at 16k tokens grew from 1.08x to 1.6x of the O(N) bound
    (benchmarks/attention.py); with reuse the peak is the same on every run.
    """

    def __init__(self, count: int, numel: int, device):
        self.bufs = [torch.empty(numel, device=device, dtype=torch.float32) for _ in range(count)]

    def matmul(self, i: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b as float32, written into buffer i."""
        shape = (*a.shape[:-1], b.shape[-1])
        out = self.bufs[i][: math.prod(shape)].view(shape)
        if a.dtype == torch.float32:
            return torch.matmul(a, b, out=out)
        return out.copy_(torch.matmul(a, b))


def _forward(q, k, v, mask, causal, causal_block, window, scale, block_q, block_k):
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    ws = _Workspace(1, b * h * min(nq, block_q) * min(nk, block_k), q.device)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, nq, 1, device=q.device, dtype=torch.float32)
    for qs in range(0, nq, block_q):
        qe = min(nq, qs + block_q)
        qc = q[:, :, qs:qe] * scale  # scaling q (bq x d) is cheaper than scaling scores (bq x bk)
        m = torch.full((b, h, qe - qs, 1), float("-inf"), device=q.device)
        l = torch.zeros((b, h, qe - qs, 1), device=q.device)
        acc = torch.zeros((b, h, qe - qs, d), device=q.device)
        for ks in _key_range(causal, causal_block, window, qs, qe, nk, block_k):
            ke = min(nk, ks + block_k)
            s = ws.matmul(0, qc, k[:, :, ks:ke].transpose(-1, -2))  # (B, nh, bq, bk)
            allowed = _block_mask(mask, causal, causal_block, window, qs, qe, ks, ke, q.device)
            if allowed is not None:
                s.masked_fill_(~allowed, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            # While a row has seen only masked keys its max is -inf; shifting by 0 keeps exp() = 0.
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)
            p = s.sub_(m_safe).exp_()
            correction = torch.exp(m - m_safe)
            l.mul_(correction).add_(p.sum(dim=-1, keepdim=True))
            acc.mul_(correction).add_(torch.matmul(p.to(v.dtype), v[:, :, ks:ke]).float())
            m = m_new
        empty = l == 0
        out[:, :, qs:qe] = (acc / l.masked_fill(empty, 1.0)).to(q.dtype)
        m_safe = m.masked_fill(m == float("-inf"), 0.0)
        lse[:, :, qs:qe] = (m_safe + torch.log(l)).masked_fill(empty, float("inf"))
    return out, lse


def _backward(q, k, v, out, lse, grad_out, mask, causal, causal_block, window, scale, block_q, block_k):
    b, h, nq, _ = q.shape
    nk = k.shape[-2]
    ws = _Workspace(2, b * h * min(nq, block_q) * min(nk, block_k), q.device)
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
    dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    for qs in range(0, nq, block_q):
        qe = min(nq, qs + block_q)
        qc, doc = q[:, :, qs:qe], grad_out[:, :, qs:qe]
        q_scaled = qc * scale
        lse_c = lse[:, :, qs:qe]
        # D_i = rowsum(dO ∘ O) (FlashAttention-2, Alg. 2 line 4), per chunk to stay O(chunk).
        delta_c = (doc.float() * out[:, :, qs:qe].float()).sum(dim=-1, keepdim=True)
        for ks in _key_range(causal, causal_block, window, qs, qe, nk, block_k):
            ke = min(nk, ks + block_k)
            kc, vc = k[:, :, ks:ke], v[:, :, ks:ke]
            s = ws.matmul(0, q_scaled, kc.transpose(-1, -2))
            allowed = _block_mask(mask, causal, causal_block, window, qs, qe, ks, ke, q.device)
            if allowed is not None:
                s.masked_fill_(~allowed, float("-inf"))
            p = s.sub_(lse_c).exp_()  # P recomputed from the saved logsumexp
            dv[:, :, ks:ke] += torch.matmul(p.to(v.dtype).transpose(-1, -2), doc).float()
            dp = ws.matmul(1, doc, vc.transpose(-1, -2))
            ds = p.mul_(dp.sub_(delta_c)).to(q.dtype)  # dS = P ∘ (dP - D), reusing P's storage
            dq[:, :, qs:qe] += torch.matmul(ds, kc).float()
            dk[:, :, ks:ke] += torch.matmul(ds.transpose(-1, -2), qc).float()
    return dq.mul_(scale).to(q.dtype), dk.mul_(scale).to(k.dtype), dv.to(v.dtype)


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, causal_block, window, scale, block_q, block_k):
        # Precision follows the input dtype (float32 accumulators), not an enclosing autocast.
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _forward(q, k, v, mask, causal, causal_block, window, scale, block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.args = (causal, causal_block, window, scale, block_q, block_k)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        with torch.autocast(q.device.type, enabled=False):
            dq, dk, dv = _backward(q, k, v, out, lse, grad_out.contiguous(), mask, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_block: int = 1,
    window: int | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
) -> torch.Tensor:
    """Attention over (B, heads, N, head_dim) tensors in O(N) memory; see the module docstring.
    `window` (with `causal`): block(i) - block(j) < window too; key chunks outside the band are skipped."""
    b, h, nq, d = q.shape
    nk = k.shape[-2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    dq_, dk_ = default_blocks(b, h, nq, nk, d)
    block_q = block_q or dq_
    block_k = block_k or dk_
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got {block_q}, {block_k}")
    return _ChunkedAttention.apply(q, k, v, _as_4d(mask), causal, causal_block, window, scale, block_q, block_k)
