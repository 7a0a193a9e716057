"""Resumable training state (DESIGN.md §4; exports are `ulvideo.exports`).

`RUN/checkpoints/step_XXXXXXX/`: DeepSpeed's (sharded) model/optimizer/scheduler files,
`ema.safetensors`, `state.json` (step, data position, counters). Written under a temporary name and
renamed when complete; `RUN/checkpoints/latest` (a one-line file) is updated last, so a crash at any
moment leaves the previous complete checkpoint in place. DeepSpeed's files are pickles: resume only
from run directories you wrote yourself.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ulvideo.config import ConfigError
from ulvideo.exports import atomic_write_text


UNIVERSAL = "universal"  # subfolder of a checkpoint holding its DeepSpeed universal-format copy
FAULT_ENV = "ULVIDEO_FAULT_SAVE_PAUSE"  # POINT:SECONDS, see fault_pause


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


def check_resumable(ckpt_dir: Path, stage: str, zero_stage: int) -> None:
    """Raise ConfigError when the run dir's latest checkpoint cannot be resumed with these settings
    (another training stage, or a change into or out of ZeRO-0, whose optimizer state is not in
    ZeRO's partitioned format). Other world sizes and ZeRO 1/2/3 changes resume via the universal format."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return
    state = read_state_json(ckpt_dir, tag)
    if state.get("stage", stage) != stage:
        raise ConfigError(f"{ckpt_dir / tag} is a '{state['stage']}' checkpoint; this config trains stage '{stage}' "
                          "(use a new --run-dir)")
    old = state.get("zero_stage", zero_stage)
    if old != zero_stage and 0 in (old, zero_stage):
        raise ConfigError(f"{ckpt_dir / tag} was written with train.zero_stage={old}; resuming it with "
                          f"train.zero_stage={zero_stage} is not supported (set it back to {old})")


def begin_save(ckpt_dir: Path, step: int, is_main: bool = True) -> str:
    """The temporary tag DeepSpeed writes into; it becomes `tag_for(step)` in `finish_save`. Rank 0
    clears what a crashed save of the same step left there (files of another world size would mix in)."""
    tag = f".tmp-{tag_for(step)}"
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        (ckpt_dir / tag).mkdir()
    return tag


def sync_tree(path: Path) -> None:
    """fsync every file under `path`, so that a rename after it never exposes unwritten data."""
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fault_pause(point: str) -> None:
    """Fault-injection hook for crash-safety tests. With ULVIDEO_FAULT_SAVE_PAUSE=POINT:SECONDS, every
    save pauses at POINT, printing a line first, so that a test can kill the process there:
    `written` (DeepSpeed's files are written, the checkpoint is not complete yet) or `renamed`
    (complete and renamed, `latest` not yet updated). Does nothing when the variable is unset."""
    spec = os.environ.get(FAULT_ENV, "")
    where, _, seconds = spec.rpartition(":")
    if spec and where == point and float(seconds) > 0:
        print(f"checkpoint: pausing {seconds} s at '{point}' ({FAULT_ENV})", flush=True)
        time.sleep(float(seconds))


def finish_save(ckpt_dir: Path, step: int, ema: dict[str, torch.Tensor], state: dict, keep_last: int) -> Path:
    """(rank 0, after every rank finished writing) add EMA + state, rename, point `latest`, rotate."""
    tmp = ckpt_dir / f".tmp-{tag_for(step)}"
    tmp.mkdir(parents=True, exist_ok=True)
    ema_tmp = tmp / ".ema.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(ema_tmp))
    sync_tree(tmp)
    os.replace(ema_tmp, tmp / "ema.safetensors")
    # state.json last inside the directory: its presence marks the checkpoint complete
    atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
    _sync_dir(tmp)
    final = ckpt_dir / tag_for(step)
    if final.exists():  # a save of this step that completed before a crash; replaced whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _sync_dir(ckpt_dir)
    fault_pause("renamed")
    atomic_write_text(ckpt_dir / "latest", final.name + "\n")
    _sync_dir(ckpt_dir)
    complete = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and p.name != final.name)
    for old in complete[:max(0, len(complete) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(".tmp-*"):  # leftovers of a crashed save
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state_json(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / "state.json").read_text())


def read_ema(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / tag / "ema.safetensors"))


def read_state(ckpt_dir: Path, tag: str) -> tuple[dict, dict[str, torch.Tensor]]:
    return read_state_json(ckpt_dir, tag), read_ema(ckpt_dir, tag)


def to_universal(tag_dir: Path) -> Path:
    """Convert one DeepSpeed ZeRO checkpoint into DeepSpeed's universal format (fp32 weights and
    optimizer moments per parameter, loadable at any world size and ZeRO stage) in TAG/universal.
    Runs DeepSpeed's own converter in a child process; done once, atomically, then reused."""
    tag_dir = Path(tag_dir)
    out = tag_dir / UNIVERSAL
    if (out / "zero").is_dir():
        return out
    tmp = tag_dir / f".{UNIVERSAL}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", workers,
           "--num_merge_workers", workers]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    sync_tree(tmp)
    os.replace(tmp, out)
    return out


@dataclass
class ResumePlan:
    tag: str  # the checkpoint (EMA, state.json)
    state: dict
    load_dir: str  # what DeepSpeed's load_checkpoint gets
    load_tag: str
    universal: bool  # the engine must be configured with checkpoint.load_universal


def plan_resume(ckpt_dir: Path, world_size: int, zero_stage: int, is_main: bool) -> ResumePlan | None:
    """What to resume from (None: start fresh). Call on every rank after the process group started
    and before the engine is built. A checkpoint from another world size or ZeRO stage is converted
    to the universal format by rank 0 (once; cached inside the checkpoint); ZeRO-0 optimizer state
    is not partitioned and loads at any world size as it is."""
    import torch.distributed as dist

    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    state = read_state_json(ckpt_dir, tag)
    same = state.get("world_size", world_size) == world_size and state.get("zero_stage", zero_stage) == zero_stage
    if same or zero_stage == 0:
        return ResumePlan(tag, state, str(ckpt_dir), tag, universal=False)
    error = [None]
    if is_main:
        try:
            to_universal(ckpt_dir / tag)
        except Exception as e:  # reported on every rank instead of leaving the others waiting
            error[0] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise RuntimeError(f"converting {ckpt_dir / tag} to DeepSpeed's universal format failed: {error[0]}")
    return ResumePlan(tag, state, str(ckpt_dir / tag), UNIVERSAL, universal=True)
