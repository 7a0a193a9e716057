"""Inference: load exports once, then encode, decode and generate.

    from ulvideo.generate import load_pipeline
    pipe = load_pipeline("runs/tiny/exports/latest.safetensors", "runs/base/exports/latest.safetensors")
    videos = pipe(["a small red circle moving left"], seed=0)      # uint8 (B, T, H, W, 3)

Generation: z ~ N(0, I) at lambda_min -> base-model sampler ending exactly at lambda_0 -> z0 (or, with
decode_from="clean", alpha_0 times the final clean prediction) -> diffusion decoder -> pixels.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ulvideo.checkpoint import ExportError, load_export
from ulvideo.config import Config
from ulvideo.ul import Condition, LatentDiffusion, UnifiedLatents


def load_stage1(path: str | Path, decoder_logsnr_end: float | None = None) -> UnifiedLatents:
    """A stage-1 export, ready to use; `decoder_logsnr_end` replaces its `decoder.sample_logsnr_end`."""
    weights, cfg, meta = load_export(path)
    if meta.get("stage", "ul") != "ul":
        raise ExportError(f"{path} is a '{meta.get('stage')}' export, not a stage-1 (ul) export")
    model = UnifiedLatents(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ExportError(f"{path}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if decoder_logsnr_end is not None:
        model.set_sample_logsnr_end(decoder_logsnr_end)
    return model.eval().requires_grad_(False)


def load_base(path: str | Path, stage1: UnifiedLatents) -> tuple[LatentDiffusion, Config, dict]:
    weights, cfg, meta = load_export(path)
    if meta.get("stage") != "base":
        raise ExportError(f"{path} is not a stage-2 (base) export")
    s1 = stage1.cfg
    if meta.get("latent_logsnr") != s1.ul.latent_logsnr or meta.get("prior_logsnr_min") != s1.ul.prior_logsnr_min:
        raise ExportError(f"{path} was trained on latents with lambda_0 = {meta.get('latent_logsnr')}, "
                          f"lambda_min = {meta.get('prior_logsnr_min')}; the stage-1 export has "
                          f"{s1.ul.latent_logsnr}, {s1.ul.prior_logsnr_min}: the exports do not belong together")
    model = LatentDiffusion(cfg, s1, text_dim=int(meta.get("text_dim", 0)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ExportError(f"{path}: weights do not fit the stage-1 export's latents or its own config "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False), cfg, meta


@dataclass
class Pipeline:
    stage1: UnifiedLatents
    base: LatentDiffusion
    base_cfg: Config
    text: object | None

    def condition(self, prompts: list[str] | None, labels: list[int] | None, context: torch.Tensor | None,
                  shape: tuple[int, ...]) -> tuple[Condition, Condition]:
        """(condition, null condition) for a latent batch of `shape` (B, C, T', H', W')."""
        batch, num_latent_frames = shape[0], shape[2]
        cond, null = Condition(), Condition()
        if self.text is not None:
            prompts = prompts if prompts else [""] * batch
            cond.text_emb, cond.text_mask = self.text.encode(prompts)
            null.text_emb, null.text_mask = self.text.null(batch)
        elif prompts and any(prompts):
            raise ValueError("this base model was trained without a text encoder; it cannot take prompts")
        if self.base_cfg.base.num_classes:
            cond.label = torch.tensor(labels if labels else [-1] * batch, dtype=torch.long)
            null.label = torch.full((batch,), -1, dtype=torch.long)
        k = self.base_cfg.base.context_frames
        if k:
            null.context, null.context_mask = torch.zeros(shape), torch.zeros(batch, num_latent_frames, dtype=torch.bool)
            cond.context, cond.context_mask = null.context.clone(), null.context_mask.clone()
            if context is not None:
                z_ctx = self.stage1.encode(context)  # (B, C, T'_ctx, H', W')
                if z_ctx.shape[2] < k or z_ctx.shape[3:] != shape[3:]:
                    raise ValueError(f"context gives latents {tuple(z_ctx.shape[1:])}; need >= {k} latent frames "
                                     f"of size {tuple(shape[3:])}")
                cond.context[:, :, :k] = z_ctx[:, :, :k]
                cond.context_mask[:, :k] = True
        return cond, null

    @torch.no_grad()
    def __call__(self, prompts: list[str] | None = None, *, labels: list[int] | None = None, seed: int = 0,
                 num_frames: int | None = None, height: int | None = None, width: int | None = None,
                 steps: int = 64, decoder_steps: int = 32, sampler: str = "ddpm", guidance: float = 1.0,
                 context: torch.Tensor | None = None, decode_from: str = "z0", progress=None,
                 decoder_sampler: str | None = None) -> np.ndarray:
        """uint8 videos (B, T, H, W, 3). `context`: clips (B, 3, T_ctx, H, W) in [-1, 1] whose first
        `context_frames` latent frames are given (frame prediction). `sampler` is the base model's;
        the decoder's is `decoder_sampler` (default: the same)."""
        from ulvideo.videoio import to_uint8

        e, d = self.stage1.cfg.encoder, self.base_cfg.data
        batch = len(prompts) if prompts else len(labels) if labels else (context.shape[0] if context is not None else 1)
        t = num_frames or d.num_frames
        if (t - 1) % e.temporal_downsample:
            raise ValueError(f"num_frames = {t} must be 1 + {e.temporal_downsample}k")
        h, w = height or d.height, width or d.width
        tl = 1 + (t - 1) // e.temporal_downsample
        shape = (batch, self.stage1.latent_channels, tl, h // e.spatial_downsample, w // e.spatial_downsample)
        cond, null = self.condition(prompts, labels, context, shape)
        g = torch.Generator().manual_seed(seed)
        res = self.base.sample(shape, cond, null, guidance, steps, sampler, g, progress)
        z0 = res.z if decode_from == "z0" else self.stage1.alpha0 * res.x_pred
        video = self.stage1.decode(z0, t, decoder_steps, decoder_sampler or sampler, g)
        return to_uint8(video)


@torch.no_grad()
def tightness_report(pipe: Pipeline, z_clean: torch.Tensor, captions: list[str] | None = None,
                     labels: list[int] | None = None, num_logsnrs: int = 32, seed: int = 0) -> dict:
    """Bits per clip on the same latents: the stage-1 prior's ELBO and the base model's unweighted
    ELBO with the null condition (the tightness check) and with the clips' own condition."""
    cond, null = pipe.condition(captions, labels, None, tuple(z_clean.shape))
    prior = pipe.stage1.rate_bits(z_clean, num_logsnrs, seed=seed).mean().item()
    base_null = pipe.base.elbo_bits(z_clean, null, num_logsnrs, seed=seed).mean().item()
    base_cond = pipe.base.elbo_bits(z_clean, cond, num_logsnrs, seed=seed).mean().item()
    return {"latents": z_clean.shape[0], "logsnr_samples": num_logsnrs, "stage1_prior_bits_per_clip": round(prior, 2),
            "base_elbo_null_bits_per_clip": round(base_null, 2), "base_elbo_cond_bits_per_clip": round(base_cond, 2),
            "null_over_prior": round(base_null / prior, 4)}


def load_pipeline(export: str | Path, base: str | Path, decoder_logsnr_end: float | None = None) -> Pipeline:
    """Load a stage-1 and a stage-2 export once; a clear error when they don't belong together.
    `decoder_logsnr_end`: where the decoder's sampling stops (default: the stage-1 export's)."""
    from ulvideo.text import load_text_encoder

    stage1 = load_stage1(export, decoder_logsnr_end)
    model, cfg, meta = load_base(base, stage1)
    text = None
    if cfg.base.text_encoder != "none":
        text = load_text_encoder(cfg.base.text_encoder, cfg.base.text_max_tokens)
        if meta.get("text_encoder") not in (None, text.fingerprint()):
            raise ExportError(f"{base} was trained with text encoder {meta.get('text_encoder')}, "
                              f"but {cfg.base.text_encoder} now loads as {text.fingerprint()}")
    return Pipeline(stage1, model, cfg, text)


# --------------------------------------------------------------------------------------------
# CLI handlers
# --------------------------------------------------------------------------------------------


def _read_input(path: str, num_frames: int | None, cfg: Config) -> torch.Tensor:
    """A video or image file -> (1, 3, T, H, W) in [-1, 1]: the first `num_frames` frames (default:
    the training clip length, or as many 1 + 4k frames as the video has), resized and centre-cropped
    like the training data."""
    from ulvideo.data import resize_crop
    from ulvideo.videoio import IMAGE_EXTENSIONS, probe, read_clip, read_image, to_float

    d, k = cfg.data, cfg.encoder.temporal_downsample
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        frames = read_image(path)
    else:
        available = probe(path).num_frames
        t = num_frames or min(d.num_frames, 1 + k * ((available - 1) // k))
        if (t - 1) % k or t > available:
            raise ValueError(f"{path}: cannot take {t} frames (it has {available}; frames must be 1 + {k}k)")
        frames = read_clip(path, 0, t, d.frame_stride)
    return to_float(resize_crop(frames, d.height, d.width, d.resolution, None, None, False))[None]


def _tiling(args):
    """`--tile P` as a streaming.Tiling (None without it)."""
    from ulvideo import streaming

    return streaming.Tiling(args.tile) if args.tile else None


def main_encode(args) -> int:
    try:
        model = load_stage1(args.export)
    except ExportError as e:
        print(f"ulvideo encode: {e}", file=sys.stderr)
        return 2
    if args.data:
        from ulvideo.encode_dataset import encode_dataset

        return encode_dataset(model, args)
    from safetensors.torch import save_file

    x = _read_input(args.input, args.num_frames, model.cfg)
    with torch.no_grad():
        if args.chunk or args.tile:
            from ulvideo import streaming

            z = streaming.encode(model, x, args.chunk, tiling=_tiling(args))[0]
        else:
            z = model.encode(x)[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"z_clean": z.contiguous()}, args.out, metadata={"source": str(args.input), "num_frames": str(x.shape[2])})
    print(f"z_clean {tuple(z.shape)} -> {args.out}")
    return 0


def main_decode(args) -> int:
    from safetensors.torch import load_file

    from ulvideo.videoio import to_uint8, write_png_grid, write_video

    try:
        model = load_stage1(args.export, args.logsnr_end)
    except (ExportError, ValueError) as e:
        print(f"ulvideo decode: {e}", file=sys.stderr)
        return 2
    z = load_file(args.input)["z_clean"]
    if z.ndim == 4:
        z = z[None]
    if z.shape[1] != model.latent_channels:
        print(f"ulvideo decode: {args.input} has {z.shape[1]} latent channels, the export expects {model.latent_channels}", file=sys.stderr)
        return 2
    if args.chunk or args.tile:
        # per-frame noise streams: chunked, tiled and one-pass decoding draw the same sample
        from ulvideo import streaming

        with torch.no_grad():
            z0 = streaming.noisy_latent(model, z, seed=args.seed, mode=args.latent_noise)
            clip = streaming.decode(model, z0, args.chunk, steps=args.steps, sampler=args.sampler, seed=args.seed,
                                    tiling=_tiling(args))
    else:
        g = torch.Generator().manual_seed(args.seed)
        z0 = model.noisy_latent(z, g, args.latent_noise)
        clip = model.decode(z0, steps=args.steps, sampler=args.sampler, generator=g)
    video = to_uint8(clip)[0]
    write_video(args.out, video)
    if not args.out.endswith(".png"):
        write_png_grid(Path(args.out).with_suffix(".png"), [video])
    print(json.dumps({"out": args.out, "frames": video.shape[0], "steps": args.steps, "sampler": args.sampler,
                      "logsnr_end": model.sample_logsnr_end(), "latent_noise": args.latent_noise, "seed": args.seed, "chunk": args.chunk, "tile": args.tile}))
    return 0


def main_generate(args) -> int:
    from tqdm import tqdm

    from ulvideo.videoio import write_png_grid, write_video

    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    try:
        pipe = load_pipeline(args.export, args.base, args.decoder_logsnr_end)
    except Exception as e:  # missing text encoder, mismatched exports: one clear line
        print(f"ulvideo generate: {e}", file=sys.stderr)
        return 2
    labels = list(args.label)
    n = max(len(prompts), len(labels), 1)
    context = None
    if args.context:
        context = _read_input(args.context, None, pipe.base_cfg)
    out = Path(args.out)
    several = n > 1
    if several:
        out.mkdir(parents=True, exist_ok=True)
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
            path = out / f"sample_{index:04d}.mp4" if several else out
            write_video(path, v)
            write_png_grid(Path(path).with_suffix(".png"), [v])
            index += 1
            bar.update(1)
    bar.close()
    return 0
