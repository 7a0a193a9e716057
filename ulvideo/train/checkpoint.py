"""Resumable training state (DESIGN.md §4; exports are `ulvideo.exports`).

`RUN/checkpoints/step_XXXXXXXX/`: DeepSpeed's (sharded) model/optimizer/scheduler files,
`ema.safetensors`, `state.json` (step, data position, counters, metrics rows written, and the name
and size of every file of the checkpoint). Written under a temporary name and renamed when complete;
`RUN/checkpoints/latest` (a one-line file) is updated last, so a crash at any moment leaves the
previous complete checkpoint in place.

Resuming picks the checkpoint `latest` names when it is a step folder of this `checkpoints/` and
intact, else the newest intact step folder; a damaged one (a file missing or of the wrong size, a
truncated `ema.safetensors`, an unreadable `state.json`, a symbolic link) is skipped with a warning
naming the file. Nothing outside `checkpoints/` is ever handed to DeepSpeed, whose files are
pickles: resume only from run directories you wrote yourself.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ulvideo.config import ConfigError
from ulvideo.exports import atomic_write_text, fsync

log = logging.getLogger("ulvideo.train")


UNIVERSAL = "universal"  # subfolder of a checkpoint holding its DeepSpeed universal-format copy
FAULT_ENV = "ULVIDEO_FAULT_SAVE_PAUSE"  # POINT[@STEP]:SECONDS, see fault_pause


TAG = re.compile(r"step_[0-9]{8,}")  # the only names `latest` may hold and resuming may use


class CheckpointError(RuntimeError):
    """The run dir has checkpoints but none that can be resumed (status 2)."""


class SaveError(RuntimeError):
    """A checkpoint or an export could not be written; its partial files are gone (status 4)."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_folders(ckpt_dir: Path) -> list[str]:
    """Names of the step folders directly in `ckpt_dir` (no symbolic links), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    names = [p.name for p in ckpt_dir.iterdir() if TAG.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(names, key=lambda n: int(n[5:]))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The checkpoint `latest` names when it is a complete step folder here, else the newest complete
    one (state.json present; `find_resumable` also checks every file)."""
    names = [n for n in step_folders(ckpt_dir) if (ckpt_dir / n / "state.json").is_file()]
    pointer = ckpt_dir / "latest"
    tag = pointer.read_text(errors="replace").strip() if pointer.is_file() else None
    return tag if tag in names else (names[-1] if names else None)


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None: its 8-byte header length, JSON header
    and the end of its last tensor must account for the file's size exactly."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"is truncated ({size} bytes, shorter than its header)"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        return "is missing"
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        return f"has no readable safetensors header ({type(e).__name__})"
    expected = 8 + n + end
    if size != expected:
        return f"is truncated ({size} of {expected} bytes)" if size < expected else f"has {size - expected} bytes too many"
    return None


def damage(tag_dir: Path) -> tuple[str, str] | None:
    """(file, what is wrong with it) when the checkpoint in `tag_dir` cannot be resumed, else None.
    Checks what can be checked without unpickling: no symbolic links, state.json readable and of this
    step, ema.safetensors complete, every file listed in state.json present with its size."""
    for p in sorted(tag_dir.rglob("*")):
        if p.is_symlink():
            return str(p.relative_to(tag_dir)), "is a symbolic link (a checkpoint holds plain files only)"
    try:
        state = json.loads((tag_dir / "state.json").read_text())
        if int(state["step"]) != int(tag_dir.name[5:]) or not isinstance(state["data"], dict):
            raise ValueError(f"it describes step {state['step']}")
    except FileNotFoundError:
        return "state.json", "is missing"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return "state.json", f"is not this checkpoint's state ({type(e).__name__}: {str(e)[:80]})"
    problem = safetensors_problem(tag_dir / "ema.safetensors")
    if problem:
        return "ema.safetensors", problem
    for rel, size in sorted(state.get("files", {}).items()):
        f = tag_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return "state.json", f"lists {rel!r}, a path outside the checkpoint"
        if not f.is_file():
            return rel, "is missing"
        if f.stat().st_size != size:
            return rel, f"has {f.stat().st_size} bytes, {size} were written"
    return None


