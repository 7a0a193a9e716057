"""`ulvideo <command>`: argument parsing, and handlers that only call the library.

    ulvideo data synth --out data/shapes                 # what configs/ul/tiny.yaml trains on
    ulvideo train configs/ul/tiny.yaml --run-dir runs/tiny --train.steps=500
    ulvideo encode --export runs/tiny/exports/latest.safetensors --input clip.mp4 --out z.safetensors
    ulvideo decode --export runs/tiny/exports/latest.safetensors --input z.safetensors --out clip.mp4
    ulvideo generate --export STAGE1 --base STAGE2 --prompt "a red circle moving left" --out out.mp4
    ulvideo fvd ref --data DIR --preset tats-fvd2048-16f --out ref.npz
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


def _lazy(module: str, func: str):
    """A handler that imports `ulvideo.<module>.<func>` when it runs, so `--help` never imports torch."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"ulvideo.{module}"), func)(args) or 0

    return run


STAGE1_EXPORT = ("a stage-1 export: RUN/exports/latest.safetensors (EMA weights; its .json beside it) of a "
                 "stage-1 run, which `ulvideo train configs/ul/tiny.yaml --run-dir RUN` writes")
BASE_EXPORT = ("a stage-2 export: RUN/exports/latest.safetensors of a base-model run, which "
               "`ulvideo train configs/base/tiny.yaml --run-dir RUN` writes (after `ulvideo encode --data`)")


