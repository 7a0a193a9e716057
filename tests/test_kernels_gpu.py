"""Every attention backend usable on CUDA against the float64 reference, forward and backward.

Marked `gpu` (deselected by default, skipped without CUDA): `pytest -m gpu tests/test_kernels_gpu.py`.
`benchmarks/gpu_check.py` runs this file and then times the backends.
"""
from __future__ import annotations

import pytest
import torch

from ulvideo.attention import attention, available_backends, key_padding_mask
from ulvideo.kernels.reference import naive_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

GPU_BACKENDS = ["sdpa", "flex", "chunked", "triton", "xformers", "naive"]
STRUCTURED = ("causal", "block_causal", "banded")  # the cases flex takes (causal, no mask tensor)
# Max error relative to the reference's largest magnitude. 16-bit inputs are compared with a
# float64 reference computed from the same rounded inputs, so only kernel round-off remains.
REL_TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _usable(backend):
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} not usable on this machine")


def _case(name, b, h, nq, nk, device):
    g = torch.Generator(device="cpu").manual_seed(4)
    if name == "none":
        return {}
    if name == "causal":
        return {"causal": True}
    if name == "block_causal":
        return {"causal": True, "causal_block": 50}
    if name == "banded":
        return {"causal": True, "causal_block": 50, "window": 2}
    if name == "mask":
        m = torch.rand(b, 1, nq, nk, generator=g) > 0.3
        m[0, 0, 7] = False  # a row with no allowed key
        return {"mask": m.to(device)}
    if name == "key_padding_causal":
        valid = torch.ones(b, nk, dtype=torch.bool)
        valid[0, nk // 3 :] = False
        return {"mask": key_padding_mask(valid.to(device)), "causal": True}
    raise ValueError(name)


def _rel_err(a, r):
    return ((a.double() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["none", "causal", "block_causal", "banded", "mask", "key_padding_causal"])
@pytest.mark.parametrize("nq,nk,d", [(200, 200, 64), (150, 333, 40)])
def test_backend_agrees_with_reference_on_cuda(backend, dtype, case, nq, nk, d):
    _usable(backend)
    if backend == "xformers" and dtype == torch.float32 and d % 8:
        pytest.skip("xformers float32 kernels want head_dim % 8 == 0")  # not a dispatcher path
    if backend == "flex" and case not in STRUCTURED:
        pytest.skip("flex takes causal, block-causal and banded masks only")
    b, h = 2, 4
    if case in ("causal", "block_causal", "banded", "key_padding_causal"):
        nk = nq
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to("cuda", dtype) for n in (nq, nk, nk))
    kw = _case(case, b, h, nq, nk, "cuda")
    inp = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*inp, backend=backend, **kw)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_in, **kw)
    grad = torch.randn(out.shape, generator=g).to("cuda")
    out.backward(grad.to(dtype))
    ref.backward(grad.double())
    tol = REL_TOL[dtype]
    assert out.dtype == dtype and out.shape == (b, h, nq, d)
    assert _rel_err(out, ref) < tol
    for name, a, r in zip(("dq", "dk", "dv"), inp, ref_in):
        assert torch.isfinite(a.grad).all(), name
        assert _rel_err(a.grad, r.grad) < 2 * tol, name
    if case == "mask":  # the row with no allowed key is exactly 0
        assert torch.count_nonzero(out[0, :, 7]) == 0


@pytest.mark.parametrize("backend", ["chunked", "triton", "flex", "sdpa"])
def test_long_block_causal_stays_linear_in_memory(backend):
    """16k tokens, block-causal: a dense score matrix alone would be 8·16384²·2 B = 4 GiB."""
    _usable(backend)
    b, h, n, d = 1, 8, 16384, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = attention(q, k, v, causal=True, causal_block=256, backend=backend)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    linear = 8 * q.numel() * q.element_size()  # out, dO, dq, dk, dv and their float32 staging
    assert extra < 3 * linear, (extra, linear)
