"""Video and image files in and out. The pixel convention of the whole project lives here.

Convention: at the edges (files, the data loader's workers, written samples) a clip is uint8
`(T, H, W, 3)`, upright (rotation metadata applied). Inside the models it is float32
`(B, 3, T, H, W)` in [-1, 1]. `to_float` and `to_uint8` are the only conversions between the
two; every other module calls them.

Reading decodes only what a clip needs: `read_frames(path, indices)` asks decord for exactly those
frames (random access), or seeks PyAV to the keyframe before the first one and decodes forward
to the last, or asks torchcodec for them. A file may also be given as its bytes (a WebDataset member,
an object fetched from storage): PyAV then reads it from memory. Frame `i` is the i-th frame in presentation order in
every backend, so all backends return the same frames (up to the colour conversion's rounding).

    info = probe("clip.mp4")                       # VideoInfo(num_frames=250, fps=25.0, ...)
    clip = read_clip("clip.mp4", start=10, num_frames=17, stride=2)   # uint8 (17, H, W, 3)
    write_video("out.mp4", clip, fps=8)            # also .gif and .png (a sheet of frames)
"""
from __future__ import annotations

import functools
import gc
import importlib.util
import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
BACKENDS = ("decord", "pyav", "torchcodec")


class VideoError(Exception):
    """A file that cannot be read as asked. `reason` is a short category used to count skips."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# uint8 <-> float: the one place the project converts pixels.
# --------------------------------------------------------------------------------------------


def to_float(frames) -> torch.Tensor:
    """uint8 `(..., T, H, W, 3)` (array or tensor) -> float32 `(..., 3, T, H, W)` in [-1, 1].

    For a batch `(B, T, H, W, 3)` this gives the model layout `(B, 3, T, H, W)`.
    """
    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 pixels, got {x.dtype}")
    if x.ndim < 4 or x.shape[-1] != 3:
        raise ValueError(f"to_float expects (..., T, H, W, 3), got {tuple(x.shape)}")
    out = torch.empty(x.movedim(-1, -4).shape, dtype=torch.float32)  # (..., 3, T, H, W), contiguous
    out.copy_(x.movedim(-1, -4))  # one pass converts and transposes
    return out.mul_(1.0 / 127.5).sub_(1.0)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """float `(B, 3, T, H, W)` in [-1, 1] -> uint8 numpy `(B, T, H, W, 3)`, clipped and rounded."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"to_uint8 expects (B, 3, T, H, W), got {tuple(video.shape)}")
    x = video.detach().float().clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 4, 1).contiguous().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Probing.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float  # average frame rate
    width: int  # as displayed, i.e. after rotation
    height: int
    duration: float  # seconds
    rotation: int  # degrees counter-clockwise that the stored frames are turned for display
    codec: str
    exact: bool = False  # num_frames counted from the packets rather than read from the header
    vfr: bool | None = None  # variable frame rate (known only when exact)


def _source(path) -> str | bytes:
    """A path as str; an in-memory file (a WebDataset member, an object fetched from storage) as bytes."""
    return bytes(path) if isinstance(path, (bytes, bytearray, memoryview)) else str(path)


def _check_file(path) -> None:
    if isinstance(path, bytes):
        if not path:
            raise VideoError("empty file", "zero bytes")
        return
    if os.path.isdir(path):
        raise VideoError("directory", "a directory named like a media file")
    if not os.path.exists(path):
        raise VideoError("missing file", path)
    if os.path.getsize(path) == 0:
        raise VideoError("empty file", "zero bytes")


