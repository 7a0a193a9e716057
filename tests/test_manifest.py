"""Manifests with metadata, entries as columns, object storage through fsspec, the held-out split of
small datasets. References: a folder of the same files read with probing (the previous path),
frame numbers read back from pixels, and counted calls of the probe."""
from __future__ import annotations

import dataclasses
import json
import shutil

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import ulvideo.data.sources as S
from test_data import cfg, frame_numbers, numbered, take
from ulvideo.data import DataError, build_loader
from ulvideo.data.manifest import read_table, write_manifest
from ulvideo.videoio import write_video

ROWS = [{"path": "a/v0.mp4", "text": "zero", "num_frames": 20, "fps": 8.0, "width": 32, "height": 32},
        {"path": "a/v1.mp4", "text": "one", "num_frames": 20, "fps": 8.0, "width": 32, "height": 32, "label": 4},
        {"path": "b/v2.mp4", "text": "two, with a comma", "num_frames": 20, "fps": 8.0, "width": 32, "height": 32,
         "start": 1.25, "label": 2},
        {"path": "b/v3.mp4", "text": "three \"quoted\"", "num_frames": 20, "fps": 8.0, "width": 32, "height": 32,
         "start": 0.0, "end": 1.0}]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest")
    for r in ROWS:
        write_video(root / r["path"], numbered(20), fps=8)
    return root


def table_of(rows) -> pa.Table:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.table({k: [r.get(k) for r in rows] for k in keys})


def write_all(root, rows=ROWS) -> dict:
    table = table_of(rows)
    return {fmt: write_manifest(table, str(root / f"m.{fmt}")) for fmt in ("parquet", "csv", "jsonl")}


