"""`build_loader`: the one entry point of the training loop and of evaluation into the data.

    loader = build_loader(cfg.data, micro_batch_size=8, seed=cfg.train.seed, rank=r, world_size=w)
    for batch in loader:               # forever; epochs roll over
        batch["video"]                 # float32 (B, 3, T, H, W) in [-1, 1], one (T, H, W) per batch
        ...
    state = loader.state_dict()        # the position after the batches the caller has received

Workers (torch DataLoader processes) decode, crop and convert with `videoio.to_float`, so the
training process only receives finished batches. A sample that fails to load is replaced by a seeded choice from
its bucket and counted in `loader.skips`, so one bad file never stops a run.
"""
from __future__ import annotations

import logging
import multiprocessing
import warnings
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F

from ulvideo.data.latents import ShardReader, find_shards, iter_shards
from ulvideo.data.sampling import TAG_CLIP, ClipSpec, Planner, Request, frame_indices, rng_for
from ulvideo.data import storage
from ulvideo.data.sources import (Clips, DataError, Entry, SkipLog, collect, first_usable, heldout_keys,
                                  heldout_mask, release_memory)
from ulvideo.videoio import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, VideoError, read_frames, read_image, to_float

log = logging.getLogger("ulvideo.data")
MAX_ATTEMPTS = 16  # replacements tried for one failing sample before the batch is given up


def resize_crop(frames: np.ndarray, height: int, width: int, resolution: int, u_y: float | None,
                u_x: float | None, flip: bool) -> torch.Tensor:
    """uint8 (T, h, w, 3) -> uint8 (T, height, width, 3): resize the short side to `resolution`
    (or more, so the crop fits; bilinear with antialiasing), crop (u = None: centred, else the
    offset is drawn from u in [0, 1)), then mirror left-right if `flip`."""
    own = frames if frames.flags.writeable and frames.flags.c_contiguous else np.array(frames)  # cached: read-only
    x = torch.from_numpy(own).permute(0, 3, 1, 2)  # (T, 3, h, w)
    h, w = x.shape[-2:]
    scale = max(resolution / min(h, w), height / h, width / w)
    rh, rw = max(height, round(h * scale)), max(width, round(w * scale))
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    y0 = (rh - height) // 2 if u_y is None else int(u_y * (rh - height + 1))
    x0 = (rw - width) // 2 if u_x is None else int(u_x * (rw - width + 1))
    x = x[:, :, y0:y0 + height, x0:x0 + width]
    if flip:
        x = x.flip(-1)
    return x.permute(0, 2, 3, 1).contiguous()


class DecodedCache:
    """LRU of decoded frame arrays up to `mb` MiB (0 = off), one per loading process. Entries are
    read-only, so a cached clip cannot be changed by whoever holds it."""

    def __init__(self, mb: float = 0.0):
        self.limit = int(mb * 2**20)
        self.items: OrderedDict = OrderedDict()
        self.bytes = self.hits = self.misses = 0

    def get(self, key):
        if not self.limit:
            return None
        frames = self.items.get(key)
        if frames is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return frames

    def put(self, key, frames: np.ndarray) -> None:
        if not self.limit or frames.nbytes > self.limit or key in self.items:
            return
        frames = np.array(frames)  # own copy
        frames.flags.writeable = False
        self.items[key] = frames
        self.bytes += frames.nbytes
        while self.bytes > self.limit:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.nbytes


class ClipDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by `Request`s: what a worker runs for one sample."""

    def __init__(self, entries: Clips, planner: Planner, spec: ClipSpec, *, height: int, width: int,
                 resolution: int, crop: str, hflip: bool, temporal_offset: str, backend: str, seed: int,
                 threads: int = 0, cache_mb: float = 0.0):
        self.entries, self.planner, self.spec = entries, planner, spec
        self.height, self.width, self.resolution = height, width, resolution
        self.random_crop, self.hflip, self.random_offset = crop == "random", hflip, temporal_offset == "random"
        self.backend, self.seed, self.threads = backend, seed, threads
        self.cache = DecodedCache(cache_mb)

    def _read(self, e: Entry, idx: np.ndarray) -> np.ndarray:
        key = (e.path, e.rotation, idx.tobytes())
        frames = self.cache.get(key)
        if frames is None:
            src = storage.read_bytes(e.path) if storage.is_url(e.path) else e.path  # object storage: fetch, decode in memory
            frames = read_frames(src, idx, self.backend, rotation=e.rotation, threads=self.threads)
            self.cache.put(key, frames)
        return frames

    def _load(self, e: Entry, req: Request) -> torch.Tensor:
        u = rng_for(self.seed, TAG_CLIP, req.epoch, req.index, req.slot).random(4)
        train = req.train
        if e.kind == "image":
            frames = read_image(storage.read_bytes(e.path) if storage.is_url(e.path) else e.path)
        else:
            idx = frame_indices(self.spec, e.first, e.count, e.fps, u[0] if train and self.random_offset else None)
            frames = self._read(e, np.asarray(idx, dtype=np.int64))
        rc = train and self.random_crop
        return resize_crop(frames, self.height, self.width, self.resolution, u[1] if rc else None,
                           u[2] if rc else None, bool(train and self.hflip and u[3] < 0.5))

    def __getitem__(self, req: Request) -> dict:
        skipped, entry = [], req.entry
        for attempt in range(MAX_ATTEMPTS):
            e = self.entries[entry]
            try:
                frames = self._load(e, req)
                return {"frames": frames, "caption": e.caption, "label": e.label, "source": e.source,
                        "_pos": (req.epoch, req.batch), "_skips": skipped}
            except (VideoError, OSError, RuntimeError, ValueError) as err:
                reason = err.reason if isinstance(err, VideoError) else type(err).__name__
                skipped.append((e.path, f"load failed: {reason}", str(err)[:300]))
                entry = self.planner.substitute(req, attempt)
        raise DataError(f"{MAX_ATTEMPTS} samples in a row failed to load; last: {skipped[-1]}")


class LatentDataset(torch.utils.data.Dataset):
    def __init__(self, entries, planner: Planner):
        self.entries, self.planner, self.reader = entries, planner, ShardReader()

    def __getitem__(self, req: Request) -> dict:
        """Like `ClipDataset`: a sample whose shard cannot be read (or holds non-finite latents) is
        replaced by a seeded choice from its bucket and counted."""
        from safetensors import SafetensorError

        skipped, entry = [], req.entry
        for attempt in range(MAX_ATTEMPTS):
            e = self.entries[entry]
            try:
                out = self.reader.load(e)
                if not bool(torch.isfinite(out["z_clean"]).all()):
                    raise ValueError(f"sample {e.index}: z_clean holds NaN or infinite values")
                out["_pos"], out["_skips"] = (req.epoch, req.batch), skipped
                return out
            except (OSError, RuntimeError, ValueError, SafetensorError) as err:
                skipped.append((e.shard, "load failed: unreadable shard", f"{type(err).__name__}: {err}"[:300]))
                entry = self.planner.substitute(req, attempt)
        raise DataError(f"{MAX_ATTEMPTS} samples in a row failed to load; last: {skipped[-1]}")


def worker_context():
    """How loader workers start: from a forkserver (a clean process forked before any decoder ran),
    never forked from the trainer itself. A forked worker inherits the decoders' thread pools
    without their threads (PyAV's frame converter, decord's readers, OpenMP) and can wait on them
    forever; the trainer's process group and caches stay out of the workers too."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def collate(samples: list[dict]) -> dict:
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if key == "_pos":
            out[key] = values[0]
        elif key == "_skips":
            out[key] = [item for v in values for item in v]
        elif key == "frames":  # in the worker, so the training process receives finished tensors
            out["video"] = to_float(torch.stack(values))  # (B, T, H, W, 3) uint8 -> (B, 3, T, H, W)
        elif isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif key in ("label", "num_frames"):
            out[key] = torch.tensor(values, dtype=torch.long)
        else:
            out[key] = values
    return out


class _BatchSampler:
    def __init__(self, planner: Planner, epoch: int, batch: int):
        self.planner, self.epoch, self.batch = planner, epoch, batch

    def __iter__(self):
        return self.planner.requests(self.epoch, self.batch)


