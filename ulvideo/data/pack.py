"""`ulvideo data pack SRC --out shards/ --size 1GB`: a folder or manifest -> WebDataset tar shards.

Every usable video and image of SRC (probed where its row carries no metadata, exactly as training
would) becomes one sample, in a seeded random order (the shard reader does not shuffle within a
shard): `<key>.<ext>` holds the file's bytes unchanged, `<key>.txt` the caption, `<key>.json`
num_frames, fps, width, height, rotation, label, start/end (a manifest segment) and the source
path. A shard is closed when the next sample would take it past `--size`. Each shard is written to
a hidden temporary file and renamed when complete; `index.json` (samples and bytes per shard) is
written last. Files that cannot be read are skipped, counted and listed in `index.json`.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from ulvideo.data import storage
from ulvideo.data.sampling import rng_for
from ulvideo.data.sources import Clips, DataError, SkipLog, collect

TAG_PACK = 7
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"size '{text}': use a number with B, KB, MB, GB (or KiB, MiB, GiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def sources(src: str, skips: SkipLog) -> Clips:
    """The usable entries of a folder or a manifest (videos and images)."""
    manifest = src if os.path.splitext(src.lower())[1] in (".csv", ".jsonl", ".json", ".parquet", ".pq") else ""
    parts = [collect(src, kind=k, manifest=manifest, skips=skips) for k in ("video", "image")]
    return Clips.concat(parts)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o444
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Tar shards of at most `size` bytes (a single larger sample gets a shard of its own)."""

    def __init__(self, out: Path, size: int):
        self.out, self.size = out, size
        self.index: list[dict] = []
        self.tar = self.tmp = None
        self.count = self.bytes = 0
        self.mtime = time.time()

    def _close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        name = f"shard-{len(self.index):06d}.tar"
        os.replace(self.tmp, self.out / name)
        self.index.append({"name": name, "samples": self.count, "bytes": (self.out / name).stat().st_size})
        self.tar = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        need = sum(512 + -(-len(v) // 512) * 512 for v in members.values())
        if self.tar is not None and self.count and self.bytes + need > self.size:
            self._close()
        if self.tar is None:
            self.tmp = self.out / f".shard-{len(self.index):06d}.tar.{os.getpid()}.tmp"
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
            self.count = self.bytes = 0
        for ext, data in members.items():
            _add(self.tar, f"{key}.{ext}", data, self.mtime)
        self.count += 1
        self.bytes += need

    def finish(self) -> list[dict]:
        self._close()
        return self.index


def pack(src: str, out: str, size: int, seed: int = 0, progress=None) -> dict:
    """Write the shards and `index.json`; returns the index."""
    out_dir = Path(out)
    if out_dir.exists() and any(p.suffix == ".tar" or p.name == "index.json" for p in out_dir.iterdir()):
        raise FileExistsError(f"'{out}' already holds shards; pack into an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    skips = SkipLog()
    clips = sources(src, skips)
    if not len(clips):
        raise DataError(f"'{src}': no usable videos or images; skipped: {skips.summary()}")
    order = rng_for(seed, TAG_PACK).permutation(len(clips))
    writer = ShardWriter(out_dir, size)
    for n, i in enumerate(order):
        e = clips[int(i)]
        try:
            data = storage.read_bytes(e.path)
        except OSError as err:
            skips.add(e.path, "unreadable", str(err))
            continue
        meta = {"source": e.source, "fps": e.fps, "width": e.width, "height": e.height, "rotation": e.rotation,
                "label": e.label}
        if e.kind == "video" and e.segment:  # the segment's frames, as training from the manifest uses them
            s = np.nan if clips.seg_start is None else float(clips.seg_start[i])
            t = np.nan if clips.seg_end is None else float(clips.seg_end[i])
            meta.update({"first": e.first, "count": e.count, "start": None if np.isnan(s) else s,
                         "end": None if np.isnan(t) else t})
        else:
            meta["num_frames"] = e.count if e.kind == "video" else 1
        writer.write(f"{n:09d}", {os.path.splitext(e.path)[1][1:].lower(): data,
                                  "txt": e.caption.encode("utf-8"), "json": json.dumps(meta).encode("utf-8")})
        if progress is not None:
            progress(1)
    index = {"format": "webdataset", "source": str(src), "seed": seed, "shard_size_bytes": size,
             "samples": 0, "shards": writer.finish(), "skipped": skips.counts(),
             "skipped_files": [{"path": p, "reason": r, "detail": d} for p, r, d in skips.items]}
    index["samples"] = sum(s["samples"] for s in index["shards"])
    tmp = out_dir / f".index.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / "index.json")
    return index


def main(args) -> int:
    from tqdm import tqdm

    try:
        size = parse_size(args.size)
        if size < 1:
            raise ValueError(f"size '{args.size}' must be positive")
    except ValueError as e:
        print(f"ulvideo data pack: {e}", file=sys.stderr)
        return 2
    if not storage.is_url(args.src) and Path(args.out).resolve() == Path(args.src).resolve():
        print(f"ulvideo data pack: --out {args.out} is the source folder; pack into an empty folder", file=sys.stderr)
        return 2
    bar = tqdm(desc="pack", unit="file")
    try:
        index = pack(args.src, args.out, size, args.seed, progress=bar.update)
    except (FileExistsError, DataError, storage.StorageError) as e:
        print(f"ulvideo data pack: {e}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    print(f"{index['samples']} samples in {len(index['shards'])} shards -> {args.out}; "
          f"skipped: {', '.join(f'{n} {r}' for r, n in index['skipped'].items()) or 'none'}")
    return 0
