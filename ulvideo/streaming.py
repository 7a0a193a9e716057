"""Constant-memory encode and decode: streaming in time, tiling in space, both exact.

Time. The encoder and the decoder are causal (DESIGN.md §2), so a clip can run in chunks
of `1 + 4k` pixel frames, then `4m` frames (latent chunks of `1 + k`, then `m` frames), each
`CausalConv3d` prefixing a chunk with the last input frames of the previous one
(`nets.layers.streaming`). The chunks, concatenated, equal the one-pass result up to fp32
round-off, for every chunk plan.

The diffusion decoder runs a whole sampler per chunk ("chunk" order): at step i, chunk c needs
the causal state the earlier chunks left *at step i*, so the cache holds one slot per sampler step
(plus one for the final clean prediction) and spatial tile. All noise (the initial x, DDPM's
ancestral noise, z0's eps_z in `UnifiedLatents.noisy_latent`) is drawn per frame from
(seed, purpose, step, frame) (`frame_noise`), so the streamed and the one-pass decode
(`decode_full` = `UnifiedLatents.decode`) see the same numbers. Memory, chunk order:
  * conv state: `kt - stride` input frames per causal conv per slot, flat in T, x (steps + 1);
  * middle transformer: each of its `depth` blocks keeps the keys and values of the earlier frames
    its block-causal attention can reach: (steps + 1) * 2 * depth * F * (H/m) * (W/m) * width values
    (m = `decoder.mid_downsampling`). Without a window (`decoder.temporal_window` None) that is
    every frame seen, F = T: linear in the clip's length, as is the attention's cost per chunk.
    With a window of W frames (frame f attends frames f - W + 1 .. f, in the one-pass network too)
    F = min(T, W - 1): older frames are evicted, and state and cost per chunk are flat in T.
    A chunk computes only its own tokens, attending to that history.
With a window the whole chunk-order state is flat in T: per slot, the conv state (per tile when
tiled) and W - 1 frames of keys and values per middle block.
The "step" order swaps the loops (every chunk at step i, then step i + 1): one slot of state at a
time, flat in `steps`, but the whole clip's x_t is held and nothing comes out before the end.

Space. `Tiling(tile)` cuts each frame into cores of tile x tile pixels (the last row and column
of cores shorter where the frame is not a multiple of `tile`) that partition it. A tile runs on its
core plus a halo of context, clipped to the frame, at least as wide as the receptive field of the
convs up to where the tile's output is cropped (`conv_reach`, traced from the network, rounded up
to the alignment); only the core's output is kept, so the zero padding at a tile's inner edges never
reaches it and nothing is blended. The conv networks take no statistics over space (their norms are
per position, `layers.ChannelRMSNorm`; the trace refuses a spatial reduction), so a tile needs
nothing but its halo: the tiled encoder is one pass over the tiles. The decoder's middle transformer
attends over the whole frame and runs once, on the whole (H/m) x (W/m) token grid (small): the
down path runs tile by tile up to the middle input (with its own, narrower halo), then each tile
runs again, the down path recomputed for the tile's skip tensors and the up path on the middle
output cropped to the tile. Keeping the skips of the first pass would save that recompute but hold
every stage's activations over the whole frame, the memory tiling is there to avoid. Peak memory is
that of one tile (plus the frame's input, output and token grid). Tiled encode and decode equal the
one-pass networks up to fp32 round-off at every tile size, also streamed in time, at every sampler
step. Cost: a tile of t pixels runs on up to (t + 2 halo)^2 pixels (`encoder_halo`,
`decoder_halos`: 20 and 48 px for configs/ul/tiny.yaml's networks), the decoder's down path twice.

How to call it. This is the only decoder path: `UnifiedLatents.decode` is `decode(..., chunk=None)`.

    z_clean = streaming.encode(model, video, chunk=16)                # = model.encode(video)
    z0 = model.noisy_latent(z_clean, 0)                               # seed 0: eps_z per latent frame
    clip = streaming.decode(model, z0, chunk=16, steps=32, sampler="ddpm", seed=0)
    clip = streaming.decode(model, z0, chunk=16, steps=32, seed=0, tiling=streaming.Tiling(128))  # the same clip
    clip = model.decode(z0, steps=32, sampler="ddpm", seed=0)         # the same clip, one pass
    for part in streaming.stream_reconstruct(model, frame_chunks, steps=32, seed=0):
        write(part)                                                   # chunks of 1 + 16, then 16 frames
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

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


# ---- spatial tiles --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles whose cores are `tile` x `tile` pixels (a multiple of the network's alignment: 8 for
    the encoder, the lcm of 8 and `mid_downsampling` for the decoder, so that every tile starts on
    every strided grid); the halo is the network's receptive field (see the module docstring)."""

    tile: int


