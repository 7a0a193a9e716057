"""PSNR vs closed form, SSIM vs scikit-image, and the held-out accumulator vs one-shot references."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from ulvideo.eval import metrics
from ulvideo.eval.metrics import FeatureStats, ReconstructionMetrics, frechet_distance


def test_psnr_closed_form():
    # A quarter of the values off by d: MSE = d^2 / 4.
    real = torch.full((2, 5, 16, 16, 3), 100, dtype=torch.uint8)
    recon = real.clone()
    recon[0, :, :8, :8] += 20
    recon[1, :, 8:, :] -= 7
    expect = [10 * math.log10(255 ** 2 / (20 ** 2 / 4)), 10 * math.log10(255 ** 2 / (7 ** 2 / 2))]
    np.testing.assert_allclose(metrics.psnr(real, recon).numpy(), expect, rtol=1e-12)
    assert metrics.psnr(real, real).tolist() == [metrics.PSNR_CAP_DB] * 2


def test_float_clips_are_quantised_like_files():
    # float (B, 3, T, H, W) in [-1, 1] is scored as its uint8 rounding: the value written to disk.
    rng = np.random.default_rng(0)
    u8 = torch.from_numpy(rng.integers(0, 256, (2, 3, 12, 12, 3), dtype=np.uint8))
    f = u8.permute(0, 4, 1, 2, 3).double() / 127.5 - 1 + 0.001  # less than half a level away
    torch.testing.assert_close(metrics.as_uint8_clips(f.float()), u8)
    recon = torch.from_numpy(rng.integers(0, 256, u8.shape, dtype=np.uint8))
    torch.testing.assert_close(metrics.psnr(f.float(), recon), metrics.psnr(u8, recon))


def smooth_clip(rng, t, h, w):
    base = rng.integers(0, 256, (t, h // 4 + 1, w // 4 + 1, 3)).astype(np.float64)
    up = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)[:, :h, :w]
    return np.clip(up + rng.normal(0, 12, up.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("h,w", [(32, 32), (23, 41)])
def test_ssim_matches_skimage(h, w):
    rng = np.random.default_rng(h * w)
    real = np.stack([smooth_clip(rng, 3, h, w) for _ in range(2)])
    recon = np.clip(real.astype(np.int16) + rng.integers(-30, 31, real.shape), 0, 255).astype(np.uint8)
    ours = metrics.ssim(torch.from_numpy(real), torch.from_numpy(recon)).numpy()
    ref = [np.mean([structural_similarity(real[b, t], recon[b, t], gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False, data_range=255, channel_axis=-1)
                    for t in range(3)]) for b in range(2)]
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)
    assert metrics.ssim(torch.from_numpy(real), torch.from_numpy(real)).tolist() == pytest.approx([1.0, 1.0])


def test_ssim_rejects_tiny_frames():
    x = torch.zeros(1, 2, 10, 10, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim(x, x)


class FakeExtractor:
    """Deterministic 6-d features of a uint8 clip (per-channel mean and std), with the extractor API."""

    dim = 6
    device = torch.device("cpu")

    weights = {"sha256": "0" * 64}

    class protocol:  # scores the first 3 frames of a clip, as FeatureExtractor scores its preset's
        name = "fake"
        covariance = "unbiased"
        num_frames = 3

    def __call__(self, clips):
        x = torch.as_tensor(clips)
        if x.shape[1] < self.protocol.num_frames:
            raise ValueError(f"preset fake scores 3 frames per clip, got {x.shape[1]}")
        x = x[:, :self.protocol.num_frames].double().flatten(1, 3)  # (B, T*H*W, 3)
        return torch.cat([x.mean(1), x.std(1)], 1)


def test_accumulator_equals_one_shot_reference():
    rng = np.random.default_rng(1)
    real = torch.from_numpy(np.stack([smooth_clip(rng, 4, 16, 16) for _ in range(7)]))
    recon = torch.from_numpy(np.clip(real.numpy().astype(np.int16) + rng.integers(-9, 10, real.shape), 0, 255)
                             .astype(np.uint8))
    ext = FakeExtractor()
    acc = ReconstructionMetrics(ext)
    for sl in (slice(0, 3), slice(3, 4), slice(4, 7)):
        acc.update(real[sl], recon[sl])
    out = acc.compute()
    assert out["recon/num_clips"] == 7
    assert out["recon/psnr"] == pytest.approx(float(metrics.psnr(real, recon).mean()), rel=1e-12)
    assert out["recon/ssim"] == pytest.approx(float(metrics.ssim(real, recon).mean()), rel=1e-12)
    fr, fg = ext(real[:, :3]).numpy(), ext(recon[:, :3]).numpy()  # the protocol's frames only
    ref = frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), fg.mean(0), np.cov(fg, rowvar=False))
    assert out["recon/rfvd"] == pytest.approx(ref, rel=1e-8, abs=1e-10)
    assert "recon/lpips" not in out
    assert acc.provenance()["fvd_preset"] == "fake"
    with pytest.raises(ValueError, match="3 frames per clip, got 2"):
        acc.update(real[:, :2], recon[:, :2])


def test_accumulator_without_extractor_and_empty():
    assert ReconstructionMetrics().compute() == {"recon/num_clips": 0.0}
    acc = ReconstructionMetrics()
    x = torch.zeros(1, 2, 12, 12, 3, dtype=torch.uint8)
    acc.update(x, x)
    assert set(acc.compute()) == {"recon/num_clips", "recon/psnr", "recon/ssim"}


def test_feature_stats_load_rejects_other_npz(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a ulvideo statistics file"):
        FeatureStats.load(tmp_path / "x.npz")
