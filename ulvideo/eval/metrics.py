"""Reconstruction metrics (PSNR, SSIM, LPIPS) and the Gaussian feature statistics behind FVD.

All pixel metrics are computed on uint8 values (data range 255), i.e. on what would be written to
a file: float `(B, 3, T, H, W)` inputs in [-1, 1] go through `videoio.to_uint8` first.

* PSNR is per clip: `10 log10(255^2 / MSE)` with the MSE over all T*H*W*3 values of the clip
  (capped at 100 dB so identical clips do not give inf), then averaged over clips.
* SSIM is Wang et al. 2004 (IEEE TIP 13(4)): 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
  population (co)variances, averaged over the valid region of each frame and channel -- the same
  numbers as `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=255, channel_axis=-1)` -- then over frames and clips.
* LPIPS (Zhang et al. 2018) only when the `lpips` package and its backbone weights are already on
  disk; nothing is downloaded. Per frame, averaged.

`FeatureStats` keeps (count, sum, sum of outer products) in float64, so batches and ranks merge
by addition; `frechet_distance` works from means and covariances.

Held-out evaluation during training (the loop calls this every `eval.every` steps):

    extractor, why_not = fvd.try_load_extractor(cfg.eval, device)   # None when no I3D weights
    rec = ReconstructionMetrics(extractor)
    for real, recon in heldout_pairs:           # uint8 (B, T, H, W, 3) or float (B, 3, T, H, W)
        rec.update(real, recon)
    logs = rec.compute()   # {"recon/psnr", "recon/ssim", ["recon/lpips"], ["recon/rfvd"], "recon/num_clips"}
    header = rec.provenance()  # preset and I3D sha256 behind rFVD: write once with the run's metrics

`compute()` returns the numbers of the clips this process saw and never communicates: training
evaluates on rank 0 alone while the other ranks wait (ulvideo/train/loop.py), and an implicit
collective there would wait for ranks that never call it. Where every rank of a group scores its
own share, `compute(group)` sums the counts, PSNR/SSIM sums and feature statistics over that group
first (a collective: every rank of it must call it) and every rank gets the same numbers. Bits per
clip come from the model's own ELBO.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0
SSIM_SIGMA, SSIM_RADIUS, SSIM_K1, SSIM_K2 = 1.5, 5, 0.01, 0.03  # radius = int(3.5 * sigma + 0.5)


# --------------------------------------------------------------------------------------------
# Distributed helper (optional; nothing here requires an initialized process group).
# --------------------------------------------------------------------------------------------


def _all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum `t` over ranks when torch.distributed is initialized; otherwise return it unchanged."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return t
    backend = torch.distributed.get_backend(group)
    work = t
    if backend == "nccl" and not t.is_cuda:
        work = t.to(torch.device("cuda", torch.cuda.current_device()))
    torch.distributed.all_reduce(work, op=torch.distributed.ReduceOp.SUM, group=group)
    return work.to(t.device)


# --------------------------------------------------------------------------------------------
# Feature statistics and the Frechet distance.
# --------------------------------------------------------------------------------------------


class FeatureStats:
    """Running (count, sum, sum of outer products) of feature vectors, in float64."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, features: torch.Tensor) -> None:
        """Add a batch `(N, dim)`; products are formed in float64, not in the network's dtype."""
        f = torch.as_tensor(features).detach().reshape(-1, self.dim).to(self.sum.device, torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError("FeatureStats.update: non-finite features")
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.sum_outer += f.T @ f

    def copy(self) -> "FeatureStats":
        out = FeatureStats(self.dim, self.sum.device)
        out.count, out.sum, out.sum_outer = self.count, self.sum.clone(), self.sum_outer.clone()
        return out

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        out = FeatureStats(self.dim, self.sum.device)
        out.count = self.count + other.count
        out.sum = self.sum + other.sum.to(self.sum.device)
        out.sum_outer = self.sum_outer + other.sum_outer.to(self.sum.device)
        return out

    def all_reduce(self, group=None) -> "FeatureStats":
        """Sum the statistics over the ranks of `group` in place (no-op without torch.distributed)."""
        flat = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64, device=self.sum.device),
                          self.sum, self.sum_outer.flatten()])
        flat = _all_reduce_sum(flat, group)
        self.count = int(round(flat[0].item()))
        self.sum = flat[1:1 + self.dim].clone()
        self.sum_outer = flat[1 + self.dim:].reshape(self.dim, self.dim).clone()
        return self

    def mean(self) -> np.ndarray:
        if self.count < 1:
            raise ValueError("no features accumulated")
        return (self.sum / self.count).cpu().numpy()

    def cov(self, estimator: str = "unbiased") -> np.ndarray:
        """Covariance: 'unbiased' divides the centred scatter by n - 1, 'population' by n."""
        n = self.count
        if estimator not in ("unbiased", "population"):
            raise ValueError(f"covariance estimator must be 'unbiased' or 'population', got {estimator!r}")
        if n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {n}")
        mu = self.sum / n
        scatter = self.sum_outer - n * torch.outer(mu, mu)
        c = scatter / (n - 1 if estimator == "unbiased" else n)
        return (0.5 * (c + c.T)).cpu().numpy()

    def save(self, path: str | os.PathLike, meta: dict) -> None:
        """npz with the raw sums and a JSON `meta` string (loadable with allow_pickle=False)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, count=np.int64(self.count), sum=self.sum.cpu().numpy(),
                 sum_outer=self.sum_outer.cpu().numpy(), meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> tuple["FeatureStats", dict]:
        with np.load(path, allow_pickle=False) as z:
            missing = {"count", "sum", "sum_outer", "meta"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a ulvideo statistics file (missing {sorted(missing)})")
            s = cls(int(z["sum"].shape[0]))
            s.count = int(z["count"])
            s.sum = torch.from_numpy(z["sum"].astype(np.float64))
            s.sum_outer = torch.from_numpy(z["sum_outer"].astype(np.float64))
            meta = json.loads(str(z["meta"]))
        return s, meta


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigendecomposition; round-off negatives -> 0."""
    w, v = np.linalg.eigh(0.5 * (c + c.T))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)  (Frechet 1957; Dowson & Landau 1982).

    tr((S1 S2)^1/2) = tr((A S2 A)^1/2) with A = S1^1/2: both matrices are similar, and A S2 A is
    symmetric PSD, so two `eigh` calls replace the general (and on singular covariances unstable)
    `scipy.linalg.sqrtm` of the non-symmetric product.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    a = _sqrt_psd(s1)
    m = a @ s2 @ a
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    # The exact value is >= 0; only round-off (relative 1e-12 of the traces) can push it below.
    return max(d, 0.0)