@dataclass
class Checkpoint:
    tag: str
    state: dict


def find_resumable(ckpt_dir: Path, warn: Callable[[str], None] = log.warning) -> Checkpoint | None:
    """The checkpoint to resume (None: start afresh): the one `latest` names when it is an intact step
    folder of `ckpt_dir`, else the newest intact one. `latest` naming anything else, and every damaged
    checkpoint passed over, are one `warn` line each. CheckpointError when there are step folders but
    none is intact. Reads no pickle; call it before any process group starts."""
    names = step_folders(ckpt_dir)
    order, pointer, ignored = names[::-1], ckpt_dir / "latest", None
    if pointer.is_file():
        named = pointer.read_text(errors="replace").strip()
        if named in names:
            order.remove(named)
            order.insert(0, named)
        else:
            ignored = f"{pointer} names {named[:200]!r}, which is not a step folder of {ckpt_dir}: ignored; "
    damaged = []
    for tag in order:
        problem = damage(ckpt_dir / tag)
        if problem is None:
            if ignored:
                warn(ignored + f"resuming from {ckpt_dir / tag}, the newest intact step folder, instead")
            for d in damaged:
                warn(f"checkpoint damaged, skipped: {d}; resuming from {ckpt_dir / tag}")
            return Checkpoint(tag, read_state_json(ckpt_dir, tag))
        damaged.append(f"{ckpt_dir / tag / problem[0]} {problem[1]}")
    if damaged:  # one line: every damaged checkpoint, nothing to fall back to
        raise CheckpointError(f"no intact checkpoint to resume in {ckpt_dir}: {'; '.join(damaged)} (move the "
                              "checkpoints folder away to start this run afresh)")
    if ignored:
        warn(ignored + "there is no step folder here, so the run starts afresh")
    return None


def check_resumable(found: Checkpoint | None, ckpt_dir: Path, stage: str, zero_stage: int) -> None:
    """Raise ConfigError when `found` cannot be resumed with these settings (another training stage,
    or a change into or out of ZeRO-0, whose optimizer state is not in ZeRO's partitioned format).
    Other world sizes and ZeRO 1/2/3 changes resume via the universal format."""
    if found is None:
        return
    state, where = found.state, ckpt_dir / found.tag
    if state.get("stage", stage) != stage:
        raise ConfigError(f"{where} is a '{state['stage']}' checkpoint; this config trains stage '{stage}' "
                          "(use a new --run-dir)")
    old = state.get("zero_stage", zero_stage)
    if old != zero_stage and 0 in (old, zero_stage):
        raise ConfigError(f"{where} was written with train.zero_stage={old}; resuming it with "
                          f"train.zero_stage={zero_stage} is not supported (set it back to {old})")


