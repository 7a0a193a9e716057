"""`ulvideo data scan DIR`: what in a folder can be trained on, and why the rest cannot.

Every video is probed exactly (frames counted from packet timestamps, variable frame rate
detected) and its last frame decoded, which catches files whose header is intact but whose data is
cut short; every image is decoded. The report (JSON) lists usable files with duration, size and
frame rate, and every skipped file with its reason.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ulvideo.data.sources import SkipLog, sidecar_caption, walk_media
from ulvideo.videoio import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoError, probe, read_frames, read_image


def _check_video(path: str, backend: str) -> dict:
    info = probe(path, exact=True)
    if info.num_frames < 1:
        raise VideoError("corrupt", "no frames")
    read_frames(path, [0, info.num_frames - 1], backend, rotation=info.rotation)
    return {"frames": info.num_frames, "fps": round(info.fps, 4), "duration": round(info.duration, 4),
            "width": info.width, "height": info.height, "rotation": info.rotation, "codec": info.codec,
            "vfr": info.vfr}


def _check_image(path: str, backend: str) -> dict:
    frame = read_image(path)
    return {"width": int(frame.shape[2]), "height": int(frame.shape[1])}


def scan(root: str, backend: str = "auto", threads: int = 4) -> dict:
    """The report as a dict (see the module docstring)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"scan: '{root}' is not a folder")
    skips = SkipLog(level=logging.DEBUG)  # the CLI prints every skip itself
    report: dict = {"dir": root, "backend": backend, "videos": [], "images": []}
    for kind, exts, check in (("videos", VIDEO_EXTENSIONS, _check_video), ("images", IMAGE_EXTENSIONS, _check_image)):
        paths = walk_media(root, exts, skips)

        def run(p, check=check):
            try:
                return check(p, backend), None
            except VideoError as e:
                return None, (e.reason, e.detail)
            except Exception as e:  # an unclassified library error is still a skip, not a crash
                return None, ("unreadable", f"{type(e).__name__}: {e}")

        with ThreadPoolExecutor(max(1, threads)) as pool:
            results = list(pool.map(run, paths))
        for p, (info, err) in zip(paths, results):
            if err:
                skips.add(p, *err)
                continue
            info = {"path": os.path.relpath(p, root), **info, "caption": sidecar_caption(p) is not None}
            report[kind].append(info)
    vids, imgs = report["videos"], report["images"]
    report["skipped"] = [{"path": os.path.relpath(p, root) if os.path.isabs(p) else p, "reason": r, "detail": d}
                         for p, r, d in skips.items]
    report["summary"] = {
        "usable_videos": len(vids),
        "usable_images": len(imgs),
        "total_duration_s": round(sum(v["duration"] for v in vids), 3),
        "total_frames": sum(v["frames"] for v in vids),
        "resolutions": dict(Counter(f"{v['width']}x{v['height']}" for v in vids + imgs).most_common()),
        "fps": dict(Counter(str(v["fps"]) for v in vids).most_common()),
        "rotated": sum(1 for v in vids if v["rotation"]),
        "variable_frame_rate": sum(1 for v in vids if v["vfr"]),
        "without_caption": sum(1 for v in vids + imgs if not v["caption"]),
        "skipped": skips.counts(),
    }
    return report


def write_report(report: dict, out: Path) -> Path:
    """Write a `scan` report as JSON, atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    return out