def fvd_from_stats(a: FeatureStats, b: FeatureStats, estimator: str) -> float:
    return frechet_distance(a.mean(), a.cov(estimator), b.mean(), b.cov(estimator))


# --------------------------------------------------------------------------------------------
# Pixel metrics on uint8 clips.
# --------------------------------------------------------------------------------------------


def as_uint8_clips(video) -> torch.Tensor:
    """uint8 `(B, T, H, W, 3)` tensor from uint8 `(B, T, H, W, 3)` or float `(B, 3, T, H, W)` in [-1, 1]."""
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(np.ascontiguousarray(video))
    if video.dtype == torch.uint8:
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"uint8 clips must be (B, T, H, W, 3), got {tuple(video.shape)}")
        return video
    if not video.is_floating_point():
        raise TypeError(f"clips must be uint8 or float, got {video.dtype}")
    from ulvideo.videoio import to_uint8  # the one float <-> uint8 conversion of the project

    return torch.from_numpy(to_uint8(video))


def psnr(real, recon, data_range: float = 255.0) -> torch.Tensor:
    """Per-clip PSNR in dB, `(B,)`, from the MSE over the whole clip."""
    x, y = as_uint8_clips(real), as_uint8_clips(recon)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    floor = data_range ** 2 * 10.0 ** (-PSNR_CAP_DB / 10.0)
    return 10.0 * torch.log10(data_range ** 2 / mse.clamp_min(floor))


def _gaussian_window(device) -> torch.Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


