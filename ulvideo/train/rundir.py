"""A run directory besides its checkpoints (ulvideo/train/checkpoint.py): the lock that keeps a
second trainer out, the exports that belong to the checkpoints, and the metrics log on resume.

    RUN/train.lock                    pid, host and start time of the trainer using RUN (its rank 0)
    RUN/exports/STAGE_step_X.*        the export of checkpoint step_X (the newest `keep_last`)
    RUN/exports/latest.*              the export of the newest complete checkpoint
    RUN/metrics.jsonl                 one row per log step and evaluation

Exports are part of a save: after `checkpoints/latest` moves to step X, step X's export is written
and `exports/latest` made the same files (hard links). A run that died in between, or whose
exports were deleted or damaged, rewrites them from the checkpoint's `ema.safetensors` when it
starts again, so `exports/latest` never stays behind the newest checkpoint.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ulvideo.config import Config
from ulvideo.exports import link_export, save_export
from ulvideo.train import checkpoint as ckpt

LOCK = "train.lock"


class RunLocked(RuntimeError):
    """Another live trainer holds the run directory (status 2)."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of process `pid` (Linux), which tells a reused pid from the original."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    return started is None or _start_time(pid) in (None, started)


class RunLock:
    """`RUN/train.lock`, created atomically (a hard link of a complete file, which fails when the
    lock exists). A lock whose process is gone from this host is taken over with a warning; one held
    by a live process, or by any process on another host, refuses with RunLocked."""

    def __init__(self, path: Path, owner: dict):
        self.path, self.owner = path, owner

    @classmethod
    def acquire(cls, run_dir: Path, warn: Callable[[str], None]) -> "RunLock":
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = run_dir / f".{LOCK}.{os.getpid()}"
        tmp.write_text(json.dumps(me) + "\n")
        try:
            for _ in range(5):
                try:
                    os.link(tmp, path)
                    return cls(path, me)
                except FileExistsError:
                    pass
                try:
                    holder = json.loads(path.read_text())
                    pid, host = int(holder["pid"]), str(holder["host"])
                except FileNotFoundError:
                    continue  # released meanwhile
                except (ValueError, KeyError, TypeError):
                    holder, pid, host = {}, None, None
                mine = pid == me["pid"] and host == me["host"]  # a pid of a dead process, now ours
                if pid is not None and not mine and (host != me["host"] or _alive(pid, holder.get("started"))):
                    raise RunLocked(f"{run_dir} is in use by another trainer (pid {pid} on host {host}, since "
                                    f"{holder.get('since', '?')}); if that process is gone, delete {path}")
                who = f"pid {pid} on {host}, which is no longer running" if pid is not None else "an unreadable lock"
                warn(f"{path}: taking over the lock of {who}")
                # rename first: of several trainers taking over at once, one wins the rename
                try:
                    os.rename(path, path.with_name(f".{LOCK}.stale-{os.getpid()}"))
                    path.with_name(f".{LOCK}.stale-{os.getpid()}").unlink()
                except FileNotFoundError:
                    pass
            raise RunLocked(f"{path}: could not take the lock (another trainer keeps taking it)")
        finally:
            tmp.unlink(missing_ok=True)

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


# ---- exports --------------------------------------------------------------------------------


