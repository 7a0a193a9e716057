"""Frechet Video Distance (Unterthiner et al. 2018): I3D features, named protocols, reference stats.

    ulvideo fvd ref  --data data/ucf101 --preset ucf101-16f-128 --out ucf_ref.npz
    ulvideo fvd calc --videos samples/ --ref ucf_ref.npz --out fvd.json
    ulvideo fvd calc --export s1.safetensors --base s2.safetensors --prompts p.txt --ref ucf_ref.npz

A number is only comparable under the same protocol, so a `Protocol` fixes everything that moves
it and is stored with every statistics file and every score, beside the weights' sha256 and the
library versions. Features are always computed from uint8 clips (real files are uint8; model
output goes through `videoio.to_uint8` first), so real and generated clips are quantised alike.

Presets (their sources are in each `source` field):

  stylegan-v-2048-16f  StyleGAN-V's `fvd2048_16f`: TorchScript I3D called as StyleGAN-V calls it
                       (uint8 clips, rescale=True, resize=True: the port resizes to 224 itself),
                       16 consecutive frames at a random start, clips at 256x256, 2048 real and
                       2048 generated clips, covariance divided by n.
  ucf101-16f-128       The i3d_pretrained_400.pt practice of TATS / cd-FVD: clips at 128x128,
                       16 frames, torch bilinear (align_corners=False, no antialias) to 224x224,
                       x * 2/255 - 1, 2048 generated clips vs. one clip per train video,
                       covariance divided by n - 1 (TATS' and VideoGPT's `cov`).
  k600-5to11           Kinetics-600 prediction (Video Transformer, MAGVIT, W.A.L.T, the UL paper):
                       16 frames at 64x64, the first 5 given. The original TF FVD input
                       (tf.image.resize_bilinear of TF1, no half-pixel offset, to 224; x*2/255-1)
                       into the tf-hub I3D (its TorchScript port, rescale=False, resize=False),
                       50,000 clips, covariance divided by n - 1 (tfgan). Our causal models make 17
                       frames; the first 16 are scored.

Weights are never downloaded: `--weights`, then $ULVIDEO_I3D (the file or its folder), then
$ULVIDEO_CACHE/i3d or ~/.cache/ulvideo/i3d. State dicts load with torch.load(weights_only=True).
A TorchScript file (which can run code) loads only when its sha256 matches a known value or the
one the user confirms with --i3d-sha256 / $ULVIDEO_I3D_SHA256.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ulvideo.eval.metrics import FeatureStats, fvd_from_stats
from ulvideo.exports import file_sha256
from ulvideo.eval.i3d import MIN_FRAMES, NUM_CLASSES, InceptionI3d

I3D_SIZE = 224


@dataclass(frozen=True)
class Protocol:
    name: str
    source: str
    weights: str  # a key of WEIGHTS
    num_frames: int
    frame_stride: int
    clip_start: str  # real clips: "random" (one per video, seeded by its path) or "first"
    resolution: int  # clips first go to R x R: short side to R (bilinear), centre crop, uint8
    i3d_resize: str  # "torchscript" (the port's own resize), "bilinear" (torch), "tf1-bilinear"
    num_gen: int
    num_ref: int  # 0: one clip from every usable reference video
    covariance: str  # "population" (/ n) or "unbiased" (/ (n - 1))
    reference_split: str  # sub-folder of --data holding the reference videos ("" = the folder)
    context_frames: int = 0  # leading frames that are given, not generated (prediction tasks)
    value_range: tuple[float, float] = (-1.0, 1.0)
    uint8_quantized: bool = True
    seed: int = 0


PRESETS = {p.name: p for p in (
    Protocol("stylegan-v-2048-16f",
             "StyleGAN-V (Skorokhodov et al. 2022) src/metrics/metric_main.py fvd2048_16f, "
             "frechet_video_distance.py (detector kwargs rescale=True, resize=True, return_features=True), "
             "metric_utils.py FeatureStats.get_mean_cov (divides by n)",
             "i3d_torchscript", 16, 1, "random", 256, "torchscript", 2048, 2048, "population", ""),
    Protocol("ucf101-16f-128",
             "TATS (Ge et al. 2022) / cd-FVD (Ge et al. 2024): i3d_pretrained_400.pt, cdfvd "
             "preprocess_i3d (bilinear to 224x224, 2x/255-1); VideoGPT/TATS frechet_distance cov (n-1); "
             "clip size 128 with VideoGPT's short-side resize + centre crop",
             "i3d_pretrained_400", 16, 1, "random", 128, "bilinear", 2048, 0, "unbiased", "train"),
    Protocol("k600-5to11",
             "Kinetics-600 5->11 frame prediction (Weissenborn et al. 2020; Yu et al. MAGVIT 2023; "
             "Heek et al. 2026): google-research frechet_video_distance.py preprocess "
             "(tf.image.resize_bilinear, 2x/255-1) and tfgan frechet_classifier_distance (n-1)",
             "i3d_torchscript", 16, 1, "random", 64, "tf1-bilinear", 50000, 50000, "unbiased", "test",
             context_frames=5),
)}


def get_preset(name: str) -> Protocol:
    if name not in PRESETS:
        raise KeyError(f"unknown FVD preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def provenance() -> dict:
    """Versions of everything between the files and the number (decoders change pixels too)."""
    import ulvideo

    out = {"ulvideo": ulvideo.__version__, "python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    for mod in ("av", "decord"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    return out


# --------------------------------------------------------------------------------------------
# Clip selection and preprocessing. Clips are uint8 (B, T, H, W, 3) until the I3D input.
# --------------------------------------------------------------------------------------------


def clip_span(p: Protocol) -> int:
    return (p.num_frames - 1) * p.frame_stride + 1


def clip_start(num_video_frames: int, p: Protocol, key: str) -> int | None:
    """First frame of the clip taken from a video, or None when the video is too short.

    A "random" start depends only on (seed, key), so a reference set is reproducible in any order.
    """
    room = num_video_frames - clip_span(p)
    if room < 0:
        return None
    if p.clip_start == "first" or room == 0:
        return 0
    rng = np.random.default_rng([p.seed, zlib.crc32(key.encode())])
    return int(rng.integers(0, room + 1))


def to_resolution(clips: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) -> uint8 (B, T, size, size, 3): short side to `size` (bilinear,
    align_corners=False, no antialias; long side rounded up), centre crop. As VideoGPT's `preprocess`."""
    b, t, h, w, _ = clips.shape
    if (h, w) == (size, size):
        return clips
    scale = size / min(h, w)
    th, tw = (size, int(np.ceil(w * scale))) if h <= w else (int(np.ceil(h * scale)), size)
    x = clips.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)
    top, left = (th - size) // 2, (tw - size) // 2
    x = x[:, :, top:top + size, left:left + size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).reshape(b, t, size, size, 3)


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

    "torchscript": the uint8 clip itself (the port rescales and resizes, as in StyleGAN-V);
    otherwise float32 at 224x224 in [-1, 1], resized on 0..255 values and then scaled by 2/255 - 1.
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
    x = x * (2.0 / 255.0) - 1.0
    return x.reshape(b, t, 3, I3D_SIZE, I3D_SIZE).permute(0, 2, 1, 3, 4).contiguous()


