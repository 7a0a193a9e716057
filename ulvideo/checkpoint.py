"""Two artifacts (DESIGN.md §4):

* **Training state** — `RUN/checkpoints/step_XXXXXXX/`: DeepSpeed's (sharded) model/optimizer/scheduler
  files, `ema.safetensors`, `state.json` (step, data position, counters). Written under a temporary
  name and renamed when complete; `RUN/checkpoints/latest` (a one-line file) is updated last, so a
  crash at any moment leaves the previous complete checkpoint in place. DeepSpeed's files are
  pickles: resume only from run directories you wrote yourself.
* **Export** — `name.safetensors` (EMA weights) + `name.json` (resolved config + metadata): the only
  thing encode/decode/generate/FVD load. No pickle is involved.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ulvideo.config import Config, from_dict, to_dict


class ExportError(RuntimeError):
    pass


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_export(path: str | os.PathLike, weights: dict[str, torch.Tensor], cfg: Config, meta: dict[str, Any] | None = None) -> Path:
    """Write `path` (.safetensors) and its `.json` sidecar atomically. Returns the .safetensors path."""
    path = Path(path).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"format": "ulvideo-export"})
    os.replace(tmp, path)
    _atomic_write_text(path.with_suffix(".json"), json.dumps({"config": to_dict(cfg), "meta": meta or {}}, indent=2))
    return path


def load_export(path: str | os.PathLike, map_location: str = "cpu") -> tuple[dict[str, torch.Tensor], Config, dict]:
    """(weights, config, meta) of an export; a clear error when either file is missing or broken."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    side = path.with_suffix(".json")
    if not path.is_file():
        raise ExportError(f"export weights not found: {path}")
    if not side.is_file():
        raise ExportError(f"export config not found: {side} (an export is NAME.safetensors + NAME.json)")
    try:
        info = json.loads(side.read_text())
        cfg = from_dict(info["config"], str(side))
    except (ValueError, KeyError) as e:
        raise ExportError(f"{side}: not a ulvideo export config ({e})") from e
    try:
        weights = load_file(str(path), device=map_location)
    except Exception as e:  # safetensors raises its own error types
        raise ExportError(f"{path}: cannot read safetensors ({e})") from e
    return weights, cfg, info.get("meta", {})


# --------------------------------------------------------------------------------------------
# Training state
# --------------------------------------------------------------------------------------------


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint, or None. Falls back to scanning when `latest` is missing."""
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        tag = pointer.read_text().strip()
        if (ckpt_dir / tag / "state.json").is_file():
            return tag
    complete = sorted(p.name for p in ckpt_dir.glob("step_*") if (p / "state.json").is_file())
    return complete[-1] if complete else None


def begin_save(ckpt_dir: Path, step: int) -> str:
    """The temporary tag DeepSpeed writes into; it becomes `tag_for(step)` in `finish_save`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    return f".tmp-{tag_for(step)}"


def finish_save(ckpt_dir: Path, step: int, ema: dict[str, torch.Tensor], state: dict, keep_last: int) -> Path:
    """(rank 0, after every rank finished writing) add EMA + state, rename, point `latest`, rotate."""
    tmp = ckpt_dir / f".tmp-{tag_for(step)}"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    # state.json last inside the directory: its presence marks the checkpoint complete
    _atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
    final = ckpt_dir / tag_for(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(ckpt_dir / "latest", final.name + "\n")
    for old in sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(".tmp-*"):  # leftovers of a crashed save
        if stale.name != tmp.name:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(ckpt_dir: Path, tag: str) -> tuple[dict, dict[str, torch.Tensor]]:
    d = ckpt_dir / tag
    return json.loads((d / "state.json").read_text()), load_file(str(d / "ema.safetensors"))