def ssim(real, recon, data_range: float = 255.0) -> torch.Tensor:
    """Per-clip SSIM `(B,)`: the mean over frames of the channel-averaged SSIM of each frame."""
    x, y = as_uint8_clips(real), as_uint8_clips(recon)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    b, t, h, w, c = x.shape
    if min(h, w) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs frames of at least {2 * SSIM_RADIUS + 1} pixels, got {h}x{w}")
    # (B*T, C, H, W) in float64; a separable VALID filter gives exactly the interior that the
    # reference crops after its padded filtering, so the padding mode never enters.
    x = x.reshape(b * t, h, w, c).permute(0, 3, 1, 2).double()
    y = y.reshape(b * t, h, w, c).permute(0, 3, 1, 2).double()
    g = _gaussian_window(x.device)
    gh, gw = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)

    def blur(z):
        return F.conv2d(F.conv2d(z, gh, groups=c), gw, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3)).reshape(b, t).mean(1)


def load_lpips(device="cpu"):
    """(model, None) when `lpips` and its AlexNet backbone are on disk, else (None, reason)."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None, "the lpips package is not installed"
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("alexnet-*.pth")):
        return None, f"no AlexNet backbone weights in {hub} (nothing is downloaded at run time)"
    import lpips

    model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    return model, None


@torch.no_grad()
def lpips_distance(model, real, recon) -> torch.Tensor:
    """Per-clip LPIPS `(B,)`, the mean over frames."""
    from ulvideo.videoio import to_float

    x, y = to_float(as_uint8_clips(real)), to_float(as_uint8_clips(recon))  # (B, 3, T, H, W)
    b, _, t, h, w = x.shape
    dev = next(model.parameters()).device
    fx = x.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w).to(dev)
    fy = y.permute(0, 2, 1, 3, 4).reshape(b * t, 3, h, w).to(dev)
    return model(fx, fy).reshape(b, t).mean(1).double().cpu()


# --------------------------------------------------------------------------------------------
# Held-out reconstruction evaluation.
# --------------------------------------------------------------------------------------------


class ReconstructionMetrics:
    """Accumulates PSNR, SSIM, optional LPIPS and, given an FVD extractor, rFVD statistics."""

    def __init__(self, extractor=None, lpips_model=None):
        self.extractor = extractor
        self.lpips_model = lpips_model
        self.sums = torch.zeros(4, dtype=torch.float64)  # clips, psnr, ssim, lpips
        if extractor is not None:
            self.real_stats = FeatureStats(extractor.dim, extractor.device)
            self.recon_stats = FeatureStats(extractor.dim, extractor.device)

    @torch.no_grad()
    def update(self, real, recon) -> None:
        x, y = as_uint8_clips(real).cpu(), as_uint8_clips(recon).cpu()
        self.sums[0] += x.shape[0]
        self.sums[1] += psnr(x, y).sum()
        self.sums[2] += ssim(x, y).sum()
        if self.lpips_model is not None:
            self.sums[3] += lpips_distance(self.lpips_model, x, y).sum()
        if self.extractor is not None:  # the preset's frames (the first num_frames) at its resolution
            self.real_stats.update(self.extractor(x))
            self.recon_stats.update(self.extractor(y))

    def provenance(self) -> dict:
        """What the numbers depend on besides the clips; log it once beside them."""
        out = {"psnr": f"per clip, uint8, capped at {PSNR_CAP_DB} dB", "ssim": "Wang et al. 2004, gaussian 11x11"}
        if self.extractor is not None:
            out |= {"fvd_preset": self.extractor.protocol.name, "i3d_sha256": self.extractor.weights.get("sha256")}
        return out

    def compute(self, group=None) -> dict[str, float]:
        """The metrics of the clips seen here; with `group` (e.g. `torch.distributed.group.WORLD`), of the
        clips every rank of the group saw (a collective). Without it nothing is communicated."""
        reduce = group is not None
        sums = _all_reduce_sum(self.sums.clone(), group) if reduce else self.sums.clone()
        n = float(sums[0])
        out = {"recon/num_clips": n}
        if n == 0:
            return out
        out["recon/psnr"] = float(sums[1]) / n
        out["recon/ssim"] = float(sums[2]) / n
        if self.lpips_model is not None:
            out["recon/lpips"] = float(sums[3]) / n
        if self.extractor is not None:
            real, recon = self.real_stats.copy(), self.recon_stats.copy()
            if reduce:
                real, recon = real.all_reduce(group), recon.all_reduce(group)
            if real.count >= 2:
                out["recon/rfvd"] = fvd_from_stats(real, recon, self.extractor.protocol.covariance)
        return out

