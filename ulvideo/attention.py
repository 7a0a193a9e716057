"""The one door to attention: every network calls `attention`, never a kernel directly.

Tensor convention (stated once, here): q is (B, heads, Nq, head_dim), k and v are
(B, heads, Nk, head_dim) (Nk may differ from Nq: cross-attention), the output is
(B, heads, Nq, head_dim). `mask` is a bool tensor broadcastable to (B, heads, Nq, Nk), True = may
attend. `causal=True` allows key j for query i iff block(j) <= block(i) with
block = index // causal_block, top-left aligned as in torch SDPA's `is_causal`; causal_block = 1 is
token-causal, causal_block = tokens_per_frame is block-causal in time without materialising a
(N, N) mask (same result as `mask=block_causal_mask(...)`); `window=W` (with causal) also requires
block(i) - block(j) < W: a band of W frames (same as `block_causal_mask(..., window=W)`). A query
row with no allowed key gets output 0 and zero gradient on every backend (never NaN).

Backends (all agree with `ulvideo.kernels.reference.naive_attention` in tests):
  sdpa      torch.nn.functional.scaled_dot_product_attention: fused flash / memory-efficient
            kernels on CUDA and CPU when no mask; block-causal and banded masks past the dense-mask
            limit as one unmasked call per query frame over its contiguous key range
            (`ulvideo.kernels.frames`, O(N) memory); a materialised mask otherwise
  flex      FlexAttention with a block mask built once per shape (`ulvideo.kernels.flex`):
            token-, block-causal and banded masks, fully masked blocks skipped; compiled; forward
            and backward on CUDA, forward only on CPU (torch 2.13)
  chunked   O(N)-memory online-softmax PyTorch implementation with a chunk-recomputing backward,
            any device, arbitrary masks (`ulvideo.kernels.chunked`); the reference of the others
  triton    Triton flash-attention forward + backward (CUDA; CPU only under TRITON_INTERPRET=1)
  xformers  xformers.ops.memory_efficient_attention (CUDA with xformers installed)
  naive     the O(N²) reference (tests and benchmarks)
(triton and xformers take a window as a materialised mask.)

Choice, first match wins: the `backend=` argument; the environment variable ULVIDEO_ATTENTION;
`set_backend(...)` (training calls it with `train.attention_backend`); otherwise "auto":
SDPA whenever it needs no large dense mask (no mask, token-causal, or a mask with at most
`DENSE_MASK_LIMIT` elements). Past that limit, block-causal and banded masks go to FlexAttention
on CUDA and to SDPA per frame elsewhere (on CPU FlexAttention has no backward, and its forward is
slower than SDPA per frame: benchmarks/attention.py), frames of fewer than `MIN_FRAME_TOKENS`
tokens and any other mask to the chunked kernel. Auto never picks Triton or xformers: they are opt-in
(argument, env var or config) until `benchmarks/gpu_check.py` has passed on the GPU in question.
The backend chosen is logged once per (backend, device type, reason), in eager calls (a compiled
network makes the same choice while it is traced).
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os

import torch
import torch.nn.functional as F

from ulvideo.kernels.reference import dense_mask, naive_attention

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "attention",
    "available_backends",
    "block_causal_mask",
    "check_window",
    "frame_causal_mask",
    "trailing_frames_attention",
    "get_backend",
    "key_padding_mask",
    "resolve_backend",
    "set_backend",
]

BACKENDS = ("auto", "sdpa", "flex", "chunked", "triton", "xformers", "naive")
ENV_VAR = "ULVIDEO_ATTENTION"
# A dense (Nq, Nk) mask larger than this is where auto stops using SDPA-with-mask (SDPA's
# memory then grows as N²) and switches to the chunked kernel, which never materialises it and
# skips fully masked blocks: 2**22 elements = a 2048 x 2048 mask. Measured on CPU, block-causal
# with 256 tokens per frame (benchmarks/attention.py --mask block_causal): chunked was 0.94x
# SDPA's speed at 2048 tokens, 1.4x at 4096 (with 0.3x its peak memory), 3.8x at 16384.
DENSE_MASK_LIMIT = 1 << 22
# Past the limit, frames of at least this many tokens run as one SDPA call each; shorter frames
# would make many calls too small for the fused kernel, and go to the chunked kernel instead.
MIN_FRAME_TOKENS = 64

log = logging.getLogger(__name__)
_configured: str | None = None
_logged: set[tuple[str, str, str]] = set()


def check_window(window, name: str = "window") -> int | None:
    """`window` (frames) if it is None (unlimited) or a positive int, else a ValueError naming `name`."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{name} = {window!r}: must be a positive number of frames, or None (unlimited)")
    return window