def _open_av(path: str):
    import av

    _check_file(path)
    try:
        container = av.open(io.BytesIO(path) if isinstance(path, bytes) else path)
    except Exception as e:  # av raises many error classes; all mean "not a readable container"
        raise VideoError("not a video", f"{type(e).__name__}: {e}") from None
    if not container.streams.video:
        container.close()
        raise VideoError("no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # a codec ffmpeg has no decoder for
        container.close()
        raise VideoError("unsupported codec", "no decoder for the video stream")
    return container, stream


def _normalise_rotation(degrees: float | None) -> int:
    return int(round((degrees or 0) / 90.0)) * 90 % 360


def _rotate(frames: np.ndarray, rotation: int) -> np.ndarray:
    """Turn stored frames `(T, H, W, 3)` upright: `rotation` degrees counter-clockwise."""
    k = rotation // 90 % 4
    return np.ascontiguousarray(np.rot90(frames, k=k, axes=(1, 2))) if k else frames


@functools.lru_cache(maxsize=256)
def _pts_index(path: str, size: int, mtime: float) -> tuple[int, ...] | None:
    return _scan_pts(path)


def _scan_pts(path) -> tuple[int, ...] | None:
    """Sorted presentation timestamps of every video packet (demuxed, not decoded).

    Frame i is the frame with the i-th smallest pts: the same indexing decord uses. None when
    the container gives packets without timestamps (then frames are counted in decode order).
    """
    container, stream = _open_av(path)
    pts = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet
                continue
            if packet.pts is None:
                return None
            pts.append(packet.pts)
    except Exception as e:
        raise VideoError("corrupt", f"demux failed: {e}") from None
    finally:
        container.close()
    return tuple(sorted(pts))


def pts_index(path: str | os.PathLike | bytes) -> tuple[int, ...] | None:
    path = _source(path)
    if isinstance(path, bytes):
        return _scan_pts(path)
    st = os.stat(path)
    return _pts_index(path, st.st_size, st.st_mtime)


def probe(path: str | os.PathLike | bytes, exact: bool = False) -> VideoInfo:
    """Metadata of a video, checked by decoding its first frame.

    exact=True counts frames from the packet timestamps (reads the whole file, no decoding) and
    detects a variable frame rate; otherwise the count comes from the header, or from duration
    times rate when the header has none (webm, mkv).
    """
    path = _source(path)
    container, stream = _open_av(path)
    stream.codec_context.thread_count = 1  # one frame: decoder threads would only add start-up time
    try:
        try:
            first = next(container.decode(stream))
        except StopIteration:
            raise VideoError("corrupt", "no decodable frame") from None
        except VideoError:
            raise
        except Exception as e:
            name = type(e).__name__
            reason = "unsupported codec" if "DecoderNotFound" in name else "corrupt"
            raise VideoError(reason, f"{name}: {e}") from None
        rotation = _normalise_rotation(getattr(first, "rotation", 0))
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000  # av.time_base
        else:
            duration = 0.0
        num_frames = int(stream.frames or 0)
        if num_frames <= 0 and fps > 0 and duration > 0:
            num_frames = max(1, int(round(duration * fps)))
        w, h = first.width, first.height
        codec = stream.codec_context.name
    finally:
        container.close()
    vfr = None
    if exact:
        pts = pts_index(path)
        if pts is not None:
            num_frames = len(pts)
            steps = np.diff(np.asarray(pts, dtype=np.int64))
            vfr = bool(len(steps) > 1 and steps.max() > 1.5 * max(1, np.median(steps)))
    if fps <= 0 and duration > 0:
        fps = num_frames / duration
    if duration <= 0 and fps > 0:
        duration = num_frames / fps
    if rotation in (90, 270):
        w, h = h, w
    return VideoInfo(num_frames=num_frames, fps=fps, width=w, height=h, duration=duration,
                     rotation=rotation, codec=codec, exact=exact, vfr=vfr)


# --------------------------------------------------------------------------------------------
# Reading frames.
# --------------------------------------------------------------------------------------------


def clip_indices(start: int, num_frames: int, stride: int = 1, fps: float | None = None,
                 native_fps: float | None = None) -> np.ndarray:
    """Frame indices of a clip: every `stride`-th frame, or frames at `fps` (nearest frame).

    At a target rate the k-th frame is the one on screen at time k/fps after `start`:
    start + floor(k * native_fps / fps) (the small epsilon absorbs float error in the ratio).
    """
    k = np.arange(num_frames)
    if fps:
        if not native_fps:
            raise ValueError("a target fps needs the video's native fps")
        return start + np.floor(k * (native_fps / fps) + 1e-6).astype(np.int64)
    return start + k * int(stride)


def available_backends() -> list[str]:
    return [b for b, mod in (("decord", "decord"), ("pyav", "av"), ("torchcodec", "torchcodec"))
            if importlib.util.find_spec(mod) is not None]


class _ReaderCache:
    """A few open decord readers per process and thread: reopening rebuilds decord's frame index,
    and one reader must not seek for two threads at once."""

    def __init__(self, size: int = 4):
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, path: str, threads: int):
        st = os.stat(path)
        key = (threading.get_ident(), path, st.st_size, st.st_mtime, threads)
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        import decord

        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=threads)
        with self.lock:
            self.items[key] = reader
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return reader


_DECORD_READERS = _ReaderCache()
_INHERITED: list = []


