"""Finding samples: folders of videos and images, manifests with or without metadata, and the
reasons files are skipped. Everything here runs once, in the main process, before any loading.

Entries are held as columns (`Clips`: Arrow strings and numpy arrays), never as one Python object
per clip: a manifest of 10^6 rows costs tens of bytes a row. An entry is one usable source of
clips: a video file, a `[start, end)` segment of one, or an image (a 1-frame video). A row that
carries num_frames and fps is used as it is (no probing); a row without them, and every file of a
folder, is probed here, in threads. Entries keep the manifest's order (a folder's is sorted by path),
so every rank and every resumed run numbers them the same way.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ulvideo.data import storage
from ulvideo.videoio import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoError, probe

log = logging.getLogger("ulvideo.data")
EXAMPLES = 20  # files named one by one per skip reason; the rest of a bulk skip is counted


class DataError(RuntimeError):
    """A dataset that cannot be trained on (no usable clips, a broken manifest, bad settings)."""


@dataclass(frozen=True)
class Entry:
    """One entry, built on demand from the columns (`Clips.entry`)."""

    path: str  # absolute, or a URL
    rel: str  # as listed (relative to the dataset root or the manifest): what the held-out split hashes
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
    """Files left out (or used with a fallback) and why. Each (file, reason) is logged once; a
    reason found on many rows at once (`add_many`) names the first few and counts the rest."""

    def __init__(self, level: int = logging.WARNING):
        self.items: list[tuple[str, str, str]] = []  # (path, reason, detail)
        self.more: Counter = Counter()  # reason -> rows counted beyond the named examples
        self._seen: set[tuple[str, str]] = set()
        self.level = level

    def add(self, path: str, reason: str, detail: str = "", level: int | None = None) -> None:
        if (path, reason) in self._seen:
            return
        self._seen.add((path, reason))
        self.items.append((path, reason, detail))
        log.log(min(level or self.level, self.level), "data: %s: %s%s", path, reason, f" ({detail})" if detail else "")

    def add_many(self, reason: str, paths, details=None, level: int | None = None) -> None:
        """`paths` (and `details`) are sequences of equal length, e.g. Arrow arrays."""
        n = len(paths)
        for i in range(min(n, EXAMPLES)):
            self.add(str(paths[i]), reason, str(details[i]) if details is not None else "", level)
        if n > EXAMPLES:
            self.more[reason] += n - EXAMPLES
            log.log(min(level or self.level, self.level), "data: %d more rows: %s", n - EXAMPLES, reason)

    def merge(self, items) -> None:
        for path, reason, detail in items:
            self.add(path, reason, detail)

    def counts(self) -> dict[str, int]:
        return dict(Counter(reason for _, reason, _ in self.items) + self.more)

    def __len__(self) -> int:
        return len(self.items) + sum(self.more.values())

    def summary(self) -> str:
        return ", ".join(f"{n} {r}" for r, n in sorted(self.counts().items())) or "none"


def heldout_key(rel: str) -> float:
    """A uniform number in [0, 1) from a path: files with key < heldout_fraction are held out.
    It depends on the relative path only, so the split survives moving the dataset folder."""
    digest = hashlib.sha256(rel.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def heldout_keys(rels) -> np.ndarray:
    """`heldout_key` of every string of an Arrow array (or list), float64, in chunks."""
    out = np.empty(len(rels), dtype=np.float64)
    for a in range(0, len(rels), 1 << 16):
        part = rels[a:a + (1 << 16)]
        part = part.to_pylist() if hasattr(part, "to_pylist") else part
        out[a:a + len(part)] = [int.from_bytes(hashlib.sha256(r.encode("utf-8")).digest()[:8], "big") for r in part]
    return out / 2.0**64


def heldout_mask(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Held out: key < fraction, and at least one entry when fraction > 0 and there are >= 2 (the
    one with the smallest key), so a small folder still has something to evaluate on."""
    held = keys < fraction
    if fraction > 0 and len(keys) >= 2 and not held.any():
        held[int(np.argmin(keys))] = True
    return held


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




def _probe_or_reason(path: str):
    try:
        return probe(path), None
    except VideoError as e:
        return None, e
    except Exception as e:  # a library error we did not classify still must not stop the scan
        return None, VideoError("not a video", f"{type(e).__name__}: {e}")


