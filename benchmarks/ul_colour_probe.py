"""How soon does stage 1 learn colour while the rate is held? Start-up variants side by side.

    python benchmarks/ul_colour_probe.py [--frames 1] [--steps 800] [--every 200] [--variants NAME=FLAGS;...]

Trains `configs/ul/tiny.yaml` once per variant with the rate held for the whole run (the prior
fits the detached latents; the start-up term stays at full weight), so only the start-up phase
is measured: the part of the schedule that has to teach the networks colour before the rate
arrives. Every `--every` steps the EMA export's reconstructions of the held-out clips (the
diffusion decoder, DDPM, 32 steps, from a sampled z0) are scored by the shapes measurer: colour,
shape, PSNR and the held-out rate in bits/clip. Every variant has the same seed and data order.

Default variants: the config as it is; `decoder.output_init_std=0.02` (the output conv starts
random, not zero); `ul.startup_input=zeros` (the start-up term's prediction from an all-zero
decoder input); both. Writes benchmarks/results/ul_colour_probe.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VARIANTS = ("config=;output_init=--decoder.output_init_std=0.02;startup_zeros=--ul.startup_input=zeros;"
                    "both=--decoder.output_init_std=0.02 --ul.startup_input=zeros")


def score_export(export: Path, data: Path, decoder_steps: int) -> dict:
    from ulvideo.eval.reports import score_shapes_reconstructions
    from ulvideo.exports import load_stage1

    model = load_stage1(export)
    got = score_shapes_reconstructions(model, model.cfg.data, data, decoder_steps, micro_batch_size=32)
    return {"colour_match": got["colour_match"], "shape_match": got["shape_match"], "psnr_db": got["psnr_db"],
            "bits_per_clip": round(got["bits_per_clip"], 1), "heldout_clips": got["clips"],
            "colour_errors": got["colour_errors"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/ul/tiny.yaml")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--num-clips", type=int, default=512)
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--decoder-steps", type=int, default=32)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="NAME=FLAGS entries separated by ';'")
    p.add_argument("--runs", default="runs/ul_colour_probe")
    p.add_argument("--out", default="benchmarks/results/ul_colour_probe.json")
    args = p.parse_args()

    from ulvideo.config import load_config

    cfg = load_config(ROOT / args.config, [f"--data.path={args.data}"])
    data = ROOT / args.data
    if not (data / "manifest.jsonl").is_file():  # the data stage1_tiny.py synthesizes
        subprocess.run([sys.executable, "-m", "ulvideo", "data", "synth", "--out", str(data), "--num", str(args.num_clips),
                        "--frames", str(cfg.data.num_frames), "--size", str(cfg.data.height)], cwd=ROOT, check=True)
    results = []
    for entry in filter(None, (v.strip() for v in args.variants.split(";"))):
        name, _, flags = entry.partition("=")
        overrides = flags.split()
        run = ROOT / args.runs / name
        fixed = [f"--data.path={args.data}", f"--data.num_frames={args.frames}", f"--train.steps={args.steps}",
                 f"--ul.rate_hold_steps={args.steps + 1}", f"--train.ckpt_every={args.every}", "--eval.every=1000000"]
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "ulvideo", "train", args.config, "--run-dir", str(run), *fixed, *overrides],
                       cwd=ROOT, check=True)
        seconds = round(time.time() - t0, 1)
        curve = []
        for step in range(args.every, args.steps + 1, args.every):
            curve.append({"step": step, **score_export(run / "exports" / f"ul_step_{step:08d}.safetensors", data,
                                                        args.decoder_steps)})
            print(name, json.dumps({k: v for k, v in curve[-1].items() if k != "colour_errors"}), flush=True)
        results.append({"variant": name, "overrides": overrides, "train_seconds": seconds, "curve": curve})
    out = {
        "what": "ul_colour_probe", "config": args.config, "frames": args.frames, "steps": args.steps,
        "rate": "held for the whole run (prior on detached latents, start-up term at full weight)",
        "decoder_sampler": "ddpm", "decoder_steps": args.decoder_steps, "weights": "EMA exports",
        "variants": results, "hardware": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
    }
    path = ROOT / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({r["variant"]: [c["colour_match"] for c in r["curve"]] for r in results}))


if __name__ == "__main__":
    main()
