"""SDPA per frame (ulvideo.kernels.frames) and FlexAttention (ulvideo.kernels.flex) against the
chunked kernel, the reference they replace for block-causal and banded masks, and the float64 naive
attention; the block masks FlexAttention gets against the element-wise rule."""
from __future__ import annotations

import pytest
import torch

from ulvideo.kernels import frames as frames_mod
from ulvideo.kernels.chunked import chunked_attention
from ulvideo.kernels.reference import causal_allowed, naive_attention

# (Nq, Nk, tokens per frame, window): equal lengths, a band, more queries than keys (the last frames
# see no key under the band: output 0, no gradient), more keys than queries, ragged last frame
CASES = [(24, 24, 4, None), (24, 24, 4, 2), (30, 18, 5, 2), (18, 30, 5, None), (13, 13, 3, 1)]


def _qkv(nq, nk, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, n, d, generator=g).to(dtype) for n in (nq, nk, nk)]


def _run(fn, q, k, v, grad):
    inp = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*inp)
    out.backward(grad.to(out.dtype))
    return out, [t.grad for t in inp]


@pytest.mark.parametrize("key_chunk", [frames_mod.KEY_CHUNK, 7])
@pytest.mark.parametrize("nq,nk,tokens,window", CASES)
def test_frames_agree_with_chunked_and_float64(nq, nk, tokens, window, key_chunk, monkeypatch):
    monkeypatch.setattr(frames_mod, "KEY_CHUNK", key_chunk)  # 7: every frame's backward in several key chunks
    q, k, v = _qkv(nq, nk)
    grad = torch.randn(2, 3, nq, 8, generator=torch.Generator().manual_seed(1))
    kw = {"causal_block": tokens, "window": window}
    out, grads = _run(lambda *t: frames_mod.frames_attention(*t, **kw), q, k, v, grad)
    ref, ref_grads = _run(lambda *t: chunked_attention(*t, causal=True, **kw), q, k, v, grad)
    exact, exact_grads = _run(lambda *t: naive_attention(*t, causal=True, **kw), q.double(), k.double(), v.double(), grad)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out.double(), exact, atol=2e-6, rtol=1e-5)
    for a, r, e in zip(grads, ref_grads, exact_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, atol=5e-6, rtol=1e-5)
        torch.testing.assert_close(a.double(), e, atol=5e-6, rtol=1e-5)
    if nq > nk and window is not None:  # frames past the keys' reach: exactly 0, no gradient
        dead = ((torch.arange(nq) // tokens) - window + 1) * tokens >= nk
        assert dead.any() and torch.count_nonzero(out[:, :, dead]) == 0
        assert torch.count_nonzero(grads[0][:, :, dead]) == 0


def test_frames_bfloat16_close_to_reference():
    q, k, v = _qkv(40, 40, d=16, dtype=torch.bfloat16)
    out = frames_mod.frames_attention(q, k, v, causal_block=8, window=3)
    ref = naive_attention(q.float(), k.float(), v.float(), causal=True, causal_block=8, window=3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("nq,nk,tokens,window", [(1000, 1000, 100, None), (1000, 1000, 100, 3), (900, 400, 64, 2),
                                                 (300, 700, 1, None), (777, 777, 37, 5)])
def test_flex_block_mask_is_the_element_rule(nq, nk, tokens, window):
    """Per 128 x 128 block: listed iff some pair in it is allowed; listed as full only if every pair
    is (then no mask_mod runs there); mask_mod is the element rule. No kernel, no compile."""
    from ulvideo.kernels.flex import BLOCK, build_block_mask

    bm = build_block_mask(nq, nk, tokens, window, "cpu")
    allowed = causal_allowed(nq, nk, tokens, window=window)
    nbq, nbk = -(-nq // BLOCK), -(-nk // BLOCK)
    padded = torch.zeros(nbq * BLOCK, nbk * BLOCK, dtype=torch.bool)
    padded[:nq, :nk] = allowed
    blocks = padded.view(nbq, BLOCK, nbk, BLOCK)
    some, every = blocks.any(dim=(1, 3)), blocks.all(dim=(1, 3))
    listed = bm.to_dense()[0, 0].bool()  # partial and full blocks
    assert torch.equal(listed, some)
    full = torch.zeros(nbq, nbk, dtype=torch.bool)
    for r in range(nbq):
        full[r, bm.full_kv_indices[0, 0, r, :bm.full_kv_num_blocks[0, 0, r]].long()] = True
    assert not (full & ~every).any()  # a full block is fully allowed
    assert full.sum() > 0 or window is not None or tokens == 1
    qi, kj = torch.meshgrid(torch.arange(nq), torch.arange(nk), indexing="ij")
    assert torch.equal(bm.mask_mod(0, 0, qi, kj), allowed)


@pytest.mark.slow  # compiles FlexAttention with inductor's C++ backend: ~1 min, then ~15 s per shape
@pytest.mark.parametrize("nq,nk,tokens,window", CASES[:3])
def test_flex_forward_agrees_with_chunked(nq, nk, tokens, window):
    """FlexAttention's CPU kernel has no backward in torch 2.13; its backward is tested on CUDA
    (tests/test_kernels_gpu.py)."""
    from ulvideo.kernels.flex import flex_causal_attention

    q, k, v = _qkv(nq, nk)
    with torch.no_grad():
        out = flex_causal_attention(q, k, v, causal_block=tokens, window=window)
        ref = chunked_attention(q, k, v, causal=True, causal_block=tokens, window=window)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
