"""Codec reference for rate-distortion: x264 and x265 through PyAV, bits counted from the packets.

    python benchmarks/real_footage.py build --out data/real64
    python benchmarks/codec_rd.py --data data/real64 --split test --crfs 18,23,28,33,38,43 \
        --out benchmarks/results/codec_rd_real64.json

    from codec_rd import crf_sweep                     # with benchmarks/ on sys.path
    records = crf_sweep(clips, "libx264", [18, 28, 38])  # clips: uint8 (T, H, W, 3) each

One clip, one CRF (`rd_point`):
* Colour: RGB -> Y'CbCr 4:2:0 (`yuv420p`, what users ship), BT.601 matrix, limited range, swscale
  bicubic chroma filter (ffmpeg's default), and back the same way after decoding. 4:2:0 keeps
  chroma at half resolution in both directions, so at high rates PSNR is bounded by the format,
  not the codec: `format_psnr` is the round trip RGB -> yuv420p -> RGB without coding (about
  44 dB on carphone, under 40 dB on saturated photos). libx264rgb with `pix_fmt="rgb24"` codes
  RGB itself; with `qp=0` it is lossless.
* Encoder: libx264 or libx265 in memory (a codec context, no container), `preset` (default
  medium, both encoders' default), rate control by `crf` (the two scales differ: x265's CRF 28
  is meant to look like x264's 23). GOP: the first frame is an IDR frame and keyint is 250 (both
  encoders' default, > T for short clips), so a clip is one GOP with later I frames only where
  the encoder detects a scene cut; B-frames and references as the preset sets them.
  Repeatable streams: one thread, and for x264 no sliced threads (PyAV's default, sliced
  threads on one thread, gave x264 streams that differ from run to run, about 1 run in 12).
  x264's macroblock-tree rate control still varies between processes on a few 64x64 clips
  (2 of the 27 real64 test clips, up to 3 % of their bits; mbtree=0 removes it but is not what
  the preset ships): two sweeps' means differed by <= 0.3 % in bits and <= 0.01 dB.
  x265 gets `ctu=32` by default: with its default 64x64 CTU, x265 4.2 gave streams whose size
  differs from run to run by up to 3 % on 64x64 clips, whatever its threading; with 32x32 CTUs
  the 64x64 streams were identical (3 runs over the 27 real64 test clips at 3 CRFs) and 1-3 %
  smaller at the same PSNR (+-0.1 dB). 32x32 clips still vary with ctu=32 (ctu=16: identical in 3 runs).
  Clips narrower than 50 pixels are coded with x265's C primitives (`asm=0`): its lookahead
  works on the half-size frame in 8x8 blocks, and its SIMD `mbtree_propagate_cost` (x265 4.3)
  writes past its one-row buffer when a row has fewer than 4 blocks (valgrind: 32 and 48 wide,
  not 56, 64 or 80; 64 high x 48 wide too). That heap corruption aborted 18 of 20 CRF sweeps
  on 48x48 clips. The C primitives are the reference the SIMD ones reproduce: on 64x64 clips
  both gave identical streams (33 test clips x 4 CRFs, 132 of 132 encodes).
* Bits: 8 x the sum of the sizes of the packets that are decoded. Packets are Annex-B access
  units (start codes, SPS/PPS and for HEVC the VPS included); there is no container overhead.
  The encoders' informational SEI messages are removed first (x264 writes its version and full
  option string, about 670 bytes, into the first packet; x265's is switched off with info=0):
  they carry nothing a decoder uses and on a 64x64x17 clip would add about 0.08 bits per pixel.
  `keep_sei=True` keeps them. Bits per pixel = bits / (T * H * W).
* Distortion: the counted packets are decoded with FFmpeg's h264 / hevc decoder, converted back to
  RGB, and compared with the input by `ulvideo.eval.metrics.psnr` and `ulvideo.eval.metrics.ssim` (uint8,
  data range 255, PSNR from the MSE over the whole clip).

`crf_sweep` averages bits per pixel, PSNR and SSIM over clips with equal weight per clip and
records the per-clip values, the settings, the encoder's version string and PyAV's FFmpeg
library versions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.append(HERE)
from real_footage import X264_THREADS, read_manifest  # noqa: E402

CODECS = {"libx264": "h264", "libx264rgb": "h264", "libx265": "hevc"}  # encoder -> decoder
SEI_TYPES = {"h264": {6}, "hevc": {39, 40}}  # SEI NAL unit types (prefix and suffix for HEVC)
COLOUR = {"src_colorspace": "ITU601", "dst_colorspace": "ITU601"}  # the matrix, both ways
X265_DEFAULT_PARAMS = "ctu=32"
X265_SIMD_MIN_BLOCKS = 4  # lookahead blocks per row x265's SIMD cu-tree primitive needs (see above)
FPS = 25  # the stream's nominal frame rate
KEYINT = 250  # maximum GOP length (both encoders' default): a short clip is one GOP


@dataclass
class Encoded:
    """One encoded clip: the packets a decoder gets, in decode order."""

    codec: str
    pix_fmt: str
    height: int
    width: int
    num_frames: int
    packets: list[bytes]
    options: dict = field(default_factory=dict)
    sei_bytes: int = 0  # removed from the packets (0 with keep_sei)

    @property
    def bits(self) -> int:
        return 8 * sum(len(p) for p in self.packets)

    @property
    def bits_per_pixel(self) -> float:
        return self.bits / (self.num_frames * self.height * self.width)


def nal_units(data: bytes) -> list[tuple[int, int, int]]:
    """(start, end, header offset) of each NAL unit of an Annex-B byte string; `start` includes
    its start code (3 or 4 bytes), so the pieces concatenate to `data`."""
    heads, i = [], data.find(b"\x00\x00\x01")
    while i >= 0:
        heads.append(i + 3)
        i = data.find(b"\x00\x00\x01", i + 3)
    units = []
    for k, h in enumerate(heads):
        start = h - 4 if h >= 4 and data[h - 4] == 0 else h - 3
        end = len(data) if k + 1 == len(heads) else (heads[k + 1] - 4 if data[heads[k + 1] - 4] == 0
                                                        else heads[k + 1] - 3)
        units.append((0 if k == 0 else start, end, h))
    return units


def nal_type(data: bytes, header: int, decoder: str) -> int:
    return data[header] & 0x1F if decoder == "h264" else (data[header] >> 1) & 0x3F


def strip_sei(packet: bytes, decoder: str) -> bytes:
    """The packet without its SEI NAL units (emulation prevention keeps 00 00 01 out of payloads)."""
    keep = [packet[s:e] for s, e, h in nal_units(packet) if nal_type(packet, h, decoder) not in SEI_TYPES[decoder]]
    return b"".join(keep)


def _check(frames, codec: str, pix_fmt: str) -> np.ndarray:
    a = np.asarray(frames)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3 or len(a) < 1:
        raise ValueError(f"clips must be uint8 (T, H, W, 3), got {a.dtype} {a.shape}")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {', '.join(CODECS)}")
    if pix_fmt.startswith(("yuv420", "yuv422")) and (a.shape[1] % 2 or a.shape[2] % 2):
        raise ValueError(f"{codec} with {pix_fmt} needs an even height and width, got {a.shape[1]}x{a.shape[2]}")
    return a


def rgb_to_codec_frame(rgb: np.ndarray, pix_fmt: str):
    import av

    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    if pix_fmt == "rgb24":
        return frame
    if pix_fmt.startswith("yuv"):
        return frame.reformat(format=pix_fmt, interpolation="BICUBIC", dst_color_range="MPEG", **COLOUR)
    return frame.reformat(format=pix_fmt)


def frame_to_rgb(frame) -> np.ndarray:
    if frame.format.name.startswith("yuv"):
        frame = frame.reformat(format="rgb24", interpolation="BICUBIC", src_color_range="MPEG", **COLOUR)
    return frame.to_ndarray(format="rgb24")


def format_roundtrip(frames: np.ndarray, pix_fmt: str = "yuv420p") -> np.ndarray:
    """RGB -> pix_fmt -> RGB without coding: what the pixel format alone loses."""
    return np.stack([frame_to_rgb(rgb_to_codec_frame(f, pix_fmt)) for f in frames])


def x265_lookahead_blocks(width: int) -> int:
    """8x8 blocks per row of x265's lookahead, which works on the half-size frame."""
    return (width // 2 + 7) // 8


def encoder_options(codec: str, crf: float | None = 23, *, width: int, qp: int | None = None,
                    preset: str = "medium", x265_params: str = X265_DEFAULT_PARAMS, keep_sei: bool = False) -> dict:
    """The FFmpeg options `encode` opens the encoder with, for frames `width` pixels wide."""
    opts = {"preset": preset}
    if qp is not None:
        opts["qp"] = str(qp)
    elif crf is not None:
        opts["crf"] = str(crf)
    if codec.startswith("libx264"):
        opts["x264-params"] = X264_THREADS
    if codec == "libx265":  # quiet, no info SEI, no thread pool
        narrow = x265_lookahead_blocks(width) < X265_SIMD_MIN_BLOCKS  # C primitives: same stream, no overflow
        opts["x265-params"] = ":".join(p for p in ("log-level=error", "pools=none", "frame-threads=1",
                                                    "" if keep_sei else "info=0", "asm=0" if narrow else "",
                                                    x265_params) if p)
    return opts


def encode(frames, codec: str = "libx264", crf: float | None = 23, *, qp: int | None = None, preset: str = "medium",
           pix_fmt: str = "yuv420p", x265_params: str = X265_DEFAULT_PARAMS, keep_sei: bool = False) -> Encoded:
    """uint8 (T, H, W, 3) -> `Encoded`. Set `crf` or `qp` (qp=0: lossless where the codec has it)."""
    import av

    frames = _check(frames, codec, pix_fmt)
    decoder = CODECS[codec]
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
    ctx.time_base, ctx.framerate = Fraction(1, FPS), Fraction(FPS)
    ctx.gop_size = KEYINT
    ctx.thread_count = 1
    opts = encoder_options(codec, crf, width=frames.shape[2], qp=qp, preset=preset, x265_params=x265_params,
                           keep_sei=keep_sei)
    ctx.options = opts
    packets = []
    for i, f in enumerate(frames):
        vf = rgb_to_codec_frame(f, pix_fmt)
        vf.pts = i
        packets += [bytes(p) for p in ctx.encode(vf)]
    packets += [bytes(p) for p in ctx.encode(None)]
    kept = packets if keep_sei else [strip_sei(p, decoder) for p in packets]
    sei = sum(map(len, packets)) - sum(map(len, kept))
    return Encoded(codec, pix_fmt, frames.shape[1], frames.shape[2], len(frames), kept, opts, sei)


def decode(enc: Encoded) -> np.ndarray:
    """The packets decoded by FFmpeg's decoder: uint8 (T, H, W, 3) RGB in presentation order."""
    import av

    ctx = av.CodecContext.create(CODECS[enc.codec], "r")
    ctx.thread_count = 1
    out = []
    for p in enc.packets:
        out += [frame_to_rgb(f) for f in ctx.decode(av.Packet(p))]
    out += [frame_to_rgb(f) for f in ctx.decode(None)]
    return np.stack(out) if out else np.zeros((0, enc.height, enc.width, 3), np.uint8)


def rd_point(frames, codec: str, crf: float | None, **kw) -> dict:
    """Bits, bits per pixel, PSNR and SSIM of one clip at one setting."""
    import torch

    from ulvideo.eval.metrics import psnr, ssim

    enc = encode(frames, codec, crf, **kw)
    rec = decode(enc)
    if rec.shape != np.shape(frames):
        raise RuntimeError(f"{codec}: decoded {rec.shape}, encoded {np.shape(frames)}")
    x, y = torch.from_numpy(np.asarray(frames)[None]), torch.from_numpy(rec[None])
    return {"bits": enc.bits, "bpp": enc.bits_per_pixel, "psnr": float(psnr(x, y)[0]), "ssim": float(ssim(x, y)[0]),
            "sei_bits": 8 * enc.sei_bytes}


def library_versions() -> dict:
    import av

    return {"pyav": av.__version__, **{k: ".".join(map(str, v)) for k, v in av.library_versions.items()}}


def encoder_version(codec: str) -> str:
    """The version string the encoder writes into its info SEI (from a 16x16 one-frame encode)."""
    enc = encode(np.zeros((1, 16, 16, 3), np.uint8), codec, 23, keep_sei=True, pix_fmt="rgb24" if codec ==
                 "libx264rgb" else "yuv420p", x265_params="")
    text = b"".join(enc.packets).decode("latin-1")
    m = re.search(r"(x264 - core \d+[^-]*|x265 \(build \d+\) - [\w.+-]+)", text)
    return m.group(1).strip() if m else "unknown"


def crf_sweep(clips, codec: str, crfs, *, preset: str = "medium", pix_fmt: str = "yuv420p",
              x265_params: str = X265_DEFAULT_PARAMS, keep_sei: bool = False) -> list[dict]:
    """One record per CRF: mean bits per pixel, PSNR and SSIM over `clips` (equal weight each),
    per-clip values, the format's own PSNR ceiling, settings and versions."""
    clips = [_check(c, codec, pix_fmt) for c in clips]
    if not clips:
        raise ValueError("crf_sweep needs at least one clip")
    ceiling = None
    if pix_fmt != "rgb24":
        import torch

        from ulvideo.eval.metrics import psnr

        ceiling = float(np.mean([float(psnr(torch.from_numpy(c[None]), torch.from_numpy(
            format_roundtrip(c, pix_fmt)[None]))[0]) for c in clips]))
    common = {"codec": codec, "encoder": encoder_version(codec), "preset": preset, "pix_fmt": pix_fmt,
              "colour": "BT.601 limited range, bicubic chroma" if pix_fmt.startswith("yuv") else "RGB",
              "x265_params": x265_params if codec == "libx265" else "", "keep_sei": keep_sei,
              "keyint": KEYINT, "threads": 1, "libraries": library_versions()}
    records = []
    for crf in crfs:
        t0 = time.perf_counter()
        points = [rd_point(c, codec, crf, preset=preset, pix_fmt=pix_fmt, x265_params=x265_params, keep_sei=keep_sei)
                  for c in clips]
        per = {k: [round(p[k], 6) for p in points] for k in ("bpp", "psnr", "ssim")}
        records.append({"crf": crf, "num_clips": len(clips), "bpp": float(np.mean(per["bpp"])),
                        "psnr": float(np.mean(per["psnr"])), "ssim": float(np.mean(per["ssim"])),
                        "bits_per_clip": float(np.mean([p["bits"] for p in points])),
                        "sei_bits_removed_per_clip": float(np.mean([p["sei_bits"] for p in points])),
                        "format_psnr": ceiling, "seconds": round(time.perf_counter() - t0, 2), **common,
                        "per_clip": per})
    return records


def load_split(data: str | Path, split: str, kinds) -> tuple[list[dict], list[np.ndarray]]:
    """Manifest rows and uint8 clips of one split of a real_footage build, read by ulvideo.videoio."""
    from ulvideo.videoio import read_clip, read_image

    rows = [r for r in read_manifest(Path(data) / "manifest.csv") if r["split"] == split and r["kind"] in kinds]
    clips = [read_image(Path(data) / r["path"]) if r["kind"] == "image" else
             read_clip(Path(data) / r["path"], 0, r["frames"]) for r in rows]
    return rows, clips


def by_kind(per_clip: dict, kinds: list[str]) -> dict:
    """Means of the per-clip values for each kind of clip."""
    out = {}
    for kind in sorted(set(kinds)):
        pick = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = {m: round(float(np.mean([v[i] for i in pick])), 4) for m, v in per_clip.items()}
        out[kind]["num_clips"] = len(pick)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a folder written by real_footage.py build")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--kinds", default="video,pan,zoom", help="comma-separated: video, pan, zoom, image")
    p.add_argument("--codecs", default="libx264,libx265")
    p.add_argument("--crfs", default="18,23,28,33,38,43")
    p.add_argument("--preset", default="medium")
    p.add_argument("--pix-fmt", default="yuv420p")
    p.add_argument("--out", default="", help="also write the records to this JSON file")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    manifest = Path(args.data) / "manifest.csv"
    if not manifest.is_file():
        sys.exit(f"codec_rd: {manifest} does not exist (run real_footage.py build first)")
    rows, clips = load_split(args.data, args.split, kinds)
    if not clips:
        sys.exit(f"codec_rd: no {args.split} clips of kinds {kinds} in {args.data}")
    crfs = [float(c) if "." in c else int(c) for c in args.crfs.split(",")]
    command = "python benchmarks/codec_rd.py " + " ".join(sys.argv[1:] if argv is None else argv)
    shapes = sorted({(r["frames"], r["height"], r["width"]) for r in rows})
    t, h = max(s[0] for s in shapes), shapes[0][1]
    build = f"python benchmarks/real_footage.py build --out {args.data}" + (f" --frames {t}" if t != 17 else "") + (
        f" --size {h}" if h != 64 else "")  # the defaults otherwise; the manifest's hash tells
    result = {"what": "codec_rd", "command": command, "data_command": build, "data": str(args.data),
              "clip_shapes": [f"{t}x{h}x{w}" for t, h, w in shapes],
              "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest()[:16], "split": args.split,
              "kinds": kinds, "clips": [r["path"] for r in rows], "records": []}
    shown = ("codec", "crf", "bpp", "psnr", "ssim", "format_psnr", "seconds")
    try:
        for codec in args.codecs.split(","):
            for rec in crf_sweep(clips, codec, crfs, preset=args.preset, pix_fmt=args.pix_fmt):
                rec["by_kind"] = by_kind(rec["per_clip"], [r["kind"] for r in rows])
                result["records"].append(rec)
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items() if k in shown}))
    except ValueError as e:
        sys.exit(f"codec_rd: {e}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
