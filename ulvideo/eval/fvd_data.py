"""FVD inputs: the two dataset layouts, each preset's window rule, and its pixel operations.

Layouts (both found anywhere under the folder, keyed by their path relative to it):
  * video files (.mp4, .webm, .mkv, .avi, .mov);
  * frame folders: a folder that directly holds image files (.png, .jpg, .jpeg, .webp) is one
    video, as StyleGAN-V's, TATS' and cd-FVD's frame datasets are laid out.
A folder must hold one layout, not both (the references read one or the other).

Window conventions (fvd_presets.py cites each reference line):
  * real clips: each preset's rule (`real_clips`): StyleGAN-V one uniform random window in each of
    the first 2048 videos; TATS 2048 windows drawn from all windows of all videos; cd-FVD one
    uniform random window in every video; k600 one uniform random window per video.
  * generated clips: frames 0..T-1 of each video (StyleGAN-V, TATS, k600), or cd-FVD's uniform
    random window, with the folder read again until 2048 clips.
So the same folder of long clips is NOT at distance 0 from itself: real and generated clips are
different windows. A generated video shorter than the preset's frames stops the run.

Clips are uint8 `(T, H, W, 3)` from reading to the I3D input; the routes below return uint8.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ulvideo.eval.fvd_presets import Protocol

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class FVDInputError(ValueError):
    """Input that cannot give the preset's number; the message is one line that says what to do."""


@dataclass(frozen=True)
class Video:
    key: str  # path relative to the listed folder, '/'-separated
    num_frames: int
    path: Path  # the file, or the frame folder
    size: tuple[int, int]  # (H, W) of its frames as stored
    frames: tuple[Path, ...] = ()  # frame folders: frame files in the preset's order


@dataclass(frozen=True)
class Clip:
    video: int  # index into the listed videos
    start: int
    flip: bool = False


# --------------------------------------------------------------------------------------------
# Listing.
# --------------------------------------------------------------------------------------------


def _frame_sort_key(p: Path, order: str, folder: Path):
    if order == "name":
        return p.name
    try:  # TATS / cd-FVD: the integer after the last '_' of the name before its first '.'
        return int(p.name.split(".")[0].split("_")[-1])
    except ValueError:
        raise FVDInputError(f"{folder}: frame file {p.name!r} does not end in a frame number "
                            "(this preset orders frames by it, e.g. 000001.jpg or frame_12.png)") from None


