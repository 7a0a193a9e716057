"""Unified Latents' claims at toy scale: loss-factor sweep, KL-VAE baseline, MSE decoder, lambda_0 = 10,
decoder sampling steps, and (with --tightness) stage-1 prior bits vs a stage-2 base model's ELBO.

    python benchmarks/ul_sweeps.py --tightness   # about 60 min on a 2-core CPU
    python benchmarks/ul_sweeps.py --quick       # fewer steps and runs (ul_sweeps_quick.json)
    python benchmarks/ul_sweeps.py --frames 9    # on 9-frame clips (about 5x the time per step)

Every run trains configs/ul/tiny.yaml (with overrides; the EMA decay is 1 - 10/steps, so the exported
average forgets the initial weights) for the same number of steps on the built-in shapes data, by
default on 1-frame clips (the causal encoder's image path, the setting of the paper's Table 5), with
the same start-up schedule (rate held for 3/8 of the steps with the start-up term on, then a ramp
over 1/4 of them). The baselines (KL-VAE over a range of beta, MSE decoder) are the stage-1 models
`ul.model` selects (ulvideo/baselines.py). Every run is measured on the held-out clips the same way:
rate in bits per pixel (the diffusion prior's ELBO on the noisy latent, K = 32 stratified logSNRs per
clip; for the KL-VAE also its own KL), PSNR of DDPM reconstructions (the MSE decoder's one pass), and
the decoder gain (bits the decoder saves with the right latent; ~0 = collapsed). Results:
benchmarks/results/ul_sweeps.json (--quick: ul_sweeps_quick.json) and PNG plots beside it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = "configs/ul/tiny.yaml"


def train(name: str, steps: int, overrides: list[str], data: str, runs: Path, frames: int) -> Path:
    run = runs / name
    meta = run / "exports" / "latest.json"
    if not (meta.is_file() and json.loads(meta.read_text())["meta"]["step"] >= steps):
        subprocess.run([sys.executable, "-m", "ulvideo", "train", CONFIG, "--run-dir", str(run),
                        f"--data.path={data}", f"--data.num_frames={frames}", f"--train.steps={steps}", "--eval.every=0",
                        f"--train.ckpt_every={steps}", f"--train.ema_decay={1 - 10 / steps:.4f}", *overrides],
                       cwd=ROOT, check=True)
    return run / "exports" / "latest.safetensors"


@torch.no_grad()
def measure(export: Path, clips: int, decoder_steps: tuple[int, ...] = (32,)) -> dict:
    from ulvideo.baselines import KLVAE
    from ulvideo.data import build_loader
    from ulvideo.exports import load_stage1
    from ulvideo.eval.metrics import psnr

    m = load_stage1(export)
    loader = build_loader(m.cfg.data, micro_batch_size=min(clips, 32), seed=0, split="heldout")
    xs = []
    for batch in loader:
        xs.append(batch["video"])
        if sum(x.shape[0] for x in xs) >= clips:
            break
    x = torch.cat(xs)[:clips]
    t, h, w = x.shape[2:]
    pixels = t * h * w
    z = m.encode(x)
    out = {"heldout_clips": x.shape[0], "bits_per_pixel": m.rate_bits(z, 32, seed=0).mean().item() / pixels,
           "decoder_gain_bits_per_clip": m.decoder_gain(x, torch.Generator().manual_seed(0)).mean().item(),
           "z_clean_std": z.std().item()}
    if isinstance(m, KLVAE):
        mean, logvar = m.posterior(x)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)
        out["vae_kl_bits_per_pixel"] = kl.mean().item() / math.log(2) / pixels
    for steps in decoder_steps:
        recon = m.decode(m.noisy_latent(z, 0), steps, "ddpm", seed=0)
        out[f"psnr_{steps}"] = psnr(x, recon).mean().item()
    out["psnr"] = out[f"psnr_{decoder_steps[0]}"] if 32 not in decoder_steps else out["psnr_32"]
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in out.items()}


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    lf = results["loss_factor_sweep"]
    xs = [r["loss_factor"] for r in lf]
    ax[0].plot(xs, [r["bits_per_pixel"] for r in lf], "o-", label="bits / pixel")
    ax[0].set_xlabel("loss factor c_lf")
    ax[0].set_ylabel("bits / pixel")
    a2 = ax[0].twinx()
    a2.plot(xs, [r["psnr"] for r in lf], "s--", color="C1", label="PSNR")
    a2.set_ylabel("PSNR (dB)")
    ax[0].set_title("loss-factor sweep")
    for name, rows, key in (("UL (c_lf sweep)", lf, "bits_per_pixel"), ("KL-VAE, diffusion-measured", results["vae_beta_sweep"], "bits_per_pixel"),
                            ("KL-VAE, own KL", results["vae_beta_sweep"], "vae_kl_bits_per_pixel")):
        ax[1].plot([r[key] for r in rows], [r["psnr"] for r in rows], "o-", label=name)
    if results.get("mse_decoder"):
        r = results["mse_decoder"]
        ax[1].plot([r["bits_per_pixel"]], [r["psnr"]], "k^", label="UL, MSE decoder")
    ax[1].set_xscale("log")
    ax[1].set_xlabel("bits / pixel")
    ax[1].set_ylabel("PSNR (dB)")
    ax[1].set_title("rate-distortion (equal steps)")
    ax[1].legend(fontsize=8)
    ds = results["decoder_steps"]
    ax[2].plot(list(map(int, ds)), list(ds.values()), "o-")
    ax[2].set_xscale("log")
    ax[2].set_xlabel("decoder sampler steps (DDPM)")
    ax[2].set_ylabel("PSNR (dB)")
    ax[2].set_title("decoder steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--runs", default="runs/sweeps")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--frames", type=int, default=1, help="frames per clip (1 + 4k)")
    p.add_argument("--reference-loss-factor", type=float, default=None,
                   help="c_lf of the run used for the decoder-steps sweep, the lambda_0 = 10 ablation and the tightness "
                        "check (default: configs/ul/tiny.yaml's)")
    p.add_argument("--loss-factors", default=None,
                   help="comma-separated c_lf values (default 1,1.3,1.5,2.1,3; quick: 1,1.5,3; both with the "
                        "reference); runs already trained are reused")
    p.add_argument("--tightness", action="store_true", help="also train a base model (a few more minutes)")
    args = p.parse_args()
    steps = args.steps or (400 if args.quick else 800)
    hold = [f"--ul.rate_hold_steps={3 * steps // 8}", f"--ul.rate_ramp_steps={steps // 4}"]
    runs = ROOT / args.runs / f"frames{args.frames}_steps{steps}"  # a run is reused only by the same setting
    data = ROOT / args.data
    if not (data / "manifest.jsonl").is_file():
        subprocess.run([sys.executable, "-m", "ulvideo", "data", "synth", "--out", str(data), "--num", "512", "--frames", "9",
                        "--size", "32"], cwd=ROOT, check=True)
    t0 = time.time()
    from ulvideo.config import load_config

    cfg = load_config(ROOT / CONFIG)
    ref = cfg.ul.loss_factor if args.reference_loss_factor is None else args.reference_loss_factor
    factors = tuple(sorted({1.0, 1.5, 3.0, ref} if args.quick else {1.0, 1.3, 1.5, 2.1, 3.0, ref}))
    if args.loss_factors:
        factors = tuple(float(v) for v in args.loss_factors.split(","))
    if ref not in factors:
        raise SystemExit(f"--loss-factors must include the reference loss factor {ref}")
    betas = (1e-3, 1e-2) if args.quick else (1e-4, 1e-3, 1e-2)
    res: dict = {"what": "ul_sweeps", "reference_loss_factor": ref, "steps": steps, "frames": args.frames, "config": CONFIG, "rate_hold": hold,
                 "latent_logsnr": cfg.ul.latent_logsnr, "prior_logsnr_min": cfg.ul.prior_logsnr_min,
                 "sigmoid_bias": cfg.ul.sigmoid_bias, "rate_logsnr_samples": 32,
                 "decoder_sampler": "ddpm", "decoder_steps_for_psnr": 32}
    res["loss_factor_sweep"] = []
    for c in factors:
        export = train(f"lf_{c}", steps, [f"--ul.loss_factor={c}", *hold], args.data, runs, args.frames)
        extra = (1, 2, 4, 8, 16, 32, 50) if c == ref else (32,)
        row = {"loss_factor": c, **measure(export, args.clips, extra)}
        if c == ref:
            res["decoder_steps"] = {str(s): row.pop(f"psnr_{s}") for s in extra if s != 32}
            res["decoder_steps"]["32"] = row["psnr"]
            res["decoder_steps"] = dict(sorted(res["decoder_steps"].items(), key=lambda kv: int(kv[0])))
        res["loss_factor_sweep"].append(row)
        print(json.dumps(row), flush=True)
    res["vae_beta_sweep"] = []
    for beta in betas:
        export = train(f"vae_{beta}", steps, ["--ul.model=kl_vae", f"--ul.kl_weight={beta}", "--ul.loss_factor=1.5", *hold], args.data, runs, args.frames)
        row = {"kl_weight": beta, **measure(export, args.clips)}
        res["vae_beta_sweep"].append(row)
        print(json.dumps(row), flush=True)
    export = train("mse_decoder", steps, ["--ul.model=mse_decoder", "--ul.loss_factor=1.5", *hold], args.data, runs, args.frames)
    res["mse_decoder"] = {"loss_factor": 1.5, "mse_sigma": cfg.ul.mse_sigma, **measure(export, args.clips)}
    export = train(f"logsnr0_10_lf{ref}", steps, ["--ul.latent_logsnr=10.0", f"--ul.loss_factor={ref}", *hold], args.data, runs,
                   args.frames)
    res["latent_logsnr_10"] = {"loss_factor": ref, **measure(export, args.clips)}
    if args.tightness:
        res["tightness"] = tightness(runs, runs / f"lf_{ref}" / "exports" / "latest.safetensors", args.data, steps * 2, args.frames)
    res["seconds"] = round(time.time() - t0, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = ("ul_sweeps_quick" if args.quick else "ul_sweeps") + (f"_frames{args.frames}" if args.frames != 1 else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, RESULTS / f"{name}.png")
    print(json.dumps({k: v for k, v in res.items() if k in ("seconds", "steps")}))


def tightness(runs: Path, export: Path, data: str, steps: int, frames: int) -> dict:
    """Stage-1 prior bits vs an unconditional-evaluated base model's ELBO on the same held-out latents."""
    from ulvideo.data import build_loader
    from ulvideo.eval.reports import tightness_report
    from ulvideo.generate import load_pipeline

    tag = export.parent.parent.name  # the stage-1 run: a new one gets its own latents and base model
    shards = runs / f"tight_latents_{tag}"
    subprocess.run([sys.executable, "-m", "ulvideo", "encode", "--export", str(export), "--data", data, "--out", str(shards)],
                   cwd=ROOT, check=True)
    base = runs / f"tight_base_{tag}"
    subprocess.run([sys.executable, "-m", "ulvideo", "train", "configs/base/tiny.yaml", "--run-dir", str(base),
                    f"--base.stage1_export={export}", f"--data.path={shards}", f"--data.num_frames={frames}", f"--train.steps={steps}",
                    "--eval.every=0"], cwd=ROOT, check=True)
    pipe = load_pipeline(export, base / "exports" / "latest.safetensors")
    # the held-out latents from the shards just written (the export's stored path may be stale)
    data_cfg = dataclasses.replace(pipe.base_cfg.data, path=str(shards))
    batch = next(iter(build_loader(data_cfg, micro_batch_size=32, seed=0, split="heldout")))
    z = batch["z_clean"]
    cond, null = pipe.condition(list(batch["caption"]), None, None, tuple(z.shape))
    report = tightness_report(pipe.stage1, pipe.base, z, cond, null, num_logsnrs=32, seed=0)
    return {"base_steps": steps, **report, "relative_gap": round(report["null_over_prior"] - 1, 4)}


if __name__ == "__main__":
    main()
