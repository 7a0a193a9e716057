"""Start-up dynamics of stage 1 on real footage: does the latent collapse, and what prevents it?

    python benchmarks/startup_dynamics.py                         # the variants below, 500 steps each
    python benchmarks/startup_dynamics.py --variants plain,hold --steps 300

Each variant trains `--config` (configs/ul/real_48.yaml, loss factor 1.5) with a few overrides and
logs every 10 steps; runs are cached by a hash of the resolved config and the training files (as in
rate_distortion.py). From each run's metrics.jsonl the script plots, against the step: the rate
(bits per clip, the per-step estimate), the decoder gain (bits per clip the decoder saves with the
right latent instead of another clip's: ~0 means the latent carries nothing it uses), the RMS of
the noisy latent z0 (sigma_0 = 0.082 when z_clean has shrunk to nothing) and the decoder's loss.
A second panel row shows, for the last export of each run, the decoder gain per logSNR band
(held-out clips, the same times and noise for the right and the wrong latent) beside the decoder's
weight c_lf * sigmoid(b - lambda), whose crossing of 1 at lambda* = b + log(c_lf - 1) marks where
sending information through the latent starts to cost more than it saves.
Writes benchmarks/results/startup_dynamics.json and .png.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))

from rate_distortion import test_clips, train_run, tree_sha256  # noqa: E402

CONFIG = "configs/ul/real_48.yaml"
# name: (what it is, overrides)
VARIANTS = {
    "plain": ("exact UL from step 0: no rate hold, no start-up term",
              ["--ul.rate_hold_steps=0", "--ul.rate_ramp_steps=0", "--ul.startup_recon_weight=0"]),
    "x_prior": ("as plain, with the paper's x-prediction prior",
                ["--ul.rate_hold_steps=0", "--ul.rate_ramp_steps=0", "--ul.startup_recon_weight=0",
                 "--prior.prediction=x"]),
    "hold": ("the recipe's rate hold and ramp, no start-up term", ["--ul.startup_recon_weight=0"]),
    "recipe": ("configs/ul/real_48.yaml as it is", []),
}
BANDS = (-15.0, -8.0, -4.0, -2.0, 0.0, 2.0, 4.0, 8.0, 15.0)


def curves(run: Path) -> dict:
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "bits_per_clip" in r]
    keys = ("bits_per_clip", "decoder_gain_bits", "z0_rms", "decoder_loss_bits_per_pixel", "rate_grad_scale")
    return {k: [[r["step"], round(r[k], 4)] for r in rows if k in r] for k in keys}


def gain_by_band(export: Path, clips, seed: int = 0) -> list[dict]:
    """Decoder gain (bits per clip, loss factor included) per logSNR band: the right latent against
    the batch's rolled one, at logSNRs drawn uniformly inside each band."""
    import torch

    from ulvideo import diffusion as D
    from ulvideo.exports import load_stage1

    m = load_stage1(export)
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        z0 = m.noisy_latent(m.encode(x), g)
        sched = m.decoder_schedule
        for lo, hi in zip(BANDS, BANDS[1:]):
            gains = []
            for _ in range(4):
                lam = lo + (hi - lo) * torch.rand(x.shape[0], generator=g)
                t = sched.t_of_logsnr(lam)
                eps = torch.randn(x.shape, generator=g)
                right, _ = m.decoder_loss(x, z0, t=t, eps=eps)
                wrong, _ = m.decoder_loss(x, z0.roll(1, dims=0), t=t, eps=eps)
                gains.append(D.nats_to_bits(m.cfg.ul.loss_factor * (wrong - right)).mean().item())
            out.append({"logsnr_band": [lo, hi], "decoder_gain_bits": round(sum(gains) / len(gains), 2)})
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = (("bits_per_clip", "rate (bits / clip)", True), ("decoder_gain_bits", "decoder gain (bits / clip)", False),
              ("z0_rms", "RMS of z0 (sigma_0 = 0.082)", True), ("decoder_loss_bits_per_pixel", "decoder loss (bits / pixel)", True))
    for ax, (key, title, log) in zip(axes.flat, panels):
        for name, v in result["variants"].items():
            pts = v["curves"].get(key, [])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[1, 0].axhline(0.082, color="k", lw=0.8, ls=":")
    ax = axes[1, 1]
    for name, v in result["variants"].items():
        bands = v.get("gain_by_band", [])
        if bands:
            mids = [sum(b["logsnr_band"]) / 2 for b in bands]
            ax.plot(mids, [b["decoder_gain_bits"] for b in bands], "o-", label=name)
    ax.set_xlabel("decoder logSNR (band centre)")
    ax.set_title("decoder gain per logSNR band, last export")
    ax.grid(alpha=0.3)
    ax = axes[1, 2]
    lam = np.linspace(-15, 15, 301)
    p = result["protocol"]
    c, b = p["loss_factor"], p["sigmoid_bias"]
    ax.plot(lam, c / (1 + np.exp(lam - b)), label=f"c_lf sigmoid(b - lambda), c_lf {c:g}, b {b:g}")
    ax.axhline(1.0, color="k", lw=0.8, ls=":")
    if c > 1:
        ax.axvline(b + math.log(c - 1), color="C3", lw=0.8, ls="--", label="lambda*")
    ax.set_xlabel("decoder logSNR")
    ax.set_title("decoder weight (latent pays off where > 1)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    from _runs import parse_with_overrides

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--train-data", default="data/real64x33/train")
    p.add_argument("--test-data", default="data/real64x9")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--runs", default="runs/startup_dynamics")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup_dynamics.json"))
    args, overrides = parse_with_overrides(p) if argv is None else p.parse_known_args(argv)
    from ulvideo.config import load_config

    cfg = load_config(ROOT / args.config, overrides)
    t0 = time.time()
    data_sha = tree_sha256(args.train_data)
    _, clips = test_clips(args.test_data, ["video", "pan", "zoom"], cfg.data.height, 16)
    result = {"what": "startup_dynamics", "command": "python benchmarks/startup_dynamics.py " + " ".join(
        sys.argv[1:] if argv is None else argv),
              "protocol": {"config": args.config, "overrides": overrides, "steps": args.steps,
                           "loss_factor": cfg.ul.loss_factor, "sigmoid_bias": cfg.ul.sigmoid_bias,
                           "latent_logsnr": cfg.ul.latent_logsnr, "heldout_clips_for_bands": len(clips)},
              "variants": {}}
    for name in args.variants.split(","):
        what, extra = VARIANTS[name]
        export = train_run(args.config, [*overrides, f"--train.steps={args.steps}", "--train.log_every=10", *extra],
                           args.train_data, ROOT / args.runs, name, data_sha)
        result["variants"][name] = {"what": what, "overrides": extra, "curves": curves(export.parent.parent),
                                    "gain_by_band": gain_by_band(export, clips)}
        last = {k: v[-1][1] for k, v in result["variants"][name]["curves"].items() if v}
        print(json.dumps({"variant": name, **last}), flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