def remove_partial(ckpt_dir: Path) -> None:
    """Remove what crashed or failed saves left (`.tmp-*` folders); rank 0, with the run dir locked."""
    for stale in ckpt_dir.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in ckpt_dir.glob(f"step_*/.{UNIVERSAL}-tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def free_bytes(path: Path) -> int | None:
    for p in (Path(path), *Path(path).parents):
        try:
            st = os.statvfs(p)
            return st.f_bavail * st.f_frsize
        except OSError:
            continue
    return None


def write_failure(e: BaseException, path: Path) -> str | None:
    """What went wrong when writing under `path` failed with `e`, or None when `e` is no write failure.
    torch.save reports a full disk as a RuntimeError without errno ("unexpected pos ..."), so a
    filesystem with (almost) no room left counts as full whatever the exception says."""
    free = free_bytes(path)
    full = getattr(e, "errno", None) == errno.ENOSPC or "os error 28" in str(e) or (free is not None and free < 1 << 20)
    if full:
        return f"no space left on device ({(free or 0) / 2**20:.1f} MiB free there)"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    return None


@contextmanager
def writing(path: Path, what: str):
    """Run a write into `path` (a folder or a file); when it fails for want of space or another OS
    error, remove `path` and raise SaveError, one line naming it. Other errors pass through (after
    the removal)."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        why = write_failure(e, path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if why is None:
            raise
        raise SaveError(f"{why}: writing {what} {path} failed; its partial files are removed") from e


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
        fsync(f)


def fault_pause(point: str, step: int) -> None:
    """Fault-injection hook for crash-safety tests. With ULVIDEO_FAULT_SAVE_PAUSE=POINT:SECONDS (every
    save) or POINT@STEP:SECONDS (the save of that step), a save pauses at POINT, printing a line
    first, so that a test can kill the process there: `written` (DeepSpeed's files are written, the
    checkpoint is not complete yet), `renamed` (complete and renamed, `latest` not yet updated) or
    `committed` (`latest` updated, the exports not yet written). Does nothing when unset."""
    spec = os.environ.get(FAULT_ENV, "")
    where, _, seconds = spec.rpartition(":")
    where, _, at = where.partition("@")
    if spec and where == point and (not at or int(at) == step) and float(seconds) > 0:
        print(f"checkpoint: pausing {seconds} s at '{point}' of step {step} ({FAULT_ENV})", flush=True)
        time.sleep(float(seconds))


def finish_save(ckpt_dir: Path, step: int, ema: dict[str, torch.Tensor], state: dict, keep_last: int) -> Path:
    """(rank 0, after every rank finished writing) add EMA + state (with the name and size of every
    file), rename, point `latest`, rotate: the `keep_last` newest checkpoints up to this one stay,
    and the one `latest` names is never deleted (it is this one)."""
    tmp = ckpt_dir / f".tmp-{tag_for(step)}"
    tmp.mkdir(parents=True, exist_ok=True)
    ema_tmp = tmp / ".ema.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(ema_tmp))
    sync_tree(tmp)
    os.replace(ema_tmp, tmp / "ema.safetensors")
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    # state.json last inside the directory: its presence marks the checkpoint complete
    atomic_write_text(tmp / "state.json", json.dumps({**state, "files": files}, indent=1))
    final = ckpt_dir / tag_for(step)
    if final.exists():  # a save of this step that completed before a crash, or a damaged one; replaced whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync(ckpt_dir)
    fault_pause("renamed", step)
    atomic_write_text(ckpt_dir / "latest", final.name + "\n")
    older = [n for n in step_folders(ckpt_dir) if int(n[5:]) < step]
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    remove_partial(ckpt_dir)  # leftovers of a crashed save
    return final


def read_state_json(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / "state.json").read_text())


def read_ema(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_dir / tag / "ema.safetensors"))


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


def plan_resume(ckpt_dir: Path, found: Checkpoint | None, world_size: int, zero_stage: int,
                is_main: bool) -> ResumePlan | None:
    """How to resume `found` (from `find_resumable`; None: start fresh). Call on every rank after the
    process group started and before the engine is built. A checkpoint from another world size or
    ZeRO stage is converted to the universal format by rank 0 (once; cached inside the checkpoint);
    ZeRO-0 optimizer state is not partitioned and loads at any world size as it is."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:  # each rank looked on its own: they must agree
        tags = [None] * dist.get_world_size()
        dist.all_gather_object(tags, found.tag if found else None)
        if len(set(tags)) > 1:
            raise RuntimeError(f"the ranks found different checkpoints to resume in {ckpt_dir} ({tags}): every rank "
                               "must see the same run directory (a shared filesystem)")
    if found is None:
        return None
    tag, state = found.tag, found.state
    assert TAG.fullmatch(tag) and (ckpt_dir / tag).is_dir() and not (ckpt_dir / tag).is_symlink()
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
