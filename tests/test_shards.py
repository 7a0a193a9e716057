"""WebDataset shards: `data pack` output read by the `webdataset` package (the reference reader) and
ours, every sample once per epoch over 2 ranks x 2 workers, exact resume mid-shard, truncated shards
and bad members skipped and counted, memory:// URLs, held-out shards."""
from __future__ import annotations

import json
import shutil

import fsspec
import numpy as np
import pytest
import torch

from test_data import cfg, frame_numbers, numbered, take
from ulvideo.data import DataError, build_loader
from ulvideo.data.pack import pack, parse_size
from ulvideo.data.shards import iter_samples
from ulvideo.videoio import write_video

N, PER_SHARD = 24, 3


def roundup(n: int) -> int:
    return -(-n // 512) * 512


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 byte-identical clips (so every sample has the same size) packed 3 to a shard."""
    root = tmp_path_factory.mktemp("shards")
    write_video(root / "src" / "c00.mp4", numbered(12), fps=8)
    for i in range(N):
        if i:
            shutil.copy(root / "src" / "c00.mp4", root / "src" / f"c{i:02d}.mp4")
        (root / "src" / f"c{i:02d}.txt").write_text(f"cap {i:02d}")
    size = (512 + roundup((root / "src" / "c00.mp4").stat().st_size) + 2 * 1024) * PER_SHARD
    index = pack(str(root / "src"), str(root / "out"), size, seed=0)
    assert [s["samples"] for s in index["shards"]] == [PER_SHARD] * (N // PER_SHARD)
    return root / "out"


def sources_of(batches) -> list[str]:
    return [s for b in batches for s in b["source"]]


def test_pack_is_read_the_same_by_webdataset(shards):
    import webdataset as wds

    urls = sorted(str(p) for p in shards.glob("*.tar"))
    ref = [s for s in wds.WebDataset(urls, shardshuffle=False)]
    ours = [s for u in urls for s, _ in iter_samples(u)]
    assert len(ref) == len(ours) == N
    for a, b in zip(ref, ours):
        assert a["__key__"] == b["__key__"] and a["mp4"] == b["mp4"] and a["txt"] == b["txt"]
        meta = json.loads(a["json"])
        assert meta["num_frames"] == 12 and meta["fps"] == 8.0 and b["txt"].decode() == f"cap {meta['source'][1:3]}"
    assert sorted(json.loads(s["json"])["source"] for s in ref) == [f"c{i:02d}.mp4" for i in range(N)]


def test_reads_shards_written_by_webdataset_without_metadata(tmp_path, shards):
    import webdataset as wds

    video = (shards.parent / "src" / "c00.mp4").read_bytes()
    with wds.TarWriter(str(tmp_path / "w-000.tar")) as w:
        for i in range(4):
            w.write({"__key__": f"s{i}", "mp4": video, "txt": f"from wds {i}", "cls": str(i)})
    loader = build_loader(cfg(tmp_path, kind="webdataset"), micro_batch_size=2, seed=0)
    b = take(loader, 2)
    assert [c for x in b for c in x["caption"]] == [f"from wds {i}" for i in range(4)]
    assert [int(v) for x in b for v in x["label"]] == [0, 1, 2, 3]
    np.testing.assert_array_equal(frame_numbers(b[0]["video"]), [[3, 4, 5, 6, 7]] * 2)  # probed: 12 frames, centred


def test_every_sample_once_per_epoch_over_2_ranks_x_2_workers(shards):
    d = cfg(shards, kind="webdataset", num_workers=2, crop="random", hflip=True, resolution=40)
    per_rank = []
    for r in range(2):
        loader = build_loader(d, micro_batch_size=2, seed=5, rank=r, world_size=2)
        # per rank and epoch: 2 workers x 2 shards x 3 samples = 12 samples = 6 batches
        per_rank.append(sources_of(take(loader, 6)))
        assert all(p["epoch"] == 0 for p in loader.state_dict()["workers"])
    assert sorted(per_rank[0] + per_rank[1]) == [f"c{i:02d}.mp4" for i in range(N)]
    nxt = build_loader(d, micro_batch_size=2, seed=5, rank=0, world_size=2)
    epochs = sources_of(take(nxt, 12))
    assert sorted(epochs[:12]) == sorted(per_rank[0]) and epochs[12:] != epochs[:12]  # another shard order


def test_resume_mid_shard_equals_the_straight_run(shards):
    d = cfg(shards, kind="webdataset", num_workers=2, crop="random", hflip=True, resolution=40,
            temporal_offset="random")
    straight = take(build_loader(d, micro_batch_size=2, seed=1), 15)  # crosses an epoch (12 batches)
    first = build_loader(d, micro_batch_size=2, seed=1)
    take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["next_worker"] == 1 and any(0 < p["sample"] < PER_SHARD for p in state["workers"])  # mid-shard
    resumed = build_loader(d, micro_batch_size=2, seed=1)
    resumed.load_state_dict(state)
    for a, b in zip(straight[3:], take(resumed, 12)):
        assert a["source"] == b["source"]
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)
    with pytest.warns(UserWarning, match="starting epoch 1"):
        other = build_loader(dataclasses_replace(d, num_workers=0), micro_batch_size=2, seed=1)
        other.load_state_dict(state)


def dataclasses_replace(d, **kw):
    import dataclasses

    return dataclasses.replace(d, **kw)


def test_truncated_shard_and_bad_member_are_skipped_and_counted(shards, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    cut = bad / "shard-000002.tar"
    ends = [after for _, after in iter_samples(str(cut))]
    cut.write_bytes(cut.read_bytes()[: (ends[0] + ends[1]) // 2])  # the second sample of the shard is cut through
    broken = bad / "shard-000005.tar"
    import tarfile

    with tarfile.open(broken) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(broken, "w", format=tarfile.USTAR_FORMAT) as tf:
        for m, payload in members:
            if m.name.endswith(".mp4") and m.name == members[0][0].name:
                payload = b"\0" * len(payload)  # the first sample's video no longer decodes
            import io

            tf.addfile(m, io.BytesIO(payload))
    kept_in_cut = [json.loads(s["json"])["source"] for s, _ in iter_samples_until_error(str(cut))]
    assert len(kept_in_cut) == 1
    loader = build_loader(cfg(bad, kind="webdataset"), micro_batch_size=1, seed=0)
    seen = sources_of(take(loader, N - 3 + 1))[: N - 3]  # 24 - 2 cut off - 1 undecodable, one epoch
    # (skips found after an epoch's last batch arrive with the next one)
    lost = {json.loads(s["json"])["source"] for s, _ in iter_samples(str(shards / "shard-000002.tar"))} - set(kept_in_cut)
    assert len(set(seen)) == len(seen) == N - 3 and not lost & set(seen)
    counts = loader.skip_counts()
    assert counts["truncated shard"] == 1 and sum(v for k, v in counts.items() if k != "truncated shard") == 1


def iter_samples_until_error(url):
    out = []
    try:
        for item in iter_samples(url):
            out.append(item)
    except Exception:
        pass
    return out


def test_memory_urls_and_brace_patterns_equal_local_files(shards):
    fs = fsspec.filesystem("memory")
    for p in sorted(shards.glob("*.tar")):
        fs.pipe(f"/bucket/wds/{p.name}", p.read_bytes())
    fs.pipe("/bucket/wds/list.txt", "\n".join(p.name for p in sorted(shards.glob("*.tar"))).encode())
    d = cfg(shards, kind="webdataset", crop="random", resolution=40)
    local = take(build_loader(d, micro_batch_size=2, seed=2), 5)
    for path in ("memory://bucket/wds/shard-{000000..000007}.tar", "memory://bucket/wds/list.txt", "memory://bucket/wds"):
        remote = take(build_loader(dataclasses_replace(d, path=path, kind="auto"), micro_batch_size=2, seed=2), 5)
        for a, b in zip(local, remote):
            assert a["source"] == b["source"]
            torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)


def test_heldout_shards_and_clear_errors(shards):
    d = cfg(shards, kind="webdataset", heldout_fraction=0.25)
    held = build_loader(d, micro_batch_size=4, seed=0, split="heldout")
    held_sources = sources_of(list(held))
    import hashlib

    keys = [int.from_bytes(hashlib.sha256(p.name.encode()).digest()[:8], "big") / 2**64 for p in shards.glob("*.tar")]
    assert len(held_sources) == max(1, sum(k < 0.25 for k in keys)) * PER_SHARD and sources_of(list(held)) == held_sources  # a fixed pass
    train = build_loader(d, micro_batch_size=2, seed=0)
    assert not set(sources_of(take(train, 9))) & set(held_sources)
    with pytest.raises(DataError, match="lower data.num_workers"):
        build_loader(dataclasses_replace(d, num_workers=4), micro_batch_size=1, seed=0, world_size=2)
    with pytest.raises(DataError, match="no held-out shards"):
        build_loader(cfg(shards, kind="webdataset"), micro_batch_size=1, seed=0, split="heldout")


def test_pack_cli(tmp_path, shards):
    from ulvideo.cli import main

    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 512 * 2**20
    assert main(["data", "pack", str(shards.parent / "src"), "--out", str(tmp_path / "p"), "--size", "1GB"]) == 0
    index = json.loads((tmp_path / "p" / "index.json").read_text())
    assert index["samples"] == N and len(index["shards"]) == 1
    assert main(["data", "pack", str(shards.parent / "src"), "--out", str(tmp_path / "p")]) == 2  # not empty
    assert main(["data", "pack", str(shards.parent / "src"), "--out", str(tmp_path / "q"), "--size", "lots"]) == 2


def test_training_from_shards_resumes_exactly(tmp_path):
    """`ulvideo train` on shards with a loader worker: 4 steps equal 2, resume, 2 (weights, data position)."""
    import test_resume as R
    from safetensors.torch import load_file

    data = R.synth(tmp_path / "shapes")
    pack(str(data), str(tmp_path / "wds"), 1)  # one clip per shard
    common = ["--data.kind=webdataset", "--data.num_workers=1", "--train.ckpt_every=100", "--train.ema_decay=0.5",
              "--train.zero_stage=0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    R.train(straight, tmp_path / "wds", "--train.steps=4", *common)
    R.train(split, tmp_path / "wds", "--train.steps=2", *common)
    state = R.state_json(split / "checkpoints" / "step_00000002")["data"]
    pos = state["workers"][0]
    assert state["kind"] == "webdataset" and (pos["epoch"], pos["shard"], pos["sample"]) == (0, 7, 1)  # 8 clips read
    second = R.train(split, tmp_path / "wds", "--train.steps=4", *common)
    assert "(step 2)" in second.stderr
    a, b = (R.state_json(r / "checkpoints" / "step_00000004") for r in (straight, split))
    assert {**a, "files": None} == {**b, "files": None}  # file sizes depend on the run directory's name
    ea, eb = (load_file(str(r / "exports" / "latest.safetensors")) for r in (straight, split))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
