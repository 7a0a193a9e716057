"""Frechet Video Distance (Unterthiner et al. 2018): I3D features, named presets, statistics, scores.

    ulvideo fvd ref  --data data/ucf101 --preset tats-fvd2048-16f --out ucf_ref.npz
    ulvideo fvd calc --videos samples/ --ref ucf_ref.npz --out fvd.json
    ulvideo fvd calc --export s1.safetensors --base s2.safetensors --prompts p.txt --ref ucf_ref.npz

A number is only comparable under the same protocol, so a preset (`fvd_presets.py`: one per
reference tool, each choice cited to the reference's file and line) fixes everything that moves it
and is stored with every statistics file and every score, beside the weights' sha256, the library
versions and the FFmpeg builds inside PyAV and decord. The library (this file) is what the CLI
handlers in ulvideo/cli.py and the training loop call:

    plan = plan_reference(folder, preset, mirror)       # lists and checks the input, no compute
    ext = load_extractor(preset, weights, sha256)       # WeightsError with one line when unusable
    stats, meta = reference_statistics(plan, ext)       # FeatureStats + what went in
    gen, source = folder_statistics(folder, ext) | pipeline_statistics(pipe, prompts, ext, ...)
    result = score(ref_stats, ref_meta, gen, ext, source)
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import platform
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ulvideo.eval import fvd_data
from ulvideo.eval.fvd_data import FVDInputError, Video, list_videos, plan_generated, plan_real, prepare_video, read_clip
from ulvideo.eval.fvd_presets import PRESETS, Protocol, get_preset
from ulvideo.eval.i3d import (MIN_FRAMES, NUM_CLASSES, WEIGHTS, WeightsError, find_weights,  # noqa: F401 (re-exported)
                              load_state_dict_checked, load_weights)
from ulvideo.eval.metrics import FeatureStats, fvd_from_stats

I3D_SIZE = 224


# --------------------------------------------------------------------------------------------
# Provenance.
# --------------------------------------------------------------------------------------------


def _ffmpeg_builds() -> dict[str, str]:
    """FFmpeg version of every libavutil loaded in this process, named by the package that ships it
    (PyAV and decord wheels each bundle their own build; their pixels can differ)."""
    out = {}
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return out
    for lib in sorted({ln.split()[-1] for ln in maps if "libavutil" in ln}):
        owner = "av" if "/av.libs/" in lib or "/av/" in lib else "decord" if "decord" in lib else "system"
        try:
            f = ctypes.CDLL(lib).av_version_info
            f.restype = ctypes.c_char_p
            out[f"{owner}_ffmpeg"] = f().decode()
        except (OSError, AttributeError):
            continue
    return out


def provenance() -> dict:
    """Versions of everything between the files and the number (decoders change pixels too)."""
    import ulvideo

    out = {"ulvideo": ulvideo.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    for mod in ("av", "decord", "PIL"):
        if importlib.util.find_spec(mod):
            try:
                out[mod] = __import__(mod).__version__
            except Exception:  # a broken install is recorded as absent, not fatal
                pass
    if "av" in out:
        import av

        out["av_ffmpeg"] = getattr(av, "ffmpeg_version_info", "")
    return out | _ffmpeg_builds()


# --------------------------------------------------------------------------------------------
# The network input and the feature extractor.
# --------------------------------------------------------------------------------------------


def _tf1_bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of TF1 resize_bilinear (align_corners=False, half_pixel_centers=False):
    output i samples input position i * n_in / n_out."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), lo] += 1 - frac
    m[torch.arange(n_out), hi] += frac
    return m


def i3d_input(clips: torch.Tensor, p: Protocol) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> the tensor handed to the network, (B, 3, T, ., .).

    "torchscript": the uint8 clip itself (the port rescales and resizes, as StyleGAN-V calls it);
    "bilinear": float32, torch bilinear to 224 (align_corners=False, no antialias), then
    2 * x / 255 - 1 in that order (TATS and cd-FVD `preprocess_i3d`); "tf1-bilinear": TF1's resize.
    """
    b, t, h, w, _ = clips.shape
    if p.i3d_resize == "torchscript":
        return clips.permute(0, 4, 1, 2, 3).contiguous()
    x = clips.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()  # (B*T, 3, H, W)
    if p.i3d_resize == "bilinear":
        x = F.interpolate(x, size=(I3D_SIZE, I3D_SIZE), mode="bilinear", align_corners=False)
    elif p.i3d_resize == "tf1-bilinear":
        mh = _tf1_bilinear_matrix(h, I3D_SIZE).float().to(x.device)
        mw = _tf1_bilinear_matrix(w, I3D_SIZE).float().to(x.device)
        x = torch.einsum("ih,nchw,jw->ncij", mh, x, mw)
    else:
        raise ValueError(f"unknown i3d_resize {p.i3d_resize!r}")
    x = 2.0 * x / 255.0 - 1
    return x.reshape(b, t, 3, I3D_SIZE, I3D_SIZE).permute(0, 2, 1, 3, 4).contiguous()


