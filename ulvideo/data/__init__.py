"""Datasets and loading: folders of videos or images (1-frame clips), manifests with metadata
(CSV, JSONL, Parquet), WebDataset tar shards, latent shards, local or on object storage; clip
sampling with exact resume. `ulvideo.data.loader` describes the batches; `sampling` the order.

    from ulvideo.data import build_loader
    loader = build_loader(cfg.data, micro_batch_size=8, seed=0)
"""
from ulvideo.data.latents import LatentEntry, find_shards, write_latent_shard
from ulvideo.data.loader import ClipLoader, build_loader, check_usable, resize_crop, resolve_kind
from ulvideo.data.sampling import ClipSpec, Planner, Request, frame_indices, rng_for
from ulvideo.data.scan import scan, write_report
from ulvideo.data.sources import Clips, DataError, Entry, SkipLog, collect, heldout_key, sidecar_caption

__all__ = [
    "ClipLoader", "ClipSpec", "Clips", "DataError", "Entry", "LatentEntry", "Planner", "Request", "SkipLog",
    "build_loader", "check_usable", "collect", "find_shards", "frame_indices", "heldout_key", "resize_crop",
    "resolve_kind", "rng_for", "scan", "sidecar_caption", "write_latent_shard", "write_report",
]