@dataclass(frozen=True)
class Tile:
    """Rows y0:y1, columns x0:x1 of the frame: the region a tile runs on, its core (rows cy0:cy1,
    columns cx0:cx1, the pixels it owns) with the halo around it, clipped to the frame."""

    y0: int
    y1: int
    x0: int
    x1: int
    cy0: int
    cy1: int
    cx0: int
    cx1: int

    @property
    def core(self) -> tuple[int, int, int, int]:
        """The core in the tile's own coordinates: (y0, y1, x0, x1)."""
        return self.cy0 - self.y0, self.cy1 - self.y0, self.cx0 - self.x0, self.cx1 - self.x0


def tile_layout(height: int, width: int, tile: int, halo: int, align: int) -> list[Tile]:
    """Cores of `tile` pixels from the top left (the last ones shorter) with `halo` pixels of context."""
    if tile < 1 or tile % align or halo < 0 or halo % align:
        raise ValueError(f"tiles of {tile} px with a {halo} px halo: both must be multiples of {align} px, "
                         "the tile positive")
    if height % align or width % align:
        raise ValueError(f"{height}x{width} frames: tiling needs multiples of {align} pixels")

    def spans(size):
        return [(c, min(c + tile, size), max(0, c - halo), min(c + tile + halo, size)) for c in range(0, size, tile)]

    return [Tile(y0, y1, x0, x1, cy0, cy1, cx0, cx1)
            for cy0, cy1, y0, y1 in spans(height) for cx0, cx1, x0, x1 in spans(width)]


def _tensors(obj) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