# --------------------------------------------------------------------------------------------
# Weights: find, check, load.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsInfo:
    filename: str
    what: str
    published: tuple[str, ...]
    sha256: str | None  # no publisher states a hash for either file; the observed one is recorded


WEIGHTS = {
    "i3d_torchscript": WeightsInfo(
        "i3d_torchscript.pt",
        "StyleGAN-V's TorchScript port of the tf-hub Kinetics-400 I3D (deepmind/i3d-kinetics-400/1)",
        ("https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt (StyleGAN-V, "
         "src/metrics/frechet_video_distance.py)",), None),
    "i3d_pretrained_400": WeightsInfo(
        "i3d_pretrained_400.pt",
        "PyTorch state dict of the Kinetics-400 RGB I3D used by VideoGPT, TATS and cd-FVD",
        ("https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt (TATS; what cd-FVD fetches)",
         "Google Drive file 1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT (VideoGPT, videogpt/download.py)"), None),
}


class WeightsError(RuntimeError):
    """I3D weights missing, unreadable or not the expected file; the message says what to do."""


def cache_dir() -> Path:
    root = os.environ.get("ULVIDEO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ulvideo")
    return Path(root) / "i3d"


def find_weights(kind: str, path: str | os.PathLike | None = None) -> Path:
    info = WEIGHTS[kind]
    tried = []
    for source, cand in (("--weights", path), ("$ULVIDEO_I3D", os.environ.get("ULVIDEO_I3D")),
                         ("cache", cache_dir())):
        if not cand:
            continue
        p = Path(cand).expanduser()
        p = p / info.filename if p.is_dir() or source == "cache" else p
        if p.is_file():
            return p
        tried.append(f"{p} ({source})")
        if source == "--weights":
            break  # an explicit path that does not exist is an error, not a reason to look elsewhere
    raise WeightsError(
        f"I3D weights not found: this protocol needs {info.filename} ({info.what}).\n"
        f"  looked at: {'; '.join(tried)}\n"
        f"  published at: {' | '.join(info.published)}\n"
        f"  download it yourself, then put it in {cache_dir()} or pass --weights PATH "
        f"or set ULVIDEO_I3D=PATH (the file or its folder)")