class _Parser(argparse.ArgumentParser):
    """argparse, plus a line per missing required option on where its value comes from (`missing`)."""

    def __init__(self, *args, missing: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.missing = missing or {}

    def error(self, message: str):
        if message.startswith("the following arguments are required"):
            message += "".join(f"\n  {opt}: {hint}" for opt, hint in self.missing.items() if opt in message.split(": ", 1)[1].split(", "))
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ulvideo", description="Unified Latents for video: train, encode, decode, generate, evaluate.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train stage 1 (UL autoencoder) or stage 2 (base model) from a config",
                       description="Train from a YAML config. Extra --section.key=value flags override it. "
                       "Rerunning the same command resumes from the run dir's latest checkpoint.")
    t.add_argument("config", help="YAML config (e.g. configs/ul/tiny.yaml)")
    t.add_argument("--run-dir", required=True, help="run directory: config, metrics, checkpoints, exports")
    t.set_defaults(run=cmd_train)

    g = sub.add_parser("generate", help="generate clips from prompts, class labels or context frames",
                       description="Generate clips with a stage-2 base model and the stage-1 decoder. Both come "
                       "from training runs: --export is stage 1's RUN/exports/latest.safetensors, --base stage 2's. "
                       "Defaults: guidance 4, base model DDPM with 64 steps, decoder DDIM with 32 steps up to the "
                       "decoder's logsnr_max.",
                       missing={"--export": STAGE1_EXPORT, "--base": BASE_EXPORT})
    g.add_argument("--export", required=True, help=STAGE1_EXPORT)
    g.add_argument("--base", required=True, help=BASE_EXPORT)
    g.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
    g.add_argument("--prompts", help="a file with one prompt per line")
    g.add_argument("--label", type=int, action="append", default=[], help="a class label (repeatable)")
    g.add_argument("--num-frames", type=int, default=None, help="pixel frames (1 + 4k); default: the training clip length")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the base model's generator and the decoder's per-frame noise (a batch: seed + the index of its first clip)")
    g.add_argument("--steps", type=int, default=64, help="base-model sampler steps (default: 64)")
    g.add_argument("--decoder-steps", type=int, default=32, help="decoder sampler steps (default: 32)")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="base-model sampler (default: ddpm)")
    g.add_argument("--decoder-sampler", choices=["ddpm", "ddim"], default="ddim",
                   help="decoder sampler (default: ddim; on the shapes data it keeps the corners that tell "
                        "the shapes apart)")
    g.add_argument("--decoder-logsnr-end", type=float, default=None,
                   help="the decoder's sampling stops at this logSNR and keeps its clean prediction there; "
                        "must lie in (decoder.logsnr_min, decoder.logsnr_max] (default: logsnr_max)")
    g.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default: 4; 1 = none)")
    g.add_argument("--context", help="a video whose first frames are given (frame prediction)")
    g.add_argument("--decode-from", choices=["z0", "clean"], default="z0",
                   help="decode the sampled z0, or alpha0 times the final clean prediction")
    g.add_argument("--batch-size", type=int, default=8, help="clips generated per forward pass")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks (inductor): faster after a one-time compile of ~1-2 min per shape on CPU")
    g.add_argument("--out", required=True, help="output .mp4 or .gif (a directory when several prompts)")
    g.set_defaults(run=cmd_generate)

    e = sub.add_parser("encode", help="encode a video (or a dataset into latent shards) with a stage-1 export",
                       missing={"--export": STAGE1_EXPORT})
    e.add_argument("--export", required=True, help=STAGE1_EXPORT)
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="one video or image file")
    src.add_argument("--data", help="a dataset folder: writes latent shards for stage 2")
    e.add_argument("--out", required=True, help="z.safetensors for --input, a shard directory for --data")
    e.add_argument("--num-frames", type=int, default=None,
                   help="frames to encode (1 + 4k); default: --input, the whole file; --data, the config's clip length")
    e.add_argument("--batch-size", type=int, default=8, help="clips encoded per forward pass (--data)")
    e.add_argument("--compile", action="store_true", help="torch.compile the networks (inductor): faster after a one-time compile of ~1-2 min per shape on CPU")
    e.add_argument("--shard-size", type=int, default=256, help="latent clips per shard file (--data)")
    e.add_argument("--text-encoder", default=None, help="cache text embeddings with this encoder (default: the config's)")
    e.add_argument("--chunk", type=int, default=None,
                   help="stream in time: pixel frames per chunk after the first (a multiple of 4; --input streams "
                        "16 by default); equal to one pass, memory flat in clip length")
    e.add_argument("--tile", type=int, default=None,
                   help="tile space: tile core size in pixels (exact: each tile runs once with a halo = receptive field)")
    e.set_defaults(run=cmd_encode)

    d = sub.add_parser("decode", help="decode a latent file into a video with a stage-1 export",
                       missing={"--export": STAGE1_EXPORT})
    d.add_argument("--export", required=True, help=STAGE1_EXPORT)
    d.add_argument("--input", required=True, help="z.safetensors holding z_clean (C, T', H', W')")
    d.add_argument("--out", required=True, help="output .mp4, .gif or .png")
    d.add_argument("--steps", type=int, default=32, help="decoder sampler steps")
    d.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="decoder sampler")
    d.add_argument("--logsnr-end", type=float, default=None,
                   help="stop sampling at this logSNR and keep the clean prediction there; must lie in "
                        "(decoder.logsnr_min, decoder.logsnr_max] (default: logsnr_max)")
    d.add_argument("--seed", type=int, default=0, help="all noise (z0's and the sampler's) is drawn per frame from it")
    d.add_argument("--compile", action="store_true", help="torch.compile the networks (inductor): faster after a one-time compile of ~1-2 min per shape on CPU")
    d.add_argument("--latent-noise", choices=["sample", "mean"], default="sample",
                   help="z0 = alpha0 z_clean + sigma0 eps (sample, as in training) or alpha0 z_clean (mean)")
    d.add_argument("--chunk", type=int, default=None,
                   help="stream in time: pixel frames per chunk after the first (a multiple of 4); the same clip "
                        "as one pass (the noise is drawn per frame from --seed), memory flat in clip length")
    d.add_argument("--tile", type=int, default=None,
                   help="tile space: tile core size in pixels (exact: halo = receptive field, the middle transformer "
                        "on the whole frame); the same clip as one pass")
    d.set_defaults(run=cmd_decode)

    from ulvideo.eval.fvd_presets import help_lines  # pure data: --help stays free of torch

    import textwrap

    windows = textwrap.fill("Windows: real clips follow the preset's rule (StyleGAN-V one random window in each of the first "
               "2048 videos, TATS 2048 windows from all windows, cd-FVD one random window per video); generated "
               "clips are frames 0..T-1 (cd-FVD: a random window, the folder read again up to 2048). A folder of "
               "long clips is therefore not at FVD 0 from itself. Layouts: video files, or one folder of frames per "
               "video.", 100) + "\n\npresets:\n" + help_lines()
    f = sub.add_parser("fvd", help="Frechet video distance: reference statistics and scores",
                       description="Frechet video distance under a named preset.\n" + windows,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    fsub = f.add_subparsers(dest="fvd_command", metavar="ACTION", required=True)
    fr = fsub.add_parser("ref", help="compute reference statistics of real videos",
                         description="Statistics of the real videos of --data (its preset split, e.g. train/, "
                         "when present).\n" + windows, formatter_class=argparse.RawDescriptionHelpFormatter)
    fr.add_argument("--data", required=True, help="folder of video files or of frame folders")
    fr.add_argument("--preset", required=True, help="one of the presets listed above")
    fr.add_argument("--out", required=True, help="statistics file (.npz)")
    fr.add_argument("--mirror", action="store_true",
                    help="add a horizontally flipped copy of every video before the preset's selection (StyleGAN-V's "
                         "dataset x-flip; its own fvd2048_* turn it off); recorded in the file and every score")
    fr.add_argument("--weights", default=None, help="I3D weights file (else $ULVIDEO_I3D or the cache dir)")
    fr.add_argument("--batch-size", type=int, default=8, help="clips per I3D forward pass")
    fr.add_argument("--i3d-sha256", default=None, help="confirm the weights' sha256 (needed for a TorchScript file)")
    fr.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    fr.set_defaults(run=cmd_fvd_ref)
    fc = fsub.add_parser("calc", help="score generated videos against reference statistics",
                         description="Score generated clips against a statistics file of `fvd ref` (its preset "
                         "decides everything).\n" + windows, formatter_class=argparse.RawDescriptionHelpFormatter)
    fsrc = fc.add_mutually_exclusive_group(required=True)
    fsrc.add_argument("--videos", help="a folder of generated videos (files or frame folders)")
    fsrc.add_argument("--export", help="stage-1 export (with --base and --prompts)")
    fc.add_argument("--base", help="stage-2 export whose generations are scored (with --export)")
    fc.add_argument("--prompts", help="a file with one prompt per line, cycled (with --export)")
    fc.add_argument("--ref", required=True, help="statistics file written by `ulvideo fvd ref`")
    fc.add_argument("--weights", default=None, help="I3D weights file (else $ULVIDEO_I3D or the cache dir)")
    fc.add_argument("--batch-size", type=int, default=8, help="clips per I3D forward pass (and per generation batch)")
    fc.add_argument("--i3d-sha256", default=None, help="confirm the weights' sha256 (needed for a TorchScript file)")
    fc.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    fc.add_argument("--seed", type=int, default=0, help="generation seed of the first batch, +1 per batch (with --export)")
    fc.add_argument("--steps", type=int, default=64, help="base-model sampler steps (with --export)")
    fc.add_argument("--decoder-steps", type=int, default=32, help="decoder sampler steps (with --export)")
    fc.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="sampler (with --export)")
    fc.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    fc.add_argument("--out", default=None, help="write the result as JSON here too")
    fc.set_defaults(run=cmd_fvd_calc)

    da = sub.add_parser("data", help="datasets: synthesize the shapes data, scan a folder, pack shards")
    dsub = da.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    # the defaults make the data configs/ul/tiny.yaml trains on (9 frames at 32x32; 5 % held out)
    ds = dsub.add_parser("synth", help="write the built-in moving-shapes dataset (mp4 + captions)")
    ds.add_argument("--out", required=True, help="folder to write (refused if it holds clips beyond --num)")
    ds.add_argument("--num", type=int, default=512, help="number of clips")
    ds.add_argument("--frames", type=int, default=9, help="frames per clip")
    ds.add_argument("--size", type=int, default=32, help="frame height and width in pixels (even, >= 16)")
    ds.add_argument("--seed", type=int, default=0, help="seed of the clips' shapes, colours and motions")
    ds.add_argument("--fps", type=int, default=8, help="frame rate written into the mp4 files")
    ds.set_defaults(run=cmd_synth)
    dc = dsub.add_parser("scan", help="probe a dataset folder once: a manifest with metadata, or a JSON report",
                         description="Probe every file (in parallel) and write a manifest whose rows carry "
                         "num_frames/fps/size, so training never probes at start-up (.parquet, .csv or .jsonl), "
                         "or a JSON report (.json). An interrupted scan continues where it stopped.")
    dc.add_argument("dir", help="the dataset folder (searched recursively)")
    dc.add_argument("--out", default=None, help="manifest (.parquet/.csv/.jsonl) or JSON report (.json); "
                    "default: DIR/scan.json")
    dc.add_argument("--backend", default="auto", help="video decoder: auto, decord, pyav or torchcodec")
    dc.add_argument("--threads", type=int, default=8, help="files probed at once")
    dc.set_defaults(run=cmd_scan)
    dp = dsub.add_parser("pack", help="write WebDataset tar shards (video bytes + caption + metadata json)")
    dp.add_argument("src", help="a dataset folder or a manifest (.parquet/.csv/.jsonl)")
    dp.add_argument("--out", required=True, help="an empty folder for shard-NNNNNN.tar and index.json")
    dp.add_argument("--size", default="1GB", help="largest shard (e.g. 1GB, 256MB, 512MiB)")
    dp.add_argument("--seed", type=int, default=0, help="seeds the sample order (shards are read in order)")
    dp.set_defaults(run=_lazy("data.pack", "main"))
    from ulvideo.cli_io import OVERWRITE_HELP  # no torch: --help stays fast

    for writer in (g, e, d, fr, fc, dc):
        writer.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p