class FeatureExtractor:
    """uint8 clips (B, T, H, W, 3) -> float64 I3D features (B, 400) on `device`.

    `features` takes clips as the preset hands them to its network input (already at their size);
    calling the extractor first brings clips to the preset's resolution as a video file's window
    would be (reconstruction metrics during training use this). Both score the first
    `num_frames` frames and refuse fewer.
    """

    dim = NUM_CLASSES

    def __init__(self, protocol: Protocol, net, weights: dict, device="cpu", batch_size: int = 8):
        self.protocol, self.net, self.weights = protocol, net, weights
        self.device, self.batch_size = torch.device(device), batch_size
        self.torchscript = protocol.weights == "i3d_torchscript"  # the port's calling convention

    def _check(self, clips) -> torch.Tensor:
        x = torch.as_tensor(np.ascontiguousarray(clips) if isinstance(clips, np.ndarray) else clips)
        if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"features need uint8 clips (B, T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        need = self.protocol.num_frames
        if x.shape[1] < need:
            raise ValueError(f"preset {self.protocol.name} scores {need} frames per clip, got {x.shape[1]}")
        return x[:, :need]

    @torch.no_grad()
    def features(self, clips) -> torch.Tensor:
        x = self._check(clips)
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            inp = i3d_input(x[i:i + self.batch_size].to(self.device), self.protocol)
            if self.torchscript:
                own = self.protocol.i3d_resize == "torchscript"
                y = self.net(inp, rescale=own, resize=own, return_features=True)
            else:
                y = self.net(inp)
            out.append(y.double())
        return torch.cat(out)

    def __call__(self, clips) -> torch.Tensor:
        x = self._check(clips)
        return self.features(torch.stack([prepare_video(c, self.protocol) for c in x]))


def load_extractor(protocol: Protocol | str, weights=None, sha256=None, device="cpu",
                   batch_size: int = 8) -> FeatureExtractor:
    p = get_preset(protocol) if isinstance(protocol, str) else protocol
    net, record = load_weights(p.weights, weights, sha256, device, preset=p.name)
    return FeatureExtractor(p, net, record, device, batch_size)


def try_load_extractor(eval_cfg, device="cpu", num_frames: int | None = None
                       ) -> tuple[FeatureExtractor | None, str | None]:
    """For training: (extractor, None), or (None, why not) -- rFVD is skipped, never fatal.
    `num_frames`: the held-out clips' length; shorter than the preset's frames skips rFVD too."""
    if not eval_cfg.fvd_preset:
        return None, "eval.fvd_preset is not set"
    try:
        p = get_preset(eval_cfg.fvd_preset)
        if num_frames is not None and num_frames < p.num_frames:
            return None, f"eval.fvd_preset {p.name} scores {p.num_frames} frames; held-out clips have {num_frames}"
        return load_extractor(p, eval_cfg.i3d_weights or None, eval_cfg.i3d_sha256 or None, device), None
    except (WeightsError, KeyError) as e:
        return None, str(e.args[0])


