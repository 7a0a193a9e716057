"""Rate-distortion on real footage: UL's loss-factor dial, the KL-VAE baseline and x264 / x265, all
on the same held-out clips.

    python benchmarks/real_footage.py build --out data/real64x33 --frames 33 --size 64 --pans 6 --zooms 6
    python benchmarks/real_footage.py build --out data/real64x9 --frames 9 --size 64
    python benchmarks/rate_distortion.py            # the full sweep
    python benchmarks/rate_distortion.py --quick    # UL at 1.5 against the KL-VAE at 0.01, two runs at once
    python benchmarks/rate_distortion.py --export runs/real_48/exports/latest.safetensors --out m.json
                                                    # measure exports you trained; no sweep

Every point trains `--config` (configs/ul/real_48.yaml) on `--train-data` with one change: UL at
each loss factor of `--loss-factors`, the KL-VAE (`ul.model: kl_vae`, the same networks, steps and
start-up) at each KL weight of `--kl-weights`. Each stage-1 export then gets its prior refined on
its own frozen latents (`stage: prior`, `--refine-steps`; the encoder and decoder are bit-for-bit
those of stage 1), so every rate is a diffusion prior fitted to the latents it measures, the
KL-VAE's as UL's (the paper's Table 5 measures the baseline's bits with a diffusion model too).

Measured on the test split of `--test-data` (clips of kinds `--kinds`, centre-cropped to the
config's size at its resolution, as the loader crops held-out clips):
* bits per pixel: the prior's ELBO of z_clean at lambda_0, K = 32 stratified logSNRs per clip
  (fixed seed), divided by T*H*W; for the KL-VAE also its own KL to N(0, I);
* PSNR and SSIM (ulvideo.eval.metrics, uint8) of reconstructions: z0 sampled, DDPM with
  `--decoder-steps` steps, noise seeded per batch;
* the decoder gain: bits per clip the decoder saves with the right latent (~0: collapsed);
* x264 and x265 (benchmarks/codec_rd.py, PyAV, yuv420p, preset medium) at the CRFs of `--crfs` on
  the same uint8 clips, bits summed from the packets.

Runs are cached by their content: a run directory is named by a hash of the resolved config and of
the training files' bytes, and a measurement by the export's hash and the test clips', so a rerun
(or a longer sweep) trains and measures only what is missing. Prints one JSON line per point and
writes `--out` (JSON) and a PNG beside it; the summary says whether bits and PSNR rise with the loss
factor, whether UL dominates the KL-VAE, and UL's bits over x265's at equal PSNR.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))

CONFIG = "configs/ul/real_48.yaml"
REFINE_CONFIG = "configs/ul/real_48_prior.yaml"
LOSS_FACTORS = (1.5, 2.0, 3.0, 5.0)
KL_WEIGHTS = (1e-3, 1e-2, 1e-1)
CRFS = (18, 23, 28, 33, 38, 43, 48, 51)
# the quick sweep: UL at the paper's loss factor against the KL-VAE and the codecs, its two training
# runs at once (one thread each on a 2-core machine), rates from the jointly trained priors; its
# runs are the full sweep's (the same configs: cached)
QUICK = {"loss_factors": (1.5,), "kl_weights": (1e-2,), "steps": 300, "refine_steps": 0, "decoder_steps": 16,
         "parallel": 2, "crfs": (18, 28, 38, 48)}


# --------------------------------------------------------------------------------------------
# Content hashes and cached runs.
# --------------------------------------------------------------------------------------------


def tree_sha256(path: str | Path) -> str:
    """sha256 over the relative paths and bytes of every file under `path` (sorted)."""
    from ulvideo.exports import file_sha256

    root, h = Path(path), hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + file_sha256(f).encode() + b"\0")
    return h.hexdigest()


def config_key(cfg_dict: dict, data_sha: str) -> str:
    """What a stage-1 run depends on: the resolved config without the data's location, and the data's bytes."""
    d = json.loads(json.dumps(cfg_dict))
    for k in ("path", "image_path", "manifest"):
        d["data"].pop(k, None)
    return hashlib.sha256(json.dumps({"config": d, "data": data_sha}, sort_keys=True).encode()).hexdigest()[:12]


def train_run(config: str, overrides: list[str], data: str, runs: Path, label: str, data_sha: str,
              env: dict | None = None) -> Path:
    """Train (or reuse) one stage-1 run; its export."""
    from ulvideo.config import load_config, to_dict

    overrides = [f"--data.path={data}", "--eval.every=0", *overrides]
    cfg = load_config(ROOT / config, overrides)
    run = runs / f"{label}-{config_key(to_dict(cfg), data_sha)}"
    overrides.append(f"--train.ckpt_every={cfg.train.steps}")
    export = run / "exports" / "latest.safetensors"
    if not _finished(export, cfg.train.steps):
        subprocess.run([sys.executable, "-m", "ulvideo", "train", str(ROOT / config), "--run-dir", str(run), *overrides],
                       cwd=ROOT, check=True, env=env)
    return export


def refine_run(config: str, export: Path, steps: int, data: str, overrides: list[str], env: dict | None = None) -> Path:
    """The stage-1 export with its prior refined on its own frozen latents (`config`, a `stage: prior`
    config, for `steps` steps); the export itself for steps = 0."""
    from ulvideo.config import load_config, to_dict

    if steps <= 0:
        return export
    cfg = to_dict(load_config(ROOT / config, [*overrides, f"--train.steps={steps}"]))
    cfg["prior"].pop("stage1_export", None)  # inside the stage-1 run directory: that export
    run = export.parent.parent / f"prior_refine-{config_key(cfg, '')}"
    out = run / "exports" / "latest.safetensors"
    if not _finished(out, steps, key="prior_refine_steps"):
        subprocess.run([sys.executable, "-m", "ulvideo", "train", str(ROOT / config), "--run-dir", str(run), *overrides,
                        f"--prior.stage1_export={export}", f"--data.path={data}", f"--train.steps={steps}",
                        f"--train.ckpt_every={steps}", "--eval.every=0"], cwd=ROOT, check=True, env=env)
    return out


def _finished(export: Path, steps: int, key: str = "step") -> bool:
    meta = export.with_suffix(".json")
    return export.is_file() and meta.is_file() and json.loads(meta.read_text())["meta"].get(key, -1) >= steps


# --------------------------------------------------------------------------------------------
# Test clips and measurements.
# --------------------------------------------------------------------------------------------


def test_clips(data: str, kinds: list[str], size: int, limit: int | None) -> tuple[list[str], np.ndarray]:
    """Paths and uint8 clips (N, T, size, size, 3) of the test split, centre-cropped to `size`."""
    from codec_rd import load_split

    rows, clips = load_split(data, "test", kinds)
    if not clips:
        raise SystemExit(f"rate_distortion: no test clips of kinds {kinds} in {data}")
    frames = min(c.shape[0] for c in clips)
    out = []
    for c in clips:
        h, w = c.shape[1:3]
        if min(h, w) < size:
            raise SystemExit(f"rate_distortion: test clips are {h}x{w}, smaller than the config's {size}")
        y, x = (h - size) // 2, (w - size) // 2
        out.append(c[:frames, y:y + size, x:x + size])
    paths = [r["path"] for r in rows]
    return (paths[:limit], np.stack(out[:limit])) if limit else (paths, np.stack(out))


def measure(export: Path, clips: np.ndarray, decoder_steps: int, sampler: str, batch: int, cache: Path) -> dict:
    """Bits per pixel (K = 32), PSNR, SSIM and decoder gain of one export on the clips; cached."""
    import torch

    from ulvideo.baselines import KLVAE
    from ulvideo.eval.metrics import psnr, ssim
    from ulvideo.exports import file_sha256, load_stage1

    key = hashlib.sha256(f"{file_sha256(export)} {hashlib.sha256(clips.tobytes()).hexdigest()} {decoder_steps} "
                         f"{sampler}".encode()).hexdigest()[:12]
    f = cache / f"measure-{key}.json"
    if f.is_file():
        return json.loads(f.read_text())
    m = load_stage1(export)
    x_all = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    t, h, w = x_all.shape[2:]
    bits, ps, ss, gain, kl = [], [], [], [], []
    with torch.no_grad():
        for i in range(0, len(x_all), batch):
            x = x_all[i:i + batch]
            z = m.encode(x)
            bits.append(m.rate_bits(z, 32, seed=0))
            recon = m.decode(m.noisy_latent(z, i), decoder_steps, sampler, seed=i)
            ps.append(psnr(x, recon))
            ss.append(ssim(x, recon))
            gain.append(m.decoder_gain(x, torch.Generator().manual_seed(i)))
            if isinstance(m, KLVAE):
                mean, logvar = m.posterior(x)
                kl.append(0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).flatten(1).sum(1) / math.log(2))
    bits_t = torch.cat(bits).double()
    out = {"clips": len(x_all), "bits_per_clip": bits_t.mean().item(), "bpp": bits_t.mean().item() / (t * h * w),
           "psnr": torch.cat(ps).mean().item(), "ssim": torch.cat(ss).mean().item(),
           "decoder_gain_bits_per_clip": torch.cat(gain).mean().item(),
           "per_clip": {"bpp": [round(v / (t * h * w), 5) for v in bits_t.tolist()],
                        "psnr": [round(v, 3) for v in torch.cat(ps).tolist()]}}
    if kl:
        out["vae_kl_bpp"] = torch.cat(kl).mean().item() / (t * h * w)
    f.write_text(json.dumps(out))
    return out


# --------------------------------------------------------------------------------------------
# What the points say.
# --------------------------------------------------------------------------------------------


def monotone(rows: list[dict]) -> dict:
    """Do bits and PSNR rise with the loss factor (the paper's Table 2)?"""
    rows = sorted(rows, key=lambda r: r["loss_factor"])
    up = lambda k: all(b[k] > a[k] for a, b in zip(rows, rows[1:]))  # noqa: E731
    return {"bits_rise": up("bpp"), "psnr_rise": up("psnr"), "ssim_rise": up("ssim")}


def dominance(ul: list[dict], vae: list[dict]) -> dict:
    """For every KL-VAE point, a UL point with higher PSNR at no more bits?"""
    per = []
    for v in vae:
        better = [u["loss_factor"] for u in ul if u["psnr"] > v["psnr"] and u["bpp"] <= v["bpp"]]
        per.append({"kl_weight": v["kl_weight"], "dominated_by_loss_factors": better})
    return {"ul_dominates_kl_vae": all(p["dominated_by_loss_factors"] for p in per), "per_point": per}


def codec_bpp_at(psnr_db: float, codec: list[dict]) -> float | None:
    """The codec's bits per pixel at a PSNR, interpolated linearly in log(bpp) between its CRF points
    (None outside their range)."""
    pts = sorted((r["psnr"], math.log(r["bpp"])) for r in codec)
    ps = [p for p, _ in pts]
    if not ps or psnr_db < ps[0] or psnr_db > ps[-1]:
        return None
    return math.exp(float(np.interp(psnr_db, ps, [b for _, b in pts])))


def beaten_by(point: dict, codec: list[dict]) -> list[int]:
    """The codec's CRFs with a higher PSNR at no more bits per pixel than `point` (where the
    equal-PSNR ratio has no value: `point` below the codec's PSNR range)."""
    return [r["crf"] for r in codec if r["psnr"] > point["psnr"] and r["bpp"] <= point["bpp"]]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    series = [("UL (loss factor)", result["ul"], "loss_factor", "o-", "C0"),
              ("KL-VAE (KL weight)", result["kl_vae"], "kl_weight", "s-", "C3")]
    series += [(f"{c['codec']} (CRF)", c["records"], "crf", ".--", col) for c, col in zip(result["codecs"], ("C2", "C1"))]
    for ax, metric in zip(axes, ("psnr", "ssim")):
        for name, rows, label, style, col in series:
            rows = sorted(rows, key=lambda r: r["bpp"])
            ax.plot([r["bpp"] for r in rows], [r[metric] for r in rows], style, color=col, label=name)
            if label != "crf":
                for r in rows:
                    ax.annotate(f"{r[label]:g}", (r["bpp"], r[metric]), fontsize=7, textcoords="offset points",
                                xytext=(3, -9))
        ax.set_xscale("log")
        ax.set_xlabel("bits / pixel")
        ax.set_ylabel("PSNR (dB)" if metric == "psnr" else "SSIM")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    p = result["protocol"]
    fig.suptitle(f"{p['num_clips']} held-out clips {p['clip']}; UL/KL-VAE: {p['steps']} steps, "
                 f"{p['sampler']} {p['decoder_steps']} steps, K = {p['rate_logsnr_samples']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    from _runs import parse_with_overrides

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--refine-config", default=REFINE_CONFIG, help="the prior refinement's config (stage: prior)")
    p.add_argument("--train-data", default="data/real64x33/train", help="the training clips (a folder of videos)")
    p.add_argument("--test-data", default="data/real64x9", help="a real_footage.py build whose test split is measured")
    p.add_argument("--kinds", default="video,pan,zoom")
    p.add_argument("--quick", action="store_true", help=f"loss factors, KL weights and steps of {QUICK}")
    p.add_argument("--loss-factors", default=None)
    p.add_argument("--kl-weights", default=None)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's; quick: 300)")
    p.add_argument("--refine-steps", type=int, default=None, help="prior refinement steps after stage 1 (0 = none)")
    p.add_argument("--decoder-steps", type=int, default=None, help="DDPM steps of the reconstructions (default 32)")
    p.add_argument("--sampler", default="ddpm", choices=("ddpm", "ddim"))
    p.add_argument("--crfs", default=None, help=f"x264/x265 CRFs ('' = no codecs; default {','.join(map(str, CRFS))})")
    p.add_argument("--clips", type=int, default=None, help="measure only the first N test clips")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--parallel", type=int, default=None,
                   help="training runs at once, each with its share of the CPU threads (default 1; quick: 2)")
    p.add_argument("--runs", default="runs/rate_distortion")
    p.add_argument("--out", default=None, help="default benchmarks/results/rate_distortion[_quick].json")
    p.add_argument("--export", action="append", default=[],
                   help="measure this stage-1 export (repeatable) on the test clips instead of training the sweep")
    args, overrides = parse_with_overrides(p) if argv is None else (p.parse_known_args(argv))
    if argv is not None:
        bad = [a for a in overrides if not (a.startswith("--") and "=" in a)]
        if bad:
            p.error(f"unrecognized arguments: {' '.join(bad)}")
    q = QUICK if args.quick else {}
    args.parallel = args.parallel or q.get("parallel", 1)
    factors = [float(v) for v in args.loss_factors.split(",")] if args.loss_factors else list(q.get("loss_factors", LOSS_FACTORS))
    betas = [float(v) for v in args.kl_weights.split(",")] if args.kl_weights else list(q.get("kl_weights", KL_WEIGHTS))
    from ulvideo.config import load_config

    base = load_config(ROOT / args.config, overrides)
    steps = args.steps or q.get("steps", base.train.steps)
    refine_cfg = load_config(ROOT / args.refine_config, overrides)
    refine = args.refine_steps if args.refine_steps is not None else q.get("refine_steps", refine_cfg.train.steps)
    dsteps = args.decoder_steps or q.get("decoder_steps", 32)
    user_overrides, overrides = overrides, [*overrides, f"--train.steps={steps}"]
    train_data, runs = str(Path(args.train_data)), ROOT / args.runs
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data_sha = tree_sha256(train_data)
    paths, clips = test_clips(args.test_data, args.kinds.split(","), base.data.height, args.clips)
    if args.export:
        return measure_exports(args, paths, clips, dsteps)
    from codec_rd import crf_sweep

    result: dict = {
        "what": "rate_distortion",
        "command": "python benchmarks/rate_distortion.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "protocol": {"config": args.config, "overrides": overrides, "train_data": train_data,
                     "train_data_sha256": data_sha[:16], "test_data": args.test_data, "kinds": args.kinds,
                     "clip": "x".join(map(str, clips.shape[1:4])), "num_clips": len(clips), "steps": steps,
                     "prior_refine_steps": refine, "sampler": args.sampler, "decoder_steps": dsteps,
                     "latent_noise": "sample", "rate_logsnr_samples": 32, "latent_logsnr": base.ul.latent_logsnr,
                     "prior_logsnr_min": base.ul.prior_logsnr_min, "sigmoid_bias": base.ul.sigmoid_bias},
        "clips": paths, "ul": [], "kl_vae": [], "codecs": []}

    # Training runs as subprocesses, up to --parallel at once, each with its share of the CPU threads
    # (or all of them when alone); measurements follow, one at a time, in this process.
    env = dict(os.environ)
    if args.parallel > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parallel))
    points = [("ul", "loss_factor", c, f"ul_lf{c:g}", ["--ul.model=unified", f"--ul.loss_factor={c}"]) for c in factors]
    points += [("kl_vae", "kl_weight", b, f"klvae_b{b:g}", ["--ul.model=kl_vae", f"--ul.kl_weight={b}"]) for b in betas]

    def trained(pt) -> Path:
        return refine_run(args.refine_config, train_run(args.config, [*overrides, *pt[4]], train_data, runs, pt[3],
                                                         data_sha, env), refine, train_data, user_overrides, env)

    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        exports = list(pool.map(trained, points))
    for (kind, key, value, _, _), export in zip(points, exports):
        row = measure(export, clips, dsteps, args.sampler, args.batch, export.parent)
        row = {key: value, "export": str(export.relative_to(ROOT) if export.is_relative_to(ROOT) else export), **row}
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "per_clip"}),
              flush=True)
        result[kind].append(row)
    crfs = [int(c) for c in args.crfs.split(",") if c] if args.crfs is not None else list(q.get("crfs", CRFS))
    for codec in ("libx264", "libx265") if crfs else ():
        recs = crf_sweep(list(clips), codec, crfs)
        result["codecs"].append({"codec": codec, "records": [{k: r[k] for k in (
            "crf", "bpp", "psnr", "ssim", "bits_per_clip", "format_psnr", "encoder", "preset", "pix_fmt")} for r in recs]})
    x265 = result["codecs"][1]["records"] if crfs else []
    summary = {"monotone_in_loss_factor": monotone(result["ul"]) if len(result["ul"]) > 1 else None,
               "dominance": dominance(result["ul"], result["kl_vae"]), "ul_over_x265_bits_at_equal_psnr": []}
    for r in result["ul"]:
        ref = codec_bpp_at(r["psnr"], x265)
        summary["ul_over_x265_bits_at_equal_psnr"].append(
            {"loss_factor": r["loss_factor"], "psnr": round(r["psnr"], 3), "x265_bpp": ref,
             "ratio": None if ref is None else round(r["bpp"] / ref, 4),
             "x265_crfs_with_more_psnr_at_fewer_bits": beaten_by(r, x265)})
    result["summary"] = summary
    result["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "rate_distortion_quick.json" if args.quick else "rate_distortion.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps(summary))
    return result


def measure_exports(args, paths: list[str], clips: np.ndarray, dsteps: int) -> dict:
    """`--export`: the measurements of given exports, one JSON line each; `--out` if given."""
    rows = []
    for e in args.export:
        export = Path(e).with_suffix(".safetensors")
        if not export.is_file():
            raise SystemExit(f"rate_distortion: --export {e}: no such export")
        row = {"export": str(export), **measure(export, clips, dsteps, args.sampler, args.batch, export.parent)}
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if k != "per_clip"}),
              flush=True)
        rows.append(row)
    result = {"what": "rate_distortion exports",
              "command": "python benchmarks/rate_distortion.py " + shlex.join(sys.argv[1:]),
              "test_data": args.test_data, "kinds": args.kinds, "clips": paths,
              "clip": "x".join(map(str, clips.shape[1:4])), "sampler": args.sampler, "decoder_steps": dsteps,
              "latent_noise": "sample", "rate_logsnr_samples": 32, "exports": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
