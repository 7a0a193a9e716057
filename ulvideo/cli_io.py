"""What the commands read and write, checked before any compute (docs/cli.md, "Errors and exit status").

Outputs: every file a command will write (a video, the PNG sheet written beside it, a latent file,
a JSON result, a manifest) is listed before anything is loaded. A path that is also one of the
command's inputs is refused always; a path that exists is refused unless `--overwrite` is given,
whoever wrote it (a command cannot tell its own earlier output from an unrelated file of the
same name, so it never guesses); a directory is never replaced. Inputs: a file that is missing,
unreadable, or holds the wrong thing (dtype, shape, non-finite values, not UTF-8) is refused with
one line naming it. `InputError` carries that line; `ulvideo.cli.main` prints it, exit status 2.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".gif", ".png")  # what videoio.write_video writes
OVERWRITE_HELP = "replace output files that already exist (an input is never replaced)"


class InputError(ValueError):
    """A bad argument or input file: one line that names it and says what is wrong."""


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_outputs(outputs, inputs, overwrite: bool) -> None:
    """Refuse an output that is an input (always), a directory, or an existing file (unless `overwrite`)."""
    ins = [Path(p) for p in inputs if p]
    for out in map(Path, outputs):
        for src in ins:
            if _same(out, src):
                raise InputError(f"{out} is also an input ({src}); write the output elsewhere")
        if out.is_dir():
            raise InputError(f"{out} is a directory; give a file name")
        if out.exists() and not overwrite:
            raise InputError(f"{out} exists; pass --overwrite to replace it")


def video_outputs(out: str | os.PathLike) -> list[Path]:
    """The files a video output writes: the video, and the PNG sheet beside it unless it is one."""
    out = Path(out)
    if out.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(f"--out {out}: unsupported suffix {out.suffix!r} (use {', '.join(VIDEO_SUFFIXES)})")
    return [out] if out.suffix.lower() == ".png" else [out, out.with_suffix(".png")]


def export_files(path: str | os.PathLike | None) -> list[Path]:
    """An export's two files (weights and config), as inputs."""
    from ulvideo.exports import export_path

    if path is None:
        return []
    p = export_path(path)
    return [p, p.with_suffix(".json")]


def clip_outputs(out: str | os.PathLike, n: int) -> list[list[Path]]:
    """`generate`'s files per clip: `out` (and its sheet) for one clip, else a folder of sample_NNNN.mp4."""
    out = Path(out)
    if n == 1:
        return [video_outputs(out)]
    if out.suffix.lower() in VIDEO_SUFFIXES or out.is_file():
        raise InputError(f"--out {out}: {n} clips are written into a folder; give a folder, not a file")
    return [video_outputs(out / f"sample_{i:04d}.mp4") for i in range(n)]


def check_encode(args) -> None:
    """`encode`'s arguments and outputs: --input writes one latent file, --data a shard folder."""
    check_counts(num_frames=args.num_frames, batch_size=args.batch_size, shard_size=args.shard_size, chunk=args.chunk,
                 tile=args.tile)
    if args.data:
        data, out = Path(args.data).resolve(), Path(args.out).resolve()
        if args.chunk or args.tile or args.overwrite:
            raise InputError("--chunk, --tile and --overwrite apply to --input; --data resumes its shard folder "
                             "(and refuses one holding shards made otherwise)")
        if out == data or data in out.parents:
            raise InputError(f"--out {args.out} lies inside --data {args.data}: the shards would become part of the "
                             "dataset; write them elsewhere")
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {args.out} is a file; --data writes a folder of shards")
    else:
        if Path(args.out).suffix != ".safetensors":
            raise InputError(f"--out {args.out}: a latent file is written as NAME.safetensors")
        check_outputs([args.out], [args.input, *export_files(args.export)], args.overwrite)


