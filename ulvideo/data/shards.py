"""WebDataset tar shards: reading with an exact resume position, and the loader for `data.kind: webdataset`.

A shard is a plain tar file; a sample is the run of consecutive members sharing a key (the name
up to the first dot): `<key>.mp4` (or another video or image suffix), `<key>.txt` (caption) and
`<key>.json` (metadata: num_frames, fps, width, height, rotation, start, end, label, source),
as written by `ulvideo data pack` and read by the `webdataset` package. Reading uses the standard
library's `tarfile` on a seekable file (local, or any fsspec URL), so a position is
`(shard, byte offset of the next sample's first header, samples read)` and resuming seeks there;
nothing is unpickled (WebDataset's default decoders would unpickle `.pyd` members).

Order. `data.path` lists the shards (a folder, a text file of URLs, a brace pattern). The held-out
shards are those `heldout_mask` picks by a hash of the shard's file name (so `heldout_fraction`
holds out whole shards, at least one when > 0 and there are >= 2 shards); the rest train. Each
epoch permutes the training shards (seed, epoch); rank r takes shards r, r + W, ... of that order
and its worker w every `num_workers`-th of those. A worker reads its shards in order, each from
start to end (`ulvideo data pack` shuffles samples when it writes them), and cuts its stream into
batches; the DataLoader hands out batches of workers 0, 1, ... in turn. The loader's state is
every worker's position and the worker whose batch comes next, so a resumed run continues with
the very batch the uninterrupted run would have produced. Unlike folders and manifests, the order
depends on the world size and `num_workers`: resuming with other values starts the next epoch.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
import warnings

import numpy as np
import torch

from ulvideo.data import storage
from ulvideo.data.loader import worker_context
from ulvideo.data.sampling import ClipSpec, frame_indices, rng_for
from ulvideo.data.sources import DataError, SkipLog, heldout_keys, heldout_mask
from ulvideo.videoio import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoError, probe, read_frames, read_image

log = logging.getLogger("ulvideo.data")
TAG_SHARDS, TAG_SHARD_CLIP = 5, 6
MEDIA = tuple(e[1:] for e in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)


def split_key(name: str) -> tuple[str, str]:
    """`dir/000001.json` -> (`dir/000001`, `json`): WebDataset's key and extension."""
    folder, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower() if dot else ""


def iter_samples(url: str, offset: int = 0):
    """Samples of one shard from byte `offset` (a sample's first header): yields
    (sample dict {ext: bytes, "__key__": key}, byte offset after it). A shard cut short ends the
    iteration with `tarfile.ReadError` / `EOFError` / `OSError` after the last complete sample."""
    with storage.open_binary(url) as f:
        f.seek(offset)
        tf = tarfile.open(fileobj=f, mode="r:")  # random access: starts at the current position
        sample = None
        while True:
            m = tf.next()
            if m is None:
                break
            if not m.isreg():
                continue
            key, ext = split_key(m.name)
            if sample is not None and key != sample["__key__"]:
                yield sample, m.offset
                sample = None
            if sample is None:
                sample = {"__key__": key}
            data = tf.extractfile(m).read()
            if len(data) != m.size:
                raise tarfile.ReadError(f"member {m.name} cut short")
            sample[ext] = data
            tf.members = []  # the member list would grow with the shard
        # tarfile stops quietly at a cut header; a complete archive ends with zero blocks
        f.seek(tf.offset)
        if f.read(512) != bytes(512):
            raise tarfile.ReadError("no end-of-archive marker: the shard is cut short")
        if sample is not None:
            yield sample, tf.offset


def sample_meta(sample: dict) -> dict:
    """(media extension, caption, metadata) of a sample; raises ValueError when it has no media."""
    media = next((e for e in sample if e in MEDIA), None)
    if media is None:
        raise ValueError(f"no video or image member (members: {', '.join(k for k in sample if k != '__key__')})")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if not isinstance(meta, dict):
        raise ValueError("the .json member is not an object")
    caption = sample.get("txt", sample.get("caption", b"")).decode("utf-8", errors="replace").strip()
    caption = caption or str(meta.get("text") or meta.get("caption") or "")
    if "cls" in sample and "label" not in meta:
        meta["label"] = int(sample["cls"].decode().strip())
    return {"media": media, "caption": caption, **meta}


class ShardStream(torch.utils.data.IterableDataset):
    """Batches from shards, one logical worker per DataLoader worker (see the module docstring)."""

    def __init__(self, shards: list[str], *, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int, train: bool, spec: ClipSpec, height: int, width: int, resolution: int,
                 crop: str, hflip: bool, temporal_offset: str, short_video: str, missing_caption: str, backend: str):
        self.shards, self.batch_size, self.seed = shards, batch_size, seed
        self.rank, self.world_size, self.slots, self.train = rank, world_size, max(1, num_workers), train
        self.spec, self.height, self.width, self.resolution = spec, height, width, resolution
        self.random_crop, self.hflip, self.random_offset = crop == "random", hflip, temporal_offset == "random"
        self.short_video, self.missing_caption = short_video, missing_caption
        self.backend = "pyav" if backend in ("auto", "decord") else backend  # members are decoded from memory
        self.states: list[dict] = [self.start_state(0) for _ in range(self.slots)]
        self.rotate = 0  # DataLoader worker i plays logical worker (i + rotate) % slots

    def start_state(self, epoch: int) -> dict:
        return {"epoch": epoch, "shard": 0, "offset": 0, "sample": 0}

    def plan(self, epoch: int, slot: int) -> list[int]:
        """Shard ids logical worker `slot` of this rank reads in `epoch`."""
        if not self.train:
            return list(range(len(self.shards)))[slot::self.slots]
        order = rng_for(self.seed, TAG_SHARDS, epoch).permutation(len(self.shards))
        return order[self.rank::self.world_size][slot::self.slots].tolist()

    def _clip(self, sample: dict, shard: int, index: int, epoch: int):
        from ulvideo.data.loader import resize_crop

        meta = sample_meta(sample)
        data = sample[meta["media"]]
        u = rng_for(self.seed, TAG_SHARD_CLIP, epoch, shard, index).random(4)
        train = self.train
        if "." + meta["media"] in IMAGE_EXTENSIONS:
            frames, count = read_image(data), 1
            first, fps, rotation = 0, 0.0, 0
        else:
            if not meta.get("fps") or not (meta.get("num_frames") or meta.get("count")):  # not from `data pack`
                info = probe(data)
                meta.setdefault("rotation", info.rotation)
                meta["num_frames"], meta["fps"] = meta.get("num_frames") or info.num_frames, meta.get("fps") or info.fps
            fps, rotation = float(meta["fps"]), int(meta.get("rotation") or 0)
            if meta.get("count") is not None:  # a manifest segment, as frames
                first, count = int(meta.get("first") or 0), int(meta["count"])
            else:  # a whole file, or start/end seconds from another writer
                first, last = 0, int(meta["num_frames"])
                if meta.get("start") is not None:
                    first = min(last, int(np.ceil(float(meta["start"]) * fps - 1e-6)))
                if meta.get("end") is not None:
                    last = min(last, int(np.ceil(float(meta["end"]) * fps - 1e-6)))
                count = last - first
        if count < 1:
            raise VideoError("empty segment", f"{count} frames")
        need = self.spec.span(fps) if count > 1 or self.spec.num_frames > 1 else 1
        if count < need and self.short_video == "skip":
            raise VideoError("shorter than clip", f"{count} frames < {need}")
        if not meta["caption"] and self.missing_caption == "skip":
            raise VideoError("missing caption")
        if count == 1 and "." + meta["media"] in IMAGE_EXTENSIONS:
            frames = frames[np.zeros(self.spec.num_frames, dtype=np.int64)]  # a still, looped like a short video
        else:
            idx = frame_indices(self.spec, first, count, fps, u[0] if train and self.random_offset else None)
            frames = read_frames(data, idx, self.backend, rotation=rotation)
        rc = train and self.random_crop
        frames = resize_crop(frames, self.height, self.width, self.resolution, u[1] if rc else None,
                             u[2] if rc else None, bool(train and self.hflip and u[3] < 0.5))
        label = meta.get("label")
        return {"frames": frames, "caption": meta["caption"], "label": -1 if label is None else int(label),
                "source": str(meta.get("source") or f"{os.path.basename(self.shards[shard])}:{sample['__key__']}")}

    def samples(self, slot: int):
        """(clip dict, position after it, skips) of logical worker `slot`, from its saved state on."""
        state, produced = dict(self.states[slot]), 1  # a resumed epoch may have produced its clips already
        while True:
            plan = self.plan(state["epoch"], slot)
            for k in range(state["shard"], len(plan)):
                shard, url = plan[k], self.shards[plan[k]]
                offset, index = (state["offset"], state["sample"]) if k == state["shard"] else (0, 0)
                try:
                    for sample, after in iter_samples(url, offset):
                        pos = {"epoch": state["epoch"], "shard": k, "offset": after, "sample": index + 1}
                        try:
                            clip = self._clip(sample, shard, index, state["epoch"])
                            produced += 1
                            yield clip, pos, []
                        except (VideoError, ValueError, OSError, RuntimeError, KeyError) as e:
                            reason = e.reason if isinstance(e, VideoError) else f"bad sample: {type(e).__name__}"
                            yield None, pos, [(f"{url}:{sample['__key__']}", reason, str(e)[:300])]
                        index += 1
                except (tarfile.TarError, EOFError, OSError) as e:
                    pos = {"epoch": state["epoch"], "shard": k + 1, "offset": 0, "sample": 0}
                    yield None, pos, [(url, "truncated shard", f"after {index} samples: {type(e).__name__}: {e}")]
            if not self.train:
                return
            if not produced:
                raise DataError(f"worker {slot} of rank {self.rank}: no usable sample in a whole epoch of its shards "
                                f"({', '.join(self.shards[i] for i in plan[:4])} ...)")
            state, produced = self.start_state(state["epoch"] + 1), 0

    def __iter__(self):
        from ulvideo.data.loader import collate

        info = torch.utils.data.get_worker_info()
        slot = ((info.id if info is not None else 0) + self.rotate) % self.slots
        batch, skips = [], []
        for clip, pos, skipped in self.samples(slot):
            skips += skipped
            if clip is not None:
                batch.append(clip)
            if len(batch) == self.batch_size:
                out = collate(batch)
                out["_pos"], out["_skips"] = (slot, pos), skips
                yield out
                batch, skips = [], []
        if batch:  # the held-out pass ends with a partial batch
            out = collate(batch)
            out["_pos"], out["_skips"] = (slot, pos), skips
            yield out


class ShardLoader:
    """`build_loader` for shards: the same interface as `ClipLoader` (iterate, state_dict)."""

    kind = "webdataset"

    def __init__(self, stream: ShardStream, *, num_workers: int, skips: SkipLog, split: str, num_entries: int | None,
                 fingerprint: str):
        self.stream, self.num_workers, self.skips, self.split = stream, num_workers, skips, split
        self.num_entries, self.fingerprint = num_entries, fingerprint
        self._next = 0

    @property
    def batches_per_epoch(self) -> int | None:
        """Known when the shards came with `index.json` (written by `data pack`); per rank."""
        n = self.num_entries
        return None if n is None else n // (self.stream.batch_size * self.stream.world_size)

    def skip_counts(self) -> dict[str, int]:
        return self.skips.counts()

    def __iter__(self):
        self.stream.rotate = self._next
        w = self.num_workers
        loader = torch.utils.data.DataLoader(self.stream, batch_size=None, num_workers=w,
                                             prefetch_factor=2 if w else None, persistent_workers=False,
                                             multiprocessing_context=worker_context() if w else None,
                                             pin_memory=torch.cuda.is_available())
        for batch in loader:
            slot, pos = batch.pop("_pos")
            self.skips.merge(batch.pop("_skips"))
            self.stream.states[slot] = pos  # counted when handed to the caller, not when prefetched
            self._next = (slot + 1) % self.stream.slots
            yield batch
        if self.split != "train":
            self.stream.states = [self.stream.start_state(0) for _ in range(self.stream.slots)]
            self._next = 0

    def state_dict(self) -> dict:
        s = self.stream
        return {"kind": "webdataset", "workers": [dict(p) for p in s.states], "next_worker": self._next,
                "seed": s.seed, "rank": s.rank, "world_size": s.world_size, "num_workers": s.slots,
                "micro_batch_size": s.batch_size, "split": self.split, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        s = self.stream
        if state.get("kind") != "webdataset":
            raise DataError("data: the checkpoint's data position is not a WebDataset position (data.kind changed)")
        if state.get("fingerprint") != self.fingerprint or state.get("seed") != s.seed:
            warnings.warn("data: the shard list or seed differs from the checkpoint's; resuming at the same "
                          "positions, but the sample order will not match the original run")
        same = all(int(state.get(k, -1)) == v for k, v in (("world_size", s.world_size), ("num_workers", s.slots),
                                                            ("micro_batch_size", s.batch_size), ("rank", s.rank)))
        if not same:
            epoch = max(int(p["epoch"]) for p in state["workers"]) + 1
            warnings.warn(f"data: world size, rank, num_workers or micro batch changed; shard positions cannot carry "
                          f"over, starting epoch {epoch}")
            s.states, self._next = [s.start_state(epoch) for _ in range(s.slots)], 0
            return
        s.states = [{k: int(p[k]) for k in ("epoch", "shard", "offset", "sample")} for p in state["workers"]]
        self._next = int(state["next_worker"])


def read_index(shards: list[str]) -> dict[str, int]:
    """Samples per shard from the `index.json` beside the shards (written by `data pack`), if any."""
    counts = {}
    for folder in sorted({storage.parent(u) for u in shards}):
        path = storage.join(folder, "index.json")
        try:
            index = json.loads(storage.read_bytes(path))
        except (OSError, ValueError):
            continue
        for s in index.get("shards", []):
            counts[storage.join(folder, s["name"])] = int(s["samples"])
    return counts


def build_shard_loader(d, *, micro_batch_size: int, seed: int, rank: int, world_size: int, split: str) -> ShardLoader:
    try:
        shards = storage.expand(d.path)
    except (storage.StorageError, OSError) as e:
        raise DataError(f"data.path '{d.path}': {e}") from None
    if not shards:
        raise DataError(f"data.path '{d.path}': no shards found")
    names = [u.rstrip("/").rsplit("/", 1)[-1] for u in shards]
    held = heldout_mask(heldout_keys(names), d.heldout_fraction) if d.heldout_fraction > 0 else np.zeros(len(shards), bool)
    mine = [u for u, h in zip(shards, held) if h == (split == "heldout")]
    workers = d.num_workers if split == "train" else 0  # evaluation reads a few clips
    if not mine:
        if split == "heldout":
            raise DataError(f"data.path '{d.path}': no held-out shards ({len(shards)} shard(s), data.heldout_fraction "
                            f"{d.heldout_fraction}); set data.heldout_fraction > 0 with >= 2 shards, or 0 to evaluate "
                            "on training clips")
        raise DataError(f"data.path '{d.path}': all {len(shards)} shard(s) are held out; lower data.heldout_fraction")
    if split == "train" and len(mine) < world_size * max(1, workers):
        raise DataError(f"data.path '{d.path}': {len(mine)} training shard(s) for {world_size} rank(s) x "
                        f"{max(1, workers)} worker(s); every worker needs a shard: pack smaller shards "
                        "(`ulvideo data pack --size`) or lower data.num_workers")
    from ulvideo.data.loader import _spec

    stream = ShardStream(mine, batch_size=micro_batch_size, seed=seed, rank=rank, world_size=world_size,
                         num_workers=workers, train=split == "train", spec=_spec(d), height=d.height, width=d.width,
                         resolution=d.resolution, crop=d.crop, hflip=d.hflip, temporal_offset=d.temporal_offset,
                         short_video=d.short_video, missing_caption=d.missing_caption, backend=d.backend)
    counts = read_index(mine)
    total = sum(counts[u] for u in mine) if all(u in counts for u in mine) else None
    fingerprint = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    log.info("data: %d %s shards (%s samples), %d rank(s) x %d worker(s)", len(mine), split,
             "?" if total is None else total, world_size, max(1, workers))
    return ShardLoader(stream, num_workers=workers, skips=SkipLog(), split=split, num_entries=total,
                       fingerprint=fingerprint)
