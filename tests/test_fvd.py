"""FVD: Frechet distance vs SciPy and closed forms, mergeable float64 statistics, presets, CLI."""
import dataclasses
import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from ulvideo.eval import fvd, fvd_data, fvd_presets
from ulvideo.eval.metrics import FeatureStats, frechet_distance, fvd_from_stats


def spd(rng, d, floor):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + floor * np.eye(d)


# ---- Frechet distance ------------------------------------------------------------------------


@pytest.mark.parametrize("d,seed", [(5, 0), (64, 1), (400, 2)])
def test_frechet_matches_scipy_on_well_conditioned_gaussians(d, seed):
    rng = np.random.default_rng(seed)
    s1, s2 = spd(rng, d, 0.5), spd(rng, d, 0.2)
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    ref = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9)


def test_frechet_diagonal_closed_form():
    # For diagonal covariances: sum (m1 - m2)^2 + sum (sqrt(a) - sqrt(b))^2.
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.01, 4, 50), rng.uniform(0.01, 4, 50)
    m1, m2 = rng.normal(size=50), rng.normal(size=50)
    closed = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(closed, rel=1e-12)


@pytest.mark.parametrize("n", [5, 50, 600])
def test_frechet_of_identical_statistics_is_zero(n):
    # n < 400 gives a singular covariance: the case where a general sqrtm goes complex or negative.
    feats = torch.from_numpy(np.random.default_rng(n).normal(size=(n, 400)) * 3 + 1)
    s = FeatureStats(400)
    s.update(feats)
    for est in ("unbiased", "population"):
        d = fvd_from_stats(s, s, est)
        assert 0.0 <= d < 1e-6


def test_frechet_never_negative_on_random_pairs():
    rng = np.random.default_rng(4)
    for _ in range(20):
        x, y = rng.normal(size=(30, 60)), rng.normal(size=(30, 60)) * 1.01
        d = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
        assert d >= 0.0


# ---- statistics ------------------------------------------------------------------------------


