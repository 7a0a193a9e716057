"""Causal 3D ResNet encoder: video (B, 3, T, H, W) in [-1, 1] -> z_clean (B, C, T', H', W').

Default compression 4x8x8: T = 1 + 4k frames give T' = 1 + k latent frames, H' = H / 8. Latent
frame j depends on pixel frames <= 4j only (DESIGN.md §2), so for every j
`encoder(v)[:, :, :1+j] == encoder(v[:, :, :1+4j])`, and an image (T = 1) lands in the same latent
space as frame 0 of a video. Deterministic, no variance head, no output normalisation.

Layout: optional 2x2 spatial patching, a causal conv, then one level per entry of `channels`:
residual blocks, then a strided causal conv halving space (and time, for the first log2(4)
downsamplings, as CogVideoX's VAE does, which keeps the expensive high-resolution levels short
in time), residual blocks at the lowest level, and the output head.
"""
from __future__ import annotations

import torch
from torch import nn

from ulvideo.nets.layers import CausalCache, CausalConv3d, ChannelRMSNorm, ResBlock, check_power_of_two, patchify
from ulvideo.nets.sizes import resolve_encoder


class Encoder(nn.Module):
    """`Encoder(cfg: EncoderConfig)`; residual blocks are the entries of `self.blocks`."""

    stream: CausalCache | None = None  # set by layers.streaming; holds the frames seen so far

    def __init__(self, cfg):
        super().__init__()
        size = resolve_encoder(cfg)
        self.size = size
        self.latent_channels = cfg.latent_channels
        self.patch_size = cfg.patch_size
        self.temporal_downsample = cfg.temporal_downsample
        self.spatial_downsample = cfg.spatial_downsample
        check_power_of_two("encoder.patch_size", cfg.patch_size)
        if cfg.spatial_downsample % cfg.patch_size:
            raise ValueError(f"encoder.spatial_downsample = {cfg.spatial_downsample} must be a multiple of "
                             f"encoder.patch_size = {cfg.patch_size} (the patch is part of the downsampling)")
        n_space = check_power_of_two("encoder.spatial_downsample / patch_size", cfg.spatial_downsample // cfg.patch_size)
        n_time = check_power_of_two("encoder.temporal_downsample", cfg.temporal_downsample)
        n_down = max(n_space, n_time)
        if len(size.channels) != n_down + 1:
            raise ValueError(f"encoder channels {size.channels} need {n_down + 1} entries: one per level of "
                             f"{n_down} downsamplings (spatial {cfg.spatial_downsample // cfg.patch_size}x, "
                             f"temporal {cfg.temporal_downsample}x)")

        ch = size.channels
        self.conv_in = CausalConv3d(3 * cfg.patch_size**2, ch[0], 3)
        blocks, downs, self.plan = [], nn.ModuleList(), []  # plan: ("block", i) / ("down", i) in order
        c = ch[0]
        for level in range(n_down + 1):
            n_blocks = size.num_res_blocks if level < n_down else size.num_mid_blocks
            for _ in range(n_blocks):
                self.plan.append(("block", len(blocks)))
                blocks.append(ResBlock(c, ch[level]))
                c = ch[level]
            if level < n_down:
                stride = (2 if level < n_time else 1, 2 if level < n_space else 1, 2 if level < n_space else 1)
                self.plan.append(("down", len(downs)))
                downs.append(CausalConv3d(c, ch[level + 1], 3, stride=stride))
                c = ch[level + 1]
        self.blocks = nn.ModuleList(blocks)
        self.downs = downs

        # Output head: a per-position RMS norm over the channels (scale = 1 at init), then a 1x1x1
        # conv with weights N(0, 1 / c) and zero bias. The norm makes the features' second moments
        # sum to exactly c over the channels at every position, so for ANY input
        # E_w[z_clean^2] = c * (1 / c) = 1 everywhere: z_clean starts with RMS ~ 1, far above the
        # sigma0 ~ 0.08 noise floor (DESIGN.md "Start-up dynamics"). It is not an output
        # normalisation: the conv's weights scale z freely afterwards.
        # What the latent must carry survives it. The norm divides out only the length of each
        # position's feature vector; an object's colour on a flat background is a contrast between
        # positions (the object's features point elsewhere than the background's), which it keeps.
        # A norm with statistics over the frame per group of channels (a per-frame GroupNorm with
        # groups of 4) removes each group's contrast, i.e. the colour in those channels: as a plain
        # autoencoder on 1-frame shapes clips, colour right in 48% of held-out clips at step 900
        # against 100% with one group (tests/test_nets.py has the property).
        self.norm_out = ChannelRMSNorm(c)
        self.conv_out = CausalConv3d(c, cfg.latent_channels, 1)
        nn.init.normal_(self.conv_out.conv.weight, std=c**-0.5)
        nn.init.zeros_(self.conv_out.conv.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        self.check_input_shape(frames, height, width)
        return (1 + (frames - 1) // self.temporal_downsample, height // self.spatial_downsample,
                width // self.spatial_downsample)

    def check_input_shape(self, frames: int, height: int, width: int) -> None:
        k, s = self.temporal_downsample, self.spatial_downsample
        if frames < 1 or (frames - 1) % k:
            raise ValueError(f"encoder input has {frames} frames; it needs 1 + {k}k (1, {1 + k}, {1 + 2 * k}, ...)")
        if height % s or width % s:
            raise ValueError(f"encoder input is {height}x{width}; height and width must be multiples of {s}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"encoder expects (B, 3, T, H, W), got {tuple(x.shape)}")
        seen = self.stream.get(self) if self.stream is not None else None
        if seen is None:
            self.check_input_shape(*x.shape[2:])
        elif x.shape[2] < 1 or x.shape[2] % self.temporal_downsample:
            k = self.temporal_downsample
            raise ValueError(f"a streamed chunk after the first has {x.shape[2]} frames; it needs a positive "
                             f"multiple of {k} (the first chunk has 1 + {k}k)")
        else:
            self.check_input_shape(1, *x.shape[3:])
        h = self.conv_in(patchify(x, self.patch_size))
        for kind, i in self.plan:
            h = self.blocks[i](h) if kind == "block" else self.downs[i](h)
        if self.stream is not None:
            self.stream.put(self, (seen or 0) + x.shape[2])
        return self.conv_out(self.norm_out(h))