def _after_fork_in_child() -> None:
    # A forked child (a DataLoader worker) must never free the parent's decoders: their threads
    # do not exist in the child, and freeing a threaded decoder there crashes or deadlocks it
    # (seen with both decord readers and PyAV codec contexts waiting for garbage collection).
    # So the child keeps the parent's readers referenced, and never garbage-collects any object
    # it inherited (gc.freeze); objects it creates itself are collected as usual.
    _INHERITED.append(_DECORD_READERS.items)
    _DECORD_READERS.items = OrderedDict()
    _DECORD_READERS.lock = threading.Lock()
    gc.freeze()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _read_decord(path: str, unique: np.ndarray, threads: int) -> np.ndarray:
    reader = _DECORD_READERS.get(path, threads)
    if unique[-1] >= len(reader):
        raise VideoError("too short", f"frame {unique[-1]} of {len(reader)}")
    frames = reader.get_batch(unique.tolist()).asnumpy()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        # decord 3.4 (decord2) infers channels from the row stride and gets widths such as
        # 16, 24, 32, 48, 96, 144 wrong; it usually raises, and this catches the rest.
        raise VideoError("corrupt", f"decord returned frames of shape {frames.shape}")
    return frames


def _read_pyav(path: str, unique: np.ndarray, threads: int) -> np.ndarray:
    pts = pts_index(path)
    container, stream = _open_av(path)
    stream.thread_type = "AUTO"
    if threads:
        stream.codec_context.thread_count = threads
    out: list[np.ndarray | None] = [None] * len(unique)
    try:
        if pts is not None:
            if unique[-1] >= len(pts):
                raise VideoError("too short", f"frame {unique[-1]} of {len(pts)}")
            want = {pts[i]: j for j, i in enumerate(unique.tolist())}
            last = pts[unique[-1]]
            # Seek lands on the keyframe at or before the first wanted frame; decode forward.
            container.seek(pts[unique[0]], stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                j = want.get(frame.pts)
                if j is not None:
                    out[j] = frame.to_ndarray(format="rgb24")
                if frame.pts is not None and frame.pts >= last and all(o is not None for o in out):
                    break
        else:  # no timestamps: count frames from the start
            pos = {i: j for j, i in enumerate(unique.tolist())}
            for n, frame in enumerate(container.decode(stream)):
                if n in pos:
                    out[pos[n]] = frame.to_ndarray(format="rgb24")
                if n >= unique[-1]:
                    break
    except VideoError:
        raise
    except Exception as e:
        raise VideoError("corrupt", f"decode failed: {type(e).__name__}: {e}") from None
    finally:
        container.close()
    missing = [int(unique[j]) for j, o in enumerate(out) if o is None]
    if missing:
        raise VideoError("corrupt", f"frames {missing[:4]} could not be decoded")
    return np.stack(out)


def _read_torchcodec(path: str, unique: np.ndarray, threads: int) -> tuple[np.ndarray, bool]:
    from torchcodec.decoders import VideoDecoder

    dec = VideoDecoder(path, seek_mode="exact", dimension_order="NHWC", num_ffmpeg_threads=threads)
    if unique[-1] >= dec.metadata.num_frames:
        raise VideoError("too short", f"frame {unique[-1]} of {dec.metadata.num_frames}")
    frames = dec.get_frames_at(indices=unique.tolist()).data.numpy()
    # torchcodec >= 0.11 applies the display matrix itself and reports it as metadata.rotation.
    return frames, hasattr(dec.metadata, "rotation")


_READERS = {"decord": _read_decord, "pyav": _read_pyav}
_DECORD_FAILED: set[tuple[int, str]] = set()


def read_frames(path: str | os.PathLike | bytes, indices, backend: str = "auto", *, rotation: int | None = None,
                threads: int = 0) -> np.ndarray:
    """Decode exactly the frames `indices` (any order, repeats allowed): uint8 `(N, H, W, 3)`.

    backend "auto": decord, except for rotated streams (decord 3.4 mis-sizes them) and streams
    decord fails on (remembered per process), which go to PyAV. `rotation` (from `probe`)
    saves a second probe.
    """
    path = _source(path)
    _check_file(path)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0:
        raise ValueError(f"frame indices must be non-negative and non-empty, got {idx[:8]}")
    unique, inverse = np.unique(idx, return_inverse=True)
    if rotation is None:
        rotation = probe(path).rotation
    if isinstance(path, bytes) and backend in ("auto", "decord"):
        order = ["pyav"]  # an in-memory file: PyAV reads it from a buffer
    elif backend == "auto":
        order = (["decord"] if rotation == 0 and importlib.util.find_spec("decord") else []) + ["pyav"]
    elif backend in BACKENDS:
        order = [backend]
    else:
        raise ValueError(f"unknown backend {backend!r} (choose auto, {', '.join(BACKENDS)})")
    error: Exception | None = None
    key = (os.getpid(), path if isinstance(path, str) else "")
    if len(order) > 1 and key in _DECORD_FAILED:
        order = order[1:]
    for name in order:
        try:
            if name == "torchcodec":
                frames, rotated = _read_torchcodec(path, unique, threads)
                frames = frames if rotated else _rotate(frames, rotation)
            else:
                frames = _rotate(_READERS[name](path, unique, threads), rotation)
            return frames[inverse]
        except VideoError as e:
            if e.reason == "too short":
                raise
            error = e
        except Exception as e:  # decord raises its own error class for streams it cannot open
            error = VideoError("corrupt", f"{name}: {type(e).__name__}: {str(e)[:200]}")
        if name == "decord" and len(order) > 1:
            _DECORD_FAILED.add(key)  # do not retry decord on this file in this process
    assert error is not None
    raise error


def read_clip(path: str | os.PathLike, start: int = 0, num_frames: int | None = None, stride: int = 1,
              fps: float | None = None, backend: str = "auto") -> np.ndarray:
    """uint8 `(T, H, W, 3)`: `num_frames` frames from frame `start`, every `stride`-th or at
    `fps` frames per second. num_frames=None reads to the end of the video."""
    info = probe(path, exact=num_frames is None)
    if num_frames is None:
        step = (info.fps / fps) if fps else stride
        num_frames = max(1, int(np.floor((info.num_frames - 1 - start) / step)) + 1)
    idx = clip_indices(start, num_frames, stride, fps, info.fps)
    return read_frames(path, idx, backend, rotation=info.rotation)


def read_image(path: str | os.PathLike | bytes) -> np.ndarray:
    """uint8 `(1, H, W, 3)`: an image as a 1-frame clip, EXIF orientation applied."""
    from PIL import Image, ImageOps

    path = _source(path)
    _check_file(path)
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as im:
            im = ImageOps.exif_transpose(im)
            return np.array(im.convert("RGB"))[None]  # a copy: PIL's buffer is read-only
    except Exception as e:
        raise VideoError("unreadable image", f"{type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------------
# Writing.
# --------------------------------------------------------------------------------------------


def _check_frames(frames) -> np.ndarray:
    a = np.asarray(frames)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3 or a.shape[0] < 1:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) with T >= 1, got {a.dtype} {a.shape}")
    return a


def _atomic(path: str | os.PathLike, write) -> Path:
    """Write through a hidden temp file in the same folder (same suffix, so formats are picked
    from it), then rename: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _write_mp4(path: str, frames: np.ndarray, fps: float, crf: int, pix_fmt: str) -> None:
    import av

    if pix_fmt == "yuv420p" and (frames.shape[1] % 2 or frames.shape[2] % 2):
        # 4:2:0 chroma needs even sizes; repeat the last row/column rather than use 4:4:4,
        # which many players cannot show. The file is then up to one pixel larger.
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": str(crf), "preset": "medium"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video(path: str | os.PathLike, frames, fps: float = 8, *, crf: int = 18,
                pix_fmt: str = "yuv420p") -> Path:
    """Write uint8 `(T, H, W, 3)` frames, atomically; the format follows the suffix.

    .mp4: H.264 (libx264, `crf`), yuv420p with odd sizes padded to even by repeating the last
    row/column (pix_fmt="yuv444p" keeps the exact size); .gif: looping GIF; .png: the frames
    side by side in one row.
    """
    frames = _check_frames(frames)
    suffix = Path(path).suffix.lower()
    if suffix == ".mp4":
        return _atomic(path, lambda p: _write_mp4(p, frames, fps, crf, pix_fmt))
    import imageio.v3 as iio

    if suffix == ".gif":
        return _atomic(path, lambda p: iio.imwrite(p, frames, extension=".gif", duration=1000.0 / fps, loop=0))
    if suffix == ".png":
        sheet = np.concatenate(list(frames), axis=1)  # (H, T*W, 3)
        return _atomic(path, lambda p: iio.imwrite(p, sheet, extension=".png"))
    raise ValueError(f"write_video: unsupported suffix {suffix!r} (use .mp4, .gif or .png)")


def write_png_grid(path: str | os.PathLike, rows) -> Path:
    """One PNG with one row per clip (e.g. inputs above reconstructions): rows of uint8
    `(T, H, W, 3)` with equal H and W; shorter rows are padded with black frames."""
    rows = [_check_frames(r) for r in rows]
    if not rows:
        raise ValueError("write_png_grid needs at least one row")
    h, w = rows[0].shape[1:3]
    if any(r.shape[1:3] != (h, w) for r in rows):
        raise ValueError(f"write_png_grid: rows differ in frame size: {[r.shape for r in rows]}")
    t = max(r.shape[0] for r in rows)
    padded = [np.concatenate([r, np.zeros((t - r.shape[0], h, w, 3), np.uint8)]) for r in rows]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in padded], axis=0)  # (rows*H, T*W, 3)
    import imageio.v3 as iio

    return _atomic(path, lambda p: iio.imwrite(p, grid, extension=".png"))
