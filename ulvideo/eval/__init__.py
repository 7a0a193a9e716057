"""Evaluation: reconstruction metrics (PSNR, SSIM, LPIPS), FVD (I3D features, float64 statistics,
named presets) and the held-out reports the training loop and the benchmarks write."""
