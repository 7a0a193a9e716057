"""Do the stage-1 networks learn colour? A plain autoencoder test on the shapes data.

    python benchmarks/autoencoder_colour.py [--steps 600] [--heads 1,0] [--inputs zeros,noise] [--chroma-weights 1]
        [-- --a.b=v ...]

Trains the encoder and decoder of `configs/ul/tiny.yaml` as a plain MSE autoencoder (no prior, no
rate, no diffusion loss) on 1-frame shapes clips: x -> z_clean -> z0 = alpha0 z_clean + sigma0 eps
-> the decoder's x-prediction at its lowest logSNR, from an all-zero input (`zeros`, the MSE
decoder's path) or from a noise input (`noise`, what the diffusion decoder sees there and what the
start-up term trains). Every run has the same seed, data order and optimizer settings (the config's
lr, betas, warm-up and clipping); only the encoder's output-head norm (`encoder.head_norm_groups`:
1 = one group, 0 = the trunk's groups of 4 channels), the decoder input and the chroma weight k
of the squared error (`ul.startup_chroma_weight`: the error's part off the grey axis scaled by k,
`ulvideo.ul.chroma_scaled`) differ. Every
`--eval-every` steps: the shapes measurer's colour match and the PSNR on the held-out clips.

Writes benchmarks/results/autoencoder_colour.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(cfg, head: int, decoder_input: str, chroma: float, steps: int, eval_every: int, seed: int, heldout,
        specs) -> dict:
    import dataclasses

    from ulvideo.data import build_loader
    from ulvideo.eval.metrics import psnr
    from ulvideo.data.shapes import measure_clip, score
    from ulvideo.ul import UnifiedLatents, chroma_scaled
    from ulvideo.videoio import to_uint8

    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, head_norm_groups=head))
    torch.manual_seed(seed)
    model = UnifiedLatents(cfg)
    params = [p for n, p in model.named_parameters() if not n.startswith("prior.")]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    g = torch.Generator().manual_seed(seed)

    def predict(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        z0 = model.noisy_latent(model.encode(x), gen)
        if decoder_input == "zeros":
            return model._mse_decode(z0, x.shape[2])
        return model._x_at_lowest_logsnr(torch.randn(x.shape, generator=gen), z0)

    def evaluate(step: int) -> dict:
        model.eval()
        ge = torch.Generator().manual_seed(seed + 1)
        colour, psnrs = [], []
        with torch.no_grad():
            for x, names in heldout:
                x_hat = predict(x, ge).clamp(-1.0, 1.0)
                psnrs += psnr(x, x_hat).tolist()
                colour += [score(specs[n], measure_clip(c))["colour"] for n, c in zip(names, to_uint8(x_hat))]
        model.train()
        return {"step": step, "colour_match": round(float(np.mean(colour)), 4), "psnr_db": round(float(np.mean(psnrs)), 3)}

    loader = build_loader(cfg.data, micro_batch_size=t.micro_batch_size, seed=seed, split="train")
    curve, step, t0 = [], 0, time.time()
    while step < steps:
        for batch in loader:
            for group in opt.param_groups:
                group["lr"] = t.lr * min(1.0, (step + 1) / max(1, t.warmup_steps))
            x = batch["video"]
            loss = chroma_scaled(predict(x, g) - x, chroma).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            step += 1
            if step % eval_every == 0 or step == steps:
                curve.append(evaluate(step))
                print(f"head_norm_groups={head} input={decoder_input} chroma={chroma} {curve[-1]}", flush=True)
            if step >= steps:
                break
    return {"head_norm_groups": head, "head_groups_resolved": model.encoder.norm_out.groups,
            "decoder_input": decoder_input, "chroma_weight": chroma, "curve": curve, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/ul/tiny.yaml")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--num-clips", type=int, default=512)
    p.add_argument("--frames", type=int, default=1)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--heads", default="1,0", help="encoder.head_norm_groups values (0 = the trunk's grouping)")
    p.add_argument("--inputs", default="zeros,noise", help="decoder inputs at its lowest logSNR")
    p.add_argument("--chroma-weights", default="1", help="chroma weights k of the squared error (1 = plain)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/autoencoder_colour.json")
    p.add_argument("overrides", nargs="*", help="extra --a.b=v config overrides (after --)")
    args = p.parse_args()

    from ulvideo.config import load_config
    from ulvideo.data import build_loader
    from ulvideo.data.shapes import manifest_specs

    clip_cfg = load_config(ROOT / args.config, [f"--data.path={args.data}"])
    cfg = load_config(ROOT / args.config, [f"--data.path={args.data}", *args.overrides, f"--data.num_frames={args.frames}"])
    data = ROOT / args.data
    if not (data / "manifest.jsonl").is_file():  # the same data stage1_tiny.py synthesizes
        subprocess.run([sys.executable, "-m", "ulvideo", "data", "synth", "--out", str(data), "--num",
                        str(args.num_clips), "--frames", str(clip_cfg.data.num_frames), "--size",
                        str(clip_cfg.data.height)], cwd=ROOT, check=True)
    specs = manifest_specs(data)
    heldout = [(b["video"], [Path(s).name for s in b["source"]])
               for b in build_loader(cfg.data, micro_batch_size=64, seed=0, split="heldout")]
    runs = [run(cfg, int(h), i, float(k), args.steps, args.eval_every, args.seed, heldout, specs)
            for h in args.heads.split(",") for i in args.inputs.split(",") for k in args.chroma_weights.split(",")]
    out = {
        "what": "autoencoder_colour",
        "config": args.config,
        "overrides": args.overrides,
        "frames": args.frames,
        "steps": args.steps,
        "batch": cfg.train.micro_batch_size,
        "heldout_clips": sum(len(n) for _, n in heldout),
        "loss": "squared error (chroma scaled by chroma_weight) of the decoder's x-prediction at its lowest logSNR from z0 (sampled)",
        "runs": runs,
        "hardware": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
    }
    path = ROOT / args.out
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({f"head_norm_groups={r['head_norm_groups']} input={r['decoder_input']} chroma={r['chroma_weight']}": r["curve"][-1]
                      for r in runs}))


if __name__ == "__main__":
    main()