# --------------------------------------------------------------------------------------------
# Statistics of a folder, of generated clips; scores.
# --------------------------------------------------------------------------------------------


@dataclass
class ReferencePlan:
    """What `fvd ref` will read: known before any feature is computed."""

    protocol: Protocol
    folder: Path
    videos: list[Video]
    clips: list[fvd_data.Clip]
    skipped: dict[str, int]
    mirror: bool


def _accumulate(clips, extract, stats: FeatureStats, batch: int, progress=None) -> None:
    buf = []
    for clip in clips:
        buf.append(clip)
        if len(buf) == batch:
            stats.update(extract(torch.stack(buf)))
            progress and progress(len(buf))
            buf = []
    if buf:
        stats.update(extract(torch.stack(buf)))
        progress and progress(len(buf))


def plan_reference(data: str | Path, preset: Protocol | str, mirror: bool = False) -> ReferencePlan:
    """List the reference videos of `data` (its preset split if present) and choose their clips."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    root = Path(data)
    folder = root / p.reference_split if p.reference_split and (root / p.reference_split).is_dir() else root
    if not folder.is_dir():
        raise FVDInputError(f"{folder} is not a folder")
    videos, skipped = list_videos(folder, p.frame_order)
    if not videos:
        raise FVDInputError(f"{folder} has no videos: video files ({', '.join(_video_exts())}) or folders of frames "
                            f"({', '.join(fvd_data.IMAGE_SUFFIXES)}), one folder per video"
                            + (f"; unreadable: {skipped}" if skipped else ""))
    usable = any(fvd_data.window_room(p.real_clips, bool(v.frames), p.num_frames, v.num_frames) is not None
                 for v in videos)
    clips, short = plan_real(videos, p, mirror) if usable else ([], len(videos))
    if not clips:
        raise FVDInputError(f"none of the {len(videos)} videos in {folder} has the {p.num_frames} frames preset {p.name} "
                            f"scores (longest: {max(v.num_frames for v in videos)} frames)")
    if short:
        skipped[f"shorter than {p.num_frames} frames"] = short
    if videos[0].frames and p.frame_route == "as-read":
        fvd_data.check_one_size(videos, clips, str(folder))
    return ReferencePlan(p, folder, videos, clips, skipped, mirror)


def _video_exts():
    from ulvideo.videoio import VIDEO_EXTENSIONS

    return VIDEO_EXTENSIONS


def _record(ext: FeatureExtractor) -> dict:
    return {"protocol": dataclasses.asdict(ext.protocol), "weights": ext.weights, "versions": provenance(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def reference_statistics(plan: ReferencePlan, ext: FeatureExtractor, progress=None) -> tuple[FeatureStats, dict]:
    p = plan.protocol
    if ext.protocol != p:
        raise ValueError(f"extractor is for {ext.protocol.name}, the plan for {p.name}")
    stats = FeatureStats(ext.dim, ext.device)
    clips = (read_clip(plan.videos[c.video], c, p) for c in plan.clips)
    _accumulate(clips, ext.features, stats, ext.batch_size, progress)
    meta = {"kind": "fvd-reference", **_record(ext), "data": str(plan.folder.resolve()), "num_clips": stats.count,
            "num_videos": len(plan.videos), "mirror": plan.mirror, "skipped": plan.skipped}
    if p.num_real and stats.count < p.num_real:
        meta["warning"] = f"{stats.count} clips, fewer than the preset's {p.num_real}"
    return stats, meta


def plan_folder(folder: str | Path, p: Protocol) -> tuple[list[Video], list[fvd_data.Clip], dict]:
    """Generated videos of `folder` and their clips (FVDInputError when any is too short)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FVDInputError(f"{folder} is not a folder")
    videos, skipped = list_videos(folder, p.frame_order)
    if not videos:
        raise FVDInputError(f"{folder} has no videos" + (f" (unreadable: {skipped})" if skipped else ""))
    return videos, plan_generated(videos, p), skipped


