"""Inception-v1 I3D (Carreira & Zisserman, "Quo Vadis, Action Recognition?", CVPR 2017), RGB stream.

The feature network of FVD (Unterthiner et al. 2018). Module and parameter names follow the
layout of the public `i3d_pretrained_400.pt` state dict (the PyTorch port of DeepMind's
Kinetics-400 weights loaded by VideoGPT, TATS and cd-FVD), so that file loads with strict key
checking:

    Conv3d_1a_7x7.conv3d.weight, Conv3d_1a_7x7.bn.{weight,bias,running_mean,running_var}, ...
    Mixed_3b.b0 / b1a / b1b / b2a / b2b / b3b .conv3d.weight and .bn.*   (b3a is the max pool)
    logits.conv3d.{weight,bias}

Input: float `(B, 3, T, H, W)` in [-1, 1] (each preset's preprocessing: fvd_data.py, fvd.py), T >= 9.
Output: the 400 Kinetics logits averaged over time, `(B, 400)` -- the FVD feature (the TF-hub
module's `RGB/inception_i3d/Mean:0` tensor), not the 1024-d pool.

Padding is TensorFlow's "SAME" rule computed from the input size, because the weights were
trained in TF; torch's symmetric padding would shift every feature map by half a pixel.

The weights (never downloaded) are found and checked by `load_weights` at the end of this file.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Output channels of each Inception block's branches, in the order
# (b0 1x1, b1 1x1 reduce, b1 3x3, b2 1x1 reduce, b2 3x3, b3 pool-proj 1x1); Szegedy et al. 2015,
# Table 1, with the 5x5 branch replaced by 3x3 as in the I3D release.
INCEPTION_BLOCKS: dict[str, tuple[int, ...]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
MIN_FRAMES = 9  # three stride-2 stages in time leave >= 2 frames for the (2, 7, 7) average pool
NUM_CLASSES = 400


def _same_pad(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    """Zero-pad (T, H, W) so that a VALID op gives ceil(n / stride) outputs, extra on the back (TF SAME)."""
    pads: list[int] = []
    for n, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride)):
        total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads) if any(pads) else x


class Unit3D(nn.Module):
    """Conv3d (TF SAME padding) + eval BatchNorm + ReLU; the logits layer has bias and neither."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1),
                 bn: bool = True, relu: bool = True, bias: bool = False, bn_eps: float = 1e-5):
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=bias)
        # eps 1e-5 as in the port that consumes i3d_pretrained_400.pt (DeepMind's TF graph used 1e-3);
        # matching the published FVD numbers of that file matters more than matching TF here.
        self.bn = nn.BatchNorm3d(cout, eps=bn_eps) if bn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    """Max pool with TF SAME padding. Zero padding equals TF's ignore-the-padding rule here because
    every pooled tensor comes out of a ReLU (all values >= 0)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    def __init__(self, cin: int, ch: tuple[int, ...], bn_eps: float):
        super().__init__()
        self.b0 = Unit3D(cin, ch[0], bn_eps=bn_eps)
        self.b1a = Unit3D(cin, ch[1], bn_eps=bn_eps)
        self.b1b = Unit3D(ch[1], ch[2], (3, 3, 3), bn_eps=bn_eps)
        self.b2a = Unit3D(cin, ch[3], bn_eps=bn_eps)
        self.b2b = Unit3D(ch[3], ch[4], (3, 3, 3), bn_eps=bn_eps)
        self.b3a = MaxPoolSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(cin, ch[5], bn_eps=bn_eps)
        self.out_channels = ch[0] + ch[2] + ch[4] + ch[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class InceptionI3d(nn.Module):
    """The RGB I3D up to its Kinetics-400 logits. Always used in eval mode (frozen statistics)."""

    def __init__(self, num_classes: int = NUM_CLASSES, bn_eps: float = 1e-5):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), bn_eps=bn_eps)
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64, bn_eps=bn_eps)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), bn_eps=bn_eps)
        self.MaxPool3d_3a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        cin = 192
        for name, ch in INCEPTION_BLOCKS.items():
            if name == "Mixed_4b":
                self.MaxPool3d_4a_3x3 = MaxPoolSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                self.MaxPool3d_5a_2x2 = MaxPoolSame((2, 2, 2), (2, 2, 2))
            block = InceptionBlock(cin, ch, bn_eps)
            self.add_module(name, block)  # registration order = execution order
            cin = block.out_channels
        self.logits = Unit3D(cin, num_classes, bn=False, relu=False, bias=True)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, num_classes) logits averaged over time."""
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"I3D expects (B, 3, T, H, W), got {tuple(x.shape)}")
        if x.shape[2] < MIN_FRAMES:
            raise ValueError(f"I3D needs at least {MIN_FRAMES} frames, got {x.shape[2]}")
        for name, module in self.named_children():
            if name != "logits":
                x = module(x)
        # The release averages 2x7x7 windows with stride 1 (7x7 = the whole map at 224x224 input),
        # applies the 1x1x1 logits conv, then averages over what is left. Capping the window at the
        # map size lets smaller inputs through; at 224x224 the result is unchanged.
        h, w = x.shape[3], x.shape[4]
        x = F.avg_pool3d(x, (2, min(7, h), min(7, w)), stride=1)  # (B, 1024, T', H', W')
        x = self.logits(x)  # (B, num_classes, T', H', W')
        return x.mean(dim=(2, 3, 4))


