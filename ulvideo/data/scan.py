"""`ulvideo data scan DIR --out manifest.parquet`: probe a dataset once, ever.

Every video is probed exactly (frames counted from packet timestamps, variable frame rate
detected) and its last frame decoded, which catches files whose header is intact but whose data is
cut short; every image is decoded. Files are checked in parallel threads, and each result is
appended to a journal beside the output (`.<name>.partial.jsonl`) as it comes: a scan that is
interrupted continues where it stopped when run again. The output is

  * a manifest (.parquet, .csv or .jsonl): one row per usable file with `path` (relative to the
    manifest's folder), `text` (the sidecar caption), `num_frames`, `fps`, `width`, `height`,
    `rotation`; training from it never probes at start-up (see `ulvideo.data.manifest`);
  * or a JSON report (.json): usable files with duration, size, frame rate and codec, and every
    skipped file with its reason.
"""
from __future__ import annotations

import json
import logging
import os
import threading
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


def _journal(out: Path | None) -> Path | None:
    return None if out is None else out.with_name(f".{out.name}.partial.jsonl")


def _check(kind: str, path: str, backend: str) -> tuple[dict | None, tuple[str, str] | None]:
    try:
        return (_check_video if kind == "videos" else _check_image)(path, backend), None
    except VideoError as e:
        return None, (e.reason, e.detail)
    except Exception as e:  # an unclassified library error is still a skip, not a crash
        return None, ("unreadable", f"{type(e).__name__}: {e}")


def scan(root: str, backend: str = "auto", threads: int = 4, out: Path | None = None) -> dict:
    """The report as a dict (see the module docstring). With `out`, results are journalled beside
    it so an interrupted scan resumes; `write_report`/`write_scan_manifest` remove the journal."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"scan: '{root}' is not a folder")
    skips = SkipLog(level=logging.DEBUG)  # the CLI prints every skip itself
    report: dict = {"dir": root, "backend": backend, "videos": [], "images": []}
    journal = _journal(out)
    done: dict[str, dict] = {}
    if journal is not None and journal.exists():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                done[rec["path"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # the line being written when the scan was stopped
    report["resumed"] = len(done)
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
    log_file = open(journal, "a", encoding="utf-8") if journal is not None else None
    lock = threading.Lock()
    try:
        for kind, exts in (("videos", VIDEO_EXTENSIONS), ("images", IMAGE_EXTENSIONS)):
            paths = walk_media(root, exts, skips)
            todo = [p for p in paths if os.path.relpath(p, root) not in done]

            def run(p, kind=kind):
                info, err = _check(kind, p, backend)
                rec = {"path": os.path.relpath(p, root), "kind": kind, "info": info, "error": err}
                if log_file is not None:
                    with lock:
                        log_file.write(json.dumps(rec) + "\n")
                        log_file.flush()
                return rec

            with ThreadPoolExecutor(max(1, threads)) as pool:  # probing is I/O and C code: threads overlap it
                for rec in pool.map(run, todo):
                    done[rec["path"]] = rec
            for p in paths:
                rec = done[os.path.relpath(p, root)]
                if rec["error"]:
                    skips.add(p, *rec["error"])
                    continue
                report[kind].append({"path": rec["path"], **rec["info"], "caption": sidecar_caption(p) is not None})
    finally:
        if log_file is not None:
            log_file.close()
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
    """Write a `scan` report as JSON, atomically, and drop the scan's journal."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    _journal(out).unlink(missing_ok=True)
    return out


def write_scan_manifest(report: dict, out: Path) -> Path:
    """The usable files of a `scan` report as a manifest with metadata (format from the suffix),
    paths relative to the manifest's folder; drops the scan's journal."""
    import pyarrow as pa

    from ulvideo.data.manifest import write_manifest

    root, base = report["dir"], os.path.dirname(os.path.abspath(out))
    rows = [(v, False) for v in report["videos"]] + [(v, True) for v in report["images"]]
    full = [os.path.join(root, v["path"]) for v, _ in rows]
    table = pa.table({
        "path": pa.array([os.path.relpath(p, base) for p in full], pa.string()),
        "text": pa.array([sidecar_caption(p) for p in full], pa.string()),
        "num_frames": pa.array([1 if img else v["frames"] for v, img in rows], pa.int64()),
        "fps": pa.array([None if img else v["fps"] for v, img in rows], pa.float64()),
        "width": pa.array([v["width"] for v, _ in rows], pa.int64()),
        "height": pa.array([v["height"] for v, _ in rows], pa.int64()),
        "rotation": pa.array([0 if img else v["rotation"] for v, img in rows], pa.int64()),
    })
    write_manifest(table, str(out))
    _journal(out).unlink(missing_ok=True)
    return out
