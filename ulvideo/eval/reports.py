"""Held-out evaluation of a stage-1 model: reconstructions (files + PSNR/SSIM/rFVD) and bits."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ulvideo.eval.metrics import ReconstructionMetrics
from ulvideo.ul import UnifiedLatents
from ulvideo.videoio import to_uint8, write_png_grid, write_video


@torch.no_grad()
def reconstruction_report(model: UnifiedLatents, videos: torch.Tensor, out_dir: Path | None, steps: int,
                          seed: int = 0, sampler: str = "ddpm", latent_noise: str = "sample",
                          extractor=None, num_logsnrs: int | None = None, fps: int = 8) -> dict:
    """Reconstruct `videos` (B, 3, T, H, W) in [-1, 1]; write mp4s and a PNG sheet (inputs above
    reconstructions) into `out_dir`; return PSNR/SSIM (and rFVD given an I3D extractor: the
    extractor's preset's frames of each clip) and the held-out rate in bits (K stratified logSNRs
    per clip, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    recon = model.reconstruct(videos, steps=steps, sampler=sampler, latent_noise=latent_noise, generator=g)
    metrics = ReconstructionMetrics(extractor=extractor)
    metrics.update(videos, recon)
    out = {k.split("/")[-1]: v for k, v in metrics.compute().items()}
    if "rfvd" in out:  # what the number depends on besides the clips
        out |= {"fvd_preset": extractor.protocol.name, "i3d_sha256": extractor.weights.get("sha256")}
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


@torch.no_grad()
def score_shapes_reconstructions(model: UnifiedLatents, data_cfg, folder: str | Path, decoder_steps: int = 32,
                                 sampler: str = "ddpm", limit: int | None = None, micro_batch_size: int = 16,
                                 seed: int = 0, num_logsnrs: int = 32) -> dict:
    """Reconstruct the held-out clips of a shapes folder (`data_cfg`'s split; z0 sampled, one
    generator seeded `seed` for the whole pass) and score them with the shapes measurer against
    the specs `ulvideo data synth` wrote: colour / shape / direction match, the fraction of frames
    whose centroid is within 2 px, PSNR, held-out bits per clip, and the colour errors seen."""
    import numpy as np

    from ulvideo.data import build_loader
    from ulvideo.eval.metrics import psnr
    from ulvideo.data.shapes import manifest_specs, measure_clip, score

    specs = manifest_specs(folder)
    g = torch.Generator().manual_seed(seed)
    colour, shape, direction, within2, psnrs, bits, wrong = [], [], [], [], [], [], []
    for batch in build_loader(data_cfg, micro_batch_size=micro_batch_size, seed=0, split="heldout"):
        x = batch["video"]
        z = model.encode(x)
        bits.append(model.rate_bits(z, num_logsnrs, seed=seed))
        recon = model.decode(model.noisy_latent(z, g), x.shape[2], decoder_steps, sampler, g)
        psnrs.append(psnr(x, recon))
        for src, clip in zip(batch["source"], to_uint8(recon)):
            spec, m = specs[Path(src).name], measure_clip(clip)
            s = score(spec, m)
            colour.append(s["colour"])
            shape.append(s["shape"])
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
            "direction_match": round(float(np.mean(direction)), 4),
            "centroid_within_2px": round(float(np.mean(within2)), 4), "colour_errors": wrong}
