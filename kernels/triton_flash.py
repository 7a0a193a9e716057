"""Triton flash attention, forward and backward, with bool masks and token/block-causal masking.

Runs on CUDA; on CPU only under Triton's interpreter (TRITON_INTERPRET=1 set before this module is
imported), which is how the CPU tests exercise the same kernels.

Forward: one program per (query block, batch*head); the online softmax of FlashAttention-2
(Dao 2023, arXiv 2307.08691, Alg. 1) in base 2 (scores pre-multiplied by log2(e), exp2), storing
the base-2 log-sum-exp per query. Backward (same paper, Alg. 2), split in two kernels so that no
atomics are needed: one program per key block accumulates dK, dV over query blocks, one per query
block accumulates dQ over key blocks; both recompute P = exp2(S - LSE). D = rowsum(dO ∘ O) is
computed with torch beforehand. A query row with no allowed key stores LSE = +inf: its output is 0
and its recomputed P is 0 (no NaN). Matmuls run in the input dtype with float32 accumulation;
float32 inputs use IEEE float32 dots (not TF32) so they match the float32 reference.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _scores(q, k, offs_m, offs_n, b, h, M, smb, smh, smm, smn, NQ, NK, qk_scale, causal_block,
            CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Base-2 scores of one (BLOCK_M, BLOCK_N) block, -inf where attending is not allowed."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    valid = (offs_m[:, None] < NQ) & (offs_n[None, :] < NK)
    if CAUSAL:
        valid = valid & ((offs_n[None, :] // causal_block) <= (offs_m[:, None] // causal_block))
    if HAS_MASK:
        mv = tl.load(M + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=valid, other=0)
        valid = valid & (mv != 0)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _key_end(start_m, NQ, NK, causal_block, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    hi = NK
    if CAUSAL:
        last_q = tl.minimum(start_m + BLOCK_M, NQ) - 1
        hi = tl.minimum(NK, (last_q // causal_block + 1) * causal_block)
    return hi


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, M, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
                smb, smh, smm, smn, H, NQ, NK, qk_scale, causal_block,
                HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :],
                mask=(offs_m[:, None] < NQ) & d_ok, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = _key_end(pid_m * BLOCK_M, NQ, NK, causal_block, BLOCK_M, CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < NK) & d_ok
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _scores(q, k, offs_m, offs_n, b, h, M, smb, smh, smm, smn, NQ, NK, qk_scale, causal_block,
                    CAUSAL, HAS_MASK, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked so far: keep exp2 at 0
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    lse = tl.where(empty, float("inf"), m_safe + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < NQ) & d_ok)
    tl.store(LSE + pid_bh * NQ + offs_m, lse, mask=offs_m < NQ)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, M, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                     smb, smh, smm, smn, H, NQ, NK, qk_scale, sm_scale, causal_block,
                     HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    # q, dO and dQ share q's strides; k, dK share k's; v, dV share v's (all made contiguous).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_D
    kv_ok = (offs_n[:, None] < NK) & d_ok
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # the first query that can see this key block
        lo = (pid_n * BLOCK_N // causal_block) * causal_block
    for start_m in range(lo, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ok = (offs_m[:, None] < NQ) & d_ok
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=q_ok, other=0.0)
        do = tl.load(DO + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=q_ok, other=0.0)
        lse = tl.load(LSE + pid_bh * NQ + offs_m, mask=offs_m < NQ, other=float("inf"))
        delta = tl.load(DELTA + pid_bh * NQ + offs_m, mask=offs_m < NQ, other=0.0)
        s = _scores(q, k, offs_m, offs_n, b, h, M, smb, smh, smm, smn, NQ, NK, qk_scale, causal_block,
                    CAUSAL, HAS_MASK, PRECISION)
        p = tl.math.exp2(s - lse[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(DK + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, M, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                   smb, smh, smm, smn, H, NQ, NK, qk_scale, sm_scale, causal_block,
                   HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_D
    q_ok = (offs_m[:, None] < NQ) & d_ok
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=q_ok, other=0.0)
    do = tl.load(DO + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], mask=q_ok, other=0.0)
    lse = tl.load(LSE + pid_bh * NQ + offs_m, mask=offs_m < NQ, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * NQ + offs_m, mask=offs_m < NQ, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = _key_end(pid_m * BLOCK_M, NQ, NK, causal_block, BLOCK_M, CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (offs_n[:, None] < NK) & d_ok
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=kv_ok, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=kv_ok, other=0.0)
        s = _scores(q, k, offs_m, offs_n, b, h, M, smb, smh, smm, smn, NQ, NK, qk_scale, causal_block,
                    CAUSAL, HAS_MASK, PRECISION)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_ok)


def _config(q: torch.Tensor, d: int) -> dict:
    block_d = max(16, triton.next_power_of_2(d))
    if q.device.type == "cpu":  # interpreter: small blocks so that tests cover many-block loops
        block = 16
    else:
        block = 64 if block_d <= 64 else 32
    precision = "ieee" if q.dtype == torch.float32 else None  # None: Triton's default for 16-bit dots
    return dict(HEAD_D=d, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, PRECISION=precision)


def _mask_args(mask, q, b, h, nq, nk):
    """(pointer tensor, strides): the bool mask viewed as uint8, broadcast dims with stride 0."""
    if mask is None:
        return q, (0, 0, 0, 0)
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(b, h, nq, nk)
    return m.view(torch.uint8), m.stride()


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, causal, causal_block, scale):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        b, h, nq, d = q.shape
        nk = k.shape[-2]
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(b * h, nq, device=q.device, dtype=torch.float32)
        m_ptr, m_strides = _mask_args(mask, q, b, h, nq, nk)
        cfg = _config(q, d)
        grid = (triton.cdiv(nq, cfg["BLOCK_M"]), b * h)
        _fwd_kernel[grid](q, k, v, out, lse, m_ptr, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                          *out.stride()[:3], *m_strides, h, nq, nk, scale * LOG2E, causal_block,
                          CAUSAL=causal, HAS_MASK=mask is not None, **cfg)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.args = (causal, causal_block, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        causal, causal_block, scale = ctx.args
        b, h, nq, d = q.shape
        nk = k.shape[-2]
        # dO must share q's strides (the kernels index both with them).
        do = torch.empty_like(q, memory_format=torch.contiguous_format).copy_(grad_out)
        qc = q.contiguous()
        k, v = k.contiguous(), v.contiguous()
        delta = (do.float() * out.float()).sum(-1).reshape(b * h, nq)
        dq, dk, dv = torch.empty_like(qc), torch.empty_like(k), torch.empty_like(v)
        m_ptr, m_strides = _mask_args(mask, q, b, h, nq, nk)
        cfg = _config(q, d)
        common = (*qc.stride()[:3], *k.stride()[:3], *v.stride()[:3], *m_strides, h, nq, nk,
                  scale * LOG2E, scale, causal_block)
        flags = dict(CAUSAL=causal, HAS_MASK=mask is not None, **cfg)
        _bwd_dkdv_kernel[(triton.cdiv(nk, cfg["BLOCK_N"]), b * h)](qc, k, v, do, lse, delta, dk, dv, m_ptr, *common, **flags)
        _bwd_dq_kernel[(triton.cdiv(nq, cfg["BLOCK_M"]), b * h)](qc, k, v, do, lse, delta, dq, m_ptr, *common, **flags)
        return dq, dk, dv, None, None, None, None


def triton_attention(q, k, v, *, mask=None, causal=False, causal_block=1, scale=None):
    """Flash attention over (B, heads, N, head_dim) tensors; see the module docstring."""
    d = q.shape[-1]
    if d > 256:
        raise ValueError(f"triton attention supports head_dim <= 256, got {d}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"triton attention wants float16/bfloat16/float32, got {q.dtype}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return _TritonAttention.apply(q, k, v, mask, causal, causal_block, scale)
