"""Which samples go into which batch, on which rank, in which order: a pure function of
(seed, epoch, batch index). Workers, prefetching and restarts never change it.

Every entry belongs to a bucket, its clip shape `(T, H, W)`; a batch holds entries of one bucket.
One training epoch, the same on every rank:
  1. each bucket gets a number of batches: `max(1, n // micro_batch_size)` for n entries, except
     in a mixed image+video set where image batches are `image_ratio` of all batches;
  2. a bucket's batches are cut from its entries in a seeded random order (further seeded
     permutations follow when a bucket needs more samples than it has);
  3. all batches are shuffled together, cut to a multiple of world_size (at least world_size),
     and rank r takes global batches r, r + W, r + 2W, ...
So ranks see disjoint samples within an epoch, and the position of a run is (epoch, batch).
The held-out split is one pass in path order with a partial last batch, no randomness at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Domain tags keep the random streams of different purposes independent.
TAG_ORDER, TAG_SHUFFLE, TAG_CLIP, TAG_SUBSTITUTE = 1, 2, 3, 4


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """A generator determined by (seed, key...) alone, never by global RNG state."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed % 2**63, *key])))


@dataclass(frozen=True)
class Request:
    """One sample to load, as sent to a worker."""

    epoch: int
    batch: int  # position in this rank's epoch: what the loader's state counts
    index: int  # global batch index in the epoch: with `slot`, seeds the sample's randomness
    slot: int  # position in the batch
    entry: int
    train: bool  # random offsets/crops/flips (train) or centred and unflipped (held out)


@dataclass(frozen=True)
class ClipSpec:
    """How a clip is cut from a video: `num_frames` frames every `stride`, or at `target_fps`
    (frame indices from the average rate, so a variable-rate video is sampled by frame count)."""

    num_frames: int
    stride: int = 1
    target_fps: float = 0.0

    def offsets(self, native_fps: float) -> np.ndarray:
        """Frame offsets of the clip from its first frame."""
        k = np.arange(self.num_frames)
        if self.target_fps > 0 and native_fps > 0:
            return np.floor(k * (native_fps / self.target_fps) + 1e-6).astype(np.int64)  # frame on screen at k/fps
        return k * self.stride

    def span(self, native_fps):
        """Frames a clip covers: an int for one rate, an array for an array of rates."""
        fps = np.asarray(native_fps, dtype=np.float64)
        last = np.full(fps.shape, (self.num_frames - 1) * self.stride, dtype=np.int64)
        if self.target_fps > 0:
            at = fps > 0
            last[at] = np.floor((self.num_frames - 1) * (fps[at] / self.target_fps) + 1e-6).astype(np.int64)
        return int(last) + 1 if last.ndim == 0 else last + 1


def frame_indices(spec: ClipSpec, first: int, count: int, native_fps: float, u: float | None) -> np.ndarray:
    """Indices of one clip among frames [first, first + count). `u` in [0, 1) draws the temporal
    offset uniformly; None centres it. A clip longer than the video loops through it."""
    rel = spec.offsets(native_fps)
    span = int(rel[-1]) + 1
    if span <= count:
        start = (count - span) // 2 if u is None else int(u * (count - span + 1))
        return first + start + rel
    start = 0 if u is None else int(u * count)
    return first + (start + rel) % count


class Planner:
    """Epoch plans: lists of batches (entry ids) for one rank. See the module docstring."""

    def __init__(self, bucket_of: np.ndarray, is_image_bucket: list[bool], *, micro_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, train: bool = True, image_ratio: float | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.bucket_of = np.asarray(bucket_of, dtype=np.int16)
        index = np.int32 if len(self.bucket_of) < 2**31 else np.int64  # 4 bytes per entry
        self.members = [np.flatnonzero(self.bucket_of == b).astype(index) for b in range(len(is_image_bucket))]
        self.is_image = list(is_image_bucket)
        self.batch_size, self.seed = micro_batch_size, seed
        self.rank, self.world_size, self.train = rank, world_size, train
        self.image_ratio = image_ratio
        self._cache: tuple[int, list] | None = None

    def _counts(self) -> list[int]:
        natural = [max(1, len(m) // self.batch_size) if len(m) else 0 for m in self.members]
        r = self.image_ratio
        has_img = any(n and i for n, i in zip(natural, self.is_image))
        has_vid = any(n and not i for n, i in zip(natural, self.is_image))
        if r is None or not (has_img and has_vid):
            return natural
        counts = [0 if i else n for n, i in zip(natural, self.is_image)]
        if r >= 1.0:
            return [n if i else 0 for n, i in zip(natural, self.is_image)]
        n_img = int(round(sum(counts) * r / (1.0 - r)))
        img = [b for b, i in enumerate(self.is_image) if i and len(self.members[b])]
        total = sum(len(self.members[b]) for b in img)
        for j, b in enumerate(img):  # split image batches over image buckets by their sizes
            share = n_img - sum(counts[c] for c in img[:j]) if j == len(img) - 1 else \
                int(round(n_img * len(self.members[b]) / total))
            counts[b] = max(0, share)
        return counts

    def _global_batches(self, epoch: int):
        B, W = self.batch_size, self.world_size
        if not self.train:
            batches = []
            for m in self.members:
                batches += [m[i:i + B] for i in range(0, len(m), B)]
            return batches
        counts = self._counts()
        if sum(counts) == 0:
            return np.zeros((0, B), dtype=np.int32)
        while sum(counts) < W:  # every rank needs a batch: draw more from the largest bucket
            counts[int(np.argmax([len(m) for m in self.members]))] += 1
        parts = []  # each bucket's batches as rows of a (batches, B) array: no Python object per batch
        for b, (m, nb) in enumerate(zip(self.members, counts)):
            if not nb:
                continue
            stream, have, p = [], 0, 0
            while have < nb * B:
                stream.append(rng_for(self.seed, TAG_ORDER, epoch, b, p).permutation(m))
                have, p = have + len(m), p + 1
            parts.append(np.concatenate(stream)[: nb * B].reshape(nb, B))
        batches = np.concatenate(parts)
        order = rng_for(self.seed, TAG_SHUFFLE, epoch).permutation(len(batches))
        return batches[order[: len(batches) // W * W]]

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of `epoch` (global batch g = k * world_size + rank)."""
        if self._cache is None or self._cache[0] != epoch:
            plan = self._global_batches(epoch)[self.rank::self.world_size]
            self._cache = (epoch, plan.copy() if isinstance(plan, np.ndarray) else plan)  # only this rank's share
        return self._cache[1]

    def batches_per_epoch(self) -> int:
        return len(self.epoch(0))

    def requests(self, epoch: int, batch: int):
        """Batches of Requests from position (epoch, batch) on: forever for training, to the end of
        the single pass for the held-out split."""
        while True:
            plan = self.epoch(epoch)
            if not len(plan):
                return
            for k in range(batch, len(plan)):
                g = k * self.world_size + self.rank
                yield [Request(epoch, k, g, i, int(e), self.train) for i, e in enumerate(plan[k])]
            if not self.train:
                return
            epoch, batch = epoch + 1, 0

    def substitute(self, req: Request, attempt: int) -> int:
        """A replacement entry from the same bucket for a sample that failed to load: seeded by the
        request, so the batch is the same whichever worker loads it."""
        m = self.members[self.bucket_of[req.entry]]
        return int(m[rng_for(self.seed, TAG_SUBSTITUTE, req.epoch, req.index, req.slot, attempt).integers(len(m))])