# ---- handlers ------------------------------------------------------------------------------


def _tiling(args):
    """`--tile P` as a streaming.Tiling (None without it)."""
    from ulvideo import streaming

    return streaming.Tiling(args.tile) if args.tile else None


def _compile(args, *models) -> None:
    """--compile: every network of these models through torch.compile, as `train.compile` does."""
    if args.compile:
        from ulvideo.train.apply import compile_networks

        for m in models:
            compile_networks(m)


def cmd_encode(args) -> int:
    from ulvideo.cli_io import check_encode
    from ulvideo.exports import load_stage1

    check_encode(args)  # arguments and outputs, before the export is loaded
    model = load_stage1(args.export)
    _compile(args, model)
    if args.data:
        from ulvideo.data.encode import encode_dataset

        return encode_dataset(model, args)
    from ulvideo.data.encode import encode_file

    return encode_file(model, args, _tiling(args))


def cmd_decode(args) -> int:
    """`ulvideo decode`: one decoder path (`streaming.decode`); with or without --chunk / --tile the
    same clip for the same --seed."""
    import torch

    from ulvideo import streaming
    from ulvideo.cli_io import (InputError, check_counts, check_outputs, export_files, latent_fps, read_latent,
                                video_outputs)
    from ulvideo.exports import load_stage1
    from ulvideo.videoio import to_uint8, write_png_grid, write_video

    outputs = video_outputs(args.out)  # the video, and the PNG sheet beside it
    check_counts(steps=args.steps, chunk=args.chunk, tile=args.tile)
    check_outputs(outputs, [args.input, *export_files(args.export)], args.overwrite)
    model = load_stage1(args.export)
    try:
        end = model.decoder_logsnr_end(args.logsnr_end)
    except ValueError as e:
        raise InputError(str(e)) from None
    _compile(args, model)  # the one-pass decoder; --chunk / --tile passes run eager
    z, meta = read_latent(args.input, model.latent_channels)
    fps = latent_fps(meta, args.input) or 8.0  # the source's rate, as `encode --input` recorded it
    try:
        with torch.no_grad():
            z0 = model.noisy_latent(z, args.seed, args.latent_noise)
            clip = streaming.decode(model, z0, args.chunk, steps=args.steps, sampler=args.sampler, seed=args.seed,
                                    tiling=_tiling(args), logsnr_end=end)
    except ValueError as e:  # a chunk, tile or latent size the decoder cannot take: raised before any network runs
        raise InputError(str(e)) from None
    video = to_uint8(clip)[0]
    write_video(outputs[0], video, fps=fps)
    if len(outputs) > 1:
        write_png_grid(outputs[1], [video])
    print(json.dumps({"out": args.out, "frames": video.shape[0], "fps": fps, "steps": args.steps, "sampler": args.sampler,
                      "logsnr_end": end, "latent_noise": args.latent_noise, "seed": args.seed, "chunk": args.chunk,
                      "tile": args.tile}))
    return 0


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from ulvideo.cli_io import (InputError, check_counts, check_finite, check_outputs, clip_outputs, export_files,
                                long_prompts, read_prompts)
    from ulvideo.generate import check_request, load_pipeline, read_input
    from ulvideo.videoio import VideoError, write_png_grid, write_video

    check_counts(steps=args.steps, decoder_steps=args.decoder_steps, batch_size=args.batch_size,
                 num_frames=args.num_frames)
    check_finite(guidance=args.guidance)
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    labels = list(args.label)
    if prompts and labels and len(prompts) != len(labels):
        raise InputError(f"{len(prompts)} prompts and {len(labels)} labels: give one label per prompt, or only one kind")
    n = max(len(prompts), len(labels), 1)
    files = clip_outputs(args.out, n)  # per clip: the video, and the PNG sheet beside it
    inputs = [*export_files(args.export), *export_files(args.base), args.prompts, args.context]
    check_outputs([f for clip in files for f in clip], inputs, args.overwrite)
    try:
        pipe = load_pipeline(args.export, args.base, args.decoder_logsnr_end)
    except ValueError as e:  # a stop logSNR outside the decoder's schedule
        raise InputError(str(e)) from None
    _compile(args, pipe.stage1, pipe.base)
    context = None
    if args.context:
        try:
            context = read_input(args.context, None, pipe.base_cfg)
        except (VideoError, ValueError) as e:
            raise InputError(f"--context {args.context}: {e}") from None
    try:
        check_request(pipe, prompts, labels, args.num_frames, context)
    except ValueError as e:
        raise InputError(str(e)) from None
    for line in long_prompts(pipe.text, prompts):
        print(f"ulvideo generate: {line}", file=sys.stderr)
    bar = tqdm(total=n, desc="generate")
    index = 0
    for start in range(0, n, args.batch_size):
        p = prompts[start:start + args.batch_size] or None
        lab = labels[start:start + args.batch_size] or None
        ctx = context.expand(len(p or lab or [0]), *context.shape[1:]) if context is not None else None
        videos = pipe(p, labels=lab, seed=args.seed + start, num_frames=args.num_frames, steps=args.steps,
                      decoder_steps=args.decoder_steps, sampler=args.sampler, guidance=args.guidance,
                      context=ctx, decode_from=args.decode_from, decoder_sampler=args.decoder_sampler)
        for v in videos:
            write_video(files[index][0], v)
            if len(files[index]) > 1:
                write_png_grid(files[index][1], [v])
            index += 1
            bar.update(1)
    bar.close()
    return 0


