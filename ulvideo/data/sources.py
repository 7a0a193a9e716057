"""Finding samples: folders of videos and images, captions, manifests, and the reasons files are
skipped. Everything here runs once, in the main process, before any loading.

An `Entry` is one usable source of clips: a video file, a `[start, end)` segment of one (from a
manifest), or an image (a 1-frame video). Entries come out sorted by path, so every rank and
every resumed run numbers them the same way.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ulvideo.videoio import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoError, probe

log = logging.getLogger("ulvideo.data")


class DataError(RuntimeError):
    """A dataset that cannot be trained on (no usable clips, a broken manifest, bad settings)."""


@dataclass(frozen=True)
class Entry:
    path: str  # absolute
    rel: str  # relative to the dataset root: what the held-out split hashes
    kind: str  # "video" or "image"
    caption: str = ""
    label: int = -1
    first: int = 0  # first usable frame (a manifest's start time)
    count: int = 1  # usable frames from `first`
    fps: float = 0.0
    rotation: int = 0
    width: int = 0  # as displayed
    height: int = 0
    segment: str = ""  # "@start-end" (seconds) for a manifest segment

    @property
    def source(self) -> str:
        return self.rel + self.segment


class SkipLog:
    """Files left out (or used with a fallback) and why. Each (file, reason) is logged once."""

    def __init__(self, level: int = logging.WARNING):
        self.items: list[tuple[str, str, str]] = []  # (path, reason, detail)
        self._seen: set[tuple[str, str]] = set()
        self.level = level

    def add(self, path: str, reason: str, detail: str = "", level: int | None = None) -> None:
        if (path, reason) in self._seen:
            return
        self._seen.add((path, reason))
        self.items.append((path, reason, detail))
        log.log(min(level or self.level, self.level), "data: %s: %s%s", path, reason, f" ({detail})" if detail else "")

    def merge(self, items) -> None:
        for path, reason, detail in items:
            self.add(path, reason, detail)

    def counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason, _ in self.items))

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        return ", ".join(f"{n} {r}" for r, n in sorted(self.counts().items())) or "none"


def heldout_key(rel: str) -> float:
    """A uniform number in [0, 1) from a path: files with key < heldout_fraction are held out.
    It depends on the relative path only, so the split survives moving the dataset folder."""
    digest = hashlib.sha256(rel.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def walk_media(root: str, extensions: tuple[str, ...], skips: SkipLog) -> list[str]:
    """Files under `root` (recursive, sorted) whose suffix is in `extensions`. Hidden files (such
    as the temporary files of an atomic write) are ignored; directories named like media are
    reported and still searched."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            if d.lower().endswith(extensions):
                skips.add(os.path.join(dirpath, d), "directory", "a directory named like a media file")
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(extensions):
                found.append(os.path.join(dirpath, name))
    return found