def list_videos(folder: str | os.PathLike, frame_order: str = "name") -> tuple[list[Video], dict[str, int]]:
    """Every video under `folder` in sorted key order, and the unreadable ones counted by reason."""
    from ulvideo.videoio import VIDEO_EXTENSIONS, VideoError, probe

    folder = Path(folder)
    files, frame_dirs, skipped = [], [], {}
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        images = [Path(root) / n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
        if images:
            frame_dirs.append((Path(root), images))
        files += [Path(root) / n for n in names if n.lower().endswith(VIDEO_EXTENSIONS)]
    if files and frame_dirs:
        raise FVDInputError(f"{folder} holds both video files ({len(files)}) and frame folders ({len(frame_dirs)}); "
                            "point it at one layout")
    videos = []
    for path, images in frame_dirs:
        ordered = tuple(sorted(images, key=lambda p: _frame_sort_key(p, frame_order, path)))
        w, h = _load_frame(ordered[0], header_only=True)
        videos.append(Video(path.relative_to(folder).as_posix() or ".", len(ordered), path, (h, w), ordered))
    for f in files:
        try:
            info = probe(f)
            hw = (info.width, info.height) if info.rotation in (90, 270) else (info.height, info.width)
            videos.append(Video(f.relative_to(folder).as_posix(), info.num_frames, f, hw))
        except (VideoError, OSError) as e:
            reason = getattr(e, "reason", type(e).__name__)
            skipped[reason] = skipped.get(reason, 0) + 1
    return sorted(videos, key=lambda v: v.key), skipped


# --------------------------------------------------------------------------------------------
# Window rules.
# --------------------------------------------------------------------------------------------


def window_room(rule: str, is_frames: bool, num_frames: int, n: int) -> int | None:
    """Largest start frame a rule allows in a video of n frames; None when the video is not used.

    StyleGAN-V, TATS and cd-FVD videos, k600: start in [0, n - T]. Frame folders in TATS: kept with
    n > T, start in [0, n - 1 - T]; in cd-FVD: kept with n > T, start in [0, n - T].
    """
    if is_frames and rule in ("tats", "cdfvd"):
        return None if n <= num_frames else n - num_frames - (1 if rule == "tats" else 0)
    return None if n < num_frames else n - num_frames


def _rng(p: Protocol, *words) -> np.random.Generator:
    return np.random.default_rng([p.seed, *[zlib.crc32(w.encode()) if isinstance(w, str) else w for w in words]])


def _start(p: Protocol, video: Video, room: int, draw: int = 0) -> int:
    """A uniform start in [0, room], fixed by (seed, video key, draw)."""
    return int(_rng(p, video.key, draw).integers(0, room + 1))


def plan_real(videos: list[Video], p: Protocol, mirror: bool = False) -> tuple[list[Clip], int]:
    """The preset's real clips; also how many videos were too short to use."""
    if not videos:
        raise FVDInputError("no videos to plan clips from")
    rooms = [window_room(p.real_clips, bool(v.frames), p.num_frames, v.num_frames) for v in videos]
    usable = [i for i, r in enumerate(rooms) if r is not None]
    short = len(videos) - len(usable)
    copies = [(i, False) for i in usable] + ([(i, True) for i in usable] if mirror else [])
    limit = p.num_real or len(copies)
    rule = p.real_clips
    if rule in ("stylegan-v", "random-window"):  # the first videos in order, one window each
        return [Clip(i, _start(p, videos[i], rooms[i], int(f)), f) for i, f in copies[:limit]], short
    if rule == "tats" and not videos[0].frames:  # windows drawn from all windows of all videos
        sizes = np.array([rooms[i] + 1 for i, _ in copies], dtype=np.int64)
        take = _rng(p, "tats-windows").choice(int(sizes.sum()), size=min(limit, int(sizes.sum())), replace=False)
        ends = np.cumsum(sizes)
        which = np.searchsorted(ends, take, side="right")
        return [Clip(copies[k][0], int(t - (ends[k] - sizes[k])), copies[k][1])
                for k, t in zip(which.tolist(), take.tolist())], short
    if rule == "tats":  # frame folders: shuffled videos, the first ones, one window each
        order = _rng(p, "tats-videos").permutation(len(copies))[:limit]
        return [Clip(copies[k][0], _start(p, videos[copies[k][0]], rooms[copies[k][0]], int(copies[k][1])),
                     copies[k][1]) for k in order.tolist()], short
    if rule == "cdfvd":
        if not videos[0].frames:  # a video without a full window is replaced by the next one with one
            copies = [(_next_usable(i, rooms), f) for i in range(len(videos)) for f in ((False, True) if mirror else (False,))]
        return _cdfvd_passes(videos, rooms, copies, p, p.num_real), short
    raise ValueError(f"unknown clip rule {rule!r}")


def _next_usable(i: int, rooms: list) -> int:
    for k in range(len(rooms)):
        j = (i + k) % len(rooms)
        if rooms[j] is not None:
            return j
    raise FVDInputError("no video has a full window")


def _cdfvd_passes(videos, rooms, copies, p: Protocol, count: int) -> list[Clip]:
    """cd-FVD's loop: whole shuffled passes over the items, new windows each pass, cut at `count`
    (count 0: one pass)."""
    out, n = [], count or len(copies)
    for k in range(math.ceil(n / len(copies))):
        order = _rng(p, "cdfvd-pass", k).permutation(len(copies)) if count else range(len(copies))
        for j in order:
            i, f = copies[j]
            out.append(Clip(i, _start(p, videos[i], rooms[i], 2 * k + int(f)), f))
    return out[:n]


def check_one_size(videos: list[Video], clips: list[Clip], where: str) -> None:
    """Clips that keep their stored size (StyleGAN-V frame folders, TATS' generated clips) must share
    one, as in the references (StyleGAN-V asserts it, TATS stacks one array)."""
    sizes = {videos[c.video].size: videos[c.video].key for c in clips}
    if len(sizes) > 1:
        (a, ka), (b, kb) = list(sizes.items())[:2]
        raise FVDInputError(f"{where}: this preset reads these clips at their stored size, and they differ "
                            f"({ka} is {a[1]}x{a[0]}, {kb} is {b[1]}x{b[0]}); bring them to one size first")


def plan_generated(videos: list[Video], p: Protocol) -> list[Clip]:
    """The preset's generated clips. Every generated video must hold the preset's frames."""
    if not videos:
        raise FVDInputError("no generated videos found")
    short = [v for v in videos if v.num_frames < p.num_frames]
    if short:
        raise FVDInputError(f"{len(short)} of {len(videos)} generated videos are shorter than the {p.num_frames} frames "
                            f"preset {p.name} scores (first: {short[0].key}, {short[0].num_frames} frames)")
    if p.gen_clips == "first":
        clips = [Clip(i, 0) for i in range(min(len(videos), p.num_gen))]
        if not p.resize_generated or (videos[0].frames and p.frame_route == "as-read"):
            check_one_size(videos, clips, "generated videos")
        return clips
    rooms = [window_room("cdfvd", bool(v.frames), p.num_frames, v.num_frames) for v in videos]
    if any(r is None for r in rooms):  # cd-FVD keeps frame folders only with more frames than the window
        bad = next(v for v, r in zip(videos, rooms) if r is None)
        raise FVDInputError(f"preset {p.name} reads frame folders with more than {p.num_frames} frames; "
                            f"{bad.key} has {bad.num_frames}")
    return _cdfvd_passes(videos, rooms, [(i, False) for i in range(len(videos))], p, p.num_gen)


# --------------------------------------------------------------------------------------------
# Pixels: a window of a video file or a frame folder -> uint8 (T, R, R, 3).
# --------------------------------------------------------------------------------------------


def _to_nchw_float01(clip: torch.Tensor) -> torch.Tensor:
    return clip.permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W), float32 as the references


