"""Exports: the EMA weights of a trained model as `NAME.safetensors` + `NAME.json` (the resolved
config and metadata). The only thing inference, encode/decode, generate and FVD load; no pickle is
involved (DESIGN.md §4). Also the one file hash of the project.

    from ulvideo.exports import load_stage1, load_base
    stage1 = load_stage1("runs/tiny/exports/latest.safetensors")
    base, base_cfg, meta = load_base("runs/base_tiny/exports/latest.safetensors", stage1)
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ulvideo.config import Config, from_dict, to_dict


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ExportError(RuntimeError):
    pass


def fsync(path: str | os.PathLike) -> None:
    """Make a file's data, or a directory's names (a rename, a new file), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` by `text` at once: written beside it, fsynced, renamed, the rename fsynced."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def save_export(path: str | os.PathLike, weights: dict[str, torch.Tensor], cfg: Config, meta: dict[str, Any] | None = None) -> Path:
    """Write `path` (.safetensors) and its `.json` sidecar, each atomically and fsynced. The weights'
    metadata repeats `meta["step"]`, so a pair from two different saves is told apart
    (`ulvideo.train.rundir.export_step`).
    Returns the .safetensors path."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = meta or {}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    header = {"format": "ulvideo-export", **({"step": str(meta["step"])} if "step" in meta else {})}
    tmp = _tmp_name(path)
    try:
        save_file(tensors, str(tmp), metadata=header)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(path.with_suffix(".json"), json.dumps({"config": to_dict(cfg), "meta": meta}, indent=2))
    return path


def link_export(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make `dst` (.safetensors + .json) the same export as `src`: hard links where the filesystem
    has them (no second copy of the weights), else copies; each file replaced atomically."""
    import shutil

    src, dst = Path(src).with_suffix(".safetensors"), Path(dst).with_suffix(".safetensors")
    for a, b in ((src, dst), (src.with_suffix(".json"), dst.with_suffix(".json"))):
        tmp = _tmp_name(b)
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(a, tmp)
            except OSError:
                shutil.copyfile(a, tmp)
                fsync(tmp)
            os.replace(tmp, b)
        finally:
            tmp.unlink(missing_ok=True)
    fsync(dst.parent)
    return dst


def export_path(path: str | os.PathLike) -> Path:
    """The weights file of an export named by either of its files or its stem (NAME.safetensors)."""
    shown, path = os.fspath(path), Path(path)
    if not shown.strip() or path.name in ("", ".", ".."):
        raise ExportError(f"export path {shown!r} names no file (give RUN/exports/latest.safetensors, written by "
                          "`ulvideo train CONFIG --run-dir RUN`)")
    return path if path.suffix == ".safetensors" else path.with_suffix(".safetensors")


def load_export(path: str | os.PathLike, map_location: str = "cpu") -> tuple[dict[str, torch.Tensor], Config, dict]:
    """(weights, config, meta) of an export; a clear error when either file is missing or broken."""
    path = export_path(path)
    side = path.with_suffix(".json")
    if not path.is_file():
        raise ExportError(f"export weights not found: {path} (a training run writes its exports to "
                          "RUN/exports/latest.safetensors: `ulvideo train CONFIG --run-dir RUN`)")
    if not side.is_file():
        raise ExportError(f"export config not found: {side} (an export is NAME.safetensors + NAME.json)")
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
        if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
            raise ValueError(f"the top level must be a mapping with a 'config' mapping, got {type(info).__name__}")
        if not isinstance(info.get("meta", {}), dict):
            raise ValueError("'meta' must be a mapping")
        cfg = from_dict(info["config"], str(side))
    except (ValueError, KeyError) as e:  # JSON syntax, a wrong layout, a config out of range
        raise ExportError(f"{side}: not a ulvideo export config ({e})") from e
    try:
        weights = load_file(str(path), device=map_location)
    except Exception as e:  # safetensors raises its own error types
        raise ExportError(f"{path}: cannot read safetensors ({e})") from e
    check_weights(path, weights)
    return weights, cfg, info.get("meta", {})


def check_weights(path, weights: dict[str, torch.Tensor]) -> None:
    """Exports hold finite float32 tensors (`save_export` writes nothing else): anything else was
    made or changed by another tool, and is refused rather than cast or computed with."""
    if not weights:
        raise ExportError(f"{path}: holds no tensors")
    other = [f"{k} ({v.dtype})" for k, v in weights.items() if v.dtype != torch.float32]
    if other:
        raise ExportError(f"{path}: {len(other)} of {len(weights)} tensors are not float32, e.g. {', '.join(other[:3])} "
                          "(exports are written in float32)")
    bad = [k for k, v in weights.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ExportError(f"{path}: {len(bad)} tensors hold NaN or infinite values, e.g. {', '.join(bad[:3])}")


def check_fit(path, model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> None:
    """The weights' names and shapes are the model's (built from the export's own config)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in weights and weights[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:2])})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:2])})" if shapes else ""]
        raise ExportError(f"{path}: the weights do not fit {what}: " + ", ".join(p for p in parts if p))


def load_stage1(path: str | os.PathLike):
    """A stage-1 export as the `UnifiedLatents` (or baseline, `ul.model`) it holds, in eval mode,
    without gradients."""
    from ulvideo.baselines import build_stage1

    weights, cfg, meta = load_export(path)
    if meta.get("stage", "ul") != "ul":
        raise ExportError(f"{path} is a '{meta.get('stage')}' export, not a stage-1 (ul) export")
    try:
        model = build_stage1(cfg)
    except ValueError as e:  # an architecture the networks refuse
        raise ExportError(f"{path}: its config does not build a model ({e})") from e
    check_fit(path, model, weights, "the model its .json describes")
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False)


def load_base(path: str | os.PathLike, stage1) -> tuple[Any, Config, dict]:
    """A stage-2 export as a `LatentDiffusion` on `stage1`'s latents: (model, its config, its metadata)."""
    from ulvideo.ul import LatentDiffusion

    weights, cfg, meta = load_export(path)
    if meta.get("stage") != "base":
        raise ExportError(f"{path} is not a stage-2 (base) export")
    s1 = stage1.cfg
    if meta.get("latent_logsnr") != s1.ul.latent_logsnr or meta.get("prior_logsnr_min") != s1.ul.prior_logsnr_min:
        raise ExportError(f"{path} was trained on latents with lambda_0 = {meta.get('latent_logsnr')}, "
                          f"lambda_min = {meta.get('prior_logsnr_min')}; the stage-1 export has "
                          f"{s1.ul.latent_logsnr}, {s1.ul.prior_logsnr_min}: the exports do not belong together")
    try:
        model = LatentDiffusion(cfg, s1, text_dim=int(meta.get("text_dim", 0)))
    except (ValueError, TypeError) as e:
        raise ExportError(f"{path}: its config does not build a base model ({e})") from e
    check_fit(path, model, weights, "the base model of its .json on the stage-1 export's latents")
    model.load_state_dict(weights)
    return model.eval().requires_grad_(False), cfg, meta