def export_step(path: Path) -> int | None:
    """The training step of a complete export (weights and sidecar of the same save), else None."""
    path = Path(path).with_suffix(".safetensors")
    if ckpt.safetensors_problem(path):
        return None
    try:
        with safe_open(str(path), "pt") as f:
            in_weights = (f.metadata() or {}).get("step")
        in_json = json.loads(path.with_suffix(".json").read_text())["meta"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return int(in_json) if in_weights is not None and str(in_json) == in_weights else None


def step_export(run_dir: Path, stage: str, step: int) -> Path:
    return run_dir / "exports" / f"{stage}_{ckpt.tag_for(step)}.safetensors"


def write_exports(run_dir: Path, stage: str, step: int, weights: dict[str, torch.Tensor], cfg: Config,
                  meta: dict, keep_last: int) -> Path:
    """The export of checkpoint `step`, `exports/latest` made the same, older per-step exports beyond
    `keep_last` deleted. A failed write is a SaveError; the checkpoint it belongs to stays complete."""
    out = step_export(run_dir, stage, step)
    latest = run_dir / "exports" / "latest.safetensors"
    with ckpt.writing(out, "export"):
        save_export(out, weights, cfg, meta)
    with ckpt.writing(latest, "export"):
        link_export(out, latest)
    older = sorted((p for p in out.parent.glob(f"{stage}_step_*.safetensors")
                    if ckpt.TAG.fullmatch(p.stem[len(stage) + 1:]) and int(p.stem.rsplit("_", 1)[1]) < step),
                   key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    for old in older[:max(0, len(older) - (keep_last - 1))]:
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    for stale in out.parent.glob(".*.tmp*"):  # a crashed write's temporary file
        stale.unlink(missing_ok=True)
    return out


def sync_exports(run_dir: Path, stage: str, step: int, ckpt_dir: Path, tag: str, cfg: Config, meta: dict,
                 keep_last: int, warn: Callable[[str], None],
                 contents: Callable[[dict, Config, dict], tuple[dict, Config, dict]] | None = None) -> bool:
    """Rewrite the exports of checkpoint `tag` (step `step`) from its ema.safetensors unless
    `exports/latest` and the per-step export are already complete exports of that step. `contents`
    maps (EMA weights, config, meta) to what the export holds, as `Trainer.save` does through the
    objective (a `stage: prior` export is a whole stage-1 export); None: those three as they are.
    True when they were rewritten."""
    latest = run_dir / "exports" / "latest.safetensors"
    have = export_step(latest)
    if have == step and export_step(step_export(run_dir, stage, step)) == step:
        return False
    was = "is missing or incomplete" if have is None else f"holds step {have}"
    warn(f"{latest} {was}, not step {step} of the newest checkpoint: rewriting it from "
         f"{ckpt_dir / tag / 'ema.safetensors'}")
    weights = ckpt.read_ema(ckpt_dir, tag)
    if contents is not None:
        weights, cfg, meta = contents(weights, cfg, meta)
    write_exports(run_dir, stage, step, weights, cfg, meta, keep_last)
    return True


# ---- metrics.jsonl and TensorBoard ----------------------------------------------------------


def rewind_metrics(path: Path, rows: int | None, step: int) -> int:
    """Drop the rows a run wrote after the checkpoint it resumes from: keep the first `rows` rows
    (what state.json recorded), or without that record the rows up to `step`. Returns the rows kept."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    if rows is not None:
        keep = lines[:rows]
    else:
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    if keep != lines:
        from ulvideo.exports import atomic_write_text

        atomic_write_text(path, "".join(keep))
    return len(keep)


class MetricLog:
    """Running means of per-step scalars between log lines, averaged over ranks when a line is
    written (the only all-reduce and .item() of the logs)."""

    def __init__(self, run_dir: Path, enabled: bool, world_size: int = 1, resume: dict | None = None):
        """`resume`: the state.json of the checkpoint the run resumes from (None: a fresh start). The
        rows written after it (by a run that died or stopped after that checkpoint, or before its
        first) are dropped, from metrics.jsonl and from TensorBoard, before they are written again."""
        self.enabled, self.world = enabled, world_size
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.rows = 0  # rows in metrics.jsonl; a checkpoint records it
        if enabled:
            step = int(resume["step"]) if resume is not None else 0
            self.rows = rewind_metrics(self.path, resume.get("metrics_rows") if resume else 0, step)
            purge = step + 1 if resume is not None or (run_dir / "tb").is_dir() else None
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
            except ImportError:  # tensorboard is a core dependency; tolerate its absence anyway
                self.tb = None

    def accumulate(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            v = v.detach().float().mean()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def write(self, step: int, extra: dict[str, float], reduce: bool = True) -> dict[str, float]:
        """The running means (averaged over ranks) and `extra`; `reduce=False` for rows only rank 0
        computes (evaluation): `extra` alone, the running means keep accumulating."""
        row = {}
        if reduce:
            keys = sorted(self.sums)
            means = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1) if keys else torch.zeros(0)
            if self.world > 1 and keys:
                torch.distributed.all_reduce(means)
                means = means / self.world
            row = dict(zip(keys, means.tolist()))
            self.sums, self.count = {}, 0
        row.update(extra)
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.rows += 1
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.tb.add_scalar(k, v, step)
                self.tb.flush()
        return row


def written(run_dir: Path, cfg) -> list[str]:
    """What a finished run left in its run dir, and the command that uses it next."""
    export = run_dir / "exports" / "latest.safetensors"
    out = [f"exports: {export} (EMA weights; config in {export.with_suffix('.json').name})",
           f"checkpoint: {run_dir / 'checkpoints' / (ckpt.latest_tag(run_dir / 'checkpoints') or '-')} "
           "(rerunning the same command resumes from it)",
           f"metrics: {run_dir / 'metrics.jsonl'} and TensorBoard {run_dir / 'tb'}"]
    samples = sorted((run_dir / "samples").glob("step_*"))
    if samples:
        out.append(f"reconstructions: {samples[-1]} (recon_sheet.png: held-out inputs above their reconstructions)")
    if cfg.stage in ("ul", "prior"):  # both leave a stage-1 export
        base = f"ulvideo train configs/base/tiny.yaml --run-dir {run_dir}_base --base.stage1_export={export}"
        top = Path(cfg.data.path)
        if cfg.data.kind == "latents" or (cfg.data.kind == "auto" and top.is_dir() and any(top.glob("*.safetensors"))):
            # trained on latent shards (stage prior): the refined export's encoder is theirs
            out.append(f"next: {base} --data.path={cfg.data.path}")
        else:
            latents = cfg.data.path.rstrip("/") + "_latents"
            out.append(f"next: ulvideo encode --export {export} --data {cfg.data.path} --out {latents} && {base} "
                       f"--data.path={latents}")
    else:
        what = "--label 0" if cfg.base.num_classes else "--context VIDEO" if cfg.base.context_frames else '--prompt "..."'
        out.append(f"next: ulvideo generate --export {cfg.base.stage1_export} --base {export} {what} --out clip.mp4")
    return out