def folder_statistics(folder, ext: FeatureExtractor, progress=None, planned=None) -> tuple[FeatureStats, dict]:
    p = ext.protocol
    videos, clips, skipped = planned or plan_folder(folder, p)
    stats = FeatureStats(ext.dim, ext.device)
    _accumulate((read_clip(videos[c.video], c, p, generated=True) for c in clips), ext.features, stats,
                ext.batch_size, progress)
    return stats, {"videos": str(Path(folder).resolve()), "num_videos": len(videos), "skipped": skipped}


def pipeline_statistics(pipe, prompts: list[str], ext: FeatureExtractor, seed: int = 0, batch_size: int = 8,
                        sampling: dict | None = None, progress=None) -> FeatureStats:
    """Stream generated clips into the statistics; prompts cycle; the seed advances by one per batch.
    Generated clips are scored from frame 0, as made (resized only where the preset resizes them)."""
    p, sampling = ext.protocol, sampling or {}
    stats, made, step = FeatureStats(ext.dim, ext.device), 0, 0
    while made < p.num_gen:
        n = min(batch_size, p.num_gen - made)
        clips = torch.as_tensor(pipe([prompts[(made + i) % len(prompts)] for i in range(n)], seed=seed + step, **sampling))
        if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[-1] != 3:
            raise FVDInputError(f"the pipeline returned {clips.dtype} {tuple(clips.shape)}, not uint8 (B, T, H, W, 3)")
        if clips.shape[1] < p.num_frames:
            raise FVDInputError(f"the pipeline makes {clips.shape[1]} frames; preset {p.name} scores {p.num_frames} "
                                "(generate longer clips)")
        clips = clips[:, :p.num_frames]
        stats.update(ext(clips) if p.resize_generated else ext.features(clips))
        progress and progress(n)
        made, step = made + n, step + 1
    return stats


def load_reference(path: str | Path) -> tuple[FeatureStats, dict, Protocol]:
    """A statistics file written by `fvd ref`, checked: FVDInputError with one line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FVDInputError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise FVDInputError(f"{path} is not a statistics file written by `ulvideo fvd ref` (not an .npz archive)")
    try:
        stats, meta = FeatureStats.load(path)
        p = Protocol(**meta["protocol"])
    except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile) as e:
        raise FVDInputError(f"{path} is not a statistics file written by this version of `ulvideo fvd ref` "
                            f"({type(e).__name__}: {str(e)[:120]}); recompute it") from None
    if PRESETS.get(p.name) != p:
        raise FVDInputError(f"{path} was made under a definition of {p.name!r} that this version does not have; "
                            f"recompute it with `ulvideo fvd ref`")
    return stats, meta, p


def score(ref: FeatureStats, ref_meta: dict, gen: FeatureStats, ext: FeatureExtractor, source: dict) -> dict:
    p = ext.protocol
    if ext.weights["sha256"] != ref_meta["weights"]["sha256"]:
        raise FVDInputError(f"weights {ext.weights['sha256']} differ from the reference's "
                            f"{ref_meta['weights']['sha256']}; features are not comparable")
    if gen.count < 2:
        raise FVDInputError(f"only {gen.count} generated clips; a covariance needs at least 2")
    result = {"fvd": fvd_from_stats(ref, gen, p.covariance), "preset": p.name, "num_gen": gen.count,
              "num_ref": ref.count, "mirror": ref_meta.get("mirror", False), **_record(ext), "source": source}
    if gen.count < p.num_gen or (p.num_real and ref.count < p.num_real):
        result["warning"] = "fewer clips than the preset's counts: not comparable with published numbers"
    if ref_meta.get("mirror"):
        result["warning_mirror"] = "the reference statistics were mirrored (fvd ref --mirror); say so with the number"
    return result
