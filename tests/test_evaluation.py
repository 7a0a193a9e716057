"""Scoring of shapes reconstructions (`ulvideo.eval.reports.score_shapes_reconstructions`)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ulvideo.cli import main as cli_main
from ulvideo.config import load_config
from ulvideo.eval.reports import score_shapes_reconstructions
from ulvideo.data.shapes import manifest_specs


class Relay:
    """A stand-in stage 1 whose latent is the clip itself and whose decoder returns it, channels
    permuted by `order`: the scorer then sees the true clips (or their colour-swapped copies)."""

    def __init__(self, order=(0, 1, 2)):
        self.order = list(order)

    def encode(self, x):
        return x

    def rate_bits(self, z, k, seed=0):
        return torch.zeros(z.shape[0])

    def decoder_logsnr_end(self, end=None):
        return 15.0 if end is None else end

    def noisy_latent(self, z, seed):
        return z

    def decode(self, z0, steps, sampler, seed, logsnr_end):
        return z0[:, self.order]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "shapes"
    assert cli_main(["data", "synth", "--out", str(out), "--num", "12", "--frames", "5", "--size", "32", "--seed", "3"]) == 0
    cfg = load_config(None, [f"--data.path={out}", "--data.num_frames=5", "--data.resolution=32", "--data.height=32", "--data.width=32",
                             "--data.num_workers=0"])
    return out, dataclasses.replace(cfg.data, heldout_fraction=1.0)


def test_true_clips_score_perfectly(folder):
    out, data = folder
    got = score_shapes_reconstructions(Relay(), data, out, micro_batch_size=5)
    assert got["clips"] == 12
    assert got["colour_match"] == got["shape_match"] == got["direction_match"] == got["centroid_within_2px"] == 1.0
    assert got["colour_errors"] == []


def test_red_blue_swap_is_scored_per_clip(folder):
    """With R and B swapped only the colours with R = B (white, green, magenta) still match, and
    each other clip is reported as its true colour -> the swapped palette entry."""
    out, data = folder
    specs = manifest_specs(out)
    swapped = {"red": "blue", "blue": "red", "yellow": "cyan", "cyan": "yellow"}
    expect = sorted(f"{s.colour}->{swapped[s.colour]}" for s in specs.values() if s.colour in swapped)
    got = score_shapes_reconstructions(Relay((2, 1, 0)), data, out, micro_batch_size=5)
    assert got["colour_match"] == pytest.approx(1 - len(expect) / 12, abs=1e-4)
    assert sorted(got["colour_errors"]) == expect
    assert got["shape_match"] == got["centroid_within_2px"] == 1.0
    got = score_shapes_reconstructions(Relay((2, 1, 0)), data, out, micro_batch_size=5, limit=5)
    assert got["clips"] == 5  # stops after the batch that reaches the limit


def test_tightness_report_compares_both_models_on_the_same_draws():
    """A base model with the prior's own weights gets exactly the prior's bits (null_over_prior = 1:
    the same times and noise for both), and those bits are the prior's ELBO by plain Monte Carlo."""
    import math

    from ulvideo import diffusion as D
    from ulvideo.eval.reports import tightness_report
    from ulvideo.ul import Condition, LatentDiffusion, UnifiedLatents

    arch = ["--prior.widths=[64]", "--prior.depths=[2]", "--base.widths=[64]", "--base.depths=[2]"]
    cfg = load_config(None, ["--encoder.latent_channels=4", "--base.text_encoder=none", "--base.prediction=x", *arch])
    torch.manual_seed(0)
    stage1 = UnifiedLatents(cfg).eval()
    with torch.no_grad():
        for p in stage1.prior.parameters():  # zero-initialised outputs would make the prior's prediction 0
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)
    base = LatentDiffusion(cfg, cfg).eval()
    base.net.load_state_dict(stage1.prior.state_dict())
    z = torch.randn(3, 4, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    got = tightness_report(stage1, base, z, Condition(), Condition(), num_logsnrs=4, seed=1)
    assert got["latents"] == 3 and got["logsnr_samples"] == 4
    assert got["null_over_prior"] == pytest.approx(1.0, abs=1e-6)
    assert got["base_elbo_cond_bits_per_clip"] == pytest.approx(got["stage1_prior_bits_per_clip"], rel=1e-6)
    # the prior's bits (the mean over 3 clips of K = 4 strata) against 6000 plain uniform draws; the
    # spread over 32 seeds gives the standard error of one estimate
    reports = torch.tensor([stage1.rate_bits(z, 4, seed=s).mean().item() for s in range(32)], dtype=torch.float64)
    assert reports[1].item() == pytest.approx(got["stage1_prior_bits_per_clip"], rel=1e-6)
    g = torch.Generator().manual_seed(2)
    zz = z.repeat(2000, 1, 1, 1, 1)
    with torch.no_grad():
        mc = D.elbo(stage1.prior_denoise, zz, stage1.prior_schedule, cfg.prior.prediction,
                    t=torch.rand(zz.shape[0], generator=g), generator=g).total.double() / math.log(2)
    se = math.sqrt(reports.var().item() / 32 + mc.var().item() / mc.numel())
    assert abs(reports.mean().item() - mc.mean().item()) < 4 * se
    with torch.no_grad():
        for p in base.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert abs(tightness_report(stage1, base, z, Condition(), Condition(), 4, seed=1)["null_over_prior"] - 1) > 1e-3
