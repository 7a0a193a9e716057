"""Speed of the networks, of a training step per stage and of generation, vs clip shape; parameter counts.

    python benchmarks/nets_speed.py [--size tiny] [--shapes 9x32x32 17x64x64] [--batch 8] [--repeats 3] [--threads N]
    python benchmarks/nets_speed.py --params-only
    python benchmarks/nets_speed.py --train-step --out benchmarks/results/train_step_scaling.json
    python benchmarks/nets_speed.py --generate --out benchmarks/results/generate_scaling.json

Default: one JSON line per (network, clip shape): median wall time of forward + backward (sum of
outputs) over `--repeats` runs after one warm-up, fp32 on the current device; then one line per
registry size with the parameter counts (prior; base model with text_dim = 384, 1000 classes and
context).

`--train-step`: one optimizer step (forward, backward, Adam) of each stage on random inputs, with
the networks of `--config` (configs/ul/tiny.yaml) for stage 1 and `--base-config`
(configs/base/tiny.yaml) for the base model: stage 1 is the exact UL objective (after the start-up
term; encoder, prior and decoder) on a (B, 3, T, H, W) batch of `--stage1-batch` clips; stage 2
the base model's loss on the stage-1 latent shape of the same clips, `--base-batch` clips with
16-token random text embeddings of MiniLM's width (the frozen text encoder is not timed). Shapes:
`--frames` at the first of `--resolutions`, then `--resolutions` at the first of `--frames`.
`--generate`: seconds per clip of the whole pipeline (base sampler with guidance 4 and its null
condition, then the diffusion decoder; MiniLM prompt encoding included) for `--frames` at the
config's resolution with the default steps (64 base DDPM, 32 decoder DDIM), then for each pair of
`--step-pairs` at the first of `--frames`. Random weights (speed does not depend on them).
Every line has `value` (median wall seconds), `cpu_seconds` (median CPU time of this process) and
`ratio`: its CPU time over the first line's of its sweep, measured in the same run (the
`--train-step` and `--generate` sweeps run on the CPU).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ulvideo.config import BaseConfig, DecoderConfig, EncoderConfig, PriorConfig, load_config
from ulvideo.nets import SIZES, Decoder, Encoder, LatentTransformer

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of fn, each the median over `repeats` calls after one warm-up. The CPU time
    (all threads of this process) is far less disturbed than the wall time by other load on a shared
    machine: the sweeps' ratios use it on CPU."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def shape_sweep(frames: list[int], resolutions: list[int]) -> list[tuple[int, int]]:
    """(frames, resolution): every frame count at the first resolution, then the other resolutions."""
    return [(t, resolutions[0]) for t in frames] + [(frames[0], r) for r in resolutions[1:]]


def train_steps(args, emit) -> None:
    from ulvideo.train.objectives import StageOne
    from ulvideo.ul import Condition, LatentDiffusion

    for stage in ("stage1", "base"):
        ref = None
        for t, r in shape_sweep(args.frames, args.resolutions):
            shape = [f"--data.num_frames={t}", f"--data.resolution={r}", f"--data.height={r}", f"--data.width={r}"]
            cfg = load_config(ROOT / args.config, shape)
            torch.manual_seed(0)
            if stage == "stage1":
                objective = StageOne(cfg)
                step = cfg.ul.rate_hold_steps + cfg.ul.rate_ramp_steps + 1  # the exact objective
                step += int(step % cfg.train.log_every == cfg.train.log_every - 1)  # no decoder-gain logging
                batch = {"video": torch.rand(args.stage1_batch, 3, t, r, r) * 2 - 1}
                g = torch.Generator().manual_seed(0)

                def loss():
                    return objective(batch, g, step)[0]
                params, b = objective.parameters(), args.stage1_batch
            else:
                bcfg = load_config(ROOT / args.base_config, shape)
                model = LatentDiffusion(bcfg, cfg, text_dim=384)
                e = cfg.encoder
                z = torch.randn(args.base_batch, e.latent_channels, 1 + (t - 1) // e.temporal_downsample,
                                r // e.spatial_downsample, r // e.spatial_downsample)
                cond = Condition(text_emb=torch.randn(args.base_batch, 16, 384),
                                 text_mask=torch.ones(args.base_batch, 16, dtype=torch.bool))
                g = torch.Generator().manual_seed(0)

                def loss():
                    return model.loss(z, cond, g).loss.mean() / z[0].numel()
                params, b = model.parameters(), args.base_batch
            opt = torch.optim.Adam(params, lr=1e-4)

            def step_fn():
                opt.zero_grad(set_to_none=True)
                loss().backward()
                opt.step()

            wall, cpu = timed(step_fn, args.repeats)
            ref = ref or cpu
            emit({"what": "train_step_time", "stage": stage, "frames": t, "resolution": r, "batch": b,
                  "config": args.config if stage == "stage1" else args.base_config, "value": round(wall, 4),
                  "cpu_seconds": round(cpu, 4), "unit": "s",
                  "ratio": round(cpu / ref, 3)})


def generation(args, emit) -> None:
    from ulvideo.generate import Pipeline
    from ulvideo.text import load_text_encoder
    from ulvideo.ul import LatentDiffusion, UnifiedLatents

    cfg = load_config(ROOT / args.config)
    bcfg = load_config(ROOT / args.base_config)
    torch.manual_seed(0)
    stage1 = UnifiedLatents(cfg).eval()
    text = load_text_encoder(bcfg.base.text_encoder, bcfg.base.text_max_tokens)
    base = LatentDiffusion(bcfg, cfg, text_dim=text.dim if text else 0).eval()
    pipe = Pipeline(stage1, base, bcfg, text)
    points = [(t, 64, 32) for t in args.frames] + [(args.frames[0], s, d) for s, d in args.step_pairs]
    ref = None
    for t, steps, dec_steps in points:
        wall, cpu = timed(lambda: pipe(["a small red circle moving left"], num_frames=t, steps=steps,
                                       decoder_steps=dec_steps), args.repeats)
        ref = ref or cpu
        emit({"what": "generate_time_per_clip", "frames": t, "height": cfg.data.height, "width": cfg.data.width,
              "base_steps": steps, "base_sampler": "ddpm", "guidance": 4.0, "decoder_steps": dec_steps,
              "decoder_sampler": "ddim", "config": [args.config, args.base_config], "value": round(wall, 4),
              "cpu_seconds": round(cpu, 4), "unit": "s", "ratio": round(cpu / ref, 3)})


def networks(args, emit, device) -> None:
    enc = Encoder(EncoderConfig(size=args.size)).to(device)
    prior = LatentTransformer(PriorConfig(size=args.size), enc.latent_channels).to(device)
    dec = Decoder(DecoderConfig(size=args.size), enc.latent_channels).to(device)
    for shape in args.shapes:
        t, h, w = (int(v) for v in shape.split("x"))
        x = torch.rand(args.batch, 3, t, h, w, device=device) * 2 - 1
        with torch.no_grad():
            z = enc(x)
        logsnr = torch.randn(args.batch, device=device)
        runs = {
            "encoder": lambda: enc(x).sum().backward(),
            "prior": lambda: prior(z, logsnr).sum().backward(),
            "decoder": lambda: dec(x, z, logsnr).sum().backward(),
        }

        def step():  # one stage-1 shaped step: encode once, prior and decoder both on the latent
            zc = enc(x)
            (prior(zc, logsnr).sum() + dec(x, zc, logsnr).sum()).backward()

        runs["encoder+prior+decoder"] = step
        for name, fn in runs.items():
            wall, cpu = timed(fn, args.repeats)
            emit({"what": "fwd_bwd_time", "network": name, "size": args.size, "clip": shape, "batch": args.batch,
                  "value": round(wall, 4), "cpu_seconds": round(cpu, 4), "unit": "s"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--shapes", nargs="+", default=["9x32x32", "17x64x64"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--params-only", action="store_true")
    p.add_argument("--train-step", action="store_true", help="time a training step of each stage vs clip shape")
    p.add_argument("--generate", action="store_true", help="time generation per clip vs frames and steps")
    p.add_argument("--config", default="configs/ul/tiny.yaml", help="stage-1 config (--train-step, --generate)")
    p.add_argument("--base-config", default="configs/base/tiny.yaml",
                   help="base-model config (--train-step, --generate)")
    p.add_argument("--frames", type=int, nargs="+", default=[9, 17, 33])
    p.add_argument("--resolutions", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--stage1-batch", type=int, default=8)
    p.add_argument("--base-batch", type=int, default=32)
    p.add_argument("--step-pairs", type=lambda v: tuple(int(a) for a in v.split(",")), nargs="+",
                   default=[(32, 16), (16, 8)], help="(base steps, decoder steps) for --generate, e.g. 32,16")
    p.add_argument("--out", default="", help="also write the lines to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hardware = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
                "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    lines = []

    def emit(line: dict) -> None:
        line = {**line, "hardware": hardware, "load_avg_1min": round(os.getloadavg()[0], 2)}
        lines.append(line)
        print(json.dumps(line), flush=True)

    torch.manual_seed(0)
    if args.train_step:
        train_steps(args, emit)
    if args.generate:
        with torch.no_grad():
            generation(args, emit)
    if not (args.train_step or args.generate or args.params_only):
        networks(args, emit, device)
    if not (args.train_step or args.generate):
        for name in SIZES:
            e = Encoder(EncoderConfig(size=name))
            emit({"what": "num_params", "size": name, "latent_channels": 16, "encoder": e.num_params(),
                  "prior": LatentTransformer(PriorConfig(size=name), 16).num_params(),
                  "decoder": Decoder(DecoderConfig(size=name), 16).num_params(),
                  "base": LatentTransformer(BaseConfig(size=name, num_classes=1000, context_frames=2), 16,
                                            text_dim=384).num_params(), "unit": "params"})
    if args.out:
        out = ROOT / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                                   "hardware": hardware, "lines": lines}, indent=1) + "\n")


if __name__ == "__main__":
    main()
