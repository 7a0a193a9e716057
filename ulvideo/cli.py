"""`ulvideo <command>`: argument parsing only. Each command's work lives in its own module.

    ulvideo data synth --out data/shapes --num 256
    ulvideo train configs/ul/tiny.yaml --run-dir runs/tiny --train.steps=500
    ulvideo encode --export runs/tiny/exports/latest.safetensors --input clip.mp4 --out z.safetensors
    ulvideo decode --export runs/tiny/exports/latest.safetensors --input z.safetensors --out clip.mp4
    ulvideo generate --export STAGE1 --base STAGE2 --prompt "a red circle moving left" --out out.mp4
    ulvideo fvd ref --data DIR --preset ucf101-16f-128 --out ref.npz
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys


def _handler(module: str, func: str):
    """Resolve `ulvideo.<module>.<func>` lazily, so `--help` never imports torch."""

    def run(args: argparse.Namespace) -> int:
        name = f"ulvideo.{module}"
        if importlib.util.find_spec(name) is None or not hasattr(importlib.import_module(name), func):
            print(f"ulvideo {args.command}: not available in this version ({name}.{func} is not implemented yet)", file=sys.stderr)
            return 2
        return getattr(importlib.import_module(name), func)(args) or 0

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ulvideo", description="Unified Latents for video: train, encode, decode, generate, evaluate.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train stage 1 (UL autoencoder) or stage 2 (base model) from a config",
                       description="Train from a YAML config. Extra --section.key=value flags override it. "
                       "Rerunning the same command resumes from the run dir's latest checkpoint.")
    t.add_argument("config", help="YAML config (e.g. configs/ul/tiny.yaml)")
    t.add_argument("--run-dir", required=True, help="run directory: config, metrics, checkpoints, exports")
    t.set_defaults(run=_handler("train", "main"))

    g = sub.add_parser("generate", help="generate clips from prompts, class labels or context frames")
    g.add_argument("--export", required=True, help="stage-1 export (.safetensors)")
    g.add_argument("--base", required=True, help="stage-2 base-model export (.safetensors)")
    g.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    g.add_argument("--prompts", help="a file with one prompt per line")
    g.add_argument("--label", type=int, action="append", default=[], help="a class label (repeatable)")
    g.add_argument("--num-frames", type=int, default=None, help="pixel frames (1 + 4k); default: the training clip length")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=64, help="base-model sampler steps")
    g.add_argument("--decoder-steps", type=int, default=32)
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="base-model sampler")
    g.add_argument("--decoder-sampler", choices=["ddpm", "ddim"], default=None,
                   help="decoder sampler (default: --sampler)")
    g.add_argument("--decoder-logsnr-end", type=float, default=None,
                   help="the decoder's sampling stops at this logSNR and keeps its clean prediction there "
                        "(default: the stage-1 export's decoder.sample_logsnr_end, else its logsnr_max)")
    g.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    g.add_argument("--context", help="a video whose first frames are given (frame prediction)")
    g.add_argument("--decode-from", choices=["z0", "clean"], default="z0",
                   help="decode the sampled z0, or alpha0 times the final clean prediction")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--out", required=True, help="output .mp4 or .gif (a directory when several prompts)")
    g.set_defaults(run=_handler("generate", "main_generate"))

    e = sub.add_parser("encode", help="encode a video (or a dataset into latent shards) with a stage-1 export")
    e.add_argument("--export", required=True)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="one video or image file")
    src.add_argument("--data", help="a dataset folder: writes latent shards for stage 2")
    e.add_argument("--out", required=True, help="z.safetensors for --input, a shard directory for --data")
    e.add_argument("--num-frames", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--shard-size", type=int, default=256)
    e.add_argument("--text-encoder", default=None, help="cache text embeddings with this encoder (default: the config's)")
    e.add_argument("--chunk", type=int, default=None,
                   help="stream in time: pixel frames per chunk after the first (a multiple of 4); equal to one pass, "
                        "memory flat in clip length")
    e.add_argument("--tile", type=int, default=None,
                   help="tile space: tile core size in pixels (exact: halo = receptive field, whole-frame norm statistics)")
    e.set_defaults(run=_handler("generate", "main_encode"))

    d = sub.add_parser("decode", help="decode a latent file into a video with a stage-1 export")
    d.add_argument("--export", required=True)
    d.add_argument("--input", required=True, help="z.safetensors holding z_clean (C, T', H', W')")
    d.add_argument("--out", required=True, help="output .mp4, .gif or .png")
    d.add_argument("--steps", type=int, default=32, help="decoder sampler steps")
    d.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    d.add_argument("--logsnr-end", type=float, default=None,
                   help="stop sampling at this logSNR and keep the clean prediction there (default: the export's)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--latent-noise", choices=["sample", "mean"], default="sample",
                   help="z0 = alpha0 z_clean + sigma0 eps (sample, as in training) or alpha0 z_clean (mean)")
    d.add_argument("--chunk", type=int, default=None,
                   help="stream in time: pixel frames per chunk after the first (a multiple of 4); equal to one pass, "
                        "memory flat in clip length")
    d.add_argument("--tile", type=int, default=None,
                   help="tile space: tile core size in pixels (exact: halo = receptive field, whole-frame norm statistics)")
    d.set_defaults(run=_handler("generate", "main_decode"))

    f = sub.add_parser("fvd", help="Frechet video distance: reference statistics and scores")
    fsub = f.add_subparsers(dest="fvd_command", metavar="ACTION", required=True)
    fr = fsub.add_parser("ref", help="compute reference statistics of real videos")
    fr.add_argument("--data", required=True)
    fr.add_argument("--preset", required=True)
    fr.add_argument("--out", required=True)
    fr.add_argument("--weights", default=None, help="I3D weights file (else $ULVIDEO_I3D or the cache dir)")
    fr.add_argument("--batch-size", type=int, default=8)
    fr.add_argument("--i3d-sha256", default=None, help="confirm the weights' sha256 (needed for a TorchScript file)")
    fr.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    fr.set_defaults(run=_handler("fvd", "main_ref"))
    fc = fsub.add_parser("calc", help="score generated videos against reference statistics")
    fsrc = fc.add_mutually_exclusive_group(required=True)
    fsrc.add_argument("--videos", help="a folder of generated videos")
    fsrc.add_argument("--export", help="stage-1 export (with --base and --prompts)")
    fc.add_argument("--base")
    fc.add_argument("--prompts")
    fc.add_argument("--ref", required=True)
    fc.add_argument("--weights", default=None)
    fc.add_argument("--batch-size", type=int, default=8)
    fc.add_argument("--i3d-sha256", default=None, help="confirm the weights' sha256 (needed for a TorchScript file)")
    fc.add_argument("--device", default="auto")
    fc.add_argument("--seed", type=int, default=0)
    fc.add_argument("--steps", type=int, default=64, help="base-model sampler steps (with --export)")
    fc.add_argument("--decoder-steps", type=int, default=32)
    fc.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    fc.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    fc.add_argument("--out", default=None, help="write the result as JSON here too")
    fc.set_defaults(run=_handler("fvd", "main_calc"))

    da = sub.add_parser("data", help="datasets: synthesize the built-in shapes data, scan a folder")
    dsub = da.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    ds = dsub.add_parser("synth", help="write the built-in moving-shapes dataset (mp4 + captions)")
    ds.add_argument("--out", required=True)
    ds.add_argument("--num", type=int, default=256)
    ds.add_argument("--frames", type=int, default=17)
    ds.add_argument("--size", type=int, default=64)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--fps", type=int, default=8)
    ds.set_defaults(run=_handler("shapes", "main_synth"))
    dc = dsub.add_parser("scan", help="report usable and skipped files of a dataset folder")
    dc.add_argument("dir")
    dc.add_argument("--out", default=None, help="JSON report path (default: DIR/scan.json)")
    dc.add_argument("--backend", default="auto")
    dc.set_defaults(run=_handler("data", "main_scan"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--") and "=" in a]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and args.command != "train"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
