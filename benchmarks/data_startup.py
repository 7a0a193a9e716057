"""Start-up time and resident memory per rank of `build_loader` on a manifest that carries metadata.

    python benchmarks/data_startup.py --rows 10000 100000 1000000 --world-sizes 1 8 \
        --out benchmarks/results/data_startup.json

Synthetic Parquet manifests (no video files: rows with num_frames and fps are never probed) with
Open-Sora's columns: `path` ("clips/0123/00012345.mp4", 24 characters), `text` (a caption of
`--caption-chars` characters on average), num_frames, fps, height, width. Each measurement runs in a
fresh process: import the package, then time `build_loader(split="train", heldout_fraction=0.05)`
as rank 0 of W until its first epoch plan exists, and read the resident set (current and peak)
before and after. Goal: 10^6 rows ready in <= 10 s and <= 150 bytes per row per rank, linear in rows.
The reference in the same process: the per-clip Python objects the loader held before (one `Entry`
per clip, built for the first 10^5 rows and measured the same way).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_manifest(path: Path, rows: int, caption_chars: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    words = np.array("a the person dog car red blue walks runs slowly quickly street park camera pans over river "
                     "city at night with light snow in on of and".split())
    per = max(1, caption_chars // 6)
    chunks = []
    for a in range(0, rows, 100_000):
        n = min(100_000, rows - a)
        w = words[rng.integers(0, len(words), (n, per))]
        captions = [" ".join(r) for r in w]
        i = np.arange(a, a + n)
        chunks.append(pa.table({
            "path": pa.array([f"clips/{k % 1000:04d}/{k:08d}.mp4" for k in i]),
            "text": pa.array(captions),
            "num_frames": pa.array(rng.integers(40, 400, n)), "fps": pa.array(rng.choice([24.0, 25.0, 30.0], n)),
            "height": pa.array(np.full(n, 720)), "width": pa.array(np.full(n, 1280))}))
    pq.write_table(pa.concat_tables(chunks), path, row_group_size=64 * 1024)


def measure(manifest: str, rows: int, world_size: int) -> dict:
    """Runs in its own process (see main)."""
    t_import = time.perf_counter()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _rss import peak_rss_bytes, reset_peak_rss, rss_bytes

    import ulvideo.data as data
    from ulvideo.config import DataConfig

    d = DataConfig(path=str(Path(manifest).parent), manifest=manifest, num_frames=17, height=128, width=128,
                   resolution=128, heldout_fraction=0.05)
    # warm-up on a 100-row manifest: imports and one-time set-up are not per-row costs
    small = Path(manifest).with_name("warmup.parquet")
    write_manifest(small, 100, 80)
    data.build_loader(dataclasses.replace(d, manifest=str(small)), micro_batch_size=8, seed=0)
    before = rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    import_s = time.perf_counter() - t_import
    loader = data.build_loader(d, micro_batch_size=8, seed=0, rank=0, world_size=world_size)
    batches = loader.batches_per_epoch  # the first epoch's plan exists
    seconds = time.perf_counter() - t0
    after, peak = rss_bytes(), peak_rss_bytes()
    entries = loader.dataset.entries
    out = {"rows": rows, "world_size": world_size, "seconds": round(seconds, 3), "import_and_warmup_s": round(import_s, 3),
           "rss_bytes_per_row": round((after - before) / rows, 1), "peak_rss_bytes_per_row": round((peak - before) / rows, 1),
           "column_bytes_per_row": round(entries.nbytes() / rows, 1), "entries": len(entries),
           "batches_per_epoch_this_rank": batches, "skipped": loader.skip_counts()}
    if rows == 100_000:  # the reference: one Python object per clip, as the loader held them before
        del loader
        base = rss_bytes()
        objs = [entries.entry(i) for i in range(len(entries))]
        out["python_entry_objects_bytes_per_row"] = round((rss_bytes() - base) / len(objs), 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--caption-chars", type=int, default=80)
    p.add_argument("--out", default=None)
    p.add_argument("--_measure", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._measure:
        print(json.dumps(measure(args._measure[0], int(args._measure[1]), int(args._measure[2]))))
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            manifest = Path(tmp) / f"m{rows}.parquet"
            write_manifest(manifest, rows, args.caption_chars)
            for w in args.world_sizes:
                env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
                r = subprocess.run([sys.executable, __file__, "--_measure", str(manifest), str(rows), str(w)], env=env,
                                   capture_output=True, text=True, check=True)
                row = {"what": "data_startup", "manifest": "parquet", "caption_chars_mean": args.caption_chars,
                       **json.loads(r.stdout.strip().splitlines()[-1]),
                       "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"}
                print(json.dumps(row), flush=True)
                results.append(row)
    import numpy as np

    for w in args.world_sizes:  # rss = fixed + marginal * rows (least squares): the cost that grows with rows
        pts = [(r["rows"], r["rss_bytes_per_row"] * r["rows"], r["seconds"]) for r in results if r["world_size"] == w]
        if len(pts) >= 2:
            rows, rss, sec = map(np.asarray, zip(*pts))
            (b, a), (bs, as_) = np.polyfit(rows, rss, 1), np.polyfit(rows, sec, 1)
            fit = {"what": "data_startup_fit", "world_size": w, "marginal_rss_bytes_per_row": round(float(b), 1),
                   "fixed_rss_mb": round(float(a) / 2**20, 1), "marginal_us_per_row": round(float(bs) * 1e6, 2)}
            print(json.dumps(fit))
            results.append(fit)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