def load_state_dict_checked(model: torch.nn.Module, state: dict, source: str) -> None:
    """Strict load with an error that names missing/unexpected/mis-shaped keys."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{source}: expected a flat state dict of tensors")
    own = model.state_dict()
    state = dict(state)
    for k in own:  # written by BatchNorm since PyTorch 0.4; older conversions lack it, eval ignores it
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise WeightsError(f"{source}: not the i3d_pretrained_400 key layout; missing {missing[:5]} "
                           f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
                           f"shape mismatches {shapes[:5]}")
    model.load_state_dict(state, strict=True)


def load_weights(kind: str, path=None, sha256: str | None = None, device="cpu"):
    """(network, record). `record` holds kind, file, sha256 and how the hash was vouched for."""
    info = WEIGHTS[kind]
    p = find_weights(kind, path)
    digest = file_sha256(p)
    expected = (sha256 or os.environ.get("ULVIDEO_I3D_SHA256") or info.sha256 or "").strip().lower()
    vouched = "published" if expected and expected == (info.sha256 or "") else ("user" if expected else "none")
    if expected and digest != expected:
        origin = "the published value" if vouched == "published" else "--i3d-sha256 / $ULVIDEO_I3D_SHA256"
        raise WeightsError(f"{p}: sha256 is {digest}, expected {expected} (from {origin}); wrong or damaged file "
                           f"(the right one: {info.filename}, {' | '.join(info.published)})")
    record = {"kind": kind, "file": str(p), "sha256": digest, "sha256_vouched_by": vouched}
    if kind == "i3d_torchscript":
        if not expected:
            raise WeightsError(
                f"{p} is a TorchScript file (it can run code) and no published sha256 is known for "
                f"{info.filename}; its sha256 is {digest}. If this is the file you downloaded from "
                f"{info.published[0]}, confirm it with --i3d-sha256 {digest} (or ULVIDEO_I3D_SHA256={digest}).")
        net = torch.jit.load(str(p), map_location=device).eval()
        return net, record
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{p}: cannot read as a PyTorch state dict with weights_only=True "
                           f"({type(e).__name__}: {e}); expected {info.filename} ({info.what})") from None
    net = InceptionI3d()
    load_state_dict_checked(net, state, str(p))
    return net.to(device).eval(), record


class FeatureExtractor:
    """uint8 clips (B, T, H, W, 3), T >= 9 -> float64 I3D logit features (B, 400) on `device`.

    Applies the protocol's resolution and I3D preprocessing; clip selection happens before.
    """

    dim = NUM_CLASSES

    def __init__(self, protocol: Protocol, net, weights: dict, device="cpu", batch_size: int = 8):
        self.protocol, self.net, self.weights = protocol, net, weights
        self.device, self.batch_size = torch.device(device), batch_size
        self.torchscript = isinstance(net, torch.jit.ScriptModule)

    @torch.no_grad()
    def __call__(self, clips) -> torch.Tensor:
        x = torch.as_tensor(np.ascontiguousarray(clips) if isinstance(clips, np.ndarray) else clips)
        if x.dtype != torch.uint8 or x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"features need uint8 clips (B, T, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        if x.shape[1] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames, got {x.shape[1]}")
        out = []
        for i in range(0, x.shape[0], self.batch_size):
            chunk = to_resolution(x[i:i + self.batch_size], self.protocol.resolution)
            inp = i3d_input(chunk.to(self.device), self.protocol)
            if self.torchscript:
                own = self.protocol.i3d_resize == "torchscript"
                y = self.net(inp, rescale=own, resize=own, return_features=True)
            else:
                y = self.net(inp)
            out.append(y.double())
        return torch.cat(out)


def load_extractor(protocol: Protocol | str, weights=None, sha256=None, device="cpu",
                   batch_size: int = 8) -> FeatureExtractor:
    p = get_preset(protocol) if isinstance(protocol, str) else protocol
    net, record = load_weights(p.weights, weights, sha256, device)
    return FeatureExtractor(p, net, record, device, batch_size)


def try_load_extractor(eval_cfg, device="cpu") -> tuple[FeatureExtractor | None, str | None]:
    """For training: (extractor, None), or (None, why not) -- rFVD is skipped, never fatal."""
    if not eval_cfg.fvd_preset:
        return None, "eval.fvd_preset is not set"
    try:
        return load_extractor(eval_cfg.fvd_preset, eval_cfg.i3d_weights or None,
                              eval_cfg.i3d_sha256 or None, device), None
    except (WeightsError, KeyError) as e:
        return None, str(e)


# --------------------------------------------------------------------------------------------
# CLI handlers (arguments: ulvideo/cli.py, `fvd ref` and `fvd calc`).
# --------------------------------------------------------------------------------------------


def _device(name: str | None) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name in (None, "auto") else name


def _video_files(folder: Path) -> list[Path]:
    from ulvideo.videoio import VIDEO_EXTENSIONS

    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)


def _clips_from_folder(folder: Path, p: Protocol, start_mode: str, limit: int, skipped: dict):
    """Yield uint8 (T, R, R, 3) clips; unreadable or short videos are skipped and counted."""
    from ulvideo.videoio import VideoError, probe, read_clip

    taken = 0
    for f in _video_files(folder):
        if limit and taken >= limit:
            return
        key = f.relative_to(folder).as_posix()
        try:
            n = probe(f).num_frames
            start = clip_start(n, p, key) if start_mode == "random" else (0 if n >= clip_span(p) else None)
            if start is None:
                skipped["too short"] = skipped.get("too short", 0) + 1
                continue
            clip = read_clip(f, start=start, num_frames=p.num_frames, stride=p.frame_stride)
        except (VideoError, OSError) as e:
            reason = getattr(e, "reason", type(e).__name__)
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        taken += 1
        yield to_resolution(torch.from_numpy(clip)[None], p.resolution)[0]


def _accumulate(clips, ext: FeatureExtractor, stats: FeatureStats, batch: int, bar) -> None:
    buf = []
    for clip in clips:
        buf.append(clip)
        if len(buf) == batch:
            stats.update(ext(torch.stack(buf)))
            bar.update(len(buf))
            buf = []
    if buf:
        stats.update(ext(torch.stack(buf)))
        bar.update(len(buf))


def _record(ext: FeatureExtractor) -> dict:
    return {"protocol": dataclasses.asdict(ext.protocol), "weights": ext.weights, "versions": provenance(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main_ref(args) -> int:
    from tqdm import tqdm

    try:
        p = get_preset(args.preset)
        ext = load_extractor(p, args.weights, getattr(args, "i3d_sha256", None), _device(getattr(args, "device", None)),
                             args.batch_size)
    except (KeyError, WeightsError) as e:
        print(f"ulvideo fvd ref: {e.args[0]}", file=sys.stderr)
        return 2
    root = Path(args.data)
    folder = root / p.reference_split if p.reference_split and (root / p.reference_split).is_dir() else root
    if not folder.is_dir():
        print(f"ulvideo fvd ref: {folder} is not a folder", file=sys.stderr)
        return 2
    total = len(_video_files(folder))
    stats, skipped = FeatureStats(ext.dim, ext.device), {}
    with tqdm(total=min(total, p.num_ref) if p.num_ref else total, desc=f"fvd ref {p.name}", unit="clip") as bar:
        _accumulate(_clips_from_folder(folder, p, p.clip_start, p.num_ref, skipped), ext, stats, args.batch_size, bar)
    if stats.count < 2:
        print(f"ulvideo fvd ref: only {stats.count} usable clips in {folder} (skipped: {skipped})", file=sys.stderr)
        return 2
    meta = {"kind": "fvd-reference", **_record(ext), "data": str(folder.resolve()), "num_clips": stats.count,
            "skipped": skipped}
    if p.num_ref and stats.count < p.num_ref:
        meta["warning"] = f"{stats.count} clips, fewer than the protocol's {p.num_ref}"
    stats.save(args.out, meta)
    print(json.dumps({k: meta[k] for k in ("num_clips", "skipped", "weights")} | {"out": str(args.out)}))
    return 0


def _load_pipeline(args):
    """The stage-2 pipeline `pipe(prompts, seed) -> uint8 (B, T, H, W, 3)`, or an error message."""
    import importlib.util

    if importlib.util.find_spec("ulvideo.generate") is None:
        return None, "ulvideo.generate is not available in this version"
    import ulvideo.generate as gen

    if not hasattr(gen, "load_pipeline"):
        return None, "ulvideo.generate.load_pipeline is not available in this version"
    return gen.load_pipeline(args.export, args.base), None


def _sampling(args) -> dict:
    """Sampler settings passed to the pipeline and recorded with the score."""
    return {k: getattr(args, k) for k in ("steps", "decoder_steps", "sampler", "guidance") if hasattr(args, k)}


def _generated_clips(pipe, prompts: list[str], args, p: Protocol, limit: int):
    """Stream uint8 clips from the pipeline; prompts cycle; the seed advances by one per batch."""
    made, step = 0, 0
    while made < limit:
        n = min(args.batch_size, limit - made)
        clips = torch.as_tensor(pipe([prompts[(made + i) % len(prompts)] for i in range(n)], seed=args.seed + step,
                                     **_sampling(args)))
        if clips.dtype != torch.uint8 or clips.ndim != 5 or clips.shape[1] < clip_span(p):
            raise ValueError(f"the pipeline returned {clips.dtype} {tuple(clips.shape)}; the protocol needs "
                             f"uint8 (B, >= {clip_span(p)}, H, W, 3)")
        for c in clips[:, :clip_span(p):p.frame_stride]:
            yield to_resolution(c[None], p.resolution)[0]
        made, step = made + n, step + 1


def main_calc(args) -> int:
    from tqdm import tqdm

    try:
        ref, meta = FeatureStats.load(args.ref)
        p = Protocol(**{**meta["protocol"], "value_range": tuple(meta["protocol"]["value_range"])})
        if PRESETS.get(p.name) != p:
            raise ValueError(f"{args.ref} was made under a different definition of {p.name!r}; recompute it")
        ext = load_extractor(p, args.weights, getattr(args, "i3d_sha256", None), _device(getattr(args, "device", None)),
                             args.batch_size)
    except (OSError, ValueError, KeyError, WeightsError) as e:
        print(f"ulvideo fvd calc: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    if ext.weights["sha256"] != meta["weights"]["sha256"]:
        print(f"ulvideo fvd calc: weights {ext.weights['sha256']} differ from the reference's "
              f"{meta['weights']['sha256']}; features are not comparable", file=sys.stderr)
        return 2
    stats, skipped = FeatureStats(ext.dim, ext.device), {}
    if args.videos:
        source = {"videos": str(Path(args.videos).resolve())}
        clips = _clips_from_folder(Path(args.videos), p, "first", p.num_gen, skipped)
    else:
        if not (args.base and args.prompts):
            print("ulvideo fvd calc: --export needs --base and --prompts", file=sys.stderr)
            return 2
        if p.context_frames:
            print(f"ulvideo fvd calc: {p.name} needs {p.context_frames} real context frames per clip; "
                  "generate with `ulvideo generate --context` and score the folder with --videos", file=sys.stderr)
            return 2
        prompts = [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
        pipe, why = _load_pipeline(args) if prompts else (None, f"no prompts in {args.prompts}")
        if pipe is None:
            print(f"ulvideo fvd calc: {why}", file=sys.stderr)
            return 2
        source = {"export": args.export, "base": args.base, "prompts": args.prompts, "seed": args.seed,
                  **_sampling(args)}
        clips = _generated_clips(pipe, prompts, args, p, p.num_gen)
    with tqdm(total=p.num_gen, desc=f"fvd calc {p.name}", unit="clip") as bar:
        _accumulate(clips, ext, stats, args.batch_size, bar)
    if stats.count < 2:
        print(f"ulvideo fvd calc: only {stats.count} usable clips (skipped: {skipped})", file=sys.stderr)
        return 2
    result = {"fvd": fvd_from_stats(ref, stats, p.covariance), "preset": p.name, "num_gen": stats.count,
              "num_ref": ref.count, **_record(ext), "ref": {"file": str(args.ref), "sha256": file_sha256(args.ref)},
              "source": source, "skipped": skipped}
    if stats.count < p.num_gen or (p.num_ref and ref.count < p.num_ref):
        result["warning"] = "fewer clips than the protocol's counts: not comparable with published numbers"
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(line + "\n")
    return 0
