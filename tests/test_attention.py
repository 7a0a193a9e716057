"""Agreement of every CPU attention backend with naive float64 softmax attention, forward and backward."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from ulvideo import attention as attn_mod
from ulvideo.attention import attention, block_causal_mask, key_padding_mask, resolve_backend, set_backend
from ulvideo.kernels.reference import naive_attention

CPU_BACKENDS = ["sdpa", "chunked", "naive"]


def _qkv(b=2, h=3, nq=13, nk=13, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (nq, nk, nk)]


def _reference(q, k, v, **kw):
    return naive_attention(q.double(), k.double(), v.double(), **kw)


def _masks(b, h, nq, nk, seed=1):
    g = torch.Generator().manual_seed(seed)
    full = torch.rand(b, h, nq, nk, generator=g) > 0.4
    full[0, 0, 2] = False  # a fully masked row
    pad_valid = torch.ones(b, nk, dtype=torch.bool)
    pad_valid[0, nk // 2 :] = False
    return {
        "none": {},
        "causal": {"causal": True},
        "full_mask": {"mask": full},
        "head_broadcast": {"mask": full[:, :1]},
        "key_padding": {"mask": key_padding_mask(pad_valid)},
        "padding_and_causal": {"mask": key_padding_mask(pad_valid), "causal": True},
        "banded": {"causal": True, "causal_block": 3, "window": 2},
    }


def test_block_causal_mask_rule():
    m = block_causal_mask(3, 4)
    frame = torch.arange(12) // 4
    for i in range(12):
        for j in range(12):
            assert bool(m[i, j]) == (frame[j] <= frame[i])


def test_key_padding_mask_shape_and_errors():
    valid = torch.tensor([[True, False, True]])
    assert key_padding_mask(valid).shape == (1, 1, 1, 3)
    with pytest.raises(ValueError):
        key_padding_mask(valid.float())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", ["none", "causal", "full_mask", "head_broadcast", "key_padding", "padding_and_causal",
                                  "banded"])
@pytest.mark.parametrize("nq,nk", [(13, 13), (7, 19)])
def test_forward_backward_agree_with_float64_reference(backend, case, nq, nk):
    q, k, v = _qkv(nq=nq, nk=nk)
    kw = _masks(2, 3, nq, nk)[case]
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_in, **kw)
    inp = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inp, backend=backend, **kw)
    assert out.shape == (2, 3, nq, q.shape[-1])
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    out.backward(grad_out)
    ref.backward(grad_out.double())
    for a, r in zip(inp, ref_in):
        assert torch.isfinite(a.grad).all()
        torch.testing.assert_close(a.grad.double(), r.grad, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_block_causal_argument_equals_materialised_mask(backend):
    q, k, v = _qkv(nq=12, nk=12)
    by_mask = attention(q, k, v, mask=block_causal_mask(3, 4), backend=backend)
    by_arg = attention(q, k, v, causal=True, causal_block=4, backend=backend)
    ref = _reference(q, k, v, mask=block_causal_mask(3, 4))
    torch.testing.assert_close(by_mask.double(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(by_arg.double(), ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_rows_are_zero_and_grads_finite(backend):
    q, k, v = _qkv(nq=6, nk=6)
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[3:, :2] = True  # rows 0..2 see nothing
    inp = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inp, mask=mask, backend=backend)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    out.sum().backward()
    for t in inp:
        assert torch.isfinite(t.grad).all()
    assert torch.equal(inp[0].grad[:, :, :3], torch.zeros_like(inp[0].grad[:, :, :3]))
    # Keys 2..5 are never attended: no gradient may reach them.
    assert torch.equal(inp[1].grad[:, :, 2:], torch.zeros_like(inp[1].grad[:, :, 2:]))


def test_override_precedence(monkeypatch, caplog):
    q, k, v = _qkv(nq=4, nk=4)
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    try:
        assert resolve_backend(q, k)[0] == "sdpa"
        set_backend("chunked")
        assert resolve_backend(q, k)[0] == "chunked"
        monkeypatch.setenv(attn_mod.ENV_VAR, "naive")
        assert resolve_backend(q, k)[0] == "naive"
        assert resolve_backend(q, k, backend="sdpa")[0] == "sdpa"
        with pytest.raises(ValueError):
            set_backend("nonsense")
        # Not usable on CPU: an explicit argument is an error, a configured choice falls back.
        with pytest.raises(RuntimeError):
            resolve_backend(q, k, backend="xformers")
        monkeypatch.setenv(attn_mod.ENV_VAR, "xformers")
        name, reason = resolve_backend(q, k)
        assert name == "sdpa" and "fell back" in reason
    finally:
        set_backend(None)
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    attn_mod._logged.clear()
    with caplog.at_level(logging.INFO, logger="ulvideo.attention"):
        attention(q, k, v)
        attention(q, k, v)
    assert sum("attention backend sdpa" in r.getMessage() for r in caplog.records) == 1


def test_auto_avoids_dense_mask_for_long_block_causal(monkeypatch):
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    q = torch.empty(1, 1, 8192, 8)
    assert resolve_backend(q, q, causal=True)[0] == "sdpa"
    # past the dense limit: frames of >= MIN_FRAME_TOKENS tokens as one SDPA call each (on CPU;
    # FlexAttention has no CPU backward and is slower forward), shorter frames and masks chunked
    name, reason = resolve_backend(q, q, causal=True, causal_block=256)
    assert name == "sdpa" and "per frame" in reason
    assert resolve_backend(q, q, causal=True, causal_block=256, window=4)[0] == "sdpa"
    assert resolve_backend(q, q, causal=True, causal_block=attn_mod.MIN_FRAME_TOKENS - 1)[0] == "chunked"
    assert resolve_backend(q, q, mask=block_causal_mask(32, 256))[0] == "chunked"
    assert resolve_backend(q, q, mask=key_padding_mask(torch.ones(1, 8192, dtype=torch.bool)))[0] == "sdpa"


def test_flex_runs_forward_only_on_cpu(monkeypatch):
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    q = torch.empty(1, 1, 64, 8)
    assert resolve_backend(q, q, causal=True, causal_block=8, backend="flex")[0] == "flex"
    with pytest.raises(RuntimeError, match="no CPU backward"):
        resolve_backend(q.requires_grad_(), q, causal=True, backend="flex")
    with pytest.raises(RuntimeError, match="no mask tensor"):
        resolve_backend(q.detach(), q.detach(), mask=torch.ones(64, 64, dtype=torch.bool), causal=True, backend="flex")
    try:  # configured (not an argument): falls back to auto
        set_backend("flex")
        name, reason = resolve_backend(q, q, causal=True)
        assert name == "sdpa" and "fell back" in reason
    finally:
        set_backend(None)


def test_chunked_precision_follows_inputs_under_autocast():
    from ulvideo.kernels.chunked import chunked_attention

    q, k, v = _qkv(nq=20, nk=20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_attention(q, k, v, causal=True, block_q=8, block_k=8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference(q, k, v, causal=True), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("causal_block,window,expected", [(300, None, "sdpa"), (300, 3, "sdpa"), (30, 20, "chunked")])
def test_auto_long_block_causal_matches_dense_sdpa(monkeypatch, causal_block, window, expected):
    """Past the dense-mask limit auto runs SDPA per frame, or the chunked kernel with its default
    (multi-chunk) blocks; either must equal SDPA given the materialised mask, values and gradients."""
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    q, k, v = _qkv(b=1, h=1, nq=2100, nk=2100, d=8, seed=3)
    kw = {"causal": True, "causal_block": causal_block, "window": window}
    assert resolve_backend(q, k, **kw)[0] == expected
    _assert_equals_masked_sdpa(lambda *t: attention(*t, **kw), (q, k, v),
                               block_causal_mask(2100 // causal_block, causal_block, window=window))


def _assert_equals_masked_sdpa(fn, qkv, mask) -> None:
    """fn(q, k, v) equals SDPA given the bool `mask`, values and the gradients of q, k, v."""
    inp = [t.clone().requires_grad_() for t in qkv]
    out = fn(*inp)
    ref_in = [t.clone().requires_grad_() for t in qkv]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    out.backward(g)
    ref.backward(g)
    for a, r in zip(inp, ref_in):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("frame_tokens,window", [(64, None), (64, 5), (64, 40), (32, None)])
def test_streamed_frames_match_their_rows_of_the_dense_mask(monkeypatch, caplog, frame_tokens, window):
    """Queries that are the last frames of the keys (a streamed chunk after cached frames), past
    the dense-mask limit: SDPA per frame with the keys' offset (frames of >= MIN_FRAME_TOKENS
    tokens; else the chunked kernel with the mask) equals SDPA given `frame_causal_mask`, values
    and gradients."""
    monkeypatch.delenv(attn_mod.ENV_VAR, raising=False)
    nq, nk = 16 * 64, 70 * 64  # 4.6M mask elements: past the limit
    assert nq * nk > attn_mod.DENSE_MASK_LIMIT
    q, k, v = _qkv(b=1, h=1, nq=nq, nk=nk, d=8, seed=4)
    with caplog.at_level(logging.INFO, logger="ulvideo.attention"):
        attn_mod._logged.clear()
        _assert_equals_masked_sdpa(lambda *t: attn_mod.trailing_frames_attention(*t, frame_tokens, window), (q, k, v),
                                   attn_mod.frame_causal_mask(nq, nk, frame_tokens, window=window))
    per_frame = "streamed frames, one SDPA call per frame" in caplog.text
    assert per_frame == (frame_tokens >= attn_mod.MIN_FRAME_TOKENS)


def test_bad_inputs_raise():
    q, k, v = _qkv()
    with pytest.raises(ValueError):
        attention(q, k, v, mask=torch.ones(13, 13))  # not bool
    with pytest.raises(ValueError):
        attention(q, k, v, mask=torch.ones(5, 13, dtype=torch.bool))
    with pytest.raises(ValueError):
        attention(q[0], k, v)


@pytest.mark.parametrize("block_q,block_k", [(4, 5), (1, 3), (16, 1)])
@pytest.mark.parametrize("case", ["none", "causal", "full_mask", "key_padding", "block_causal"])
def test_chunked_small_blocks_agree(block_q, block_k, case):
    """Many chunks: the online-softmax rescaling, skipped causal blocks and masked leading chunks."""
    from ulvideo.kernels.chunked import chunked_attention

    q, k, v = _qkv(nq=13, nk=17)
    kw = {"block_causal": {"causal": True, "causal_block": 3}}.get(case) or _masks(2, 3, 13, 17)[case]
    if case == "full_mask":
        kw = {"mask": kw["mask"].clone()}
        kw["mask"][1, 2, 5, :9] = False  # valid keys appear only in a late chunk
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_in, **kw)
    inp = [t.clone().requires_grad_() for t in (q, k, v)]
    out = chunked_attention(*inp, block_q=block_q, block_k=block_k, **kw)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(grad_out)
    ref.backward(grad_out.double())
    for a, r in zip(inp, ref_in):
        torch.testing.assert_close(a.grad.double(), r.grad, atol=5e-5, rtol=1e-4)


def test_chunked_bfloat16_close_to_reference():
    from ulvideo.kernels.chunked import chunked_attention

    q, k, v = _qkv(nq=40, nk=40, d=16)
    out = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, block_q=8, block_k=16)
    ref = _reference(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def _triton_interpreter_checks() -> dict:
    """Max |error| of the Triton kernels vs the float64 reference, forward and backward.

    Runs in a child process: Triton picks interpreter or compiler when a kernel is decorated, so
    TRITON_INTERPRET=1 must be in the environment before ulvideo.kernels.triton_flash is imported,
    which cannot be guaranteed inside a pytest process that may have imported it already.
    """
    nq, nk = 21, 37  # several 16-blocks, ragged last block, cross-attention
    full = torch.rand(2, 1, nq, nk, generator=torch.Generator().manual_seed(3)) > 0.5
    full[1, 0, 4] = False  # a fully masked row
    pad = torch.ones(2, nk, dtype=torch.bool)
    pad[0, 9:] = False
    cases = {
        "none": (nq, nk, {}, torch.float32),
        "causal": (nq, nq, {"causal": True}, torch.float32),
        "block_causal": (nq + 3, nq + 3, {"causal": True, "causal_block": 6}, torch.float32),
        "banded": (nq + 3, nq + 3, {"causal": True, "causal_block": 6, "window": 2}, torch.float32),
        "mask_head_broadcast": (nq, nk, {"mask": full}, torch.float32),
        "key_padding_causal": (nk, nk, {"mask": key_padding_mask(pad), "causal": True}, torch.float32),
        "float16": (nq, nk, {"causal": True}, torch.float16),
    }
    report = {}
    for name, (n_q, n_k, kw, dtype) in cases.items():
        q, k, v = (t.to(dtype) for t in _qkv(nq=n_q, nk=n_k, d=12, seed=11))
        name_used, _ = resolve_backend(q, k, backend="triton")
        inp = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*inp, backend="triton", **kw)
        ref_in = [t.double().requires_grad_() for t in (q, k, v)]
        ref = _reference(*ref_in, **kw)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
        out.backward(g.to(dtype))
        ref.backward(g.double())
        errs = {"out": (out.double() - ref).abs().max().item()}
        for label, a, r in zip(("dq", "dk", "dv"), inp, ref_in):
            errs[label] = (a.grad.double() - r.grad).abs().max().item() if torch.isfinite(a.grad).all() else float("inf")
        errs["dtype"] = str(dtype)
        errs["backend"] = name_used
        report[name] = errs
    return report


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__, "--triton-interpreter"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 7
    for name, errs in report.items():
        assert errs["backend"] == "triton", name
        tol = 5e-3 if errs["dtype"] == "torch.float16" else 2e-5
        for key in ("out", "dq", "dk", "dv"):
            assert errs[key] < tol, (name, key, errs)


if __name__ == "__main__" and "--triton-interpreter" in sys.argv:
    print(json.dumps(_triton_interpreter_checks()))
