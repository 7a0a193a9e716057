"""The reference tools' FVD pixel pipelines and statistics, rebuilt from their documented operations.

Written for the parity tests (tests/test_fvd_parity.py) and benchmarks/fvd_parity.py without
ulvideo.eval.fvd_data or ulvideo.eval.fvd: only torch, numpy, PIL and scipy. The file and line each
step follows are listed in ulvideo/eval/fvd_presets.py; here each function says which tool it is.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image


# ---- pixels ------------------------------------------------------------------------------------


def stylegan_v_convert(frames: np.ndarray, size: int) -> np.ndarray:
    """StyleGAN-V convert_videos_to_frames: torchvision resize(int) with LANCZOS, then center_crop."""
    out = []
    for f in frames:
        im = Image.fromarray(f)
        w, h = im.size
        ow, oh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
        im = im.resize((ow, oh), Image.LANCZOS)
        top, left = int(round((oh - size) / 2.0)), int(round((ow - size) / 2.0))
        out.append(np.asarray(im.crop((left, top, left + size, top + size))))
    return np.stack(out)


def _short_side_bilinear(frames: np.ndarray, resolution: int, antialias: bool) -> torch.Tensor:
    """VideoGPT/TATS/cd-FVD `preprocess` up to the crop: (C, T, R, R) in [0, 1], float32."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.
    t, c, h, w = video.shape
    scale = resolution / min(h, w)
    if h < w:
        target = (resolution, math.ceil(w * scale))
    else:
        target = (math.ceil(h * scale), resolution)
    video = F.interpolate(video, size=target, mode="bilinear", align_corners=False, antialias=antialias)
    t, c, h, w = video.shape
    w0, h0 = (w - resolution) // 2, (h - resolution) // 2
    return video[:, :, h0:h0 + resolution, w0:w0 + resolution].permute(1, 0, 2, 3).contiguous()


def tats_real(frames: np.ndarray, resolution: int) -> np.ndarray:
    """TATS: dataset clip in [-0.5, 0.5], then (x + 0.5) * 255 `.byte()`; uint8 (T, R, R, 3)."""
    video = _short_side_bilinear(frames, resolution, antialias=False)
    video -= 0.5
    return ((video + 0.5) * 255).byte().permute(1, 2, 3, 0).numpy()


def cdfvd_real(frames: np.ndarray, resolution: int) -> np.ndarray:
    """cd-FVD video_folder: clip in [0, 1] (antialiased), then * 255 `.byte()`."""
    video = _short_side_bilinear(frames, resolution, antialias=True)
    return (video * 255).byte().permute(1, 2, 3, 0).numpy()


def frame_folder(paths, resolution: int, tats: bool) -> np.ndarray:
    """TATS / cd-FVD FrameDataset: square centre crop from the first frame's size, PIL ANTIALIAS to
    R x R, / 255 (TATS: - 0.5), then the FVD script's (+ 0.5) * 255 `.byte()`."""
    first = Image.open(paths[0])
    h, w = first.height, first.width
    if h > w:
        half = (h - w) // 2
        box = (0, half, w, half + w)
    elif w > h:
        half = (w - h) // 2
        box = (half, 0, half + h, h)
    images = []
    for p in paths:
        img = Image.open(p)
        if h != w:
            img = img.crop(box)
        img = np.asarray(img.resize((resolution, resolution), Image.LANCZOS), dtype=np.float32)
        img /= 255.
        images.append(torch.from_numpy(img - 0.5 if tats else img))
    video = torch.stack(images)
    return ((video + 0.5) * 255 if tats else video * 255).byte().numpy()


def i3d_preprocess(videos: np.ndarray, size: int = 224) -> torch.Tensor:
    """TATS / cd-FVD `preprocess_i3d`: uint8 (B, T, H, W, C) -> float (B, C, T, size, size) in [-1, 1]."""
    b, t, h, w, c = videos.shape
    frames = torch.FloatTensor(videos).flatten(end_dim=1).permute(0, 3, 1, 2).contiguous()
    resized = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False)
    resized = resized.view(b, t, c, size, size).transpose(1, 2).contiguous()
    return 2. * resized / 255. - 1


# ---- statistics ----------------------------------------------------------------------------------


def mean_cov(features: np.ndarray, divisor: str) -> tuple[np.ndarray, np.ndarray]:
    """StyleGAN-V / cd-FVD FeatureStats (float32 features, float64 sums, / n) or TATS `cov` (/ (n - 1);
    TATS runs it in float32 torch, here float64 so that only the divisor is compared)."""
    if divisor == "n":
        x = np.asarray(features, dtype=np.float32).astype(np.float64)
        mean = x.sum(0) / len(x)
        return mean, x.T @ x / len(x) - np.outer(mean, mean)
    x = torch.as_tensor(features, dtype=torch.float64)
    xc = (x - x.mean(0)).T
    return x.mean(0).numpy(), (xc @ xc.T / (x.shape[0] - 1)).numpy()


def frechet_sqrtm(mu1, s1, mu2, s2) -> float:
    """StyleGAN-V / cd-FVD: |m1 - m2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy's sqrtm."""
    s = scipy.linalg.sqrtm(np.dot(s1, s2))
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(s1 + s2 - s * 2)))
