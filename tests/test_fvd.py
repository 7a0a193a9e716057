"""FVD: Frechet distance vs SciPy and closed forms, mergeable float64 statistics, presets, CLI."""
import hashlib
from pathlib import Path
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from ulvideo.eval import fvd
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
    p = fvd.get_preset("ucf101-16f-128")
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


@pytest.mark.parametrize("name", ["ucf101-16f-128", "k600-5to11"])
@pytest.mark.parametrize("v", [0, 37, 128, 255])
def test_value_range_maps_uint8_to_minus_one_one(name, v):
    x = fvd.i3d_input(torch.full((1, 9, 20, 30, 3), v, dtype=torch.uint8), fvd.get_preset(name))
    torch.testing.assert_close(x, torch.full_like(x, 2 * v / 255 - 1), atol=1e-6, rtol=0)


def test_resolution_is_short_side_then_centre_crop():
    # 32x64 clip: a 200-valued middle half between zero quarters. At 16x16 the short side halves
    # (16x32) and the centre 16 columns are exactly the middle half, still 200 after bilinear.
    x = torch.zeros(1, 9, 32, 64, 3, dtype=torch.uint8)
    x[:, :, :, 16:48] = 200
    y = fvd.to_resolution(x, 16)
    assert y.shape == (1, 9, 16, 16, 3) and (y == 200).all()
    square = x[:, :, :, 16:48]
    assert torch.equal(fvd.to_resolution(square, 32), square)  # already R x R: untouched


def test_clip_start_reproducible_and_in_range():
    p = fvd.get_preset("ucf101-16f-128")
    starts = [fvd.clip_start(100, p, f"v{i}.mp4") for i in range(50)]
    assert starts == [fvd.clip_start(100, p, f"v{i}.mp4") for i in range(50)]
    assert all(0 <= s <= 100 - 16 for s in starts) and len(set(starts)) > 10
    assert fvd.clip_start(15, p, "a") is None and fvd.clip_start(16, p, "a") == 0
    strided = fvd.Protocol(**{**p.__dict__, "frame_stride": 3})
    assert fvd.clip_span(strided) == 46 and fvd.clip_start(45, strided, "a") is None


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
    # StyleGAN-V: uint8 clips at the dataset resolution, rescale=True, resize=True, return_features=True.
    ext = fvd.load_extractor("stylegan-v-2048-16f", path, digest)
    out = ext(clip)
    assert out.dtype == torch.float64 and out[:, :3].tolist() == [[1.0, 1.0, 1.0]] * 2 and (out[:, 3] == 51).all()
    # k600: our resize to 224 in [-1, 1], the port's own resize and rescale off.
    out = fvd.load_extractor("k600-5to11", path, digest)(clip)
    assert out[:, :3].tolist() == [[0.0, 0.0, 1.0]] * 2
    torch.testing.assert_close(out[:, 3], torch.full((2,), 2 * 51 / 255 - 1, dtype=torch.float64))
    # ucf101: the state-dict network gets float (B, 3, T, 224, 224) in [-1, 1] from 128x128 clips.
    rec = Recorder()
    fvd.FeatureExtractor(fvd.get_preset("ucf101-16f-128"), rec, {}, batch_size=1)(clip)
    assert len(rec.inputs) == 2 and rec.inputs[0][0].shape == (1, 3, 17, 224, 224) and rec.inputs[0][1] == {}
    with pytest.raises(ValueError, match="uint8"):
        ext(clip.float())


# ---- CLI ----------------------------------------------------------------------------------------


TINY = fvd.Protocol("tiny-test", "tests", "i3d_pretrained_400", 9, 1, "random", 32, "bilinear", 4, 4,
                    "unbiased", "train")


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
    assert meta["data"].endswith("train") and meta["num_clips"] == 4
    assert meta["protocol"] == {**TINY.__dict__, "value_range": list(TINY.value_range)}
    assert meta["weights"]["sha256"] == hashlib.sha256(Path(weights).read_bytes()).hexdigest() and "torch" in meta["versions"]


def test_cli_calc_folder(tiny):
    tmp, weights, _ = tiny
    common = ["--ref", str(tmp / "ref.npz"), "--weights", str(weights), "--batch-size", "2", "--device", "cpu"]
    # The same 9-frame videos: the random start is 0, so the clips and the statistics are the same.
    assert run_cli(["fvd", "calc", "--videos", str(tmp / "data/train"), *common, "--out", str(tmp / "same.json")]) == 0
    same = json.loads((tmp / "same.json").read_text())
    assert 0.0 <= same["fvd"] < 1e-6 and same["num_gen"] == 4 and same["preset"] == "tiny-test"
    assert same["weights"]["sha256"] == hashlib.sha256(Path(weights).read_bytes()).hexdigest() and same["ref"]["sha256"] == hashlib.sha256(Path(tmp / "ref.npz").read_bytes()).hexdigest()
    assert run_cli(["fvd", "calc", "--videos", str(tmp / "noise"), *common, "--out", str(tmp / "noise.json")]) == 0
    assert json.loads((tmp / "noise.json").read_text())["fvd"] > 1e-3


def test_cli_calc_streams_from_a_pipeline(tiny):
    tmp, weights, mp = tiny
    calls = []

    def pipe(prompts, seed, **sampling):
        assert sampling == {"steps": 5, "decoder_steps": 32, "sampler": "ddim", "guidance": 1.0}
        calls.append((list(prompts), seed))
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 256, (len(prompts), 17, 32, 32, 3), generator=g, dtype=torch.uint8)

    mp.setattr(fvd, "_load_pipeline", lambda args: (pipe, None))
    (tmp / "prompts.txt").write_text("a red circle\n\na blue square\nthree\n")
    out = tmp / "gen.json"
    assert run_cli(["fvd", "calc", "--export", "s1", "--base", "s2", "--prompts", str(tmp / "prompts.txt"),
                    "--ref", str(tmp / "ref.npz"), "--weights", str(weights), "--batch-size", "3", "--seed", "7", "--steps", "5", "--sampler", "ddim",
                    "--device", "cpu", "--out", str(out)]) == 0
    assert calls == [(["a red circle", "a blue square", "three"], 7), (["a red circle"], 8)]
    res = json.loads(out.read_text())
    assert res["num_gen"] == 4 and res["fvd"] > 0 and res["source"]["seed"] == 7 and res["source"]["steps"] == 5


def test_cli_refuses_other_weights(tiny, capsys):
    tmp, _, _ = tiny
    from test_i3d import random_state

    other = tmp / "other.pt"
    torch.save(random_state(1), other)
    assert run_cli(["fvd", "calc", "--videos", str(tmp / "noise"), "--ref", str(tmp / "ref.npz"),
                    "--weights", str(other), "--device", "cpu"]) == 2
    assert "not comparable" in capsys.readouterr().err