def cmd_train(args) -> int:
    """`ulvideo train CONFIG --run-dir DIR [--a.b=v ...]`. Exit status: 0 done (or stopped by SIGTERM
    after saving); 2 a bad setting, the run dir in use by another trainer, or no intact checkpoint
    to resume (all before any process group starts); 3 non-finite steps stopped the run; 4 a
    checkpoint or export could not be written (a full disk), the previous checkpoint kept."""
    import logging
    import os

    from ulvideo.config import ConfigError, load_config
    from ulvideo.exports import ExportError
    from ulvideo.train.checkpoint import CheckpointError, SaveError
    from ulvideo.train.loop import NonFiniteError, Trainer, find_start, preflight_all, world_size_from_env
    from ulvideo.train.rundir import RunLock, RunLocked, written

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    first = os.environ.get("RANK", "0") == "0"
    warn = logging.getLogger("ulvideo.train").warning if first else (lambda line: None)
    # the deepspeed launcher appends --local_rank=N (it also sets LOCAL_RANK, which is what we read)
    overrides = [o for o in args.overrides if not o.startswith("--local_rank=")]
    run_dir = Path(args.run_dir)
    lock = None
    try:
        cfg = load_config(args.config, overrides)
        preflight_all(cfg, run_dir, world_size_from_env())  # before any process group starts
        if first:  # rank 0 holds the run dir; the other ranks of a refused launch are ended by the launcher
            lock = RunLock.acquire(run_dir, warn)
        start = find_start(cfg, run_dir, warn)
    except (ConfigError, ExportError, CheckpointError, RunLocked, FileNotFoundError, ValueError, RuntimeError) as e:
        if lock is not None:
            lock.release()
        if first:
            print(f"ulvideo train: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        trainer = Trainer(cfg, run_dir, start)
        finished = trainer.fit()
    except NonFiniteError as e:  # every rank agrees on the refused steps
        if first:
            print(f"ulvideo train: {e}", file=sys.stderr, flush=True)
        return 3
    except SaveError as e:  # on whichever rank failed to write; the launcher ends the others
        from ulvideo.train.checkpoint import latest_tag

        kept = latest_tag(run_dir / "checkpoints")
        print(f"ulvideo train: {e}; the latest complete checkpoint is "
              f"{run_dir / 'checkpoints' / kept if kept else 'none'}", file=sys.stderr, flush=True)
        return 4
    finally:
        if lock is not None:
            lock.release()
    if trainer.is_main:
        what = "done" if finished else "stopped (SIGTERM)"
        print(f"{what}: step {trainer.step}\n" + "\n".join(f"  {line}" for line in written(run_dir, cfg)), flush=True)
    return 0


def cmd_synth(args) -> int:
    """`ulvideo data synth`: the built-in moving-shapes clips."""
    from ulvideo.data.shapes import write_dataset

    if args.num < 1 or args.frames < 1 or args.size < 16 or args.size % 2 or args.fps <= 0:
        print(f"ulvideo data synth: need --num >= 1, --frames >= 1, an even --size >= 16 and --fps > 0 "
              f"(got {args.num}, {args.frames}, {args.size}, {args.fps})", file=sys.stderr)
        return 2
    try:
        count = write_dataset(args.out, args.num, args.frames, args.size, args.seed, args.fps)
    except FileExistsError as e:
        print(f"ulvideo data synth: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} clips ({args.frames} frames, {args.size}x{args.size}, {args.fps} fps) to {args.out}")
    return 0


def cmd_scan(args) -> int:
    """`ulvideo data scan DIR [--out M.parquet | R.json]`: the usable and the skipped files."""
    from ulvideo.data.manifest import FORMATS
    from ulvideo.data.scan import scan, write_report, write_scan_manifest

    out = Path(args.out) if args.out else Path(args.dir) / "scan.json"
    suffix = out.suffix.lower()
    if suffix != ".json" and suffix not in FORMATS:
        print(f"ulvideo data scan: --out {out}: use .parquet, .csv or .jsonl (a manifest) or .json (a report)",
              file=sys.stderr)
        return 2
    from ulvideo.cli_io import check_outputs

    check_outputs([out], [], args.overwrite)  # an unfinished scan's journal is beside it, not it
    try:
        report = scan(args.dir, backend=args.backend, threads=args.threads, out=out)
    except FileNotFoundError as e:
        print(f"ulvideo data scan: {e}", file=sys.stderr)
        return 2
    s = report["summary"]
    if report["resumed"]:
        print(f"continued an interrupted scan: {report['resumed']} files were already checked")
    print(f"{report['dir']}: {s['usable_videos']} videos ({s['total_duration_s']:.1f} s, {s['total_frames']} frames), "
          f"{s['usable_images']} images usable")
    if s["resolutions"]:
        print("  sizes: " + ", ".join(f"{k} ({n})" for k, n in list(s["resolutions"].items())[:8]))
    if s["fps"]:
        print("  fps:   " + ", ".join(f"{k} ({n})" for k, n in list(s["fps"].items())[:8]))
    for item in report["skipped"]:
        print(f"  skipped {item['path']}: {item['reason']}" + (f" ({item['detail']})" if item["detail"] else ""))
    if not (s["usable_videos"] or s["usable_images"]):
        print("no usable files", file=sys.stderr)
        return 1
    written = write_report(report, out) if suffix == ".json" else write_scan_manifest(report, out)
    print(f"{'report' if suffix == '.json' else 'manifest'}: {written}")
    return 0


def _fvd_device(name: str | None) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name in (None, "auto") else name


def _fvd_progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="clip")
    return bar, bar.update


