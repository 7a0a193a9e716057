"""Held-out evaluation of a stage-1 model: reconstructions (files + PSNR/SSIM/rFVD) and bits."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ulvideo.metrics import ReconstructionMetrics
from ulvideo.ul import UnifiedLatents
from ulvideo.videoio import to_uint8, write_png_grid, write_video


@torch.no_grad()
def reconstruction_report(model: UnifiedLatents, videos: torch.Tensor, out_dir: Path | None, steps: int,
                          seed: int = 0, sampler: str = "ddpm", latent_noise: str = "sample",
                          extractor=None, num_logsnrs: int | None = None, fps: int = 8) -> dict:
    """Reconstruct `videos` (B, 3, T, H, W) in [-1, 1]; write mp4s and a PNG sheet (inputs above
    reconstructions) into `out_dir`; return PSNR/SSIM (and rFVD given an I3D extractor) and the
    held-out rate in bits (K stratified logSNRs per clip, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    recon = model.reconstruct(videos, steps=steps, sampler=sampler, latent_noise=latent_noise, generator=g)
    metrics = ReconstructionMetrics(extractor=extractor)
    metrics.update(videos, recon)
    out = {k.split("/")[-1]: v for k, v in metrics.compute().items()}
    k = num_logsnrs or model.cfg.ul.eval_logsnr_samples
    bits = model.rate_bits(model.encode(videos), k, seed=seed)
    _, _, t, h, w = videos.shape
    out.update({"bits_per_clip": bits.mean().item(), "bits_per_pixel": bits.mean().item() / (t * h * w),
                "rate_logsnr_samples": k, "decoder_steps": steps, "sampler": sampler, "latent_noise": latent_noise})
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        real_u8, recon_u8 = to_uint8(videos), to_uint8(recon)
        for i in range(real_u8.shape[0]):
            write_video(out_dir / f"recon_{i:03d}.mp4", recon_u8[i], fps=fps)
        rows = [r for pair in zip(real_u8, recon_u8) for r in pair]
        write_png_grid(out_dir / "recon_sheet.png", rows)
    return {k: (round(v, 5) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}