def _crop(x: torch.Tensor, r: int, offset) -> torch.Tensor:
    h, w = x.shape[-2:]
    top, left = offset(h - r), offset(w - r)
    return x[..., top:top + r, left:left + r]


def _bilinear(clip: torch.Tensor, r: int, antialias: bool) -> torch.Tensor:
    """TATS / VideoGPT / cd-FVD `preprocess`: / 255, short side to r (long side ceil), crop at floor."""
    x = _to_nchw_float01(clip)
    h, w = x.shape[-2:]
    scale = r / min(h, w)  # the references' float steps, so the ceil lands where theirs does
    size = (r, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), r)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return _crop(x, r, lambda d: d // 2)


def route_bilinear_tats(clip: torch.Tensor, r: int) -> torch.Tensor:
    x = _bilinear(clip, r, antialias=False) - 0.5  # the dataset returns [-0.5, 0.5] ...
    x = (x + 0.5) * 255  # ... and the FVD script adds 0.5 back before `.byte()`
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def route_bilinear_aa_cdfvd(clip: torch.Tensor, r: int) -> torch.Tensor:
    x = _bilinear(clip, r, antialias=True) * 255
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # float -> uint8 truncates, as `.byte()`


def route_bilinear_round(clip: torch.Tensor, r: int) -> torch.Tensor:
    """ulvideo's own: short side to r on 0..255 values (long side ceil), centre crop at floor, rounded."""
    t, h, w, _ = clip.shape
    if (h, w) == (r, r):
        return clip
    scale = r / min(h, w)
    size = (r, math.ceil(w * scale)) if h <= w else (math.ceil(h * scale), r)
    x = F.interpolate(clip.permute(0, 3, 1, 2).float(), size=size, mode="bilinear", align_corners=False)
    x = _crop(x, r, lambda d: d // 2)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def route_pil_lanczos(clip: torch.Tensor, r: int) -> torch.Tensor:
    """StyleGAN-V's convert_videos_to_frames: short side to r with PIL LANCZOS (long side truncated),
    centre crop at round((size - r) / 2) (Python's round, half to even)."""
    from PIL import Image

    t, h, w, _ = clip.shape
    if (h, w) == (r, r):
        return clip
    th, tw = (int(r * h / w), r) if w <= h else (r, int(r * w / h))  # torchvision's resize(size=int)
    top, left = int(round((th - r) / 2.0)), int(round((tw - r) / 2.0))
    out = [np.asarray(Image.fromarray(f).resize((tw, th), Image.LANCZOS))[top:top + r, left:left + r]
           for f in clip.numpy()]
    return torch.from_numpy(np.stack(out))


VIDEO_ROUTES = {"pil-lanczos": route_pil_lanczos, "bilinear-tats": route_bilinear_tats,
                "bilinear-aa-cdfvd": route_bilinear_aa_cdfvd, "bilinear-round": route_bilinear_round}


def prepare_video(clip: torch.Tensor, p: Protocol) -> torch.Tensor:
    """uint8 (T, H, W, 3) decoded from a video file -> uint8 (T, R, R, 3) by the preset's route."""
    return VIDEO_ROUTES[p.video_route](clip, p.resolution)


def _load_frame(path: Path, header_only: bool = False):
    from PIL import Image

    try:
        with Image.open(path) as im:  # no EXIF rotation: the references read frames as stored
            return im.size if header_only else im.convert("RGB")
    except Exception as e:
        raise FVDInputError(f"{path}: unreadable frame ({type(e).__name__}: {e})") from None


def read_frames_clip(video: Video, start: int, p: Protocol) -> torch.Tensor:
    """uint8 (T, ., ., 3) from a frame folder by the preset's frame route."""
    images = [_load_frame(f) for f in video.frames[start:start + p.num_frames]]
    route = p.frame_route
    if route in ("crop-lanczos-tats", "crop-lanczos-cdfvd"):
        from PIL import Image

        w, h = images[0].size  # the crop box comes from the folder's first frame
        half = abs(h - w) // 2
        box = (0, half, w, half + w) if h > w else (half, 0, half + h, h)
        out = []
        for im in images:
            im = im.crop(box) if h != w else im
            out.append(np.asarray(im.resize((p.resolution, p.resolution), Image.LANCZOS), dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(out))
        x = (x - 0.5 + 0.5) * 255 if route == "crop-lanczos-tats" else x * 255  # float32, then truncated
        return x.to(torch.uint8)
    clip = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    return clip if route == "as-read" else VIDEO_ROUTES[route](clip, p.resolution)


def read_clip(video: Video, c: Clip, p: Protocol, generated: bool = False) -> torch.Tensor:
    """The clip `c` of `video`, brought to the preset's size (generated clips only where it resizes them)."""
    from ulvideo.videoio import VideoError, read_clip as read_video_clip

    if video.frames:
        x = read_frames_clip(video, c.start, p) if (p.resize_generated or not generated) else \
            torch.from_numpy(np.stack([np.asarray(_load_frame(f)) for f in video.frames[c.start:c.start + p.num_frames]]))
    else:
        try:
            x = torch.from_numpy(read_video_clip(video.path, start=c.start, num_frames=p.num_frames))
        except (VideoError, OSError) as e:  # probed fine, fails to decode: stop, naming the file
            raise FVDInputError(f"{video.path}: cannot decode frames {c.start}..{c.start + p.num_frames - 1} ({e})") from None
        if p.resize_generated or not generated:
            x = prepare_video(x, p)
    return x.flip(2).contiguous() if c.flip else x  # (T, H, W, 3): W is axis 2
