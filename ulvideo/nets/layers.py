"""Building blocks shared by the encoder, the latent transformers and the decoder.

Tensor convention (DESIGN.md §2): videos are (B, C, T, H, W) with pixels in [-1, 1]; an image is
the T = 1 case and takes the same path. Every temporal operation in this package is causal:
  * `CausalConv3d` pads time on the left only, in one place (`_pad_time`);
  * norms take statistics per position over channels (`ChannelRMSNorm`) or per token (LayerNorm),
    never over time, and in the conv networks never over space either;
  * patching is spatial only; temporal attention is causally masked where a network needs it.

Streaming and tiling (ulvideo/streaming.py): `streaming(net, cache)` attaches one `CausalCache` to
every module of `net` that keeps causal state (those declaring a class attribute `stream`), so a
long video can run chunk by chunk in time with the same result as one pass. The conv networks
have no spatial statistics, so a tile of a frame run with a halo of context as wide as their
receptive field gives the whole frame's result on its core, in one pass. Outside the streaming
context nothing changes.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class CausalCache:
    """What a streamed pass remembers of the frames it has already processed.

    One object per streamed call, never global: `streaming(net, cache)` attaches it to the modules
    that keep causal state, which read and write their own entry under the current `slot`. Slots
    separate independent streams through the same modules (the decoder uses one per sampler step
    and spatial tile, the encoder one per tile).
    """

    def __init__(self):
        self.slot = None
        self._state: dict = {}

    def get(self, module: nn.Module):
        return self._state.get((self.slot, id(module)))

    def put(self, module: nn.Module, value) -> None:
        self._state[(self.slot, id(module))] = value

    def clear(self) -> None:
        self._state.clear()

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self._state.values() if torch.is_tensor(v))


@contextmanager
def streaming(net: nn.Module, cache: CausalCache):
    """Attach `cache` to every stateful module of `net` (class attribute `stream`) for the block.

    The attachment is an instance attribute shadowing the class's `stream = None` and is removed on
    exit (also on error), so nothing leaks into later calls; nesting on the same modules is refused.
    """
    mods = [m for m in net.modules() if hasattr(type(m), "stream")]
    if any("stream" in vars(m) for m in mods):
        raise RuntimeError("these modules are already streaming with another CausalCache")
    for m in mods:
        m.stream = cache
    try:
        yield cache
    finally:
        for m in mods:
            vars(m).pop("stream", None)


class CausalConv3d(nn.Module):
    """A 3D convolution that sees the current and past frames only.

    Space is zero-padded symmetrically ("same" for odd kernels); time is padded on the left with
    `kt - 1` copies of frame 0, so output frame i depends on input frames <= stride_t * i. With a
    temporal stride of 2, `1 + 2m` frames give `1 + m` and frame 0 is alone in its group.
    Repeating frame 0 (instead of zeros) makes the missing past look like a still scene, so an
    image and the first frame of a video see the same padding.

    `_pad_time` is the only place the past is invented. Under `streaming`, the first chunk is
    padded the same way and every later chunk is prefixed with what the previous one left over:
    the padded input's frames from `stride_t * outputs` on, i.e. its last `kt - stride_t` frames
    when chunk lengths line up with the stride (as `1 + 4k`, then `4m` frames do). The output of
    the chunks, concatenated, is then the output of the whole clip.
    """

    stream: CausalCache | None = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, bias: bool = True):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        st, sh, sw = _triple(stride)
        if kt < st:
            raise ValueError(f"temporal kernel {kt} smaller than temporal stride {st} would skip frames")
        self.time_pad = kt - 1
        self.conv = nn.Conv3d(in_channels, out_channels, (kt, kh, kw), stride=(st, sh, sw),
                              padding=(0, kh // 2, kw // 2), bias=bias)

    def _pad_time(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad == 0:
            return x
        past = self.stream.get(self) if self.stream is not None else None
        if past is None:
            past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
        x = torch.cat([past, x], dim=2)
        if self.stream is not None:
            kt, st = self.conv.kernel_size[0], self.conv.stride[0]
            used = max(0, (x.shape[2] - kt) // st + 1) * st  # frames no later output window starts in
            self.stream.put(self, x[:, :, used:].clone())  # a copy: a view would keep all of x alive
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self._pad_time(x))


class ChannelRMSNorm(nn.Module):
    """RMS norm over the channels of each position: y = x / sqrt(mean_c x^2 + eps) * weight.

    No statistics over space or time (Wan-VAE's choice for its causal video VAE, Wan et al. 2025,
    per-position RMS norms with a learned scale): a position's output depends on that position's
    channels only, so a network of these norms and causal convs has a finite receptive field in
    space and is causal in time (DESIGN.md §2), and a spatial tile needs only its halo of context
    to reproduce the whole frame's result exactly (ulvideo/streaming.py). What it divides out is the
    length of each position's feature vector, never a contrast between positions: an object's
    colour on a flat background stays in the direction of the features at the object's positions
    (a norm with statistics per channel group over the frame removed it, see the encoder's head).
    Statistics in float32; `affine=False` leaves the scale to the caller (FiLM in `ResBlock`).
    """

    def __init__(self, channels: int, affine: bool = True, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(dim=1, keepdim=True) + self.eps)  # (B, C, T, H, W) / (B, 1, T, H, W)
        if self.weight is not None:
            y = y * self.weight.view(1, -1, *([1] * (x.ndim - 2)))
        return y.to(x.dtype)


class ResBlock(nn.Module):
    """Pre-norm residual block of two causal 3x3x3 convs.

    With `emb_dim` > 0 the second norm is adaptive (FiLM on a per-position RMS norm: scale and shift
    from the logSNR embedding, as ADM's AdaGN does on a GroupNorm). `zero_init` zeroes the last conv
    so the block starts as the identity (ADM); the encoder keeps the default init so its features
    are non-trivial from the first step.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int = 0, dropout: float = 0.0,
                 zero_init: bool = False):
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3)
        self.norm2 = ChannelRMSNorm(out_channels, affine=emb_dim == 0)
        self.film = nn.Linear(emb_dim, 2 * out_channels) if emb_dim else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3)
        if zero_init:
            nn.init.zeros_(self.conv2.conv.weight)
            nn.init.zeros_(self.conv2.conv.bias)
        self.skip = CausalConv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None:
            scale, shift = self.film(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Spatial-only patching: (B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p)."""
    if p == 1:
        return x
    return rearrange(x, "b c t (h p) (w q) -> b (c p q) t h w", p=p, q=p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    if p == 1:
        return x
    return rearrange(x, "b (c p q) t h w -> b c t (h p) (w q)", p=p, q=p)


def expand_latent_time(z: torch.Tensor, temporal_downsample: int) -> torch.Tensor:
    """Align latent frames with pixel frames: pixel frame f <-> latent frame ceil(f / k).

    Latent frame 0 is kept once and every later one repeated k times, so T' latent frames give
    1 + k (T' - 1) frames (DESIGN.md §2; `interpolate(size=T)` would misalign them).
    """
    if temporal_downsample == 1:
        return z
    return torch.cat([z[:, :, :1], z[:, :, 1:].repeat_interleave(temporal_downsample, dim=2)], dim=2)


def _sincos_1d(pos: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    """Transformer sinusoids (Vaswani et al. 2017): (N,) positions -> (N, dim), dim even."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=pos.device, dtype=torch.float32) / half)
    angles = pos.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def sincos_3d(frames: int, height: int, width: int, dim: int, device=None,
              offset: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
    """Fixed 3D position embedding, (frames*height*width, dim), tokens in (t, h, w) order.

    The width is split into a time part and two equal space parts, each a 1D sinusoid of the
    integer coordinate. It works for any number of frames (T' = 1 for images: frame 0 of a video
    and an image get the same embedding) and any grid size. `offset` is the (t, h, w) coordinate of
    the first token: a later chunk or an inner tile gets the embedding of its place in the whole.
    """
    d_space = 2 * (dim // 6)
    d_time = dim - 2 * d_space
    t0, h0, w0 = offset
    t, h, w = torch.meshgrid(
        torch.arange(t0, t0 + frames, device=device), torch.arange(h0, h0 + height, device=device),
        torch.arange(w0, w0 + width, device=device), indexing="ij",
    )
    return torch.cat([
        _sincos_1d(t.flatten(), d_time, 10000.0),
        _sincos_1d(h.flatten(), d_space, 10000.0),
        _sincos_1d(w.flatten(), d_space, 10000.0),
    ], dim=1)


class LogSNREmbedding(nn.Module):
    """logSNR (B,) -> conditioning vector (B, dim): sinusoids of logSNR, then a 2-layer MLP.

    Frequencies run geometrically from 1 to 1/1000 radians per unit of logSNR: the fastest resolves
    ~0.1 logSNR units, the slowest stays unaliased over any range used here ([-15, 15] and beyond).
    Computed in float32 (logSNR itself is never cast to bf16).
    """

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, logsnr: torch.Tensor) -> torch.Tensor:
        return self.mlp(_sincos_1d(logsnr.float(), self.freq_dim, 1000.0))


def batch_logsnr(logsnr, batch: int, device) -> torch.Tensor:
    """Accept a (B,) tensor or a scalar; return float32 (B,)."""
    logsnr = torch.as_tensor(logsnr, dtype=torch.float32, device=device)
    if logsnr.ndim == 0:
        logsnr = logsnr.expand(batch)
    if logsnr.shape != (batch,):
        raise ValueError(f"logsnr must have shape ({batch},) or be a scalar, got {tuple(logsnr.shape)}")
    return logsnr


def check_power_of_two(name: str, value: int) -> int:
    """log2 of `value`, or a clear error."""
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} = {value} must be a power of two")
    return value.bit_length() - 1
