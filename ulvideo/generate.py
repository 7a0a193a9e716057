"""Inference: load exports once, then encode, decode and generate.

    from ulvideo.generate import load_pipeline
    pipe = load_pipeline("runs/tiny/exports/latest.safetensors", "runs/base/exports/latest.safetensors")
    videos = pipe(["a small red circle moving left"], seed=0)      # uint8 (B, T, H, W, 3)

Generation: z ~ N(0, I) at lambda_min -> base-model sampler ending exactly at lambda_0 -> z0 (or, with
decode_from="clean", alpha_0 times the final clean prediction) -> diffusion decoder -> pixels.
Defaults (the `ulvideo generate` ones): guidance 4, base sampler DDPM (64 steps), decoder DDIM
(32 steps) sampling up to the decoder's logsnr_max (`decoder_logsnr_end` stops it earlier).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ulvideo.exports import ExportError, load_base, load_stage1
from ulvideo.config import Config
from ulvideo.ul import Condition, LatentDiffusion, UnifiedLatents


@dataclass
class Pipeline:
    stage1: UnifiedLatents
    base: LatentDiffusion
    base_cfg: Config
    text: object | None
    decoder_logsnr_end: float | None = None  # the default stop logSNR of `__call__` (None: logsnr_max)

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
                 steps: int = 64, decoder_steps: int = 32, sampler: str = "ddpm", guidance: float = 4.0,
                 context: torch.Tensor | None = None, decode_from: str = "z0", progress=None,
                 decoder_sampler: str = "ddim", decoder_logsnr_end: float | None = None) -> np.ndarray:
        """uint8 videos (B, T, H, W, 3). `context`: clips (B, 3, T_ctx, H, W) in [-1, 1] whose first
        `context_frames` latent frames are given (frame prediction). `sampler` is the base model's,
        `decoder_sampler` the decoder's; the decoder stops at `decoder_logsnr_end` (None: the
        pipeline's, from `load_pipeline`, else the decoder's logsnr_max). The base model draws from a
        generator seeded `seed`, the decoder its per-frame noise from `seed`."""
        from ulvideo.videoio import to_uint8

        e, d = self.stage1.cfg.encoder, self.base_cfg.data
        end = self.stage1.decoder_logsnr_end(self.decoder_logsnr_end if decoder_logsnr_end is None else decoder_logsnr_end)
        for name, value in (("sampler", sampler), ("decoder_sampler", decoder_sampler)):
            if value not in ("ddpm", "ddim"):
                raise ValueError(f"{name} = '{value}' (ddpm, ddim)")
        if decode_from not in ("z0", "clean"):
            raise ValueError(f"decode_from = '{decode_from}' (z0, clean)")
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
        video = self.stage1.decode(z0, decoder_steps, decoder_sampler, seed, end)
        return to_uint8(video)


def load_pipeline(export: str | Path, base: str | Path, decoder_logsnr_end: float | None = None) -> Pipeline:
    """Load a stage-1 and a stage-2 export once; a clear error when they don't belong together.
    `decoder_logsnr_end`: the pipeline's default stop logSNR for the decoder (None: its logsnr_max),
    checked here (ValueError) so a bad value fails before anything is generated."""
    from ulvideo.text import load_text_encoder

    stage1 = load_stage1(export)
    stage1.decoder_logsnr_end(decoder_logsnr_end)
    model, cfg, meta = load_base(base, stage1)
    text = None
    if cfg.base.text_encoder != "none":
        text = load_text_encoder(cfg.base.text_encoder, cfg.base.text_max_tokens)
        if meta.get("text_encoder") not in (None, text.fingerprint()):
            raise ExportError(f"{base} was trained with text encoder {meta.get('text_encoder')}, "
                              f"but {cfg.base.text_encoder} now loads as {text.fingerprint()}")
    return Pipeline(stage1, model, cfg, text, decoder_logsnr_end)


def check_request(pipe: Pipeline, prompts: list[str], labels: list[int], num_frames: int | None,
                  context: torch.Tensor | None) -> None:
    """What the exports can take, before anything is sampled: a ValueError naming the argument."""
    k = pipe.stage1.cfg.encoder.temporal_downsample
    if num_frames is not None and (num_frames < 1 or (num_frames - 1) % k):
        raise ValueError(f"--num-frames {num_frames}: must be 1 + {k}k (e.g. {1 + k * max(1, (num_frames - 1) // k)})")
    b = pipe.base_cfg.base
    if prompts and pipe.text is None:
        raise ValueError("--prompt: this base model was trained without text (base.text_encoder = none)")
    if labels and not b.num_classes:
        raise ValueError("--label: this base model has no class labels (base.num_classes = 0)")
    bad = [v for v in labels if not 0 <= v < b.num_classes]
    if bad:
        raise ValueError(f"--label {bad[0]}: must lie in [0, {b.num_classes}) (base.num_classes = {b.num_classes})")
    if context is not None:
        if not b.context_frames:
            raise ValueError("--context: this base model was trained without context frames (base.context_frames = 0)")
        frames = 1 + (context.shape[2] - 1) // k
        if frames < b.context_frames:
            raise ValueError(f"--context gives {context.shape[2]} frames ({frames} latent frames); the base model "
                             f"takes {b.context_frames} latent frames, i.e. at least {1 + k * (b.context_frames - 1)} frames")


def read_input(path: str, num_frames: int | None, cfg: Config) -> torch.Tensor:
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