def _image_or_reason(path: str):
    from PIL import Image

    if os.path.isdir(path):
        return None, VideoError("directory", "a directory named like a media file")
    if not os.path.exists(path):
        return None, VideoError("missing file", path)
    if os.path.getsize(path) == 0:
        return None, VideoError("empty file", "zero bytes")
    try:
        with Image.open(path) as im:
            im.verify()  # header and, for PNG, checksums; full decode errors are caught at load
            return im.size, None
    except Exception as e:
        return None, VideoError("unreadable image", f"{type(e).__name__}: {e}")


def first_usable(root: str, kind: str, span: Callable, short_video: str, missing_caption: str,
                 skips: SkipLog) -> bool:
    """Whether a folder holds one usable file of `kind`, by `collect`'s rules, checking files in its
    order and stopping at the first usable one (a healthy folder costs one probe). Files found
    unusable on the way are added to `skips`."""
    if not os.path.isdir(root):
        raise DataError(f"data folder '{root}' does not exist")
    check = _probe_or_reason if kind == "video" else _image_or_reason
    for path in walk_media(root, VIDEO_EXTENSIONS if kind == "video" else IMAGE_EXTENSIONS, skips):
        info, err = check(path)
        if err is not None:
            skips.add(path, err.reason, err.detail)
            continue
        if kind == "video":
            need = span(info.fps)
            if info.num_frames < 1 or (info.num_frames < need and short_video == "skip"):
                skips.add(path, "shorter than clip" if info.num_frames else "no frames", f"{info.num_frames} frames < {need}")
                continue
        if missing_caption == "skip" and sidecar_caption(path) is None:
            skips.add(path, "missing caption")
            continue
        return True
    return False


def _hash_strings(h, arr) -> None:
    """Feed an Arrow string array's offsets (rebased) and characters to `h`, however it was sliced."""
    off = np.frombuffer(arr.buffers()[1], dtype=np.int32 if arr.type == "string" else np.int64)
    off = off[arr.offset:arr.offset + len(arr) + 1]
    h.update((off - off[0]).astype(np.int64).tobytes())
    if arr.buffers()[2] is not None and len(arr):
        h.update(memoryview(arr.buffers()[2])[off[0]:off[-1]])