def check_counts(**values: int) -> None:
    """Each `--name value` is >= 1."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} {value}: must be >= 1")


def check_finite(**values: float) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise InputError(f"--{name.replace('_', '-')} {value}: must be a finite number")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The non-empty lines of a UTF-8 text file (a byte-order mark is allowed), stripped."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--prompts {p}: no such file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise InputError(f"--prompts {p}: not UTF-8 text (line {line}: byte {raw[e.start:e.start + 1]!r}); "
                         "save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"--prompts {p}: no prompts (one per line)")
    return prompts


def read_latent(path: str | os.PathLike, channels: int):
    """(z_clean float32 (1, C, T', H', W'), metadata) of a latent file written by `ulvideo encode
    --input`: a `z_clean` (C, T', H', W') or (1, C, T', H', W') float32 tensor, all finite."""
    import torch
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--input {p}: no such file (a latent file written by `ulvideo encode --input`)")
    try:
        with safe_open(str(p), "pt") as f:
            keys, meta = list(f.keys()), f.metadata() or {}
            z = f.get_tensor("z_clean") if "z_clean" in keys else None
    except (SafetensorError, OSError) as e:
        raise InputError(f"--input {p}: not a readable safetensors file ({e})") from None
    if z is None:
        raise InputError(f"--input {p}: no 'z_clean' tensor (it holds {', '.join(keys[:5]) or 'none'}); "
                         "`ulvideo encode --input` writes one")
    if z.dtype != torch.float32:
        raise InputError(f"--input {p}: z_clean is {z.dtype}, expected float32 (as `ulvideo encode` writes it)")
    if z.ndim == 5 and z.shape[0] == 1:
        z = z[0]
    if z.ndim != 4 or z.shape[0] != channels or min(z.shape) < 1:
        raise InputError(f"--input {p}: z_clean has shape {tuple(z.shape)}, expected ({channels}, T', H', W') "
                         f"with the export's {channels} latent channels")
    if not bool(torch.isfinite(z).all()):
        raise InputError(f"--input {p}: z_clean holds {int((~torch.isfinite(z)).sum())} NaN or infinite values")
    return z[None], meta


def latent_fps(meta: dict, path) -> float:
    """The frame rate `encode --input` recorded in a latent file's metadata (0: none, e.g. an image)."""
    try:
        fps = float(meta.get("fps") or 0)
    except ValueError:
        fps = float("nan")
    if not math.isfinite(fps) or fps < 0:
        raise InputError(f"--input {path}: its metadata fps = {meta.get('fps')!r} is not a frame rate")
    return fps


def long_prompts(text, prompts: list[str]) -> list[str]:
    """One warning per distinct prompt that the text encoder cuts at its token limit."""
    if text is None or not prompts:
        return []
    unique = list(dict.fromkeys(prompts))
    out = []
    for prompt, n in zip(unique, text.token_counts(unique)):
        if n > text.max_tokens:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            out.append(f"warning: prompt {shown!r} is {n} tokens; the text encoder reads the first "
                       f"{text.max_tokens} (base.text_max_tokens), the rest is cut")
    return out


def input_errors() -> tuple[type, ...]:
    """The exception types that mean bad input (a message for the user), not a bug (a traceback)."""
    from ulvideo.config import ConfigError
    from ulvideo.data.sources import DataError
    from ulvideo.data.storage import StorageError
    from ulvideo.exports import ExportError
    from ulvideo.text import TextEncoderError
    from ulvideo.videoio import VideoError

    return InputError, ConfigError, DataError, StorageError, ExportError, TextEncoderError, VideoError


def one_line(e: BaseException) -> str:
    """The message of `e` on one line. An error re-raised from a DataLoader worker carries the
    worker's traceback in its message: its last line is the original 'module.Error: message'."""
    text = str(e).strip()
    if "\n" in text:
        last = text.splitlines()[-1].strip()
        head, sep, rest = last.partition(": ")
        text = rest if sep and head.replace(".", "").replace("_", "").isalnum() else last
    return text
