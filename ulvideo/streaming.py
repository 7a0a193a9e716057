"""Constant-memory encode and decode: streaming in time, tiling in space.

Time (exact). The encoder and the decoder are causal (DESIGN.md §2), so a clip can run in chunks
of `1 + 4k` pixel frames, then `4m` frames (latent chunks of `1 + k`, then `m` frames), each
`CausalConv3d` prefixing a chunk with the last input frames of the previous one
(`nets.layers.streaming`). The chunks, concatenated, equal the one-pass result up to fp32
round-off, for every chunk plan.

The diffusion decoder runs a whole sampler per chunk ("chunk" order): at step i, chunk c needs
the causal state the earlier chunks left *at step i*, so the cache holds one slot per sampler step
(plus one for the final clean prediction) and spatial tile. Noise is drawn per frame from
(seed, purpose, step, frame) (`frame_noise`), so the streamed and the one-pass decode
(`decode_full`) see the same numbers. Memory, chunk order:
  * conv state: `kt - stride` input frames per causal conv per slot, flat in T, x (steps + 1);
  * middle transformer: its block-causal attention reaches every earlier frame, so their tokens
    are kept, (steps + 1) * T * (H/m) * (W/m) * width values (m = `decoder.mid_downsampling`),
    and its blocks re-run over all earlier frames each chunk (transient activations and compute
    grow with T too). Per-block keys and values would avoid the re-run but take 2 * depth times
    the memory; they would also need a cache argument in `TransformerBlock`.
The "step" order swaps the loops (every chunk at step i, then step i + 1): one slot of state at a
time, flat in `steps`, but the whole clip's x_t is held and nothing comes out before the end.

Space (approximate). `Tiling(tile, overlap, margin)`: overlapping square tiles blended with linear
ramps over their overlap, `margin` pixels at each inner tile edge discarded. A network with a
finite receptive field r and no spatial statistics gives exactly the one-pass result with
margin >= r; ours are not such networks (per-frame GroupNorm takes statistics over the whole
frame; the decoder's middle transformer attends across the whole frame), so tiling changes the
result and `benchmarks/memory_vs_frames.py` / the tests measure by how much. For the diffusion
decoder the tiles are blended at every network evaluation (each sampler step sees one x_t), not
once at the end.

How to call it (UnifiedLatents.decode / the CLI can route here when asked for chunks or tiles):

    z_clean = streaming.encode(model, video, chunk=16)                # = model.encode(video)
    z0 = streaming.noisy_latent(model, z_clean, seed=0)
    clip = streaming.decode(model, z0, chunk=16, steps=32, sampler="ddpm", seed=0)
    for part in streaming.stream_reconstruct(model, frame_chunks, steps=32, seed=0):
        write(part)                                                   # chunks of 1 + 16, then 16 frames

`streaming.decode(..., chunk=None)` is the one-pass decode with the same per-frame noise.
`UnifiedLatents.decode` draws its noise from one generator over the whole clip, so it gives a
different (equally distributed) sample; to make them agree it would draw through `clip_noise`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ulvideo import diffusion as D
from ulvideo.nets.layers import CausalCache, streaming

NOISE_INIT, NOISE_STEP, NOISE_LATENT = 0, 1, 2  # purposes of the per-frame noise streams


# ---- chunk plans ----------------------------------------------------------------------------------


def chunk_plan(num_frames: int, chunk: int, first: int | None = None, temporal_downsample: int = 4) -> list[int]:
    """Pixel frames per chunk: `first` (default 1 + chunk) then `chunk` frames, the last one shorter.

    `first` must be 1 + k * temporal_downsample and `chunk` a multiple of temporal_downsample, so
    every chunk boundary falls where a latent frame's group of pixel frames ends.
    """
    k = temporal_downsample
    first = 1 + chunk if first is None else first
    if num_frames < 1 or (num_frames - 1) % k:
        raise ValueError(f"{num_frames} frames; streaming needs 1 + {k}n")
    if chunk < k or chunk % k or first < 1 or (first - 1) % k:
        raise ValueError(f"chunks of {first}, then {chunk} frames: need 1 + {k}a, then {k}b with b >= 1")
    plan, left = [min(first, num_frames)], num_frames - min(first, num_frames)
    while left:
        plan.append(min(chunk, left))
        left -= plan[-1]
    return plan


def latent_plan(plan: list[int], temporal_downsample: int = 4) -> list[int]:
    """Latent frames per chunk of a pixel chunk plan: 1 + (p0 - 1) / k, then p / k."""
    k = temporal_downsample
    if not plan or (plan[0] - 1) % k or any(p < 1 or p % k for p in plan[1:]):
        raise ValueError(f"chunk plan {plan}: need 1 + {k}a frames first, then positive multiples of {k}")
    return [1 + (plan[0] - 1) // k] + [p // k for p in plan[1:]]


def split_time(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    if sum(sizes) != x.shape[2]:
        raise ValueError(f"chunk plan {sizes} covers {sum(sizes)} frames, the clip has {x.shape[2]}")
    return list(torch.split(x, sizes, dim=2))


# ---- per-frame noise ------------------------------------------------------------------------------


def frame_noise(seed: int, purpose: int, step: int, frame: int, shape, device=None) -> torch.Tensor:
    """N(0, I) of `shape` (one frame of a batch), a pure function of (seed, purpose, step, frame).

    numpy's SeedSequence hashes the tuple into a 64-bit generator seed (documented as stable across
    versions), so chunking a clip never changes the noise a frame receives.
    """
    key = np.random.SeedSequence(seed, spawn_key=(purpose, step, frame)).generate_state(1, np.uint64)[0]
    g = torch.Generator(device=device).manual_seed(int(key))
    return torch.randn(shape, generator=g, device=device)


def clip_noise(seed: int, purpose: int, step: int, start: int, shape, device=None) -> torch.Tensor:
    """(B, C, T, H, W) noise whose frame t is `frame_noise(..., frame=start + t)`."""
    b, c, t, h, w = shape
    return torch.stack([frame_noise(seed, purpose, step, start + i, (b, c, h, w), device) for i in range(t)], dim=2)


def noisy_latent(model, z_clean: torch.Tensor, seed: int = 0, start: int = 0, mode: str = "sample") -> torch.Tensor:
    """z0 = alpha_0 z_clean + sigma_0 eps_z with eps_z drawn per latent frame (frame index `start` + j),
    or alpha_0 z_clean for mode "mean" (DESIGN.md §1, Reconstruction)."""
    if mode == "mean":
        return model.alpha0 * z_clean
    if mode != "sample":
        raise ValueError(f"latent noise mode '{mode}' (sample, mean)")
    eps = clip_noise(seed, NOISE_LATENT, 0, start, z_clean.shape, z_clean.device)
    return (model.alpha0 * z_clean.float() + model.sigma0 * eps).to(z_clean.dtype)


# ---- spatial tiles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    """Square tiles of `tile` pixels overlapping by at least `overlap` pixels; `margin` pixels at each
    inner tile edge get weight 0 (the rest of the overlap is a linear ramp). Values are pixels; tile
    and overlap must be multiples of the network's alignment (8 for the encoder, the lcm of 8 and
    `mid_downsampling` for the decoder: tile origins must fall on every strided grid), the margin a
    multiple of the output cell (8 pixels for the encoder's latents, 1 for the decoder)."""

    tile: int
    overlap: int = 16
    margin: int = 0

    def check(self, align: int, unit: int = 1) -> None:
        if min(self.tile, self.overlap, self.margin) < 0 or self.tile == 0:
            raise ValueError(f"{self}: sizes must be non-negative and the tile positive")
        if self.tile % align or self.overlap % align or self.margin % unit:
            raise ValueError(f"{self}: tile and overlap must be multiples of {align} pixels, the margin of {unit}")
        if self.overlap and 2 * self.margin >= self.overlap:
            raise ValueError(f"{self}: the overlap must exceed twice the margin (the blending ramp is what is left)")
        if 2 * self.overlap > self.tile:
            raise ValueError(f"{self}: the overlap may be at most half the tile")


def _starts(size: int, tile: int, overlap: int, align: int) -> list[int]:
    """Tile starts spread evenly over [0, size - tile], on multiples of `align`, overlaps >= `overlap`."""
    if tile >= size:
        return [0]
    n = 1 + math.ceil((size - tile) / (tile - overlap))
    # floor(v + 1/2), not round(): banker's rounding could widen one stride past tile - overlap
    return sorted({math.floor(i * (size - tile) / (n - 1) / align + 0.5) * align for i in range(n)})


def _profile(size: int, starts: list[int], tile: int, margin: int, unit: int) -> list[torch.Tensor]:
    """1D blend weights per tile on the output grid (`unit` pixels per output cell), summing to 1."""
    n_out, t_out, m = size // unit, min(tile, size) // unit, margin // unit
    ws = []
    for i, s in enumerate(starts):
        d = torch.arange(t_out, dtype=torch.float64)
        w = torch.ones(t_out, dtype=torch.float64)
        if i > 0:  # ramp up over the overlap with the previous tile
            o = (starts[i - 1] + tile - s) // unit
            w = torch.minimum(w, ((d - m + 0.5) / (o - 2 * m)).clamp(0, 1))
        if i < len(starts) - 1:  # ramp down over the overlap with the next tile
            o = (s + tile - starts[i + 1]) // unit
            w = torch.minimum(w, ((t_out - 1 - d - m + 0.5) / (o - 2 * m)).clamp(0, 1))
        ws.append(w)
    total = torch.zeros(n_out, dtype=torch.float64)
    for s, w in zip(starts, ws):
        total[s // unit: s // unit + t_out] += w
    if (total <= 0).any():
        raise ValueError("tiling leaves output cells with zero weight: use a larger overlap or a smaller margin")
    return [w / total[s // unit: s // unit + t_out] for s, w in zip(starts, ws)]


def tiles(height: int, width: int, tiling: Tiling, align: int,
          unit: int) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """(y0, x0, h, w, weight) per tile, pixels; `weight` is (h/unit, w/unit) and the weights of all
    tiles sum to 1 at every output cell."""
    tiling.check(align, unit)
    if height % align or width % align:
        raise ValueError(f"{height}x{width} frames: tiling needs multiples of {align} pixels")
    ys = _starts(height, tiling.tile, tiling.overlap, align)
    xs = _starts(width, tiling.tile, tiling.overlap, align)
    wy = _profile(height, ys, tiling.tile, tiling.margin, unit)
    wx = _profile(width, xs, tiling.tile, tiling.margin, unit)
    th, tw = min(tiling.tile, height), min(tiling.tile, width)
    return [(y, x, th, tw, (a[:, None] * b[None, :]).float()) for y, a in zip(ys, wy) for x, b in zip(xs, wx)]


def _run(fn, x: torch.Tensor, cache: CausalCache | None, slot, layout, unit: int) -> torch.Tensor:
    """fn(x_tile, y0, x0) over the tiles in `layout` (or once, untiled), blended; `cache.slot` is
    (slot, tile index) so every tile streams through its own state."""
    if layout is None:
        if cache is not None:
            cache.slot, cache.origin = (slot, 0), (0, 0)
        return fn(x, 0, 0)
    out = None
    for index, (y0, x0, h, w, weight) in enumerate(layout):
        if cache is not None:
            cache.slot, cache.origin = (slot, index), (y0, x0)
        o = fn(x[..., y0:y0 + h, x0:x0 + w], y0, x0)
        if out is None:
            out = o.new_zeros(*o.shape[:3], x.shape[-2] // unit, x.shape[-1] // unit)
        out[..., y0 // unit:(y0 + h) // unit, x0 // unit:(x0 + w) // unit] += o * weight.to(o)
    return out


# ---- encode ---------------------------------------------------------------------------------------


@torch.no_grad()
def stream_encode(model, chunks: Iterable[torch.Tensor], tiling: Tiling | None = None) -> Iterator[torch.Tensor]:
    """Pixel chunks (1 + 4k frames, then 4m frames) -> z_clean chunks (1 + k, then m latent frames)."""
    enc = model.encoder
    cache, layout = CausalCache(), None
    with streaming(enc, cache):
        for x in chunks:
            if tiling is not None and layout is None:
                layout = tiles(x.shape[-2], x.shape[-1], tiling, enc.spatial_downsample, enc.spatial_downsample)
            yield _run(lambda xt, y0, x0: enc(xt), x, cache, 0, layout, enc.spatial_downsample)


@torch.no_grad()
def encode(model, x: torch.Tensor, chunk: int | None = 16, *, first: int | None = None,
           tiling: Tiling | None = None) -> torch.Tensor:
    """(B, 3, T, H, W) -> z_clean; `chunk=None` runs the clip in one pass (tiled if asked)."""
    if chunk is None:
        enc = model.encoder
        if tiling is None:
            return enc(x)
        layout = tiles(x.shape[-2], x.shape[-1], tiling, enc.spatial_downsample, enc.spatial_downsample)
        return _run(lambda xt, y0, x0: enc(xt), x, None, 0, layout, enc.spatial_downsample)
    plan = chunk_plan(x.shape[2], chunk, first, model.encoder.temporal_downsample)
    return torch.cat(list(stream_encode(model, split_time(x, plan), tiling)), dim=2)


# ---- decode ---------------------------------------------------------------------------------------


def sampler_step(z: torch.Tensor, out: torch.Tensor, logsnr_s: float, logsnr_t: float, kind: str, method: str,
                 noise: torch.Tensor | None = None, clip_x: float | None = 1.0) -> torch.Tensor:
    """One step of `diffusion.sample` from logSNR s to t (same equations), with the ancestral noise
    given instead of drawn, so that it can come per frame:

        DDPM: z_t = r (alpha_t / alpha_s) z_s + alpha_t (1 - r) x_hat + sigma_t sqrt(1 - r) noise,
              r = exp(lambda_s - lambda_t);   DDIM: z_t = alpha_t x_hat + sigma_t eps_hat.
    """
    lam = torch.full((z.shape[0],), logsnr_s, device=z.device)
    x_hat, eps_hat = D.predict_x_eps(out, z, lam, kind)
    if clip_x is not None:
        x_hat = x_hat.clamp(-clip_x, clip_x)
        eps_hat = D.predict_x_eps(x_hat, z, lam, "x")[1]
    a_s, _ = (float(v) for v in D.alpha_sigma(torch.tensor(logsnr_s)))
    a_t, s_t = (float(v) for v in D.alpha_sigma(torch.tensor(logsnr_t)))
    if method == "ddim":
        return a_t * x_hat + s_t * eps_hat
    if method == "ddpm":
        if noise is None:
            raise ValueError("a DDPM step needs its ancestral noise")
        one_minus_r = -math.expm1(logsnr_s - logsnr_t)
        return ((1.0 - one_minus_r) * (a_t / a_s) * z.float() + a_t * one_minus_r * x_hat
                + s_t * math.sqrt(one_minus_r) * noise)
    raise ValueError(f"unknown sampler '{method}' (ddpm, ddim)")


def decoder_tiles(dec, height: int, width: int, tiling: Tiling):
    return tiles(height, width, tiling, math.lcm(dec.spatial_downsample, dec.mid_downsampling), 1)


def _decoder_call(dec, x_t, z0, logsnr, cache: CausalCache | None, slot, layout) -> torch.Tensor:
    s = dec.spatial_downsample

    def fn(xt, y0, x0):
        return dec(xt, z0[..., y0 // s:(y0 + xt.shape[-2]) // s, x0 // s:(x0 + xt.shape[-1]) // s], logsnr)

    return _run(fn, x_t, cache, slot, layout, 1)


def tiled_denoise(model, z0: torch.Tensor, tiling: Tiling) -> D.Denoise:
    """`denoise(x_t, logsnr)` running the decoder tile by tile over whole clips and blending the outputs:
    a drop-in for `model.decoder_denoise(z0)` in `diffusion.sample` (an approximation, see above)."""
    dec, layout = model.decoder, None

    def denoise(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        nonlocal layout
        layout = layout or decoder_tiles(dec, x_t.shape[-2], x_t.shape[-1], tiling)
        with streaming(dec, CausalCache(record=False)) as cache:  # carries only the tile origins
            return _decoder_call(dec, x_t, z0, logsnr, cache, 0, layout)

    return denoise


class _ChunkDecoder:
    """The sampler for one chunk of frames, given where the chunk starts and the shared cache."""

    def __init__(self, model, steps: int, sampler: str, seed: int, tiling: Tiling | None):
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler '{sampler}' (ddpm, ddim)")
        self.model, self.dec, self.steps, self.sampler, self.seed = model, model.decoder, steps, sampler, seed
        self.kind = model.cfg.decoder.prediction
        self.logsnrs = [float(v) for v in D.sampling_logsnrs(model.decoder_schedule, steps)]
        self.logsnrs.append(float(model.decoder_schedule.logsnr_max))  # the final clean prediction
        self.tiling, self.layout = tiling, None

    def shape(self, z0: torch.Tensor, first: bool) -> tuple[int, ...]:
        k, s = self.dec.temporal_downsample, self.dec.spatial_downsample
        t = 1 + k * (z0.shape[2] - 1) if first else k * z0.shape[2]
        return (z0.shape[0], 3, t, z0.shape[3] * s, z0.shape[4] * s)

    def denoise(self, x_t: torch.Tensor, z0: torch.Tensor, step: int, cache: CausalCache | None) -> torch.Tensor:
        """The network output at sampler step `step` (index into self.logsnrs), tiled if asked."""
        if self.tiling is not None and self.layout is None:
            self.layout = decoder_tiles(self.dec, x_t.shape[-2], x_t.shape[-1], self.tiling)
        lam = torch.full((x_t.shape[0],), self.logsnrs[step], device=x_t.device)
        return _decoder_call(self.dec, x_t, z0, lam, cache, step, self.layout)

    def update(self, x_t: torch.Tensor, out: torch.Tensor, step: int, start: int) -> torch.Tensor:
        """x_t at the next logSNR, or (after the last step) the clean prediction clipped to [-1, 1]."""
        if step == self.steps:
            lam = torch.full((x_t.shape[0],), self.logsnrs[step], device=x_t.device)
            return D.predict_x_eps(out, x_t, lam, self.kind)[0].clamp(-1.0, 1.0)
        noise = None
        if self.sampler == "ddpm":
            noise = clip_noise(self.seed, NOISE_STEP, step, start, x_t.shape, x_t.device)
        return sampler_step(x_t, out, self.logsnrs[step], self.logsnrs[step + 1], self.kind, self.sampler, noise)

    def run(self, z0: torch.Tensor, start: int, cache: CausalCache | None) -> torch.Tensor:
        """All sampler steps for the frames starting at pixel frame `start` (0 = a first chunk)."""
        x = clip_noise(self.seed, NOISE_INIT, 0, start, self.shape(z0, start == 0), z0.device)
        for step in range(self.steps + 1):
            x = self.update(x, self.denoise(x, z0, step, cache), step, start)
        return x


@torch.no_grad()
def stream_decode(model, z0_chunks: Iterable[torch.Tensor], steps: int = 32, sampler: str = "ddpm", seed: int = 0,
                  tiling: Tiling | None = None) -> Iterator[torch.Tensor]:
    """Latent chunks (1 + k, then m frames) -> clip chunks in [-1, 1] (1 + 4k, then 4m frames), chunk order:
    each chunk runs the whole sampler; the cache holds one slot of causal state per step and tile."""
    runner, cache, start = _ChunkDecoder(model, steps, sampler, seed, tiling), CausalCache(), 0
    with streaming(model.decoder, cache):
        for z0 in z0_chunks:
            x = runner.run(z0, start, cache)
            start += x.shape[2]
            yield x


@torch.no_grad()
def decode_full(model, z0: torch.Tensor, steps: int = 32, sampler: str = "ddpm", seed: int = 0,
                tiling: Tiling | None = None) -> torch.Tensor:
    """The one-pass decode with the per-frame noise of the streamed one: the reference it must equal."""
    runner = _ChunkDecoder(model, steps, sampler, seed, tiling)
    if tiling is None:
        return runner.run(z0, 0, None)
    with streaming(model.decoder, CausalCache(record=False)) as cache:  # only for the tile origins
        return runner.run(z0, 0, cache)


@torch.no_grad()
def decode(model, z0: torch.Tensor, chunk: int | None = 16, *, first: int | None = None, steps: int = 32,
           sampler: str = "ddpm", seed: int = 0, tiling: Tiling | None = None, order: str = "chunk") -> torch.Tensor:
    """z0 (B, C, T', H', W') -> clip (B, 3, T, H, W) in [-1, 1], in pixel chunks of `first`, then `chunk`
    frames (`chunk=None`: one pass). `order="chunk"` runs each chunk through all steps (state for
    every step kept); `order="step"` runs every chunk at step i before step i + 1 (state for one
    step, the whole x_t kept). Both give the one-pass result."""
    k = model.decoder.temporal_downsample
    if chunk is None:
        return decode_full(model, z0, steps, sampler, seed, tiling)
    plan = chunk_plan(1 + k * (z0.shape[2] - 1), chunk, first, k)
    lat = split_time(z0, latent_plan(plan, k))
    if order == "chunk":
        return torch.cat(list(stream_decode(model, lat, steps, sampler, seed, tiling)), dim=2)
    if order != "step":
        raise ValueError(f"unknown decode order '{order}' (chunk, step)")
    runner, cache = _ChunkDecoder(model, steps, sampler, seed, tiling), CausalCache()
    starts = [sum(plan[:i]) for i in range(len(plan))]
    xs = [clip_noise(seed, NOISE_INIT, 0, s, runner.shape(z, s == 0), z0.device) for s, z in zip(starts, lat)]
    with streaming(model.decoder, cache):
        for step in range(steps + 1):
            cache.clear()  # step i's state starts again at frame 0; step i - 1's is no longer needed
            for c, (s, z) in enumerate(zip(starts, lat)):
                xs[c] = runner.update(xs[c], runner.denoise(xs[c], z, step, cache), step, s)
    return torch.cat(xs, dim=2)


@torch.no_grad()
def stream_reconstruct(model, chunks: Iterable[torch.Tensor], steps: int = 32, sampler: str = "ddpm", seed: int = 0,
                       latent_noise: str = "sample", tiling: Tiling | None = None,
                       encode_tiling: Tiling | None = None) -> Iterator[torch.Tensor]:
    """Pixel chunks -> reconstructed pixel chunks, encoder and decoder both streaming: memory flat in T
    apart from the decoder's middle-transformer token history (see the module docstring). Equals
    `decode_full(model, noisy_latent(model, model.encode(clip), seed), steps, sampler, seed)`."""

    def latents():
        start = 0
        for z in stream_encode(model, chunks, encode_tiling):
            yield noisy_latent(model, z, seed, start, latent_noise)
            start += z.shape[2]

    yield from stream_decode(model, latents(), steps, sampler, seed, tiling)