def frame_causal_mask(queries: int, keys: int, frame_tokens: int, device=None,
                      window: int | None = None) -> torch.Tensor:
    """(queries, keys) bool for queries that are the last `queries` tokens of the keys' sequence
    (frame-major, `frame_tokens` tokens a frame, the keys starting at a frame boundary): True iff
    frame(key) <= frame(query), i.e. every earlier frame and the query's own, and with a `window`
    of W frames also frame(query) - frame(key) < W. With queries == keys it is `block_causal_mask`;
    otherwise its last `queries` rows, restricted to the last `keys` columns (only the frames'
    distance matters, not where the keys start): the mask of streamed and query-blocked attention."""
    q_frame = (torch.arange(queries, device=device) + keys - queries) // frame_tokens
    k_frame = torch.arange(keys, device=device) // frame_tokens
    lag = q_frame[:, None] - k_frame[None, :]
    return (lag >= 0) if window is None else (lag >= 0) & (lag < window)


def block_causal_mask(num_frames: int, tokens_per_frame: int, device=None, window: int | None = None) -> torch.Tensor:
    """(N, N) bool with N = num_frames * tokens_per_frame (frame-major token order): token i may
    attend token j iff frame(j) <= frame(i), and with a `window` of W frames also
    frame(i) - frame(j) < W (frames frame(i) - W + 1 .. frame(i): block-causal and banded).
    Broadcasts against (B, heads, N, N)."""
    if num_frames < 1 or tokens_per_frame < 1:
        raise ValueError(f"num_frames and tokens_per_frame must be >= 1, got {num_frames}, {tokens_per_frame}")
    n = num_frames * tokens_per_frame
    return frame_causal_mask(n, n, tokens_per_frame, device, check_window(window))


def key_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """valid: bool (B, Nk), True for real tokens (e.g. text tokens before padding) -> (B, 1, 1, Nk)."""
    if valid.dtype != torch.bool or valid.dim() != 2:
        raise ValueError(f"key_padding_mask wants a bool (B, Nk) tensor, got {valid.dtype} {tuple(valid.shape)}")
    return valid[:, None, None, :]


def set_backend(name: str | None) -> None:
    """Process-wide backend choice (from `train.attention_backend`); None or "auto" restores auto."""
    global _configured
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _configured = None if name in (None, "auto") else name


def get_backend() -> str:
    """The requested backend before per-call resolution: env var, then set_backend, then "auto"."""
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r} is not one of {BACKENDS}")
        return env
    return _configured or "auto"


# Looked up once at import (no import of the packages themselves): a compiled network's trace
# reads these instead of calling importlib.
_INSTALLED = {name: importlib.util.find_spec(name) is not None for name in ("triton", "xformers")}
try:
    import torch.nn.attention.flex_attention  # noqa: F401  (torch >= 2.5)

    _INSTALLED["flex"] = True
except ImportError:
    _INSTALLED["flex"] = False


def _triton_usable(device: torch.device) -> bool:
    if not _INSTALLED["triton"]:
        return False
    if device.type == "cuda":
        return True
    # Triton's interpreter runs the same kernels on CPU tensors (slow; for tests only).
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def _xformers_usable(device: torch.device) -> bool:
    # xformers has no CPU kernels; only look for it where it could run.
    return device.type == "cuda" and _INSTALLED["xformers"]