@pytest.fixture
def probes(monkeypatch):
    calls = []
    real = S.probe
    monkeypatch.setattr(S, "probe", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    return calls


def columns(loader):
    e = loader.dataset.entries
    return ([e.entry(i) for i in range(len(e))])


def test_formats_give_the_same_entries_without_probing(dataset, probes):
    paths = write_all(dataset)
    got = {}
    for fmt, path in paths.items():
        loader = build_loader(cfg(dataset, manifest=path), micro_batch_size=2, seed=0)
        got[fmt] = columns(loader)
    assert probes == []  # every row carries num_frames and fps
    assert got["parquet"] == got["csv"] == got["jsonl"]
    by_src = {e.source: e for e in got["parquet"]}
    assert by_src["b/v2.mp4@1.25-"].first == 10 and by_src["b/v2.mp4@1.25-"].count == 10  # ceil(1.25 * 8)
    assert by_src["b/v3.mp4@0-1"].count == 8 and by_src["b/v2.mp4@1.25-"].label == 2
    assert by_src["b/v2.mp4@1.25-"].caption == "two, with a comma" and by_src["b/v3.mp4@0-1"].caption == 'three "quoted"'
    # the folder read (probing every file) agrees on what the files are
    folder = {e.rel: e for e in columns(build_loader(cfg(dataset), micro_batch_size=2, seed=0))}
    assert len(probes) == 4
    for e in got["csv"]:
        assert (e.fps, e.width, e.height, e.path) == (folder[e.rel].fps, folder[e.rel].width, folder[e.rel].height,
                                                      folder[e.rel].path)


def test_open_sora_columns_and_batches_match_the_rows(dataset, probes):
    table = table_of([{**r, "aspect_ratio": 1.0, "resolution": 1024} for r in ROWS])
    pq.write_table(table, dataset / "opensora.parquet")
    loader = build_loader(cfg(dataset, manifest=str(dataset / "opensora.parquet"), temporal_offset="random"),
                          micro_batch_size=1, seed=0)
    for b in take(loader, 12):
        ids = frame_numbers(b["video"])[0]
        if b["caption"] == ["two, with a comma"]:
            assert ids.min() >= 10 and b["label"].item() == 2
        elif b["caption"] == ['three "quoted"']:
            assert ids.max() <= 7
        np.testing.assert_array_equal(np.diff(ids), 1)
    assert probes == []


def test_bad_rows_are_found_when_read_and_counted(dataset, probes, tmp_path):
    rows = ROWS + [{"path": "gone.mp4", "text": "missing", "num_frames": 20, "fps": 8.0},
                   {"path": "b/v2.mp4", "text": "too long", "num_frames": 400, "fps": 8.0, "start": 40.0},
                   {"path": "a/v0.mp4", "text": "short", "num_frames": 3, "fps": 8.0}]
    for r in ROWS:
        shutil.copy(dataset / r["path"], tmp_path / r["path"].replace("/", "_"))
    rows = [{**r, "path": str(dataset / r["path"]) if not r["path"].startswith("gone") else str(tmp_path / r["path"])}
            for r in rows]
    path = write_all(tmp_path, rows)["csv"]
    with open(path, "a") as f:
        f.write("\"unterminated,row\n")
    loader = build_loader(cfg(dataset, manifest=path), micro_batch_size=1, seed=0)
    assert probes == [] and loader.skip_counts()["shorter than clip"] == 1 and loader.num_entries == 6
    sources = {s for b in take(loader, 18) for s in b["source"]}
    assert not any("gone" in s for s in sources)
    reasons = {p.rsplit("/", 1)[-1]: r for p, r, _ in loader.skips.items}
    assert reasons["gone.mp4"].startswith("load failed")  # replaced by a seeded pick, counted
    assert reasons["v2.mp4"].startswith("load failed")  # the row claims 400 frames: frame 320+ does not exist


def test_many_rows_are_counted_not_listed(tmp_path, probes):
    n = 5000
    table = pa.table({"path": [f"v/{i:06d}.mp4" for i in range(n)], "text": ["x"] * n,
                      "num_frames": np.where(np.arange(n) % 10 == 0, 2, 30), "fps": np.full(n, 24.0)})
    write_manifest(table, str(tmp_path / "m.parquet"))
    loader = build_loader(cfg(tmp_path, manifest=str(tmp_path / "m.parquet"), heldout_fraction=0.1),
                          micro_batch_size=4, seed=0)
    assert loader.skip_counts() == {"shorter than clip": 500} and len(loader.skips.items) == S.EXAMPLES
    held = build_loader(cfg(tmp_path, manifest=str(tmp_path / "m.parquet"), heldout_fraction=0.1),
                        micro_batch_size=4, seed=0, split="heldout")
    assert loader.num_entries + held.num_entries == 4500
    assert abs(held.num_entries - 450) < 4 * np.sqrt(450)  # binomial around the fraction
    assert isinstance(loader.dataset.entries.paths, pa.Array) and probes == []


def test_memory_filesystem_end_to_end(dataset, probes):
    """Manifest and videos on fsspec's memory:// filesystem; batches equal those from local files."""
    fs = fsspec.filesystem("memory")
    for r in ROWS:
        fs.pipe(f"/bucket/ds/{r['path']}", (dataset / r["path"]).read_bytes())
    fs.pipe("/bucket/ds/m.jsonl", "\n".join(json.dumps(r) for r in ROWS).encode())
    write_all(dataset)
    remote = build_loader(cfg("memory://bucket/ds", manifest="memory://bucket/ds/m.jsonl", temporal_offset="random"),
                          micro_batch_size=2, seed=3)
    local = build_loader(cfg(dataset, manifest=str(dataset / "m.jsonl"), temporal_offset="random"),
                         micro_batch_size=2, seed=3)
    for a, b in zip(take(remote, 4), take(local, 4)):
        assert a["source"] == b["source"]
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)
    assert remote.skip_counts() == {} and probes == []
    file_url = build_loader(cfg(dataset, manifest=f"file://{dataset / 'm.parquet'}"), micro_batch_size=2, seed=3)
    assert file_url.num_entries == 4
    with pytest.raises(DataError, match="credentials come from the environment"):
        build_loader(cfg(dataset, manifest="s3://key:secret@bucket/m.parquet"), micro_batch_size=1, seed=0)