def test_stats_in_batches_equal_one_pass_and_numpy():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(257, 16)) * rng.uniform(0.1, 10, 16) + rng.normal(size=16) * 5
    one, batched = FeatureStats(16), FeatureStats(16)
    one.update(torch.from_numpy(x))
    for chunk in np.array_split(x, 7):
        batched.update(torch.from_numpy(chunk))
    assert batched.count == one.count == 257
    np.testing.assert_allclose(batched.cov(), one.cov(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(one.mean(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(one.cov("unbiased"), np.cov(x, rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(one.cov("population"), np.cov(x, rowvar=False, ddof=0), rtol=1e-10, atol=1e-12)


def test_stats_merge_equals_one_pass_and_survives_save(tmp_path):
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(23, 8)) + 2
    sa, sb, sab = FeatureStats(8), FeatureStats(8), FeatureStats(8)
    sa.update(torch.from_numpy(a))
    sb.update(torch.from_numpy(b))
    sab.update(torch.from_numpy(np.concatenate([a, b])))
    merged = sa.merge(sb)
    np.testing.assert_allclose(merged.mean(), sab.mean(), rtol=1e-13)
    np.testing.assert_allclose(merged.cov(), sab.cov(), rtol=1e-12, atol=1e-14)
    merged.save(tmp_path / "s.npz", {"protocol": "x"})
    loaded, meta = FeatureStats.load(tmp_path / "s.npz")
    assert meta == {"protocol": "x"} and loaded.count == 63
    assert torch.equal(loaded.sum_outer, merged.sum_outer)


def test_stats_reject_non_finite():
    with pytest.raises(ValueError, match="non-finite"):
        FeatureStats(3).update(torch.tensor([[1.0, float("nan"), 0.0]]))


def _all_reduce_worker(rank, path, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    s = FeatureStats(4)
    s.update(torch.arange(12, dtype=torch.float64).view(3, 4) * (rank + 1))
    s.all_reduce()
    torch.save({"count": s.count, "sum": s.sum, "sum_outer": s.sum_outer}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_all_reduce_equals_single_process(tmp_path):
    torch.multiprocessing.spawn(_all_reduce_worker, args=(str(tmp_path / "store"), str(tmp_path / "r")), nprocs=2)
    base = torch.arange(12, dtype=torch.float64).view(3, 4)
    ref = FeatureStats(4)
    ref.update(torch.cat([base, 2 * base]))
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'r'}.{rank}", weights_only=True)
        assert got["count"] == 6 and torch.equal(got["sum"], ref.sum) and torch.equal(got["sum_outer"], ref.sum_outer)


# ---- presets: preprocessing on known inputs --------------------------------------------------


def ramp_clip(h=48, w=64, t=9):
    """uint8 (1, T, H, W, 3) with pixel value h + 2w: linear, so bilinear resizing is exact."""
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    img = (hh + 2 * ww).astype(np.uint8)
    return torch.from_numpy(np.broadcast_to(img[None, None, :, :, None], (1, t, h, w, 3)).copy())


def test_bilinear_is_torch_half_pixel_resize():
    p = fvd.get_preset("tats-fvd2048-16f")
    x = fvd.i3d_input(ramp_clip(), p)
    assert x.shape == (1, 3, 9, 224, 224) and x.dtype == torch.float32
    j = np.arange(224)
    # align_corners=False: output j samples input (j + 0.5) * n / 224 - 0.5, clamped to the edges
    sh, sw = np.clip((j + 0.5) * 48 / 224 - 0.5, 0, 47), np.clip((j + 0.5) * 64 / 224 - 0.5, 0, 63)
    expect = 2 * (sh[:, None] + 2 * sw[None, :]) / 255 - 1
    np.testing.assert_allclose(x[0, 1, 4].numpy(), expect, atol=2e-5)


def test_tf1_bilinear_has_no_half_pixel_offset():
    p = fvd.get_preset("k600-5to11")
    x = fvd.i3d_input(ramp_clip(), p)
    j = np.arange(224)
    # TF1 tf.image.resize_bilinear (half_pixel_centers=False): output j samples input j * n / 224
    sh, sw = np.minimum(j * 48 / 224, 47), np.minimum(j * 64 / 224, 63)
    expect = 2 * (sh[:, None] + 2 * sw[None, :]) / 255 - 1
    np.testing.assert_allclose(x[0, 2, 0].numpy(), expect, atol=2e-5)


@pytest.mark.parametrize("name", ["tats-fvd2048-16f", "cdfvd-i3d-16f-128px", "k600-5to11"])
@pytest.mark.parametrize("v", [0, 37, 128, 255])
def test_value_range_maps_uint8_to_minus_one_one(name, v):
    x = fvd.i3d_input(torch.full((1, 9, 20, 30, 3), v, dtype=torch.uint8), fvd.get_preset(name))
    torch.testing.assert_close(x, torch.full_like(x, 2 * v / 255 - 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("route", ["bilinear-round", "bilinear-tats", "bilinear-aa-cdfvd", "pil-lanczos"])
def test_resolution_is_short_side_then_centre_crop(route):
    # 32x64 clip: a 200-valued middle half between zero quarters. At 16x16 the short side halves
    # (16x32) and the centre 16 columns are exactly the middle half; the filters only reach across
    # the edges between the halves, so the centre 8 columns are 200 whatever the filter.
    x = torch.zeros(9, 32, 64, 3, dtype=torch.uint8)
    x[:, :, 16:48] = 200
    y = fvd_data.VIDEO_ROUTES[route](x, 16)
    assert y.shape == (9, 16, 16, 3) and y.dtype == torch.uint8 and (y[:, :, 4:12] == 200).all()
    if route in ("bilinear-round", "bilinear-tats"):  # a 2:1 bilinear never reaches the zero quarters
        assert (y == 200).all()


def test_pil_lanczos_route_is_torchvisions_size_and_crop_rule():
    """StyleGAN-V's conversion: long side int(R * long / short), crop at round((size - R) / 2)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (2, 30, 47, 3), dtype=np.uint8))
    y = fvd_data.route_pil_lanczos(x, 20)
    big = np.asarray(Image.fromarray(x[1].numpy()).resize((31, 20), Image.LANCZOS))  # int(20 * 47 / 30) = 31
    np.testing.assert_array_equal(y[1].numpy(), big[:, 6:26])  # round(5.5) = 6 (half to even)


# ---- window rules on listed videos (no decoding) ------------------------------------------------


def videos_of(lengths, frames=False):
    return [fvd_data.Video(f"v{i:04d}", n, Path(f"v{i:04d}"), (8, 8), tuple(Path(f"{k}.png") for k in range(n))
                           if frames else ()) for i, n in enumerate(lengths)]


def test_stylegan_v_takes_the_first_2048_usable_videos_one_window_each():
    p = fvd.get_preset("stylegan-v-fvd2048-16f")
    vids = videos_of([15] + [40] * 3000)
    clips, short = fvd_data.plan_real(vids, p)
    assert short == 1 and [c.video for c in clips] == list(range(1, 2049))
    starts = [c.start for c in clips]
    assert min(starts) == 0 and max(starts) == 24 and len(set(starts)) == 25  # uniform over [0, n - 16]
    assert clips == fvd_data.plan_real(vids, p)[0]  # seeded by (seed, path)
    # --mirror: the list tiled with flipped copies, then the first 2048 (StyleGAN-V dataset.py:59-62)
    few = videos_of([20] * 1500)
    mirrored, _ = fvd_data.plan_real(few, p, mirror=True)
    assert len(mirrored) == 2048 and [c.flip for c in mirrored] == [False] * 1500 + [True] * 548
    assert [c.video for c in mirrored[1500:]] == list(range(548))


def test_tats_draws_2048_distinct_windows_from_all_windows():
    p = fvd.get_preset("tats-fvd2048-16f")
    vids = videos_of([16, 116] * 200)  # 1 and 101 windows per video
    clips, _ = fvd_data.plan_real(vids, p)
    pairs = {(c.video, c.start) for c in clips}
    assert len(clips) == len(pairs) == 2048
    assert all(0 <= c.start <= vids[c.video].num_frames - 16 for c in clips)
    long = sum(vids[c.video].num_frames == 116 for c in clips)
    assert abs(long / 2048 - 101 / 102) < 0.01  # windows, not videos, are drawn uniformly
    # frame folders: videos are drawn, kept only with more than 16 frames, start in [0, n - 17]
    fclips, short = fvd_data.plan_real(videos_of([16, 17, 30] * 10, frames=True), p)
    assert short == 10 and len(fclips) == 20 and all(c.start <= [0, 0, 13][c.video % 3] for c in fclips)


def test_cdfvd_reads_every_video_and_resamples_generated_sets():
    p = fvd.get_preset("cdfvd-i3d-16f-128px")
    vids = videos_of([20, 10, 30, 18])
    clips, short = fvd_data.plan_real(vids, p)  # video 1 has no window: the next video stands in
    assert short == 1 and [c.video for c in clips] == [0, 2, 2, 3]
    gen = fvd_data.plan_generated(videos_of([20] * 5), p)
    counts = np.bincount([c.video for c in gen])
    assert len(gen) == 2048 and counts.min() >= 409 and counts.max() <= 410  # whole passes, the last cut
    assert len({c.start for c in gen}) == 5  # new random windows each pass
    with pytest.raises(fvd.FVDInputError, match="more than 16 frames"):
        fvd_data.plan_generated(videos_of([16, 20], frames=True), p)


def test_generated_videos_below_the_preset_frames_stop():
    with pytest.raises(fvd.FVDInputError, match="1 of 2 generated videos are shorter than the 16 frames"):
        fvd_data.plan_generated(videos_of([20, 9]), fvd.get_preset("stylegan-v-fvd2048-16f"))


def test_presets_names_aliases_and_retired_names():
    assert fvd.get_preset("stylegan-v-2048-16f") is fvd.get_preset("stylegan-v-fvd2048-16f")
    with pytest.raises(KeyError, match="retired.*tats-fvd2048-16f"):
        fvd.get_preset("ucf101-16f-128")
    for p in fvd.PRESETS.values():  # every choice names an implemented operation
        assert p.video_route in fvd_data.VIDEO_ROUTES and p.real_clips in fvd_presets.CLIP_RULES
        assert p.frame_route in fvd_presets.FRAME_ROUTES and p.gen_clips in fvd_presets.GEN_RULES


class Recorder:
    """A stand-in network that returns per-clip (mean, min, max) padded to 400 and keeps its inputs."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x, **kwargs):
        self.inputs.append((x.clone(), kwargs))
        f = x.float().flatten(1)
        return torch.nn.functional.pad(torch.stack([f.mean(1), f.min(1).values, f.max(1).values], 1), (0, 397))


def test_each_preset_hands_the_network_what_its_source_does(tmp_path):
    clip = torch.full((2, 17, 40, 60, 3), 51, dtype=torch.uint8)
    from test_i3d import FakeDetector

    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(FakeDetector()).save(str(path))
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    # StyleGAN-V: uint8 clips, rescale=True, resize=True, return_features=True.
    ext = fvd.load_extractor("stylegan-v-fvd2048-16f", path, digest)
    out = ext.features(clip)
    assert out.dtype == torch.float64 and out[:, :3].tolist() == [[1.0, 1.0, 1.0]] * 2 and (out[:, 3] == 51).all()
    # k600: our resize to 224 in [-1, 1], the port's own resize and rescale off.
    out = fvd.load_extractor("k600-5to11", path, digest).features(clip)
    assert out[:, :3].tolist() == [[0.0, 0.0, 1.0]] * 2
    torch.testing.assert_close(out[:, 3], torch.full((2,), 2 * 51 / 255 - 1, dtype=torch.float64))
    # TATS: the state-dict network gets float (B, 3, 16, 224, 224) in [-1, 1]; the first 16 frames.
    rec = Recorder()
    fvd.FeatureExtractor(fvd.get_preset("tats-fvd2048-16f"), rec, {}, batch_size=1)(clip)
    assert len(rec.inputs) == 2 and rec.inputs[0][0].shape == (1, 3, 16, 224, 224) and rec.inputs[0][1] == {}
    with pytest.raises(ValueError, match="uint8"):
        ext(clip.float())
    with pytest.raises(ValueError, match="scores 16 frames per clip, got 9"):
        ext(clip[:, :9])


def test_provenance_names_the_ffmpeg_inside_pyav_and_decord():
    import av

    import ulvideo.videoio  # noqa: F401 (loads the decoders)

    v = fvd.provenance()
    assert v["av_ffmpeg"] == av.ffmpeg_version_info
    if importlib.util.find_spec("decord"):
        import decord  # noqa: F401

        assert fvd.provenance()["decord_ffmpeg"].count(".") >= 1


# ---- CLI ----------------------------------------------------------------------------------------


TINY = fvd_presets.Protocol("tiny-test", "tests", "i3d_pretrained_400", 9, 32, "bilinear-tats", "crop-lanczos-tats",
                            "number", "bilinear", "stylegan-v", "first", True, 4, 4, "unbiased", "train")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two folders of 9-frame 32x32 videos, random standard-layout weights, and a reference file."""
    from test_i3d import random_state
    from ulvideo.videoio import write_video

    tmp = tmp_path_factory.mktemp("fvdcli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(fvd.PRESETS, TINY.name, TINY)
        mp.setattr(fvd, "I3D_SIZE", 32)  # keep the network input small on CPU
        weights = tmp / "i3d_pretrained_400.pt"
        torch.save(random_state(0), weights)
        rng = np.random.default_rng(0)
        for folder, kind in (("data/train", "smooth"), ("noise", "noise")):
            (tmp / folder).mkdir(parents=True)
            for i in range(4):
                if kind == "smooth":
                    base = np.linspace(0, 255, 32)[None, :, None] * np.ones((32, 1, 3)) * (i + 1) / 4
                    frames = np.stack([np.roll(base, 2 * t, axis=1) for t in range(9)]).astype(np.uint8)
                else:
                    frames = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
                write_video(tmp / folder / f"v{i}.mp4", frames, fps=8)
        (tmp / "data/train/broken.mp4").write_bytes(b"garbage")
        (tmp / "data/test").mkdir()  # another split: must not be read
        write_video(tmp / "data/test/x.mp4", np.zeros((9, 32, 32, 3), np.uint8), fps=8)
        rc = run_cli(["fvd", "ref", "--data", str(tmp / "data"), "--preset", "tiny-test", "--out",
                      str(tmp / "ref.npz"), "--weights", str(weights), "--batch-size", "2", "--device", "cpu"])
        assert rc == 0
        yield tmp, weights, mp


def run_cli(argv):
    from ulvideo.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.run(args)


def test_cli_ref_records_protocol_weights_versions(tiny):
    tmp, weights, _ = tiny
    stats, meta = FeatureStats.load(tmp / "ref.npz")
    assert stats.count == 4 and sum(meta["skipped"].values()) == 1
    assert meta["data"].endswith("train") and meta["num_clips"] == 4 and meta["mirror"] is False
    assert meta["protocol"] == dataclasses.asdict(TINY)
    assert meta["weights"]["sha256"] == hashlib.sha256(Path(weights).read_bytes()).hexdigest() and "torch" in meta["versions"]
    assert "av_ffmpeg" in meta["versions"]


def test_cli_calc_folder(tiny):
    tmp, weights, _ = tiny
    common = ["--ref", str(tmp / "ref.npz"), "--weights", str(weights), "--batch-size", "2", "--device", "cpu"]
    # The same 9-frame videos: the only window starts at 0, so the clips and the statistics are the same.
    assert run_cli(["fvd", "calc", "--videos", str(tmp / "data/train"), *common, "--out", str(tmp / "same.json")]) == 0
    same = json.loads((tmp / "same.json").read_text())
    assert 0.0 <= same["fvd"] < 1e-6 and same["num_gen"] == 4 and same["preset"] == "tiny-test"
    assert same["weights"]["sha256"] == hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    assert same["source"]["ref_sha256"] == hashlib.sha256(Path(tmp / "ref.npz").read_bytes()).hexdigest()
    assert run_cli(["fvd", "calc", "--videos", str(tmp / "noise"), *common, "--out", str(tmp / "noise.json")]) == 0
    assert json.loads((tmp / "noise.json").read_text())["fvd"] > 1e-3


def test_cli_frame_folders_score_like_the_video_files_they_hold(tiny):
    """StyleGAN-V's layout: one folder of frames per video, read with its frame route."""
    from PIL import Image

    from ulvideo.videoio import read_clip

    tmp, weights, _ = tiny
    for f in sorted((tmp / "data/train").glob("v*.mp4")):
        (tmp / "frames" / f.stem).mkdir(parents=True)
        for i, frame in enumerate(read_clip(f, 0, 9)):
            Image.fromarray(frame).save(tmp / "frames" / f.stem / f"frame_{i}.png")
    out = tmp / "frames.json"
    assert run_cli(["fvd", "calc", "--videos", str(tmp / "frames"), "--ref", str(tmp / "ref.npz"), "--weights",
                    str(weights), "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["num_gen"] == 4 and res["fvd"] < 1e-6  # 32x32 frames: the route leaves the decoded pixels as they are
    assert run_cli(["fvd", "ref", "--data", str(tmp / "frames"), "--preset", "tiny-test", "--mirror", "--weights",
                    str(weights), "--device", "cpu", "--out", str(tmp / "mirrored.npz")]) == 0
    stats, meta = FeatureStats.load(tmp / "mirrored.npz")
    assert meta["mirror"] is True and stats.count == 4  # 4 videos + 4 flipped copies, the first 4 (num_real)


def test_cli_calc_streams_from_a_pipeline(tiny, monkeypatch):
    tmp, weights, _ = tiny
    import ulvideo.cli as cli

    calls = []

    def pipe(prompts, seed, **sampling):
        assert sampling == {"steps": 5, "decoder_steps": 32, "sampler": "ddim", "guidance": 1.0}
        calls.append((list(prompts), seed))
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (len(prompts), 17, 32, 32, 3), generator=g, dtype=torch.uint8)

    monkeypatch.setattr(cli, "_fvd_pipeline", lambda args: pipe)
    (tmp / "prompts.txt").write_text("a red circle\n\na blue square\nthree\n")
    out = tmp / "gen.json"
    assert run_cli(["fvd", "calc", "--export", "s1", "--base", "s2", "--prompts", str(tmp / "prompts.txt"),
                    "--ref", str(tmp / "ref.npz"), "--weights", str(weights), "--batch-size", "3", "--seed", "7",
                    "--steps", "5", "--sampler", "ddim", "--device", "cpu", "--out", str(out)]) == 0
    assert calls == [(["a red circle", "a blue square", "three"], 7), (["a red circle"], 8)]
    res = json.loads(out.read_text())
    assert res["num_gen"] == 4 and res["fvd"] > 0 and res["source"]["seed"] == 7 and res["source"]["steps"] == 5


def _one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def test_cli_bad_inputs_give_one_line_and_status_2(tiny, capsys):
    from test_i3d import random_state

    tmp, weights, _ = tiny
    base = ["--weights", str(weights), "--device", "cpu"]
    ref = lambda data, *extra: run_cli(["fvd", "ref", "--data", str(data), "--preset", "tiny-test", "--out",
                                        str(tmp / "never.npz"), *extra])
    (tmp / "empty").mkdir()
    _one_line_error(capsys, ref(tmp / "empty", *base), "has no videos", "folders of frames")
    short = tmp / "short"
    short.mkdir()
    from ulvideo.videoio import write_video

    write_video(short / "a.mp4", np.zeros((5, 32, 32, 3), np.uint8), fps=8)
    _one_line_error(capsys, ref(short, *base), "the 9 frames preset tiny-test scores", "longest: 5")
    calc = lambda *extra: run_cli(["fvd", "calc", "--ref", str(tmp / "ref.npz"), *base, *extra])
    _one_line_error(capsys, calc("--videos", str(short)), "shorter than the 9 frames")
    (tmp / "notes.txt").write_text("not statistics\n")
    _one_line_error(capsys, run_cli(["fvd", "calc", "--videos", str(short), "--ref", str(tmp / "notes.txt"), *base]),
                    "not a statistics file")
    # a state dict handed to the TorchScript preset, with and without a confirmed hash
    sd = tmp / "sd.pt"
    torch.save(random_state(2), sd)
    write_video(tmp / "sixteen" / "a.mp4", np.zeros((16, 32, 32, 3), np.uint8), fps=8)
    sv = ["fvd", "ref", "--data", str(tmp / "sixteen"), "--preset", "stylegan-v-fvd2048-16f", "--out", str(tmp / "n.npz"),
          "--weights", str(sd), "--device", "cpu"]
    err = _one_line_error(capsys, run_cli(sv + ["--i3d-sha256", "0" * 64]), "is a PyTorch state dict", "i3d_torchscript.pt")
    err2 = _one_line_error(capsys, run_cli(sv), "is a PyTorch state dict")
    assert "can run code" not in err + err2
    # DataParallel keys
    prefixed = tmp / "prefixed.pt"
    torch.save({f"module.{k}": v for k, v in random_state(3).items()}, prefixed)
    _one_line_error(capsys, ref(tmp / "data", "--weights", str(prefixed), "--device", "cpu"), "'module.'")
    _one_line_error(capsys, run_cli(["fvd", "ref", "--data", str(tmp / "data"), "--preset", "ucf101-16f-128",
                                     "--out", str(tmp / "n.npz")]), "retired")
    assert not (tmp / "never.npz").exists() and not (tmp / "n.npz").exists()


def test_cli_refuses_other_weights(tiny, capsys):
    tmp, _, _ = tiny
    from test_i3d import random_state

    other = tmp / "other.pt"
    torch.save(random_state(1), other)
    rc = run_cli(["fvd", "calc", "--videos", str(tmp / "noise"), "--ref", str(tmp / "ref.npz"),
                  "--weights", str(other), "--device", "cpu"])
    _one_line_error(capsys, rc, "not comparable")


def test_fvd_help_lists_every_preset_and_the_window_convention():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ulvideo", "fvd", "ref", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in set(fvd.PRESETS) - {TINY.name}:
        assert name in out
    assert "not at FVD 0 from itself" in out.replace("\n", " ")