class ClipLoader:
    """Batches forever (train) or for one pass (heldout); resumable at batch granularity."""

    def __init__(self, dataset, planner: Planner, *, kind: str, num_workers: int, skips: SkipLog,
                 num_entries: int, fingerprint: str, split: str):
        self.dataset, self.planner, self.kind = dataset, planner, kind
        self.num_workers, self.skips, self.split = num_workers, skips, split
        self.num_entries, self.fingerprint = num_entries, fingerprint
        self._epoch, self._batch = 0, 0

    @property
    def batches_per_epoch(self) -> int:
        return self.planner.batches_per_epoch()

    def skip_counts(self) -> dict[str, int]:
        return self.skips.counts()

    def __iter__(self):
        w = self.num_workers
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_BatchSampler(self.planner, self._epoch, self._batch), collate_fn=collate,
            num_workers=w, prefetch_factor=2 if w else None, persistent_workers=False,
            multiprocessing_context=worker_context() if w else None,
            pin_memory=torch.cuda.is_available())  # page-locked batches copy to the GPU asynchronously
        for batch in loader:
            epoch, k = batch.pop("_pos")
            self.skips.merge(batch.pop("_skips"))
            self._epoch, self._batch = epoch, k + 1  # counted when handed to the caller, not when prefetched
            yield batch
        if self.split != "train":
            self._epoch, self._batch = 0, 0  # the pass is complete: the next iteration is a new pass

    def state_dict(self) -> dict:
        p = self.planner
        return {"epoch": self._epoch, "batch": self._batch, "seed": p.seed, "rank": p.rank,
                "world_size": p.world_size, "micro_batch_size": p.batch_size, "split": self.split,
                "num_entries": self.num_entries, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        p = self.planner
        if state.get("kind") == "webdataset":
            raise DataError("data: the checkpoint's data position is a WebDataset position (data.kind changed)")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if state.get("fingerprint") != self.fingerprint or state.get("seed") != p.seed:
            warnings.warn("data: the dataset or seed differs from the checkpoint's; resuming at the same "
                          "epoch and batch, but the sample order will not match the original run")
        old_w = int(state.get("world_size", p.world_size))
        if old_w != p.world_size or int(state.get("micro_batch_size", p.batch_size)) != p.batch_size:
            # Keep the number of samples already seen: convert through the global batch count.
            seen = batch * old_w * int(state.get("micro_batch_size", p.batch_size))
            batch = seen // (p.world_size * p.batch_size)
            warnings.warn(f"data: world size / micro batch changed; resuming epoch {epoch} at batch {batch}")
        self._epoch, self._batch = epoch, batch


def _spec(d) -> ClipSpec:
    return ClipSpec(d.num_frames, d.frame_stride, d.target_fps)


def resolve_kind(d) -> str:
    """`data.kind`, with "auto" resolved from what `data.path` holds (a manifest means videos)."""
    if d.kind != "auto":
        return d.kind
    if d.manifest:
        return "video"
    if storage.is_url(d.path) or "{" in d.path or d.path.endswith((".tar", ".txt", ".shards")) or "::" in d.path:
        return "webdataset"
    from pathlib import Path

    root = Path(storage.local(d.path))
    if not root.is_dir():
        raise DataError(f"data.path '{d.path}' is not a folder")
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if any(p.name.endswith(".json") and p.with_suffix(".safetensors").exists() for p in files):
        return "latents"
    if any(p.suffix.lower() in VIDEO_EXTENSIONS for p in files):
        return "video"
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in files):
        return "image"
    if any(p.suffix == ".tar" for p in files):
        return "webdataset"
    raise DataError(f"data.path '{d.path}': no videos, images or latent shards found (nor WebDataset .tar shards)")


def check_usable(data_cfg) -> None:
    """A DataError, before any process group starts, when `data.path` holds no usable clip at all
    (e.g. a folder of broken files). Files are checked in `build_loader`'s order until the first
    usable one (latent shards by their JSON and tensor headers), so a healthy folder costs one.
    Manifests, URLs and WebDataset shards are left to `build_loader` (their rows are not probed)."""
    d = data_cfg
    kind = resolve_kind(d)
    if kind == "webdataset" or d.manifest or storage.is_url(d.path):
        return
    skips = SkipLog(level=logging.DEBUG)  # build_loader logs each skipped file later, once
    if kind == "latents":
        found = any(len(shard) for shard in iter_shards(d.path, skips))  # stops at the first readable shard
    else:
        kinds = {"video": ["video"], "image": ["image"], "mixed": ["video", "image"]}[kind]
        found = any(first_usable(d.path if k == "video" else d.image_path or d.path, k, _spec(d).span, d.short_video,
                                 d.missing_caption, skips) for k in kinds)
    if not found:
        raise _no_clips(d, kind, "train", 0, skips)


def _no_clips(d, kind: str, split: str, found: int, skips: SkipLog) -> DataError:
    if split == "heldout":
        how = (f"data.heldout_fraction is {d.heldout_fraction}: set it > 0 to hold clips out" if d.heldout_fraction <= 0
               else f"with {found} usable clip(s) none can be held out; set data.heldout_fraction=0 (evaluation then "
                    "uses training clips) or add clips")
        return DataError(f"data.path '{d.path}' (kind {kind}): no held-out clips; {how}")
    if found:
        return DataError(f"data.path '{d.path}' (kind {kind}): all {found} usable clips are held out "
                         f"(data.heldout_fraction {d.heldout_fraction}); lower it or add clips")
    return DataError(f"data.path '{d.path}' (kind {kind}): no usable clips; skipped: {skips.summary()}. "
                     f"Run `ulvideo data scan {d.path}` for a per-file report.")