class Clips:
    """Entries as columns: `paths` and `captions` are Arrow string arrays (paths as listed, relative
    to `roots[root_of[i]]`), the rest numpy arrays. `entry(i)` builds one `Entry` when a worker
    loads it."""

    NUMERIC = ("root_of", "label", "first", "count", "fps", "rotation", "width", "height", "is_image", "seg_start",
               "seg_end")

    def __init__(self, roots: list[str], paths, captions, **cols):
        self.roots, self.paths, self.captions = roots, paths, captions
        n = len(paths)
        dtypes = {"root_of": np.int8, "label": np.int32, "first": np.int32, "count": np.int32, "fps": np.float32,
                  "rotation": np.int16, "width": np.uint16, "height": np.uint16, "is_image": np.bool_,
                  "seg_start": np.float32, "seg_end": np.float32}
        for k, dt in dtypes.items():
            v = cols.get(k)
            if k.startswith("seg_"):  # only a manifest with start/end has segments: otherwise no column at all
                v = None if v is None or np.isnan(v).all() else np.asarray(v, dtype=dt)
                setattr(self, k, v)
                continue
            setattr(self, k, np.full(n, 0, dt) if v is None else np.asarray(v, dtype=dt))

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, idx: np.ndarray) -> "Clips":
        import pyarrow as pa

        ids = pa.array(np.asarray(idx, dtype=np.int64))
        return Clips(self.roots, self.paths.take(ids), None if self.captions is None else self.captions.take(ids),
                     **{k: getattr(self, k)[idx] for k in self.NUMERIC if getattr(self, k) is not None})

    @staticmethod
    def concat(parts: list["Clips"]) -> "Clips":
        import pyarrow as pa

        parts = [p for p in parts if len(p)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return Clips([""], pa.array([], pa.string()), None)
        roots, root_of = [], []
        for p in parts:
            root_of.append(p.root_of + len(roots))
            roots += p.roots
        caps = [p.captions if p.captions is not None else pa.nulls(len(p), pa.string()) for p in parts]
        cols = {k: np.concatenate([getattr(p, k) if getattr(p, k) is not None else np.full(len(p), np.nan, np.float32)
                                   for p in parts]) for k in Clips.NUMERIC}
        cols["root_of"] = np.concatenate(root_of)
        return Clips(roots, pa.concat_arrays([p.paths for p in parts]), pa.concat_arrays(caps), **cols)

    def rel(self, i: int) -> str:
        return self.paths[i].as_py()

    def entry(self, i: int) -> Entry:
        rel = self.paths[i].as_py()
        cap = self.captions[i].as_py() if self.captions is not None else None
        segment = ""
        s = np.nan if self.seg_start is None else self.seg_start[i]
        e = np.nan if self.seg_end is None else self.seg_end[i]
        if not (np.isnan(s) and np.isnan(e)):
            segment = f"@{0 if np.isnan(s) else float(s):g}-{'' if np.isnan(e) else f'{float(e):g}'}"
        return Entry(storage.join(self.roots[self.root_of[i]], rel), rel, "image" if self.is_image[i] else "video",
                     cap or "", int(self.label[i]), int(self.first[i]), int(self.count[i]), float(self.fps[i]),
                     int(self.rotation[i]), int(self.width[i]), int(self.height[i]), segment)

    def __getitem__(self, i: int) -> Entry:
        return self.entry(int(i))

    def nbytes(self) -> int:
        arrow = self.paths.nbytes + (self.captions.nbytes if self.captions is not None else 0)
        return arrow + sum(getattr(self, k).nbytes for k in self.NUMERIC if getattr(self, k) is not None)

    def fingerprint(self) -> str:
        """Identifies the entries and their order: a resumed run checks it still numbers them the same."""
        h = hashlib.sha256()
        _hash_strings(h, self.paths)
        for k in ("first", "count", "seg_start", "seg_end"):
            if getattr(self, k) is not None:
                h.update(getattr(self, k).tobytes())
        return h.hexdigest()[:16]


def _table_from_folder(root: str, exts, skips: SkipLog):
    import pyarrow as pa

    if not os.path.isdir(root):
        raise DataError(f"data folder '{root}' does not exist")
    return pa.table({"path": pa.array([os.path.relpath(p, root) for p in walk_media(root, exts, skips)], pa.string())})


def _column(table, name, fill, dtype):
    if name not in table.column_names:
        return np.full(len(table), fill, dtype)
    return table[name].to_numpy(zero_copy_only=False) if not table[name].null_count else \
        table[name].fill_null(fill).to_numpy(zero_copy_only=False)


def collect(root: str, *, kind: str, manifest: str = "", missing_caption: str = "empty",
            span: Callable[[np.ndarray], np.ndarray] = lambda fps: np.ones(len(fps), np.int64),
            short_video: str = "skip", skips: SkipLog, threads: int = 8) -> Clips:
    """Entries of one folder (or manifest): kind "video" or "image".

    `span(fps)` is the number of consecutive frames a clip covers in videos of those frame rates
    (an array); a video with fewer usable frames is skipped ("shorter than clip") or, with
    short_video="loop", kept and looped when read.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    exts = VIDEO_EXTENSIONS if kind == "video" else IMAGE_EXTENSIONS
    if manifest:
        from ulvideo.data.manifest import read_table

        try:
            table, bad = read_table(manifest)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise DataError(f"data.manifest: {e}") from None
        base = storage.parent(manifest) if storage.is_url(manifest) else os.path.dirname(os.path.abspath(manifest))
        if bad:
            skips.add_many("bad manifest row", [f"{manifest}: row"] * bad, ["malformed or not a number"] * bad)
        path = table["path"]
        good = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(path)), 0), False)
        if not pc.all(good).as_py():
            n = len(table) - pc.sum(good.cast(pa.int64())).as_py()
            skips.add_many("bad manifest row", [f"{manifest}: row"] * n, ["no 'path'"] * n)
            table = table.filter(good)
        pattern = "(" + "|".join(e.replace(".", "\\.") for e in exts) + ")$"
        # rows of the other media kind belong to the other source of kind "mixed"
        table = table.filter(pc.match_substring_regex(pc.utf8_lower(table["path"]), pattern))
    else:
        root = os.path.abspath(root)
        table, base = _table_from_folder(root, exts, skips), root
    n = len(table)
    start = _column(table, "start", np.nan, np.float64)
    end = _column(table, "end", np.nan, np.float64)
    bad = (start < 0) | (~np.isnan(start) & ~np.isnan(end) & ~(end > start))
    if bad.any():
        skips.add_many("bad manifest row", table["path"].filter(pa.array(bad)),
                       [f"start {s} / end {e}" for s, e in zip(start[bad][:EXAMPLES], end[bad][:EXAMPLES])])
    frames = _column(table, "num_frames", -1, np.int64)
    fps = _column(table, "fps", np.nan, np.float64)
    width, height = _column(table, "width", 0, np.int64), _column(table, "height", 0, np.int64)
    rotation = _column(table, "rotation", 0, np.int64)
    if kind == "video":
        known = (frames >= 0) & (fps > 0)
    else:
        known = (width > 0) & (height > 0)
        frames[:], fps[:] = 1, 0.0
    label = _column(table, "label", -1, np.int64)
    captions = table["text"] if "text" in table.column_names else pa.nulls(n, pa.string())
    captions = captions.combine_chunks() if isinstance(captions, pa.ChunkedArray) else captions
    captions = pc.utf8_trim_whitespace(captions)
    paths = table["path"].combine_chunks()
    del table
    # Rows without metadata (every file of a folder): probe them now, in threads (I/O and C code).
    todo = np.flatnonzero(~known & ~bad)
    found_caps: dict[int, str] = {}
    if len(todo):
        if manifest and len(todo) > 1000:
            log.info("data: probing %d manifest rows without num_frames/fps; `ulvideo data scan` writes a manifest "
                     "that needs no probing", len(todo))
        full = [storage.join(base, paths[int(i)].as_py()) for i in todo]
        check = _probe_or_reason if kind == "video" else _image_or_reason
        with ThreadPoolExecutor(max(1, threads)) as pool:
            results = list(pool.map(check, full))
        for i, p, (info, err) in zip(todo, full, results):
            if err is not None:
                skips.add(p, err.reason, err.detail)
                bad[i] = True
                continue
            if kind == "video":
                frames[i], fps[i], rotation[i], width[i], height[i] = (info.num_frames, info.fps, info.rotation,
                                                                        info.width, info.height)
            else:
                width[i], height[i] = info
            if not storage.is_url(p) and captions[int(i)].as_py() in (None, ""):
                cap = sidecar_caption(p)
                if cap is not None:
                    found_caps[int(i)] = cap
    if found_caps:
        values = captions.to_pylist()
        for i, c in found_caps.items():
            values[i] = c
        captions = pa.array(values, pa.string())
    # A segment holds the frames whose start time lies in [start, end).
    first = np.zeros(n, np.int64)
    last = frames.copy()
    with np.errstate(invalid="ignore"):
        has_start, has_end = ~np.isnan(start), ~np.isnan(end)
        first[has_start] = np.minimum(last[has_start], np.ceil(start[has_start] * fps[has_start] - 1e-6))
        last[has_end] = np.minimum(last[has_end], np.ceil(end[has_end] * fps[has_end] - 1e-6))
    count = last - first
    keep = ~bad
    empty = keep & (count < 1)
    if empty.any():
        skips.add_many("empty segment" if (has_start | has_end)[empty].any() else "no frames",
                       paths.filter(pa.array(empty)), [f"{frames[i]} frames" for i in np.flatnonzero(empty)[:EXAMPLES]])
    keep &= ~empty
    if kind == "video":
        need = span(fps)
        short = keep & (count < need)
        if short.any():
            detail = [f"{count[i]} frames < {need[i]}" for i in np.flatnonzero(short)[:EXAMPLES]]
            if short_video == "skip":
                skips.add_many("shorter than clip", paths.filter(pa.array(short)), detail)
                keep &= ~short
            else:
                skips.add_many("shorter than clip (looped)", paths.filter(pa.array(short)), detail, level=logging.INFO)
    nocap = keep & ~np.asarray(pc.fill_null(pc.greater(pc.utf8_length(captions), 0), False))
    if nocap.any():
        if missing_caption == "skip":
            skips.add_many("missing caption", paths.filter(pa.array(nocap)))
            keep &= ~nocap
        else:
            skips.add_many("missing caption (empty used)", paths.filter(pa.array(nocap)), level=logging.INFO)
    idx = np.flatnonzero(keep)
    take = pa.array(idx)
    clips = Clips([base], paths.take(take), captions.take(take) if captions.null_count < n else None,
                  label=label[idx], first=first[idx], count=count[idx], fps=fps[idx], rotation=rotation[idx],
                  width=width[idx], height=height[idx], is_image=np.full(len(idx), kind == "image"),
                  seg_start=start[idx], seg_end=end[idx])
    return clips


def release_memory() -> None:
    """Hand freed pages back to the OS after start-up: the manifest's table and the temporary numpy
    columns are gone, but Arrow's pool and glibc's heap would otherwise keep their pages resident
    (measured: 290 -> 150 bytes per row on 10^6 rows, benchmarks/data_startup.py)."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass
