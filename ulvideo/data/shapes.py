"""The built-in "shapes" dataset and a ground-truth measurer for its clips.

    ulvideo data synth --out data/shapes --num 256 --frames 17 --size 64 --seed 0

Each clip shows one shape (circle, square, triangle, diamond) of one palette colour and one of two
sizes, moving at constant velocity in one of four directions over a dark grey background, with
the caption "a {size} {colour} {shape} moving {direction}". `measure_clip` reads colour, shape,
size, centroid track and direction back from pixels alone, so reconstructions and generations can
be scored without a learned model (`score`). It names a shape only when that shape's template
explains the clip clearly better than every other shape and than a round blob (`SHAPE_RULE`);
otherwise the shape is "unknown", which matches no spec: a blurred reconstruction whose corners
are gone does not count as a square, a triangle or a diamond, nor a round blob as a circle.

Conventions (owned here):
  * frames are uint8 `(T, H, W, 3)` RGB, square (`H = W = size`);
  * positions are `(x, y)`: x to the right, y downwards, in pixels, with pixel `i` covering
    `[i, i + 1)` (its centre is `i + 0.5`); a `ShapeSpec` stores them as fractions of the frame
    side so one spec renders at any size and any number of frames;
  * every shape fills a `d x d` bounding box (`d = DIAMETERS[size] * frame side`); the triangle
    points up, so its area centroid lies `d / 6` below the box centre;
  * over a clip the shape moves from `start` by `SPEEDS[speed]` of its free range (the span its
    box centre can take while staying `MARGIN` inside the frame), frame 0 at `start`, the last
    frame at the end of the path, so a clip of any length stays inside the frame.

Held-out combinations: `heldout_combinations()` lists (colour, shape, direction) triples that
`ulvideo data synth` never renders, chosen so that every pair of their attributes still occurs in
training; a prompt-adherence benchmark generates them to test composition.

Paraphrases: `paraphrase(spec, rng)` words the same content with words that never occur in a
training caption ("a tiny crimson disc travelling westward"), to test prompt robustness.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond")
# Pure-ish hues at least 150 RGB levels apart from each other (min pairwise distance 160, blue to
# cyan), so a colour shift of ~40 levels per channel still lands on the right name.
PALETTE = {
    "red": (230, 40, 40),
    "green": (40, 200, 40),
    "blue": (40, 60, 240),
    "yellow": (230, 220, 40),
    "magenta": (220, 40, 220),
    "cyan": (40, 220, 220),
    "white": (235, 235, 235),
}
COLOURS = tuple(PALETTE)
BACKGROUND = (24, 24, 24)  # dark grey, inside H.264's limited luma range so it survives encoding
SIZES = ("small", "large")
DIAMETERS = {"small": 0.25, "large": 0.40}  # box side / frame side: 8 and 12.8 px at 32x32
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
SPEEDS = {"slow": 0.45, "fast": 0.9}  # fraction of the free range covered over one clip
MARGIN = 0.03  # gap between the shape's box and the frame edge (1 px at 32x32)
SUPERSAMPLE = 4  # 4x4 coverage samples per pixel: antialiased edges, sub-pixel motion

# Measurer settings.
MIN_TRAVEL = 0.05  # below this displacement (fraction of the side) over the clip: "none"
MIN_CONTRAST = 40.0  # every palette colour is >= 170 RGB levels from BACKGROUND; below 40: blank frame
COVERAGE_FLOOR = 0.15  # coverage below this is noise or compression ringing, not shape
HALO = 0.08  # the shape's region: its half-coverage mask grown by this fraction of the side
BLURS = (0.0, 0.5, 1.0, 1.5, 2.0)  # template blur levels, in pixels per 32 px of frame side
BLOB_WIDTHS = tuple(np.geomspace(0.75, 8.0, 24))  # round-blob hypothesis: Gaussian widths, px per 32 px
TEMPLATE_FRAMES = 5  # frames (evenly spread) on which the shape templates are compared
# A shape is named only when its best template leaves at least this fraction of the coverage's
# energy less unexplained than every other shape and than a round Gaussian blob; else "unknown".
SHAPE_MARGIN = 0.01
SHAPE_RULE = (f"least-squares fit of the coverage by templates (4 shapes x 2 sizes x {len(BLURS)} blurs) and by "
              f"round Gaussian blobs ({len(BLOB_WIDTHS)} widths); the best shape is named only if its relative "
              f"residual is below every other shape's and the blob's by >= {SHAPE_MARGIN}, else 'unknown'")


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    size: str
    direction: str
    speed: str = "fast"
    start: tuple[float, float] | None = None  # box centre at frame 0 (fractions); None: path centred

    def __post_init__(self):
        for name, allowed in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES),
                              ("direction", DIRECTIONS), ("speed", SPEEDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ShapeSpec.{name} = {getattr(self, name)!r}; expected one of {sorted(allowed)}")
        lo, hi = _free_range(self.size)
        if self.start is None:
            travel, (dx, dy) = SPEEDS[self.speed] * (hi - lo), DIRECTIONS[self.direction]
            object.__setattr__(self, "start", (0.5 - travel * dx / 2, 0.5 - travel * dy / 2))
        object.__setattr__(self, "start", (float(self.start[0]), float(self.start[1])))
        end = self.end
        for p in (self.start, end):
            if not all(lo - 1e-9 <= c <= hi + 1e-9 for c in p):
                raise ValueError(f"{self}: the path {self.start} -> {end} leaves the frame "
                                 f"(centres must lie in [{lo:.3f}, {hi:.3f}])")

    @property
    def end(self) -> tuple[float, float]:
        lo, hi = _free_range(self.size)
        travel = SPEEDS[self.speed] * (hi - lo)
        dx, dy = DIRECTIONS[self.direction]
        return (self.start[0] + travel * dx, self.start[1] + travel * dy)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ShapeSpec":
        return cls(**{**d, "start": tuple(d["start"])})


def _free_range(size: str) -> tuple[float, float]:
    r = DIAMETERS[size] / 2
    return r + MARGIN, 1.0 - r - MARGIN


def caption(spec: ShapeSpec) -> str:
    return f"a {spec.size} {spec.colour} {spec.shape} moving {spec.direction}"


def sample_spec(rng: np.random.Generator, exclude=None) -> ShapeSpec:
    """One random spec; attributes uniform, start uniform over the positions that keep the path inside."""
    for _ in range(10_000):
        attrs = dict(shape=SHAPES[rng.integers(len(SHAPES))], colour=COLOURS[rng.integers(len(COLOURS))],
                     size=SIZES[rng.integers(len(SIZES))], direction=list(DIRECTIONS)[rng.integers(len(DIRECTIONS))],
                     speed=list(SPEEDS)[rng.integers(len(SPEEDS))])
        if not _excluded(attrs, exclude):
            break
    else:
        raise ValueError("exclude= rules out every attribute combination")
    lo, hi = _free_range(attrs["size"])
    travel = SPEEDS[attrs["speed"]] * (hi - lo)
    dx, dy = DIRECTIONS[attrs["direction"]]
    # along the motion axis the start leaves room for the whole path; across it, anywhere
    along = rng.uniform(lo + travel * (dx < 0 or dy < 0), hi - travel * (dx > 0 or dy > 0))
    across = rng.uniform(lo, hi)
    start = (along, across) if dx != 0 else (across, along)
    return ShapeSpec(start=start, **attrs)


def _excluded(attrs: dict, exclude) -> bool:
    return any(all(attrs[k] == v for k, v in combo.items()) for combo in exclude or ())


def make_dataset_specs(num: int, seed: int = 0, exclude=None) -> list[ShapeSpec]:
    """`num` specs; spec i depends only on (seed, i), so a smaller dataset is a prefix of a larger one.

    `exclude`: combinations (dicts of attribute -> value, e.g. from `heldout_combinations()`) never drawn.
    """
    return [sample_spec(np.random.default_rng([seed, i]), exclude) for i in range(num)]


def heldout_combinations(num: int = 8, seed: int = 0,
                         keys: tuple[str, ...] = ("colour", "shape", "direction")) -> list[dict]:
    """`num` attribute combinations to keep out of training, deterministic by seed.

    Drawn greedily from a shuffled list of all combinations, skipping any that shares a pair of
    attribute values with one already chosen: each pair of a held-out combination is then held out
    only once and still occurs in training with every other value of the remaining attribute(s),
    so each unseen combination is composable from seen parts.
    """
    values = {"colour": COLOURS, "shape": SHAPES, "direction": tuple(DIRECTIONS), "size": SIZES, "speed": tuple(SPEEDS)}
    combos = list(itertools.product(*(values[k] for k in keys)))
    order = np.random.default_rng([seed, 7]).permutation(len(combos))
    chosen, used_pairs = [], set()
    for i in order:
        combo = dict(zip(keys, combos[i]))
        pairs = {frozenset(p) for p in itertools.combinations(combo.items(), min(2, len(keys)))}
        if pairs & used_pairs:
            continue
        chosen.append(combo)
        used_pairs |= pairs
        if len(chosen) == num:
            return chosen
    raise ValueError(f"only {len(chosen)} combinations of {keys} can be held out without sharing a pair; asked {num}")


# Paraphrase vocabulary: none of these words occurs in any training caption (test_shapes checks).
_SYNONYMS = {
    "small": ("tiny", "little", "petite"), "large": ("big", "huge", "giant"),
    "red": ("crimson", "scarlet"), "green": ("emerald", "grassy"), "blue": ("azure", "cobalt"),
    "yellow": ("golden", "lemon"), "magenta": ("fuchsia", "pink"), "cyan": ("turquoise", "aqua"),
    "white": ("snowy", "ivory"),
    "circle": ("disc", "dot", "ball"), "square": ("box", "block", "tile"),
    "triangle": ("wedge", "pyramid"), "diamond": ("rhombus", "lozenge"),
    "left": ("westward", "toward the west"), "right": ("eastward", "toward the east"),
    "up": ("upward", "northward", "toward the top"), "down": ("downward", "southward", "toward the bottom"),
}
_VERBS = ("travelling", "drifting", "gliding", "sliding", "heading")


def paraphrase(spec: ShapeSpec, rng: np.random.Generator) -> str:
    """A caption for `spec` made of words absent from every training caption (except "a")."""
    pick = lambda word: _SYNONYMS[word][rng.integers(len(_SYNONYMS[word]))]  # noqa: E731
    size, colour, shape, direction = (pick(w) for w in (spec.size, spec.colour, spec.shape, spec.direction))
    verb = _VERBS[rng.integers(len(_VERBS))]
    if rng.random() < 0.5:
        return f"a {size} {colour} {shape} {verb} {direction}"
    return f"one {colour} {shape}, {size}, {verb} {direction}"


def parse_caption(text: str) -> dict:
    """Attributes named in a caption or paraphrase (`{"colour": "red", ...}`); absent ones are left out."""
    words = {w: w for w in (*SHAPES, *COLOURS, *SIZES, *DIRECTIONS)}
    words.update({syn: w for w, syns in _SYNONYMS.items() for syn in syns})
    kind = {**{s: "shape" for s in SHAPES}, **{c: "colour" for c in COLOURS}, **{s: "size" for s in SIZES},
            **{d: "direction" for d in DIRECTIONS}}
    text = " " + " ".join(text.lower().replace(",", " ").replace(":", " ").split()) + " "
    found = {}
    for phrase in sorted(words, key=len, reverse=True):  # longest first: "toward the top" before "top"
        if f" {phrase} " in text:
            found.setdefault(kind[words[phrase]], words[phrase])
            text = text.replace(f" {phrase} ", " | ")
    return found


# ---------------------------------------------------------------------------------------------
# Rendering


def box_centres(spec: ShapeSpec, num_frames: int, size: int) -> np.ndarray:
    """(T, 2) box centre per frame in pixels; constant velocity from `start` to `end`."""
    t = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    start, end = np.array(spec.start), np.array(spec.end)
    return (start + t[:, None] * (end - start)) * size


def true_centroids(spec: ShapeSpec, num_frames: int, size: int) -> np.ndarray:
    """(T, 2) exact area centroid per frame in pixels (the triangle's sits d/6 below its box centre)."""
    c = box_centres(spec, num_frames, size)
    if spec.shape == "triangle":
        c[:, 1] += DIAMETERS[spec.size] * size / 6
    return c


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership in the shape, in box coordinates u, v in [-1, 1] (v down)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    return (v >= -1.0) & (v <= 1.0) & (2.0 * np.abs(u) <= v + 1.0)  # triangle, apex at v = -1


def _coverage(shape: str, centres: np.ndarray, radius: float, size: int) -> np.ndarray:
    """(T, H, W) fraction of each pixel inside the shape with box centres (T, 2) px and half-side `radius` px."""
    k = SUPERSAMPLE
    grid = (np.arange(size * k) + 0.5) / k  # sample positions in pixels
    u = (grid[None, None, :] - centres[:, 0, None, None]) / radius  # (T, 1, W*k)
    v = (grid[None, :, None] - centres[:, 1, None, None]) / radius  # (T, H*k, 1)
    hit = _inside(shape, u, v).astype(np.float32)  # (T, H*k, W*k)
    return hit.reshape(len(centres), size, k, size, k).mean(axis=(2, 4))


def render_clip(spec: ShapeSpec, num_frames: int, size: int) -> np.ndarray:
    """uint8 (T, H, W, 3) clip of `spec`, antialiased by SUPERSAMPLE^2 coverage samples per pixel."""
    if num_frames < 1 or size < 8:
        raise ValueError(f"render_clip: need num_frames >= 1 and size >= 8, got {num_frames}, {size}")
    coverage = _coverage(spec.shape, box_centres(spec, num_frames, size), DIAMETERS[spec.size] * size / 2, size)
    bg, fg = np.array(BACKGROUND, np.float32), np.array(PALETTE[spec.colour], np.float32)
    return np.rint(bg + coverage[..., None] * (fg - bg)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Measurement:
    colour: str  # nearest palette name, or "none" when no shape is found
    shape: str
    size: str
    direction: str  # nearest of DIRECTIONS, or "none" when it travels < MIN_TRAVEL of the side
    rgb: tuple[float, float, float]  # median colour of the shape's core
    area: float  # pixels covered, median over frames
    blur: float  # blur (Gaussian sigma, pixels) of the best-fitting template
    residual: float  # squared error of the best template / squared coverage: 0 = a perfect shape
    # how much more of the coverage's energy the best competitor (the next shape, or a round blob)
    # leaves unexplained than the best shape: the shape is named when this is >= SHAPE_MARGIN
    shape_margin: float
    velocity: tuple[float, float]  # least-squares (vx, vy) in pixels per frame
    frame_size: int  # frame side in pixels
    centroids: np.ndarray = field(repr=False)  # (T, 2) pixels; NaN where no shape is found
    visible: np.ndarray = field(repr=False)  # (T,) bool
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("centroids", "visible")}
        d["centroids"] = [[None if math.isnan(c) else round(float(c), 3) for c in xy] for xy in self.centroids]
        d["visible"] = [bool(v) for v in self.visible]
        return d


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a (T, H, W) mask by `radius` pixels (square neighbourhood)."""
    for axis in (1, 2):
        grown = mask.copy()
        for shift in range(1, radius + 1):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(shift, None), slice(None, -shift)
            grown[tuple(lo)] |= mask[tuple(hi)]
            grown[tuple(hi)] |= mask[tuple(lo)]
        mask = grown
    return mask


def _gauss_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur along one axis (rows renormalised, so edges do not darken)."""
    if sigma <= 0:
        return np.eye(n, dtype=np.float32)
    i = np.arange(n)
    g = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def _fit(template: np.ndarray, cov: np.ndarray, energy: float) -> float:
    """Relative residual of the best multiple of `template` for `cov` (both (F, H, W)).

    The template goes through the same floor as the measured coverage (values below
    COVERAGE_FLOOR were set to 0 there), so a hypothesis with soft tails is not charged for them.
    The amplitude is fitted because a heavily blurred small shape never reaches full contrast.
    """
    amp = float((template * cov).sum()) / max(float((template * template).sum()), 1e-6)
    t = np.where(amp * template >= COVERAGE_FLOOR, template, 0.0)
    amp = float((t * cov).sum()) / max(float((t * t).sum()), 1e-6)
    return float(((amp * t - cov) ** 2).sum()) / max(energy, 1e-6)


def _classify(cov: np.ndarray, centroids: np.ndarray) -> tuple[str, str, float, float, float]:
    """(shape, size, blur, residual, margin) from coverage maps (F, H, W) with their centroids (F, 2).

    Hypotheses: each known shape at each known size, its area centroid on the measured centroid,
    blurred at each of BLURS; and a round blob, an isotropic Gaussian on the centroid at each of
    BLOB_WIDTHS. Each is fitted by least squares (`_fit`); a shape's residual is its best over sizes
    and blurs. The best shape is named only with a clear margin, SHAPE_MARGIN of the coverage's
    energy, over the next shape and over the blob: blur that rounds off corners and points makes
    the shapes and the blob explain the data alike, and then the answer is "unknown". Size and
    blur are those of the best shape's template either way.
    """
    size = cov.shape[-1]
    energy = float((cov ** 2).sum())
    best: dict[str, tuple[float, str, float]] = {}  # shape -> (residual, size name, blur px)
    for shape, name in itertools.product(SHAPES, SIZES):
        d = DIAMETERS[name] * size
        centres = centroids - np.array([0.0, d / 6 if shape == "triangle" else 0.0])
        template = _coverage(shape, centres, d / 2, size)
        for blur in BLURS:
            g = _gauss_matrix(size, blur * size / 32)
            err = _fit(g @ template @ g.T, cov, energy)
            if err < best.get(shape, (math.inf,))[0]:
                best[shape] = (err, name, blur * size / 32)
    grid = np.arange(size) + 0.5
    r2 = (grid[None, None, :] - centroids[:, 0, None, None]) ** 2 + (grid[None, :, None] - centroids[:, 1, None, None]) ** 2
    blob = min(_fit(np.exp(-r2 / (2 * (w * size / 32) ** 2)), cov, energy) for w in BLOB_WIDTHS)
    ranked = sorted(best, key=lambda k: best[k][0])
    err, name, blur = best[ranked[0]]
    margin = min(best[ranked[1]][0], blob) - err
    return (ranked[0] if margin >= SHAPE_MARGIN else "unknown"), name, blur, err, margin


def _nearest_colour(diff: np.ndarray) -> str:
    """Palette name nearest to a colour given as its difference from the background.

    Blur mixes a shape's colour with the background, `bg + a * (colour - bg)` with a < 1, which
    pulls bright colours toward darker palette entries; fitting `a` (within [0.5, 1.25]) per
    candidate undoes that while keeping brightness differences beyond it meaningful.
    """
    def err(name: str) -> float:
        q = np.array(PALETTE[name], np.float64) - np.array(BACKGROUND)
        a = np.clip(diff @ q / (q @ q), 0.5, 1.25)
        return float(np.sum((diff - a * q) ** 2))
    return min(PALETTE, key=err)


def measure_clip(frames: np.ndarray) -> Measurement:
    """Colour, shape, size, centroid track and direction of the one shape in `frames`.

    `frames`: (T, H, W, 3) RGB levels 0..255 (uint8, or float on that scale; convert a [-1, 1]
    tensor with `ulvideo.videoio.to_uint8` first). A blank clip measures "none" everywhere.

    Shape decision rule (`SHAPE_RULE`): on the coverage maps of up to TEMPLATE_FRAMES frames, every
    shape is fitted by least squares at both sizes and at each of BLURS (best of the ten kept), and
    so is a round Gaussian blob at each of BLOB_WIDTHS, all centred on the measured centroids and
    put through the same coverage floor as the data. The best shape is named only if its relative
    residual (squared error / squared coverage) is lower than the next shape's and the blob's by at
    least SHAPE_MARGIN; else the shape is "unknown". `shape_margin` records that lead. Checked in
    tests/test_shapes.py: true clips, clean, through H.264, or blurred by 1 px (large shapes 1.5 px)
    with noise, are named right; at 2 px right or "unknown"; a Gaussian blob of the same colour,
    area and motion, and a shape blurred by 0.4 of its size, are "unknown".
    """
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2]:
        raise ValueError(f"measure_clip: expected square (T, H, W, 3) RGB frames, "
                         f"got shape {tuple(np.shape(frames))}")
    num_frames, side = x.shape[0], x.shape[1]
    # The shape covers at most ~13 % of a frame, so the per-frame median pixel is background.
    bg = np.median(x.reshape(num_frames, -1, 3), axis=1)  # (T, 3)
    dist = np.linalg.norm(x - bg[:, None, None], axis=-1)  # (T, H, W)
    peak = dist.reshape(num_frames, -1).max(axis=1)  # (T,)
    visible = peak > MIN_CONTRAST
    core = (dist >= 0.6 * peak[:, None, None]) & visible[:, None, None]
    centroids = np.full((num_frames, 2), np.nan)
    background = tuple(map(float, np.median(bg, axis=0)))
    blank = Measurement("none", "none", "none", "none", (math.nan,) * 3, math.nan, math.nan, math.nan, math.nan,
                        (math.nan, math.nan), side, centroids, np.zeros(num_frames, bool), background)
    if not visible.any():
        return blank
    rgb = np.median(x[core], axis=0)
    colour = _nearest_colour(rgb - np.median(bg, axis=0))
    # Coverage = distance / the shape's contrast: linear in how much of a pixel the shape covers,
    # even after blur mixes shape and background. Outside the shape's region it is noise.
    contrast = float(np.median([np.median(dist[t][core[t]]) for t in np.flatnonzero(visible)]))
    cov = dist / contrast
    region = _dilate((cov >= 0.5) & visible[:, None, None], max(1, round(HALO * side)))
    cov = np.where(region & (cov >= COVERAGE_FLOOR), cov, 0.0)
    area = cov.sum(axis=(1, 2))  # (T,)
    visible &= area > 1.0
    t = np.flatnonzero(visible)
    if len(t) == 0:
        return blank
    grid = np.arange(side) + 0.5
    centroids[t, 0] = (cov[t].sum(axis=1) @ grid) / area[t]
    centroids[t, 1] = (cov[t].sum(axis=2) @ grid) / area[t]
    pick = t[np.unique(np.linspace(0, len(t) - 1, min(TEMPLATE_FRAMES, len(t))).round().astype(int))]
    shape, size, blur, residual, margin = _classify(cov[pick], centroids[pick])
    velocity, direction = (0.0, 0.0), "none"
    if len(t) >= 2:
        velocity = tuple(float(np.polyfit(t, centroids[t, i], 1)[0]) for i in range(2))
        if math.hypot(*velocity) * (num_frames - 1) >= MIN_TRAVEL * side:
            direction = max(DIRECTIONS, key=lambda d: np.dot(velocity, DIRECTIONS[d]))
    return Measurement(colour, shape, size, direction, tuple(map(float, rgb)), float(np.median(area[t])), blur,
                       residual, margin, velocity, side, centroids, visible, background)


def score_attributes(attrs: dict, m: Measurement) -> dict:
    """Per-attribute matches for the attributes named in `attrs` (e.g. `parse_caption(prompt)`)."""
    out = {k: getattr(m, k) == v for k, v in attrs.items() if k in ("colour", "shape", "size", "direction")}
    out["all"] = all(out.values())
    return out


def score(spec: ShapeSpec, m: Measurement) -> dict:
    """Attribute matches plus per-frame centroid errors (pixels) against `true_centroids(spec)`."""
    out = score_attributes({k: getattr(spec, k) for k in ("colour", "shape", "size", "direction")}, m)
    truth = true_centroids(spec, len(m.centroids), m.frame_size)
    err = np.linalg.norm(m.centroids - truth, axis=1)
    out["centroid_err"] = [None if math.isnan(e) else float(e) for e in err]
    out["centroid_err_mean"] = float(np.nanmean(err)) if m.visible.any() else math.nan
    out["centroid_err_max"] = float(np.nanmax(err)) if m.visible.any() else math.nan
    out["visible_frac"] = float(m.visible.mean())
    return out


def manifest_specs(folder: str | Path) -> dict[str, ShapeSpec]:
    """{clip file name: its ShapeSpec} from the `manifest.jsonl` that `ulvideo data synth` wrote."""
    specs = {}
    for line in (Path(folder) / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        specs[Path(row["path"]).name] = ShapeSpec.from_dict(row["spec"])
    return specs


def write_dataset(out: str | Path, num: int, frames: int, size: int, seed: int = 0, fps: int = 8) -> int:
    """Write `<out>/shape_NNNNN.mp4` + `.txt` (caption) per clip, `manifest.jsonl` and `heldout.json`
    (`ulvideo data synth`); returns the number of clips. The combinations of `heldout_combinations()`
    are never rendered; `heldout.json` lists them. A folder holding clips beyond `num` is refused
    (FileExistsError), so no stale clips are trained on."""
    from tqdm import tqdm

    from ulvideo.videoio import write_video

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stale = [p.name for p in out.glob("shape_*.mp4") if not p.stem[6:].isdigit() or int(p.stem[6:]) >= num]
    if stale:
        raise FileExistsError(f"{out} already holds {len(stale)} clips beyond --num {num} (e.g. {sorted(stale)[0]}); "
                              "use an empty folder so no stale clips are trained on")
    heldout = heldout_combinations()
    specs = make_dataset_specs(num, seed, exclude=heldout)
    rows = []
    for i, spec in enumerate(tqdm(specs, desc="shapes", unit="clip")):
        name = f"shape_{i:05d}"
        write_video(out / f"{name}.mp4", render_clip(spec, frames, size), fps=fps)
        (out / f"{name}.txt").write_text(caption(spec) + "\n", encoding="utf-8")
        rows.append({"path": f"{name}.mp4", "caption": caption(spec), "spec": spec.to_dict(),
                     "num_frames": frames, "size": size, "fps": fps, "seed": seed})
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "heldout.json").write_text("[\n" + ",\n".join(json.dumps(c) for c in heldout) + "\n]\n", encoding="utf-8")
    return len(specs)