def build_loader(data_cfg, *, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 split: str = "train"):
    """See the module docstring. Raises DataError when no usable clip is left."""
    d = data_cfg
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if d.frame_stride < 1 or d.num_frames < 1 or d.target_fps < 0:
        raise DataError(f"data: num_frames {d.num_frames}, frame_stride {d.frame_stride}, target_fps {d.target_fps}")
    kind, skips, spec = resolve_kind(d), SkipLog(), _spec(d)
    try:
        storage.check_url(d.path)
        storage.check_url(d.manifest)
    except storage.StorageError as e:
        raise DataError(str(e)) from None
    if kind == "webdataset":
        from ulvideo.data.shards import build_shard_loader

        return build_shard_loader(d, micro_batch_size=micro_batch_size, seed=seed, rank=rank, world_size=world_size,
                                  split=split)
    if kind == "latents":
        entries = find_shards(d.path, skips)
        found = len(entries)
        held = heldout_mask(heldout_keys([e.rel for e in entries]), d.heldout_fraction) if d.heldout_fraction > 0 \
            else np.zeros(found, bool)
        entries = [e for e, h in zip(entries, held) if h == (split == "heldout")]
    else:
        parts = []
        if kind in ("video", "mixed"):
            parts.append(collect(d.path, kind="video", manifest=d.manifest, missing_caption=d.missing_caption,
                                 span=spec.span, short_video=d.short_video, skips=skips))
        if kind in ("image", "mixed"):
            parts.append(collect(d.image_path or d.path, kind="image", manifest=d.manifest,
                                 missing_caption=d.missing_caption, skips=skips))
        entries = Clips.concat(parts)
        del parts  # the entries before the split must not outlive it (release_memory below)
        found = len(entries)
        held = heldout_mask(heldout_keys(entries.paths), d.heldout_fraction) if d.heldout_fraction > 0 \
            else np.zeros(found, bool)
        entries = entries.take(np.flatnonzero(held == (split == "heldout")))
    if not len(entries):
        raise _no_clips(d, kind, split, found, skips)
    if kind == "latents":
        keys = sorted({e.shape for e in entries})
        is_image = [s[1] == 1 for s in keys]
        key_of = np.asarray([keys.index(e.shape) for e in entries])
    else:
        vkey, ikey = (d.num_frames, d.height, d.width), (1, d.height, d.width)
        keys = sorted({ikey if img else vkey for img in np.unique(entries.is_image).tolist()})
        is_image = [k[0] == 1 for k in keys]
        key_of = np.where(entries.is_image, keys.index(ikey) if ikey in keys else 0,
                          keys.index(vkey) if vkey in keys else 0)
    planner = Planner(key_of, is_image, micro_batch_size=micro_batch_size, seed=seed, rank=rank,
                      world_size=world_size, train=split == "train",
                      image_ratio=d.image_ratio if kind == "mixed" else None)
    if kind == "latents":
        dataset = LatentDataset(entries, planner)
    else:
        dataset = ClipDataset(entries, planner, spec, height=d.height, width=d.width, resolution=d.resolution,
                              crop=d.crop, hflip=d.hflip, temporal_offset=d.temporal_offset, backend=d.backend,
                              seed=seed, threads=1 if d.num_workers else 0, cache_mb=d.decoded_cache_mb)
    if split == "train" and planner.batches_per_epoch() == 0:
        raise DataError(f"data.path '{d.path}': no batches for rank {rank} of {world_size}")
    log.info("data: %d %s clips (%s), %d batches per epoch on this rank; skipped: %s", len(entries), split,
             kind, planner.batches_per_epoch(), skips.summary())
    loader = ClipLoader(dataset, planner, kind=kind, num_workers=d.num_workers, skips=skips,
                        num_entries=len(entries), fingerprint=_fingerprint(entries), split=split)
    release_memory()  # last: the temporaries of reading, splitting and planning are all freed by now
    return loader


def _fingerprint(entries) -> str:
    if isinstance(entries, Clips):
        return entries.fingerprint()
    import hashlib

    return hashlib.sha256("\n".join(f"{e.shard}:{e.index}" for e in entries).encode()).hexdigest()[:16]