def cmd_fvd_ref(args) -> int:
    """`ulvideo fvd ref`: statistics of real videos under a preset."""
    from ulvideo.cli_io import check_counts, check_outputs
    from ulvideo.eval import fvd

    check_counts(batch_size=args.batch_size)
    check_outputs([args.out], [args.weights], args.overwrite)
    try:
        plan = fvd.plan_reference(args.data, args.preset, args.mirror)
        ext = fvd.load_extractor(plan.protocol, args.weights, args.i3d_sha256, _fvd_device(args.device), args.batch_size)
        bar, tick = _fvd_progress(len(plan.clips), f"fvd ref {plan.protocol.name}")
        with bar:
            stats, meta = fvd.reference_statistics(plan, ext, tick)
    except (fvd.FVDInputError, fvd.WeightsError) as e:
        print(f"ulvideo fvd ref: {e}", file=sys.stderr)
        return 2
    except KeyError as e:  # unknown or retired preset
        print(f"ulvideo fvd ref: {e.args[0]}", file=sys.stderr)
        return 2
    stats.save(args.out, meta)
    keys = ("num_clips", "num_videos", "mirror", "skipped", "weights", "versions")
    print(json.dumps({k: meta[k] for k in keys} | {"preset": plan.protocol.name, "out": str(args.out)}))
    return 0


