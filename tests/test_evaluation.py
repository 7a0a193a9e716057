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

    def noisy_latent(self, z, g):
        return z

    def decode(self, z0, frames, steps, sampler, g):
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