def sidecar_caption(path: str) -> str | None:
    """The caption in `<stem>.txt` beside the file, stripped; None when absent or empty."""
    txt = os.path.splitext(path)[0] + ".txt"
    if not os.path.isfile(txt):
        return None
    try:
        with open(txt, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return None
    return text or None


@dataclass(frozen=True)
class ManifestRow:
    path: str
    caption: str | None
    start: float | None
    end: float | None
    label: int


def read_manifest(manifest: str, skips: SkipLog) -> list[ManifestRow]:
    """CSV (with a header) or JSONL rows: path, caption, optional start/end seconds and label.
    Relative paths are relative to the manifest's folder. Bad rows are skipped and counted."""
    base = os.path.dirname(os.path.abspath(manifest))
    if not os.path.isfile(manifest):
        raise DataError(f"data.manifest '{manifest}' does not exist")
    with open(manifest, encoding="utf-8") as f:
        if manifest.lower().endswith((".jsonl", ".json")):
            raw = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        raw.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        skips.add(f"{manifest}:{n}", "bad manifest row", str(e))
        else:
            raw = list(enumerate(csv.DictReader(f), 2))
    rows = []
    for n, r in raw:
        where = f"{manifest}:{n}"
        try:
            if not isinstance(r, dict) or not r.get("path"):
                raise ValueError("no 'path'")
            start = float(r["start"]) if r.get("start") not in (None, "") else None
            end = float(r["end"]) if r.get("end") not in (None, "") else None
            label = int(r["label"]) if r.get("label") not in (None, "") else -1
            if start is not None and end is not None and not end > start >= 0:
                raise ValueError(f"start {start} / end {end}")
        except (ValueError, TypeError) as e:
            skips.add(where, "bad manifest row", str(e))
            continue
        caption = r.get("caption")
        caption = str(caption).strip() if caption not in (None, "") else None
        rows.append(ManifestRow(os.path.join(base, str(r["path"])), caption or None, start, end, label))
    return rows


def _probe_or_reason(path: str):
    try:
        return probe(path), None
    except VideoError as e:
        return None, e
    except Exception as e:  # a library error we did not classify still must not stop the scan
        return None, VideoError("not a video", f"{type(e).__name__}: {e}")


def _image_or_reason(path: str):
    from PIL import Image

    if os.path.getsize(path) == 0:
        return None, VideoError("empty file", "zero bytes")
    try:
        with Image.open(path) as im:
            im.verify()  # header and, for PNG, checksums; full decode errors are caught at load
            return im.size, None
    except Exception as e:
        return None, VideoError("unreadable image", f"{type(e).__name__}: {e}")


def collect(root: str, *, kind: str, manifest: str = "", missing_caption: str = "empty",
            span: Callable[[float], int] = lambda fps: 1, short_video: str = "skip", skips: SkipLog,
            threads: int = 8) -> list[Entry]:
    """Entries of one folder (or manifest): kind "video" or "image".

    `span(fps)` is the number of consecutive frames a clip covers in a video of that frame rate;
    a video with fewer usable frames is skipped ("shorter than clip") or, with
    short_video="loop", kept and looped when read.
    """
    root = os.path.abspath(root)
    exts = VIDEO_EXTENSIONS if kind == "video" else IMAGE_EXTENSIONS
    if manifest:
        rows = [r for r in read_manifest(manifest, skips) if r.path.lower().endswith(exts)]
    else:
        if not os.path.isdir(root):
            raise DataError(f"data folder '{root}' does not exist")
        rows = [ManifestRow(p, None, None, None, -1) for p in walk_media(root, exts, skips)]
    candidates = []
    for r in rows:
        if os.path.isdir(r.path):
            skips.add(r.path, "directory", "a directory named like a media file")
        elif not os.path.exists(r.path):
            skips.add(r.path, "missing file", "listed in the manifest")
        else:
            candidates.append(r)
    check = _probe_or_reason if kind == "video" else _image_or_reason
    with ThreadPoolExecutor(max(1, threads)) as pool:  # probing is I/O and C code: threads overlap it
        results = list(pool.map(lambda r: check(r.path), candidates))
    entries = []
    for r, (info, err) in zip(candidates, results):
        if err is not None:
            skips.add(r.path, err.reason, err.detail)
            continue
        caption = r.caption if r.caption is not None else sidecar_caption(r.path)
        if caption is None:
            if missing_caption == "skip":
                skips.add(r.path, "missing caption")
                continue
            skips.add(r.path, "missing caption (empty used)", level=logging.INFO)
            caption = ""
        rel = os.path.relpath(r.path, root)
        if kind == "image":
            w, h = info
            entries.append(Entry(r.path, rel, "image", caption, r.label, width=w, height=h))
            continue
        # A segment holds the frames whose start time lies in [start, end).
        first, last, segment = 0, info.num_frames, ""
        if r.start is not None or r.end is not None:
            segment = f"@{r.start or 0:g}-{'' if r.end is None else f'{r.end:g}'}"
        if r.start is not None:
            first = min(last, math.ceil(r.start * info.fps - 1e-6))
        if r.end is not None:
            last = min(last, math.ceil(r.end * info.fps - 1e-6))
        count = last - first
        where = r.path + segment
        if count < 1:
            skips.add(where, "empty segment", f"start {r.start}, end {r.end}, {info.num_frames} frames")
            continue
        need = span(info.fps)
        if count < need:
            if short_video == "skip":
                skips.add(where, "shorter than clip", f"{count} frames < {need}")
                continue
            skips.add(where, "shorter than clip (looped)", f"{count} frames < {need}", level=logging.INFO)
        entries.append(Entry(r.path, rel, "video", caption, r.label, first, count, info.fps, info.rotation,
                             info.width, info.height, segment))
    return entries


def fingerprint(entries: list[Entry]) -> str:
    """Identifies an entry list: a resumed run checks it still numbers the samples the same way."""
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.source}|{e.first}|{e.count}\n".encode())
    return h.hexdigest()[:16]