# --------------------------------------------------------------------------------------------
# Weights: find, check, load. Never downloaded; a TorchScript file (which can run code) loads only
# when its sha256 is confirmed, a state dict only through torch.load(weights_only=True).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsInfo:
    filename: str
    what: str
    published: tuple[str, ...]
    sha256: str | None  # no publisher states a hash for either file; `ulvideo fvd` records the observed one


WEIGHTS = {
    "i3d_torchscript": WeightsInfo(
        "i3d_torchscript.pt",
        "StyleGAN-V's TorchScript port of the tf-hub Kinetics-400 I3D (deepmind/i3d-kinetics-400/1)",
        ("https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt (StyleGAN-V, "
         "src/metrics/frechet_video_distance.py:22)",), None),
    "i3d_pretrained_400": WeightsInfo(
        "i3d_pretrained_400.pt",
        "PyTorch state dict of the Kinetics-400 RGB I3D used by VideoGPT, TATS and cd-FVD",
        ("https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt (TATS; what cd-FVD fetches)",
         "Google Drive file 1mQK8KD8G6UWRa5t87SRMm5PVXtlpneJT (VideoGPT, videogpt/download.py)"), None),
}


class WeightsError(RuntimeError):
    """I3D weights missing, unreadable or not the expected file; the message (one line) says what to do."""


def cache_dir() -> Path:
    root = os.environ.get("ULVIDEO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ulvideo")
    return Path(root) / "i3d"


def find_weights(kind: str, path: str | os.PathLike | None = None) -> Path:
    """--weights PATH, then $ULVIDEO_I3D (the file or its folder), then the cache folder."""
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
        f"I3D weights not found: this preset needs {info.filename} ({info.what}); looked at {'; '.join(tried)}; "
        f"published at {' | '.join(info.published)}; download it yourself, then put it in {cache_dir()}, "
        f"pass --weights PATH or set ULVIDEO_I3D=PATH (the file or its folder)")


def file_kind(path: Path) -> str:
    """"torchscript" (a zip with a code/ folder), "state_dict" (another torch.save zip or a legacy
    pickle) or "other", read from the container without unpickling anything."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any("/code/" in n for n in names):
            return "torchscript"
        return "state_dict" if any(n.endswith("data.pkl") for n in names) else "other"
    with open(path, "rb") as f:
        head = f.read(2)
    return "state_dict" if head[:1] == b"\x80" else "other"  # pickle protocol 2+ (torch.save legacy format)


def load_state_dict_checked(model: nn.Module, state, source: str) -> None:
    """Strict load with an error that names missing/unexpected/mis-shaped keys and the usual causes."""
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        raise WeightsError(f"{source}: the tensors are nested under {next(iter(state))!r}; save that inner dict instead")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{source}: expected a flat state dict of tensors")
    own = model.state_dict()
    state = dict(state)
    for k in own:  # written by BatchNorm since PyTorch 0.4; older conversions lack it, eval ignores it
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing and unexpected and all(k.startswith("module.") for k in unexpected):
        raise WeightsError(f"{source}: every key starts with 'module.' (saved from DataParallel/DDP); save "
                           "{k.removeprefix('module.'): v for k, v in state.items()} instead")
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise WeightsError(f"{source}: not the i3d_pretrained_400 key layout; missing {missing[:5]} "
                           f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
                           f"shape mismatches {shapes[:5]}")
    model.load_state_dict(state, strict=True)


def load_weights(kind: str, path=None, sha256: str | None = None, device="cpu", preset: str = ""):
    """(network, record). `record` holds kind, file, sha256 and how the hash was vouched for."""
    from ulvideo.exports import file_sha256

    info = WEIGHTS[kind]
    p = find_weights(kind, path)
    what = file_kind(p)
    needs = f"preset {preset} needs" if preset else "this needs"
    if kind == "i3d_torchscript" and what != "torchscript":
        hint = (" (a state dict goes with the tats-* and cdfvd-* presets)" if what == "state_dict" else "")
        raise WeightsError(f"{p} is {'a PyTorch state dict' if what == 'state_dict' else 'not a TorchScript file'}; "
                           f"{needs} {info.filename}, {info.what}{hint}")
    if kind == "i3d_pretrained_400" and what == "torchscript":
        raise WeightsError(f"{p} is a TorchScript file; {needs} the state dict {info.filename} ({info.what}); "
                           "the TorchScript I3D goes with the stylegan-v-* and k600-* presets")
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
        try:
            net = torch.jit.load(str(p), map_location=device).eval()
        except Exception as e:
            raise WeightsError(f"{p}: cannot load as TorchScript ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return net, record
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{p}: cannot read as a PyTorch state dict with weights_only=True "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); expected {info.filename} "
                           f"({info.what})") from None
    net = InceptionI3d()
    load_state_dict_checked(net, state, str(p))
    return net.to(device).eval(), record