class _Reach(TorchFunctionMode):
    """How far, in input pixels, the values of each tensor of a traced pass reach beyond their own cell.

    The value at a cell of d x d pixels depends only on input pixels less than r beyond that cell.
    A conv with a k x k kernel on cells of d pixels adds (k // 2) d to r (strided or not); an
    upsampling (nearest, depth-to-space) from cells of d to d' < d adds d - d' (a fine cell sees its
    whole coarse cell's context); pooling and space-to-depth add nothing; other ops pass their
    inputs' reach on. Cell sizes are read where the layout is known: at conv inputs and outputs,
    interpolation and pooling, and at the traced outputs. In between, a tensor carries (r, d) pairs,
    one per path whose resizing by a reshape (patching, depth-to-space) is not settled yet. That
    covers pointwise ops, convs, resizing aligned to the cells and reductions over channels (the
    per-position norms); not attention, which a traced pass must not contain. Statistics over space
    (a norm over a frame, a reduction over H or W) have no finite reach: the trace refuses them.
    """

    RESIZE = ("interpolate", "avg_pool2d", "avg_pool3d", "max_pool2d", "max_pool3d")
    FRAME_NORMS = ("group_norm", "batch_norm", "instance_norm")
    REDUCTIONS = ("mean", "sum", "var", "std", "var_mean", "std_mean", "amax", "amin", "max", "min", "norm",
                  "logsumexp", "softmax", "log_softmax")

    def __init__(self, size: tuple[int, int]):
        super().__init__()
        self.size, self.pairs, self.alive = size, {}, []  # alive: ids stay unique during the trace

    def spatial_statistics(self, name: str, args, kwargs) -> bool:
        """Whether this call reduces a (B, C, [T,] H, W) tensor of the trace over its H or W axis."""
        x = args[0] if args and torch.is_tensor(args[0]) else None
        if x is None or id(x) not in self.pairs or x.ndim < 4 or name not in self.FRAME_NORMS + self.REDUCTIONS:
            return False
        dim = kwargs.get("dim", args[1] if len(args) > 1 and not torch.is_tensor(args[1]) else None)
        if name in self.FRAME_NORMS or dim is None:  # max/min of two tensors is no reduction
            return name in self.FRAME_NORMS or len(args) == 1
        return any(d % x.ndim >= x.ndim - 2 for d in ([dim] if isinstance(dim, int) else dim))

    def cell(self, x: torch.Tensor) -> int:
        """Pixels a cell of the (..., H, W) tensor x."""
        d = self.size[0] // x.shape[-2]
        if d * x.shape[-2] != self.size[0] or d * x.shape[-1] != self.size[1]:
            raise ValueError(f"a {tuple(x.shape[-2:])} grid does not tile the traced {self.size} pixels in square cells")
        return d

    @staticmethod
    def settle(pairs, now: int) -> int:
        """The reach on cells of `now` pixels."""
        return max((r + max(0, d - now) for r, d in pairs), default=0)

    def reach(self, x: torch.Tensor) -> int:
        return self.settle(self.pairs.get(id(x), ()), self.cell(x))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.spatial_statistics(name, args, kwargs):
            raise ValueError(f"'{name}' takes statistics over space: a tile cannot reproduce it from its halo")
        out = func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        pairs = {p for t in inputs for p in self.pairs.get(id(t), ())}
        if name in ("conv2d", "conv3d"):
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            d = self.cell(x)
            pairs = {(self.settle(pairs, d) + max(w.shape[-2:]) // 2 * d, self.cell(out))}
        elif name in self.RESIZE:
            pairs = {(self.settle(pairs, self.cell(out)), self.cell(out))}
        written = _tensors(out)
        if name == "__setitem__" or name.startswith("__i") or (name.endswith("_") and not name.endswith("__")):
            written += inputs[:1]  # in place: the first argument now holds the result
        for t in written:
            merged = pairs | set(self.pairs.get(id(t), ()))
            # a pair with no larger reach and no larger cell than another never decides a settle
            self.pairs[id(t)] = tuple(p for p in merged
                                      if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in merged))
            self.alive.append(t)
        return out


@torch.no_grad()
def conv_reach(net: torch.nn.Module, fn, size: tuple[int, int]) -> int:
    """The largest reach (pixels) of the (..., H, W) tensors `fn()` returns, on inputs of `size` = (H, W)
    pixels: the context a tile needs around its core for its output there to equal the whole frame's
    (see `_Reach`). `fn` runs `net` as one unchunked pass (an empty cache, dropped after, shields any
    stream state)."""
    with streaming(net, CausalCache()), _Reach(size) as trace:
        out = fn()
    return max(trace.reach(t) for t in _tensors(out))


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _tiled(run, x: torch.Tensor, layout: list[Tile], unit: int, cache: CausalCache | None = None,
           slot=0) -> torch.Tensor:
    """run(tile, x_tile) over the tiles of `layout`, the cores of its outputs (`unit` pixels a cell)
    assembled into the frame's. `cache.slot` is (slot, tile index): each tile streams through its own state."""
    out = None
    for i, tile in enumerate(layout):
        if cache is not None:
            cache.slot = (slot, i)
        o = run(tile, x[..., tile.y0:tile.y1, tile.x0:tile.x1])
        if out is None:
            out = o.new_empty(*o.shape[:-2], x.shape[-2] // unit, x.shape[-1] // unit)
        y0, y1, x0, x1 = (c // unit for c in tile.core)
        out[..., tile.cy0 // unit:tile.cy1 // unit, tile.cx0 // unit:tile.cx1 // unit] = o[..., y0:y1, x0:x1]
    return out


# ---- encode ---------------------------------------------------------------------------------------


def encoder_halo(enc) -> int:
    """Pixels of context a tile of the encoder needs on each side: the reach of its latents, rounded
    up to the latent cell (traced on one frame of one latent cell)."""
    a = enc.spatial_downsample
    p = next(enc.parameters())
    x = torch.zeros(1, 3, 1, a, a, device=p.device, dtype=p.dtype)
    return _round_up(conv_reach(enc, lambda: enc(x), (a, a)), a)


def _encode_call(enc, x: torch.Tensor, cache: CausalCache | None, layout: list[Tile] | None) -> torch.Tensor:
    if layout is None:
        if cache is not None:
            cache.slot = (0, 0)
        return enc(x)
    return _tiled(lambda tile, xt: enc(xt), x, layout, enc.spatial_downsample, cache)


@torch.no_grad()
def stream_encode(model, chunks: Iterable[torch.Tensor], tiling: Tiling | None = None) -> Iterator[torch.Tensor]:
    """Pixel chunks (1 + 4k frames, then 4m frames) -> z_clean chunks (1 + k, then m latent frames)."""
    enc = model.encoder
    cache, layout = CausalCache(), None
    halo = encoder_halo(enc) if tiling is not None else None
    with streaming(enc, cache):
        for x in chunks:
            if tiling is not None and layout is None:
                layout = tile_layout(x.shape[-2], x.shape[-1], tiling.tile, halo, enc.spatial_downsample)
            yield _encode_call(enc, x, cache, layout)


@torch.no_grad()
def encode(model, x: torch.Tensor, chunk: int | None = 16, *, first: int | None = None,
           tiling: Tiling | None = None) -> torch.Tensor:
    """(B, 3, T, H, W) -> z_clean; `chunk=None` runs the clip in one pass (tiled if asked)."""
    if chunk is None:
        enc = model.encoder
        if tiling is None:
            return enc(x)
        layout = tile_layout(x.shape[-2], x.shape[-1], tiling.tile, encoder_halo(enc), enc.spatial_downsample)
        return _encode_call(enc, x, None, layout)
    plan = chunk_plan(x.shape[2], chunk, first, model.encoder.temporal_downsample)
    return torch.cat(list(stream_encode(model, split_time(x, plan), tiling)), dim=2)


# ---- decode ---------------------------------------------------------------------------------------


def decoder_halos(dec) -> tuple[int, int]:
    """Pixels of context a tile of the decoder needs on each side: (the reach of the middle input, i.e.
    of the down path; the reach of the output, down and up path with the middle output given), each
    rounded up to the alignment (traced on one frame of the alignment's size)."""
    a = math.lcm(dec.spatial_downsample, dec.mid_downsampling)
    p = next(dec.parameters())
    x = torch.zeros(1, 3, 1, a, a, device=p.device, dtype=p.dtype)
    z0 = torch.zeros(1, dec.latent_channels, 1, a // dec.spatial_downsample, a // dec.spatial_downsample,
                     device=p.device, dtype=p.dtype)
    emb = dec.embed(torch.zeros(1, device=p.device), x)

    def both_paths():
        h, skips = dec.down(x, z0, emb)
        return dec.up(torch.zeros(h.shape, device=h.device, dtype=h.dtype), skips, emb)

    down = conv_reach(dec, lambda: dec.down(x, z0, emb)[0], (a, a))
    return _round_up(down, a), _round_up(max(down, conv_reach(dec, both_paths, (a, a))), a)


@dataclass(frozen=True)
class DecoderLayout:
    """The decoder's tiles: the same cores with the down path's halo (`down`) and the whole network's (`full`)."""

    down: list[Tile]
    full: list[Tile]


def decoder_layout(dec, height: int, width: int, tiling: Tiling, halos: tuple[int, int] | None = None) -> DecoderLayout:
    down, full = decoder_halos(dec) if halos is None else halos
    a = math.lcm(dec.spatial_downsample, dec.mid_downsampling)
    return DecoderLayout(tile_layout(height, width, tiling.tile, down, a), tile_layout(height, width, tiling.tile, full, a))


def _decoder_call(dec, x_t, z0, logsnr, cache: CausalCache | None, slot, layout: DecoderLayout | None,
                  start: int = 0) -> torch.Tensor:
    """The decoder network on x_t (frames from pixel frame `start` of the clip), tiled if `layout`."""
    if layout is None:
        if cache is not None:
            cache.slot = (slot, 0)
        return dec(x_t, z0, logsnr)
    s, m, first = dec.spatial_downsample, dec.mid_downsampling, start == 0
    dec._check(x_t, z0, first)
    emb = dec.embed(logsnr, x_t)

    def down(tile, xt):
        return dec.down(xt, z0[..., tile.y0 // s:tile.y1 // s, tile.x0 // s:tile.x1 // s], emb, first)

    # the middle input, tile by tile with the down path's halo; these passes stream through their own
    # slots (their tiles differ from the full ones by the halo)
    h = _tiled(lambda tile, xt: down(tile, xt)[0], x_t, layout.down, m, cache, (slot, "down"))
    if cache is not None:
        cache.slot = (slot, None)  # the middle's keys and values: one stream for the whole frame
    mid = dec.middle(h, emb, (start, 0, 0))

    def up(tile, xt):  # the down path again for the tile's skips, then the up path
        return dec.up(mid[..., tile.y0 // m:tile.y1 // m, tile.x0 // m:tile.x1 // m], down(tile, xt)[1], emb)

    return _tiled(up, x_t, layout.full, 1, cache, slot)


def tiled_denoise(model, z0: torch.Tensor, tiling: Tiling) -> D.Denoise:
    """`denoise(x_t, logsnr)` running the decoder tile by tile over whole clips: a drop-in for
    `model.decoder_denoise(z0)` in `diffusion.sample`, equal to it up to fp32 round-off."""
    dec, layout, halos = model.decoder, None, decoder_halos(model.decoder)

    def denoise(x_t: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        nonlocal layout
        layout = layout or decoder_layout(dec, x_t.shape[-2], x_t.shape[-1], tiling, halos)
        return _decoder_call(dec, x_t, z0, logsnr, None, 0, layout)

    return denoise


class _ChunkDecoder:
    """The sampler for one chunk of frames, given where the chunk starts and the shared cache.

    Network evaluation i (0..steps) runs at logsnrs[i] with cache slot i; evaluations 0..steps-1
    each take a `diffusion.ddpm_step` / `ddim_step` to logsnrs[i + 1], the last one gives the clean
    prediction at logsnrs[steps] = the stop logSNR. The MSE baseline's decoder is one evaluation
    (steps = 0) from an all-zero input at the decoder's logsnr_min."""

    def __init__(self, model, steps: int, sampler: str, seed: int, tiling: Tiling | None,
                 logsnr_end: float | None = None):
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler '{sampler}' (ddpm, ddim)")
        self.dec, self.sampler, self.seed = model.decoder, sampler, seed
        self.kind = model.cfg.decoder.prediction
        end = model.decoder_logsnr_end(logsnr_end)
        self.mse = model.deterministic_decoder
        if self.mse:
            self.steps, self.logsnrs = 0, [float(model.cfg.decoder.logsnr_min)]
        else:
            if steps < 1:
                raise ValueError(f"decoder steps = {steps} must be >= 1")
            self.steps = steps
            self.logsnrs = [float(v) for v in D.sampling_logsnrs(model.decoder_schedule, steps, logsnr_end=end)]
        self.tiling, self.layout = tiling, None
        self.halos = decoder_halos(self.dec) if tiling is not None else None  # traced before any streaming

    def shape(self, z0: torch.Tensor, first: bool) -> tuple[int, ...]:
        k, s = self.dec.temporal_downsample, self.dec.spatial_downsample
        t = 1 + k * (z0.shape[2] - 1) if first else k * z0.shape[2]
        return (z0.shape[0], 3, t, z0.shape[3] * s, z0.shape[4] * s)

    def initial(self, z0: torch.Tensor, start: int) -> torch.Tensor:
        """x at logsnrs[0] for the frames from pixel frame `start`: per-frame noise (zeros for MSE)."""
        shape = self.shape(z0, start == 0)
        if self.mse:
            return torch.zeros(shape, device=z0.device)
        return clip_noise(self.seed, NOISE_INIT, 0, start, shape, z0.device)

    def denoise(self, x_t: torch.Tensor, z0: torch.Tensor, step: int, cache: CausalCache | None,
                start: int) -> torch.Tensor:
        """The network output at sampler step `step` (index into self.logsnrs) for the frames from pixel
        frame `start`, tiled if asked."""
        if self.tiling is not None and self.layout is None:
            self.layout = decoder_layout(self.dec, x_t.shape[-2], x_t.shape[-1], self.tiling, self.halos)
        lam = torch.full((x_t.shape[0],), self.logsnrs[step], device=x_t.device)
        return _decoder_call(self.dec, x_t, z0, lam, cache, step, self.layout, start)

    def update(self, x_t: torch.Tensor, out: torch.Tensor, step: int, start: int) -> torch.Tensor:
        """x_t at the next logSNR, or (after the last step) the clean prediction clipped to [-1, 1]."""
        ls = self.logsnrs[step]
        if step == self.steps:
            return D.clipped_prediction(out, x_t, ls, self.kind, 1.0)[0]
        lt = self.logsnrs[step + 1]
        if self.sampler == "ddim":
            return D.ddim_step(x_t, out, ls, lt, self.kind, 1.0)
        noise = clip_noise(self.seed, NOISE_STEP, step, start, x_t.shape, x_t.device)
        return D.ddpm_step(x_t, out, ls, lt, self.kind, 1.0, noise)

    def run(self, z0: torch.Tensor, start: int, cache: CausalCache | None) -> torch.Tensor:
        """All sampler steps for the frames starting at pixel frame `start` (0 = a first chunk)."""
        x = self.initial(z0, start)
        for step in range(self.steps + 1):
            x = self.update(x, self.denoise(x, z0, step, cache, start), step, start)
        return x


@torch.no_grad()
def stream_decode(model, z0_chunks: Iterable[torch.Tensor], steps: int = 32, sampler: str = "ddpm", seed: int = 0,
                  tiling: Tiling | None = None, logsnr_end: float | None = None) -> Iterator[torch.Tensor]:
    """Latent chunks (1 + k, then m frames) -> clip chunks in [-1, 1] (1 + 4k, then 4m frames), chunk order:
    each chunk runs the whole sampler; the cache holds one slot of causal state per step and tile."""
    runner, cache, start = _ChunkDecoder(model, steps, sampler, seed, tiling, logsnr_end), CausalCache(), 0
    with streaming(model.decoder, cache):
        for z0 in z0_chunks:
            x = runner.run(z0, start, cache)
            start += x.shape[2]
            yield x


@torch.no_grad()
def decode_full(model, z0: torch.Tensor, steps: int = 32, sampler: str = "ddpm", seed: int = 0,
                tiling: Tiling | None = None, logsnr_end: float | None = None) -> torch.Tensor:
    """The one-pass decode (`UnifiedLatents.decode`), with the per-frame noise of the streamed one."""
    return _ChunkDecoder(model, steps, sampler, seed, tiling, logsnr_end).run(z0, 0, None)


@torch.no_grad()
def decode(model, z0: torch.Tensor, chunk: int | None = 16, *, first: int | None = None, steps: int = 32,
           sampler: str = "ddpm", seed: int = 0, tiling: Tiling | None = None, order: str = "chunk",
           logsnr_end: float | None = None) -> torch.Tensor:
    """z0 (B, C, T', H', W') -> clip (B, 3, T, H, W) in [-1, 1], in pixel chunks of `first`, then `chunk`
    frames (`chunk=None`: one pass). `order="chunk"` runs each chunk through all steps (state for
    every step kept); `order="step"` runs every chunk at step i before step i + 1 (state for one
    step, the whole x_t kept). Every plan, order and tiling gives the one-pass result. Sampling stops
    at `model.decoder_logsnr_end(logsnr_end)` (None: the decoder's logsnr_max)."""
    k = model.decoder.temporal_downsample
    if chunk is None:
        return decode_full(model, z0, steps, sampler, seed, tiling, logsnr_end)
    if order not in ("chunk", "step"):
        raise ValueError(f"unknown decode order '{order}' (chunk, step)")
    plan = chunk_plan(1 + k * (z0.shape[2] - 1), chunk, first, k)
    lat = split_time(z0, latent_plan(plan, k))
    if order == "chunk":
        return torch.cat(list(stream_decode(model, lat, steps, sampler, seed, tiling, logsnr_end)), dim=2)
    runner, cache = _ChunkDecoder(model, steps, sampler, seed, tiling, logsnr_end), CausalCache()
    starts = [sum(plan[:i]) for i in range(len(plan))]
    xs = [runner.initial(z, s) for s, z in zip(starts, lat)]
    with streaming(model.decoder, cache):
        for step in range(runner.steps + 1):
            cache.clear()  # step i's state starts again at frame 0; step i - 1's is no longer needed
            for c, (s, z) in enumerate(zip(starts, lat)):
                xs[c] = runner.update(xs[c], runner.denoise(xs[c], z, step, cache, s), step, s)
    return torch.cat(xs, dim=2)


@torch.no_grad()
def stream_reconstruct(model, chunks: Iterable[torch.Tensor], steps: int = 32, sampler: str = "ddpm", seed: int = 0,
                       latent_noise: str = "sample", tiling: Tiling | None = None,
                       encode_tiling: Tiling | None = None, logsnr_end: float | None = None) -> Iterator[torch.Tensor]:
    """Pixel chunks -> reconstructed pixel chunks, encoder and decoder both streaming: memory flat in T
    apart from the decoder's middle-transformer key/value history, which is flat too with a
    `decoder.temporal_window` (see the module docstring). Equals `model.reconstruct(clip, steps,
    sampler, latent_noise, seed, logsnr_end)`."""

    def latents():
        start = 0
        for z in stream_encode(model, chunks, encode_tiling):
            yield model.noisy_latent(z, seed, latent_noise, start)
            start += z.shape[2]

    yield from stream_decode(model, latents(), steps, sampler, seed, tiling, logsnr_end)