def _flex_usable(device: torch.device) -> bool:
    # compiled through Triton on CUDA, through inductor's C++ backend on CPU
    return _INSTALLED["flex"] and (device.type == "cpu" or (device.type == "cuda" and _INSTALLED["triton"]))


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this process (not counting "auto"); flex runs on CPU
    without gradients only (see `resolve_backend`)."""
    device = torch.device(device)
    names = ["sdpa", "chunked", "naive"]
    if _flex_usable(device):
        names.append("flex")
    if _triton_usable(device):
        names.append("triton")
    if _xformers_usable(device):
        names.append("xformers")
    return names


def _dense_mask_elements(mask: torch.Tensor | None, causal: bool, causal_block: int, nq: int, nk: int,
                         window: int | None = None) -> int:
    """Elements of the mask SDPA would have to be given as a tensor (0 when it needs none)."""
    if causal and (causal_block > 1 or window is not None or mask is not None):
        lead = 1 if mask is None else math.prod(mask.shape[:-2]) if mask.dim() > 2 else 1
        return lead * nq * nk
    return 0 if mask is None else mask.numel()


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _cannot_run(name: str, q, k, v, mask, causal) -> str | None:
    """Why backend `name` cannot run this call (None: it can)."""
    usable = available_backends(q.device)
    if name not in usable:
        return f"not usable on {q.device.type} here (usable: {usable})"
    if name == "flex":
        if mask is not None or not causal:
            return "flex takes token-, block-causal and banded masks only (no mask tensor)"
        if q.device.type == "cpu" and _needs_grad(q, k, v):
            return "FlexAttention has no CPU backward in this torch"
    return None


def resolve_backend(q, k, mask=None, causal=False, causal_block=1, backend=None, window=None, v=None) -> tuple[str, str]:
    """(backend, reason) for this call, following the precedence in the module docstring."""
    device = q.device
    v = k if v is None else v
    source = "argument"
    requested = backend
    if requested is None:
        requested = get_backend()
        source = f"env {ENV_VAR}" if os.environ.get(ENV_VAR, "").strip() else "set_backend"
    if requested not in BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {BACKENDS}")
    if requested != "auto":
        why = _cannot_run(requested, q, k, v, mask, causal)
        if why is None:
            return requested, f"requested by {source}"
        msg = f"attention backend {requested!r} cannot run this call: {why}"
        if source == "argument":
            raise RuntimeError(msg)
        reason = msg + "; fell back to auto"
    else:
        reason = "auto"
    dense = _dense_mask_elements(mask, causal, causal_block, q.shape[-2], k.shape[-2], window)
    if dense <= DENSE_MASK_LIMIT:
        return "sdpa", reason + (f": mask of {dense} elements" if dense else ": no dense mask needed")
    past = f": a dense mask would have {dense} > {DENSE_MASK_LIMIT} elements"
    if mask is None:  # block-causal or banded: structured, no mask tensor needed
        if device.type == "cuda" and _cannot_run("flex", q, k, v, mask, causal) is None:
            return "flex", reason + past + "; FlexAttention with a block mask"
        if causal_block >= MIN_FRAME_TOKENS:
            return "sdpa", reason + past + "; one SDPA call per frame"
    return "chunked", reason + past


def trailing_frames_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_tokens: int,
                              window: int | None = None) -> torch.Tensor:
    """Block-causal attention of queries that are the last Nq tokens of the keys' sequence (a
    streamed chunk's frames against the cached earlier frames and their own; the mask is
    `frame_causal_mask(Nq, Nk, frame_tokens, window)`). Under auto, past the dense-mask limit and
    with frames of at least `MIN_FRAME_TOKENS` tokens, one SDPA call per query frame over its
    contiguous key range, as for the one-pass block-causal mask; otherwise `attention` with that
    mask (and whatever backend it is asked for)."""
    nq, nk = q.shape[-2], k.shape[-2]
    past = nk - nq
    dense = nq * nk
    if (get_backend() == "auto" and dense > DENSE_MASK_LIMIT and frame_tokens >= MIN_FRAME_TOKENS
            and past >= 0 and past % frame_tokens == 0 and nq % frame_tokens == 0):
        from ulvideo.kernels.frames import frames_attention

        check_window(window)
        if not torch.compiler.is_compiling():
            _log_once("sdpa", q.device, f"auto: a dense mask would have {dense} > {DENSE_MASK_LIMIT} elements; "
                                        "streamed frames, one SDPA call per frame")
        return frames_attention(q, k, v, causal_block=frame_tokens, window=window, past=past)
    return attention(q, k, v, mask=frame_causal_mask(nq, nk, frame_tokens, q.device, window))


def _log_once(name: str, device: torch.device, reason: str) -> None:
    key = (name, device.type, reason)
    if key not in _logged:
        _logged.add(key)
        log.info("attention backend %s on %s (%s)", name, device.type, reason)


def _check(q, k, v, mask, causal, causal_block, window) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, heads, N, head_dim); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if causal_block < 1:
        raise ValueError(f"causal_block must be >= 1, got {causal_block}")
    check_window(window)
    if window is not None and not causal:
        raise ValueError("a window needs causal=True (it bands the causal rule)")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (True = may attend), got {mask.dtype}")
        if mask.dim() > 4:
            raise ValueError(f"mask has {mask.dim()} dims; at most 4 (B, heads, Nq, Nk)")
        try:
            torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError as e:
            raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to (B, heads, Nq, Nk)") from e


def _sdpa(q, k, v, mask, causal, causal_block, window, scale):
    if mask is None and (not causal or (causal_block == 1 and window is None)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    nq, nk = q.shape[-2], k.shape[-2]
    if mask is None and _dense_mask_elements(None, causal, causal_block, nq, nk, window) > DENSE_MASK_LIMIT:
        from ulvideo.kernels.frames import frames_attention

        return frames_attention(q, k, v, causal_block=causal_block, window=window, scale=scale)
    allowed = dense_mask(mask, causal, causal_block, nq, nk, q.device, window)
    # Kernels differ on rows with no allowed key (0 on some, NaN on others, NaN gradients that leak
    # into dK/dV). Let such rows attend everything, then zero their output: 0, and no gradient.
    has_key = allowed.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, scale=scale)
    return out * has_key.to(out.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    causal_block: int = 1,
    window: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale, masked) v -> (B, heads, Nq, head_dim); scale defaults to head_dim^-1/2."""
    _check(q, k, v, mask, causal, causal_block, window)
    name, reason = resolve_backend(q, k, mask, causal, causal_block, backend, window, v)
    if not torch.compiler.is_compiling():  # logging would break a compiled graph
        _log_once(name, q.device, reason)
    if name == "sdpa":
        return _sdpa(q, k, v, mask, causal, causal_block, window, scale)
    if name == "naive":
        return naive_attention(q, k, v, mask, causal, causal_block, scale, window=window)
    if name == "chunked":
        from ulvideo.kernels.chunked import chunked_attention

        return chunked_attention(q, k, v, mask=mask, causal=causal, causal_block=causal_block, window=window, scale=scale)
    if name == "flex":
        from ulvideo.kernels.flex import flex_causal_attention

        return flex_causal_attention(q, k, v, causal_block=causal_block, window=window, scale=scale)
    if window is not None:  # the CUDA kernels below take the band as a materialised mask
        mask, causal = dense_mask(mask, causal, causal_block, q.shape[-2], k.shape[-2], q.device, window), False
    if name == "triton":
        from ulvideo.kernels.triton_flash import triton_attention

        return triton_attention(q, k, v, mask=mask, causal=causal, causal_block=causal_block, scale=scale)
    from ulvideo.kernels.xformers_attention import xformers_attention

    return xformers_attention(q, k, v, mask=mask, causal=causal, causal_block=causal_block, scale=scale)