def test_small_folders_hold_out_one_clip_or_say_what_to_set(tmp_path):
    for i in range(6):
        write_video(tmp_path / "six" / f"v{i}.mp4", numbered(9), fps=8)
    d = cfg(tmp_path / "six", heldout_fraction=0.05)
    held = build_loader(d, micro_batch_size=8, seed=0, split="heldout")
    train = build_loader(d, micro_batch_size=2, seed=0)
    assert held.num_entries == 1 and train.num_entries == 5
    write_video(tmp_path / "one" / "v.mp4", numbered(9), fps=8)
    with pytest.raises(DataError, match="set data.heldout_fraction=0"):
        build_loader(cfg(tmp_path / "one", heldout_fraction=0.05), micro_batch_size=1, seed=0, split="heldout")
    assert build_loader(cfg(tmp_path / "one", heldout_fraction=0.05), micro_batch_size=1, seed=0).num_entries == 1


def test_scan_writes_a_manifest_that_needs_no_probing_and_resumes(dataset, tmp_path, probes, monkeypatch):
    import importlib

    from ulvideo.cli import main

    scan_mod = importlib.import_module("ulvideo.data.scan")

    src = tmp_path / "src"
    shutil.copytree(dataset / "a", src / "a")
    (src / "a" / "v0.txt").write_text("caption zero\n")
    (src / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "out" / "m.parquet"
    real = scan_mod._check_video
    seen = []

    def crash_on_second(path, backend):
        if len(seen) == 1:
            raise KeyboardInterrupt  # the scan is stopped part way
        seen.append(path)
        return real(path, backend)

    monkeypatch.setattr(scan_mod, "_check_video", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        main(["data", "scan", str(src), "--out", str(out), "--threads", "1"])
    assert not out.exists() and (out.parent / ".m.parquet.partial.jsonl").exists()
    monkeypatch.setattr(scan_mod, "_check_video", lambda p, b: seen.append(p) or real(p, b))
    assert main(["data", "scan", str(src), "--out", str(out), "--threads", "1"]) == 0
    assert len(seen) == 3 and len(set(seen)) == 3  # the first file was not checked again
    assert not (out.parent / ".m.parquet.partial.jsonl").exists()
    table, bad = read_table(str(out))
    assert bad == 0 and sorted(table["path"].to_pylist()) == ["../src/a/v0.mp4", "../src/a/v1.mp4"]
    assert table["num_frames"].to_pylist() == [20, 20] and table["text"].to_pylist()[0] == "caption zero"
    probes.clear()
    loader = build_loader(cfg(tmp_path, manifest=str(out)), micro_batch_size=1, seed=0)
    assert probes == [] and loader.num_entries == 2
    assert {e.caption for e in columns(loader)} == {"caption zero", ""}


def test_columns_cost_tens_of_bytes_per_row(tmp_path):
    """A manifest of 20k rows: entries, held-out keys and the epoch plan cost < 150 bytes a row."""
    n = 20_000
    table = pa.table({"path": [f"clips/{i % 97:03d}/{i:08d}.mp4" for i in range(n)],
                      "text": [f"a caption of clip {i}" for i in range(n)], "num_frames": np.full(n, 64),
                      "fps": np.full(n, 30.0), "width": np.full(n, 320), "height": np.full(n, 240)})
    write_manifest(table, str(tmp_path / "m.parquet"))
    loader = build_loader(dataclasses.replace(cfg(tmp_path, manifest=str(tmp_path / "m.parquet")),
                                              heldout_fraction=0.01), micro_batch_size=8, seed=0, rank=1, world_size=4)
    e = loader.dataset.entries
    plan = loader.planner.epoch(0)
    total = e.nbytes() + loader.planner.bucket_of.nbytes + sum(m.nbytes for m in loader.planner.members) + plan.nbytes
    assert total / n < 150 and plan.shape[0] == loader.batches_per_epoch
