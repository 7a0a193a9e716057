"""Pixel-space diffusion decoder: a causal 3D U-ViT conditioned on the noisy latent z0 and logSNR.

    out = Decoder(cfg, C)(x_t (B, 3, T, H, W), z0 (B, C, T', H', W'), logsnr (B,)) -> (B, 3, T, H, W)

U-ViT (Hoogeboom et al., simple diffusion; the paper's decoder, PAPER.md §1): optional 2x2 patching, conv
stages (`channels`, each ending in a 2x spatial downsampling), a transformer at the lowest
resolution, and the mirrored conv stages with skip connections. Time is never downsampled: the
conv stages mix frames with causal 3x3x3 convs and the transformer attends across frames
block-causally, so output frame f depends on x_t frames <= f and latent frames <= ceil(f / 4) only:
`decoder(x_t, z0, l)[:, :, :1+4j] == decoder(x_t[:, :, :1+4j], z0[:, :, :1+j], l)`.
`decoder.temporal_window` W (None = unlimited) narrows the transformer's attention in time to a
band: a token of frame f attends frames f - W + 1 .. f only (pixel frames: time is never
downsampled here), in the one-pass forward and in streaming alike. (The convs still reach further
back, causally, through the stack; the band bounds what the middle must remember.)

Conditioning: logSNR through adaptive per-position RMS norms (FiLM) in the residual blocks and
adaLN in the transformer. z0 is aligned in time (latent frame 0 once, each later frame repeated 4 times), put
through a small per-frame conv stack at latent resolution and resized (sub-pixel depth-to-space up,
average down) to every stage's resolution, where it is added to the trunk. Each injection's last conv starts at
zero (see `LatentInjection`); the encoder's output starts at RMS ~1 (DESIGN.md "Start-up dynamics").

Streaming (`ulvideo.streaming`): under `layers.streaming(decoder, cache)` a first call takes
T = 1 + 4(T' - 1) frames and every later call T = 4 T' frames that continue the clip (their latent
frames then each cover 4 pixel frames). The conv stages carry their last input frames in the cache
(`kt - 1` frames per causal conv: flat in T); each block of the middle transformer keeps the keys
and values of the earlier frames its attention can still reach and attends from the current
frames' queries to them, so a call computes only its own tokens. That key/value history is
2 * depth * F * (H / m) * (W / m) * width values per slot, m = `mid_downsampling` (16 at sizes S
to L), with F = T, the frames seen, without a window (it grows with the clip), and
F = min(T, W - 1) with `temporal_window` W (older frames are evicted: flat once T >= W - 1).
The decoder itself only counts the frames seen (the time offset of the position embedding).

Tiling (`ulvideo.streaming`): `forward` is `up(middle(down(...)), ...)`, and the three parts can be
called on their own so that the conv stages run tile by tile while the middle transformer runs
once on the whole frame's (H / m) x (W / m) token grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ulvideo.attention import check_window
from ulvideo.nets.layers import (CausalCache, CausalConv3d, ChannelRMSNorm, LogSNREmbedding, ResBlock, batch_logsnr,
                                 check_power_of_two, expand_latent_time, patchify, sincos_3d, unpatchify)
from ulvideo.nets.sizes import resolve_decoder
from ulvideo.nets.transformer import TransformerBlock


class LatentInjection(nn.Module):
    """Time-aligned z0 (B, C, T, h, w) -> features (B, channels, T, h * up / down, w * up / down).

    Per-frame convs at latent resolution (1x3x3, then 1x1x1). To go up by `up`, the last conv
    emits `channels * up^2` features per latent position and a depth-to-space rearrangement lays
    them out as an up x up block of pixels (a sub-pixel convolution): every pixel of the block gets
    its own learned features, so a latent can place an edge anywhere inside its 8x8 footprint.
    Nearest upsampling instead makes the injected features constant over the block, and the trunk's
    translation-invariant convs can then only locate detail relative to block borders. Going
    down (stages coarser than the latent) average-pools.
    """

    def __init__(self, latent_channels: int, channels: int, up: int, down: int):
        super().__init__()
        self.up, self.down = up, down
        self.conv = CausalConv3d(latent_channels, channels, (1, 3, 3))
        self.proj = CausalConv3d(channels, channels * up * up, 1)
        # Zero output ("zero convolution", as ControlNet's): at init the injected features are
        # random functions of z0, i.e. noise added to the trunk, and the fastest way to reduce the
        # loss is then to shrink them - through the encoder too, which drives z_clean below the
        # sigma_0 noise floor before the decoder has learnt to read it (measured: a clip's latent
        # fell from 65k to 200 bits within 350 steps of the rate hold, with decoder gain ~0).
        # From zero, the projection only grows along directions that lower the loss.
        nn.init.zeros_(self.proj.conv.weight)
        nn.init.zeros_(self.proj.conv.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.proj(F.silu(self.conv(z)))
        if self.up > 1:
            h = rearrange(h, "b (c i j) t h w -> b c t (h i) (w j)", i=self.up, j=self.up)
        if self.down > 1:
            h = F.avg_pool3d(h, (1, self.down, self.down))
        return h


class LatentReadout(nn.Module):
    """z0 (B, C, T', H', W') -> pixels (B, 3, 1 + k (T' - 1), s H', s W'): a small per-latent-position
    network, the start-up term's cheap stand-in for the decoder (ulvideo/startup.py).

    Two 3x3 convs over each latent frame (width w), then a 1x1 conv to k * 3 * s * s values per
    position, laid out as the k pixel frames and s x s pixels that the latent position covers
    (depth-to-space in time and space). Latent frame j >= 1 covers pixel frames 4j - 3 .. 4j and
    latent frame 0 frame 0 alone, so frame 0 takes the last of its k sub-frames. It never sees
    another latent frame, so it is causal in time. What it needs to do well is what the encoder
    must keep in z: where the objects are and what colour, in every frame.
    """

    def __init__(self, latent_channels: int, width: int, temporal_downsample: int = 4, spatial_downsample: int = 8):
        super().__init__()
        self.k, self.s = temporal_downsample, spatial_downsample
        self.conv1 = CausalConv3d(latent_channels, width, (1, 3, 3))
        self.conv2 = CausalConv3d(width, width, (1, 3, 3))
        self.out = CausalConv3d(width, self.k * 3 * self.s * self.s, 1)

    def forward(self, z0: torch.Tensor) -> torch.Tensor:
        h = self.out(F.silu(self.conv2(F.silu(self.conv1(z0)))))
        x = rearrange(h, "b (k c i j) t h w -> b c (t k) (h i) (w j)", k=self.k, c=3, i=self.s, j=self.s)
        return x[:, :, self.k - 1:]


class Decoder(nn.Module):
    """`Decoder(cfg: DecoderConfig, latent_channels, temporal_downsample=4, spatial_downsample=8)`.

    Residual and transformer blocks are the entries of `self.blocks` (down stages, middle
    transformer, up stages, in execution order).
    """

    stream: CausalCache | None = None  # set by layers.streaming; holds the number of frames seen

    def __init__(self, cfg, latent_channels: int, temporal_downsample: int = 4, spatial_downsample: int = 8):
        super().__init__()
        size = resolve_decoder(cfg)
        self.size = size
        self.latent_channels = latent_channels
        self.temporal_downsample = temporal_downsample
        self.spatial_downsample = spatial_downsample
        self.patch_size = p = size.patch_size
        check_power_of_two("decoder.patch_size", p)
        check_power_of_two("spatial_downsample", spatial_downsample)
        ch, n_stages = size.channels, len(size.channels)
        emb_dim = 4 * ch[0]  # ADM's embedding width
        factorized = getattr(cfg, "attention", "full") == "factorized"
        # frames of the middle transformer = pixel frames; None = every earlier frame
        self.temporal_window = window = check_window(getattr(cfg, "temporal_window", None), "decoder.temporal_window")
        self.logsnr_emb = LogSNREmbedding(emb_dim)
        self.conv_in = CausalConv3d(3 * p * p, ch[0], 3)

        def injection(downsampling: int, channels: int) -> LatentInjection:
            # stage at pixel/downsampling resolution vs latent at pixel/spatial_downsample
            up, down = max(1, spatial_downsample // downsampling), max(1, downsampling // spatial_downsample)
            return LatentInjection(latent_channels, channels, up, down)

        # Block indices per part; all blocks live in one ModuleList (checkpointing applies per entry).
        blocks, self.down_idx, self.up_idx = [], [], [None] * n_stages
        self.inject, self.downs, self.ups = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(n_stages):
            self.inject.append(injection(p * 2**s, ch[s]))
            self.down_idx.append(list(range(len(blocks), len(blocks) + size.num_res_blocks)))
            blocks += [ResBlock(ch[s], ch[s], emb_dim, size.dropout, zero_init=True) for _ in range(size.num_res_blocks)]
            c_next = ch[s + 1] if s + 1 < n_stages else ch[-1]
            self.downs.append(CausalConv3d(ch[s], c_next, 3, stride=(1, 2, 2)))
        self.mid_downsampling = p * 2**n_stages
        self.inject.append(injection(self.mid_downsampling, ch[-1]))
        self.mid_in = nn.Linear(ch[-1], size.width)
        self.mid_idx = list(range(len(blocks), len(blocks) + size.depth))
        blocks += [TransformerBlock(size.width, emb_dim, size.head_dim, factorized=factorized, temporal_causal=True,
                                    temporal_window=window, dropout=size.dropout) for _ in range(size.depth)]
        self.mid_out = nn.Sequential(nn.LayerNorm(size.width, eps=1e-6), nn.Linear(size.width, ch[-1]))
        for s in reversed(range(n_stages)):
            n = max(1, size.num_res_blocks)
            self.up_idx[s] = list(range(len(blocks), len(blocks) + n))
            # the first block of an up stage takes [upsampled trunk, skip] concatenated
            blocks += [ResBlock(2 * ch[s] if i == 0 else ch[s], ch[s], emb_dim, size.dropout, zero_init=True)
                       for i in range(n)]
        # after a nearest 2x spatial upsampling, a 1x1x1 conv only changes the width: the next
        # block's 3x3x3 convs do the spatial and temporal mixing
        self.ups = nn.ModuleList(CausalConv3d(ch[s + 1] if s + 1 < n_stages else ch[-1], ch[s], 1)
                                 for s in range(n_stages))
        self.blocks = nn.ModuleList(blocks)

        self.norm_out = ChannelRMSNorm(ch[0])
        self.conv_out = CausalConv3d(ch[0], 3 * p * p, 3)
        # Zero output: the first prediction is 0 for every input (ADM), a bounded start for any
        # prediction target; the gradient reaches everything else from the second step on.
        nn.init.zeros_(self.conv_out.conv.weight)
        nn.init.zeros_(self.conv_out.conv.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check(self, x_t: torch.Tensor, z0: torch.Tensor, first: bool = True) -> None:
        if x_t.ndim != 5 or x_t.shape[1] != 3:
            raise ValueError(f"decoder expects x_t (B, 3, T, H, W), got {tuple(x_t.shape)}")
        if z0.ndim != 5 or z0.shape[1] != self.latent_channels:
            raise ValueError(f"decoder expects z0 (B, {self.latent_channels}, T', H', W'), got {tuple(z0.shape)}")
        B, _, T, H, W = x_t.shape
        k, s = self.temporal_downsample, self.spatial_downsample
        frames = 1 + k * (z0.shape[2] - 1) if first else k * z0.shape[2]
        if z0.shape[0] != B or T != frames or (H, W) != (s * z0.shape[3], s * z0.shape[4]) or T < 1:
            need = f"1 + {k}(T' - 1)" if first else f"{k} T' (a streamed chunk after the first)"
            raise ValueError(f"x_t {tuple(x_t.shape)} does not match z0 {tuple(z0.shape)}: need T = {need}, "
                             f"H = {s} H', W = {s} W'")
        if H % self.mid_downsampling or W % self.mid_downsampling:
            raise ValueError(f"decoder input {H}x{W} must be divisible by {self.mid_downsampling} "
                             f"(patch {self.patch_size}, {len(self.size.channels)} downsamplings)")

    def embed(self, logsnr: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """logSNR (B,) or scalar -> the conditioning vector (B, emb_dim) in x_t's dtype."""
        return self.logsnr_emb(batch_logsnr(logsnr, x_t.shape[0], x_t.device)).to(x_t.dtype)

    def down(self, x_t: torch.Tensor, z0: torch.Tensor, emb: torch.Tensor,
             first: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The conv stages: -> (middle input (B, ch[-1], T, H/m, W/m), skip tensors). `first`: x_t starts
        the clip (else it continues a streamed one and each latent frame covers 4 pixel frames)."""
        if first:
            z = expand_latent_time(z0, self.temporal_downsample)  # (B, C, T, H', W'), frame f <-> latent ceil(f/4)
        else:  # a later chunk starts at a pixel frame 4j + 1: each of its latent frames covers 4 frames
            z = z0.repeat_interleave(self.temporal_downsample, dim=2)
        h = self.conv_in(patchify(x_t, self.patch_size))
        skips = []
        for s, idx in enumerate(self.down_idx):
            h = h + self.inject[s](z)
            for i in idx:
                h = self.blocks[i](h, emb)
            skips.append(h)
            h = self.downs[s](h)
        return h + self.inject[-1](z), skips

    def middle(self, h: torch.Tensor, emb: torch.Tensor, offset: tuple[int, int, int] = (0, 0, 0)) -> torch.Tensor:
        """The transformer over the (T, H/m, W/m) token grid, (B, c, T, h, w) -> same shape. `offset`: the
        grid's first (t, y, x) token in the clip, for the position embedding."""
        t, gh, gw = h.shape[2:]
        x = self.mid_in(rearrange(h, "b c t h w -> b (t h w) c"))
        x = x + sincos_3d(t, gh, gw, x.shape[-1], x.device, offset=offset).to(x.dtype)
        for i in self.mid_idx:
            x = self.blocks[i](x, emb, (t, gh, gw))
        return rearrange(self.mid_out(x), "b (t h w) c -> b c t h w", t=t, h=gh)

    def up(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor) -> torch.Tensor:
        """The mirrored conv stages: middle output and the skips of `down` -> (B, 3, T, H, W)."""
        skips = list(skips)
        for s in reversed(range(len(self.up_idx))):
            h = self.ups[s](F.interpolate(h, scale_factor=(1, 2, 2), mode="nearest"))
            h = torch.cat([h, skips.pop()], dim=1)
            for i in self.up_idx[s]:
                h = self.blocks[i](h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return unpatchify(out, self.patch_size)

    def forward(self, x_t: torch.Tensor, z0: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        seen = self.stream.get(self) if self.stream is not None else None  # frames of earlier calls
        self._check(x_t, z0, first=seen is None)
        emb = self.embed(logsnr, x_t)
        h, skips = self.down(x_t, z0, emb, first=seen is None)
        if self.stream is not None:
            self.stream.put(self, (seen or 0) + x_t.shape[2])
        return self.up(self.middle(h, emb, (seen or 0, 0, 0)), skips, emb)