def _fvd_pipeline(args):
    """The stage-2 pipeline `pipe(prompts, seed) -> uint8 (B, T, H, W, 3)`."""
    from ulvideo.generate import load_pipeline

    return load_pipeline(args.export, args.base)


def cmd_fvd_calc(args) -> int:
    """`ulvideo fvd calc`: score a folder of generated videos, or clips streamed from a pipeline."""
    from ulvideo.cli_io import check_counts, check_finite, check_outputs, export_files, long_prompts, read_prompts
    from ulvideo.eval import fvd

    check_counts(batch_size=args.batch_size, steps=args.steps, decoder_steps=args.decoder_steps)
    check_finite(guidance=args.guidance)
    if args.out:
        check_outputs([args.out], [args.ref, args.prompts, args.weights, *export_files(args.export),
                                   *export_files(args.base)], args.overwrite)
    sampling = {"steps": args.steps, "decoder_steps": args.decoder_steps, "sampler": args.sampler,
                "guidance": args.guidance}
    try:
        ref, meta, p = fvd.load_reference(args.ref)
        if args.videos:
            planned = fvd.plan_folder(args.videos, p)
        elif not (args.base and args.prompts):
            raise fvd.FVDInputError("--export needs --base and --prompts")
        elif p.context_frames:
            raise fvd.FVDInputError(f"{p.name} needs {p.context_frames} real context frames per clip; generate with "
                                    "`ulvideo generate --context` and score the folder with --videos")
        else:
            prompts = read_prompts(args.prompts)
        ext = fvd.load_extractor(p, args.weights, args.i3d_sha256, _fvd_device(args.device), args.batch_size)
        if ext.weights["sha256"] != meta["weights"]["sha256"]:
            raise fvd.FVDInputError(f"weights {ext.weights['sha256']} differ from the reference's "
                                    f"{meta['weights']['sha256']}; features are not comparable")
        if args.videos:
            bar, tick = _fvd_progress(len(planned[1]), f"fvd calc {p.name}")
            with bar:
                gen, source = fvd.folder_statistics(args.videos, ext, tick, planned)
        else:
            pipe = _fvd_pipeline(args)
            for line in long_prompts(getattr(pipe, "text", None), prompts):  # None: no text encoder
                print(f"ulvideo fvd calc: {line}", file=sys.stderr)
            bar, tick = _fvd_progress(p.num_gen, f"fvd calc {p.name}")
            with bar:
                gen = fvd.pipeline_statistics(pipe, prompts, ext, args.seed, args.batch_size, sampling, tick)
            source = {"export": args.export, "base": args.base, "prompts": args.prompts, "seed": args.seed, **sampling}
        from ulvideo.exports import file_sha256

        result = fvd.score(ref, meta, gen, ext, source | {"ref": str(args.ref), "ref_sha256": file_sha256(args.ref)})
    except (fvd.FVDInputError, fvd.WeightsError, OSError) as e:
        print(f"ulvideo fvd calc: {e}", file=sys.stderr)
        return 2
    line = json.dumps(result)
    print(line)
    if args.out:
        from ulvideo.exports import atomic_write_text

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), line + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit status 0: done; 2: a bad argument, config or input file, said in one line on stderr
    before any compute where it can be known up front; 3: training stopped on non-finite steps."""
    import os

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--") and "=" in a]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and args.command != "train"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    args.overrides = overrides
    try:
        return int(args.run(args) or 0)
    except Exception as e:
        from ulvideo.cli_io import input_errors, one_line

        if not isinstance(e, input_errors()):
            raise
        name = " ".join(filter(None, (args.command, getattr(args, "fvd_command", None),
                                      getattr(args, "data_command", None))))
        rank = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"ulvideo {name}{rank}: {one_line(e)}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
