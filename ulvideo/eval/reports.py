"""Held-out evaluation: a stage-1 model's reconstructions (files + PSNR/SSIM/rFVD) and bits, and the
tightness of a base model's ELBO against the stage-1 prior's bits on the same latents."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ulvideo.eval.metrics import ReconstructionMetrics
from ulvideo.ul import Condition, LatentDiffusion, UnifiedLatents
from ulvideo.videoio import to_uint8, write_png_grid, write_video


@torch.no_grad()
def reconstruction_report(model: UnifiedLatents, videos: torch.Tensor, out_dir: Path | None, steps: int,
                          seed: int = 0, sampler: str = "ddpm", latent_noise: str = "sample",
                          extractor=None, num_logsnrs: int | None = None, fps: int = 8,
                          logsnr_end: float | None = None) -> dict:
    """Reconstruct `videos` (B, 3, T, H, W) in [-1, 1] (noise from `seed`, decoding up to `logsnr_end`);
    write mp4s and a PNG sheet (inputs above reconstructions) into `out_dir`; return PSNR/SSIM (and
    rFVD given an I3D extractor: the extractor's preset's frames of each clip) and the held-out rate
    in bits (K stratified logSNRs per clip, fixed seed)."""
    end = model.decoder_logsnr_end(logsnr_end)
    recon = model.reconstruct(videos, steps, sampler, latent_noise, seed, end)
    metrics = ReconstructionMetrics(extractor=extractor)
    metrics.update(videos, recon)
    out = {k.split("/")[-1]: v for k, v in metrics.compute().items()}
    if "rfvd" in out:  # what the number depends on besides the clips
        out |= {"fvd_preset": extractor.protocol.name, "i3d_sha256": extractor.weights.get("sha256")}
    k = num_logsnrs or model.cfg.ul.eval_logsnr_samples
    bits = model.rate_bits(model.encode(videos), k, seed=seed)
    _, _, t, h, w = videos.shape
    out.update({"bits_per_clip": bits.mean().item(), "bits_per_pixel": bits.mean().item() / (t * h * w),
                "rate_logsnr_samples": k, "decoder_steps": steps, "sampler": sampler, "latent_noise": latent_noise,
                "logsnr_end": end})
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        real_u8, recon_u8 = to_uint8(videos), to_uint8(recon)
        for i in range(real_u8.shape[0]):
            write_video(out_dir / f"recon_{i:03d}.mp4", recon_u8[i], fps=fps)
        rows = [r for pair in zip(real_u8, recon_u8) for r in pair]
        write_png_grid(out_dir / "recon_sheet.png", rows)
    return {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}


@torch.no_grad()
def score_shapes_reconstructions(model: UnifiedLatents, data_cfg, folder: str | Path, decoder_steps: int = 32,
                                 sampler: str = "ddpm", limit: int | None = None, micro_batch_size: int = 16,
                                 seed: int = 0, num_logsnrs: int = 32, logsnr_end: float | None = None) -> dict:
    """Reconstruct the held-out clips of a shapes folder (`data_cfg`'s split; z0 sampled, batch i's
    noise from seed + i, decoding up to `logsnr_end`) and score them with the shapes measurer against
    the specs `ulvideo data synth` wrote: colour / shape / direction match, the fraction of clips
    whose shape the measurer leaves "unknown" (no clear call, `shapes.SHAPE_RULE`), the fraction of
    frames whose centroid is within 2 px, PSNR, held-out bits per clip, and the colour errors seen."""
    import numpy as np

    from ulvideo.data import build_loader
    from ulvideo.eval.metrics import psnr
    from ulvideo.data.shapes import manifest_specs, measure_clip, score

    specs = manifest_specs(folder)
    end = model.decoder_logsnr_end(logsnr_end)
    colour, shape, unknown, direction, within2, psnrs, bits, wrong = [], [], [], [], [], [], [], []
    for i, batch in enumerate(build_loader(data_cfg, micro_batch_size=micro_batch_size, seed=0, split="heldout")):
        x = batch["video"]
        z = model.encode(x)
        bits.append(model.rate_bits(z, num_logsnrs, seed=seed))
        recon = model.decode(model.noisy_latent(z, seed + i), decoder_steps, sampler, seed + i, end)
        psnrs.append(psnr(x, recon))
        for src, clip in zip(batch["source"], to_uint8(recon)):
            spec, m = specs[Path(src).name], measure_clip(clip)
            s = score(spec, m)
            colour.append(s["colour"])
            shape.append(s["shape"])
            unknown.append(m.shape == "unknown")
            direction.append(s["direction"])
            within2 += [e is not None and e <= 2.0 for e in s["centroid_err"]]
            if not s["colour"]:
                wrong.append(f"{spec.colour}->{m.colour}")
        if limit is not None and len(colour) >= limit:
            break
    bits_t = torch.cat(bits)
    _, t, h, w = x.shape[1:]
    return {"clips": len(colour), "bits_per_clip": bits_t.mean().item(), "bits_per_pixel": bits_t.mean().item() / (t * h * w),
            "psnr_db": round(torch.cat(psnrs).mean().item(), 3),
            "colour_match": round(float(np.mean(colour)), 4), "shape_match": round(float(np.mean(shape)), 4),
            "shape_unknown": round(float(np.mean(unknown)), 4),
            "direction_match": round(float(np.mean(direction)), 4),
            "centroid_within_2px": round(float(np.mean(within2)), 4), "colour_errors": wrong, "logsnr_end": end}


@torch.no_grad()
def tightness_report(stage1: UnifiedLatents, base: LatentDiffusion, z_clean: torch.Tensor, cond: Condition,
                     null: Condition, num_logsnrs: int = 32, seed: int = 0) -> dict:
    """Bits per clip on the same latents z_clean (B, C, T', H', W'), each the mean over the clips of
    `diffusion.stratified_elbo_bits` with the same K = `num_logsnrs` times and noise (`seed`):
    the stage-1 prior's ELBO; the base model's unweighted ELBO with the null condition, the same
    quantity from a larger model (the tightness check: `null_over_prior` near 1 when the prior's
    bits are as tight a bound as the base model's); and with the clips' own condition (over the
    generated frames only, where `cond` gives context frames)."""
    prior = stage1.rate_bits(z_clean, num_logsnrs, seed).mean().item()
    base_null = base.elbo_bits(z_clean, null, num_logsnrs, seed).mean().item()
    base_cond = base.elbo_bits(z_clean, cond, num_logsnrs, seed).mean().item()
    return {"latents": z_clean.shape[0], "logsnr_samples": num_logsnrs, "stage1_prior_bits_per_clip": prior,
            "base_elbo_null_bits_per_clip": base_null, "base_elbo_cond_bits_per_clip": base_cond,
            "null_over_prior": base_null / prior}
