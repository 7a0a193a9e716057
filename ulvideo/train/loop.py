"""The one training loop, both stages, under DeepSpeed ZeRO.

    ulvideo train configs/ul/tiny.yaml --run-dir runs/tiny                 # one process, no launcher
    torchrun --nproc_per_node 2 -m ulvideo train configs/ul/tiny.yaml --run-dir runs/tiny2
    deepspeed --num_gpus 8 --module ulvideo train configs/ul/k600_128.yaml --run-dir runs/k600

Rerunning the same command resumes from RUN/checkpoints/latest, also at another world size (the
checkpoint is converted to DeepSpeed's universal format once). The run dir holds config.yaml,
metrics.jsonl, TensorBoard events (tb/), checkpoints/ and exports/ (EMA weights + config); stage 1's
evaluations (every `eval.every` steps and at the end) add samples/step_X/ (reconstructions).
SIGTERM saves a checkpoint and stops at the next log step (within `train.log_every` steps): the stop
check is a collective with a host sync, so it runs with the log line, not every step. Evaluation
runs on rank 0 alone, with no collective, while the other ranks wait at their next one: its numbers
are those of one process at any world size (ulvideo/eval/metrics.py).

A step is applied whole or not at all: a non-finite loss, gradient or Adam moment, or new weights
beyond +-1.8e19, leave weights, optimizer state, LR schedule and EMA as they were
(ulvideo/train/guard.py); `train.max_nonfinite_skips` such steps in a row stop the run (status 3).

Determinism: micro-batch `slot = micro * world_size + rank` of step `s` is global batch
`s * (global_batch_size / micro_batch_size) + slot` of the data order, and all of its randomness
(times, noises, dropout) is seeded by (seed, s, slot). The same global batch therefore sees the same
clips and noises at any world size, and a resumed run repeats the uninterrupted one exactly.
The DeepSpeed config is generated from the training config (`deepspeed_config`).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ulvideo.config import Config, ConfigError, save_config
from ulvideo.train import checkpoint as ckpt
from ulvideo.train import rundir
from ulvideo.train.ema import EMA
from ulvideo.train.guard import NONFINITE_GRADIENT, UpdateCheck
from ulvideo.train.objectives import Objective, make_objective, preflight

log = logging.getLogger("ulvideo.train")
_FIND = object()  # Trainer(start=...) default: look for the checkpoint to resume itself


class NonFiniteError(RuntimeError):
    """`train.max_nonfinite_skips` steps in a row were not applied (see ulvideo/train/guard.py)."""


# --------------------------------------------------------------------------------------------
# Checks before any process group, and the DeepSpeed config
# --------------------------------------------------------------------------------------------


def world_size_from_env() -> int:
    """The world size a launcher (torchrun, deepspeed, srun wrappers) announced; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_config(cfg: Config, world_size: int) -> None:
    """Training settings that cannot work with `world_size` processes: a ConfigError naming the key."""
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size = {t.global_batch_size} is not a multiple of micro_batch_size × world size "
            f"= {t.micro_batch_size} × {world_size} (gradient accumulation = global / (micro × world) must be whole)")
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer needs train.zero_stage 1, 2 or 3")
    if t.compile and t.zero_stage == 3:  # the compiled graph would see ZeRO-3's empty weight partitions
        raise ConfigError("train.compile needs train.zero_stage 0, 1 or 2: ZeRO-3 gathers each layer's weights "
                          "in hooks around its forward, which a compiled network does not run")
    for section, key, low in (("train", "steps", 0), ("train", "ckpt_every", 1), ("train", "keep_last", 1),
                              ("train", "log_every", 1), ("train", "max_nonfinite_skips", 1), ("train", "warmup_steps", 0),
                              ("eval", "every", 0), ("eval", "num_clips", 1), ("eval", "decoder_steps", 1)):
        value = getattr(getattr(cfg, section), key)
        if value < low:
            raise ConfigError(f"{section}.{key} = {value} must be >= {low}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay = {t.ema_decay} must lie in [0, 1)")


def preflight_all(cfg: Config, run_dir: Path, world_size: int) -> None:
    """Every check of the settings that needs no process group: config, data, exports."""
    from ulvideo.data import resolve_kind

    preflight(cfg)
    check_config(cfg, world_size)
    resolve_kind(cfg.data)  # an empty data folder fails here, not after the process group starts


def find_start(cfg: Config, run_dir: Path, warn: Callable[[str], None] = log.warning) -> ckpt.Checkpoint | None:
    """The checkpoint to resume (None: a fresh run), before any process group: CheckpointError when
    the run has checkpoints but none intact, ConfigError when it cannot resume with these settings."""
    found = ckpt.find_resumable(run_dir / "checkpoints", warn)
    ckpt.check_resumable(found, run_dir / "checkpoints", cfg.stage, cfg.train.zero_stage)
    return found


def use_bf16(cfg: Config) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON, derived from `cfg.train` (there is no second, hand-kept file). Every ZeRO
    stage uses DeepSpeed's AdamW, whose steps the update check guards (ulvideo/train/guard.py)."""
    check_config(cfg, world_size)
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # exports come from the EMA instead
        # one sub-group per rank: the update check applies or refuses a step whole
        zero["sub_group_size"] = 10**15
    out = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world_size),
        "gradient_clipping": t.grad_clip,
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": t.lr,
                                                     "warmup_num_steps": max(1, t.warmup_steps), "warmup_type": "linear"}},
        "zero_optimization": zero,
        # a NaN/inf gradient makes the optimizer skip the step in bf16 as it does in fp32
        "bf16": {"enabled": use_bf16(cfg), "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        # torch's AdamW on the offloaded fp32 partitions (DeepSpeedCPUAdam when torch_adam is false)
        "zero_force_ds_cpu_optimizer": not t.torch_adam,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    out["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8,
                                                    "weight_decay": t.weight_decay, "torch_adam": t.torch_adam}}
    if load_universal:
        out["checkpoint"] = {"load_universal": True}
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Start the process group. Without a launcher, act as rank 0 of 1 (sets the rendezvous env)."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():  # NCCL collectives before the engine exists use the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def step_seeds(seed: int, step: int, slot: int) -> tuple[int, int]:
    """(generator seed, dropout seed) of global micro-batch `slot` of `step`: no rank, no world size."""
    a, b, c, d = np.random.SeedSequence([seed, step, slot]).generate_state(4, dtype=np.uint32).tolist()
    return (a << 31) ^ b, (c << 31) ^ d


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, start=_FIND):
        """`start`: the checkpoint to resume from `find_start` (None: fresh); by default found here."""
        import deepspeed

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if start is _FIND:
            first = os.environ.get("RANK", "0") == "0"
            start = find_start(cfg, self.run_dir, log.warning if first else lambda line: None)
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            ckpt.remove_partial(self.ckpt_dir)  # what a failed or killed save left
        resume = ckpt.plan_resume(self.ckpt_dir, start, self.world, cfg.train.zero_stage, self.is_main)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        from ulvideo.attention import set_backend

        set_backend(cfg.train.attention_backend)
        self.objective: Objective = make_objective(cfg)
        from ulvideo.train.apply import apply_activation_checkpointing, compile_networks

        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(self.objective.trained)
        if cfg.train.compile:  # the networks, before DeepSpeed wraps the objective (never the engine)
            compile_networks(self.objective)
        trainable = [p for p in self.objective.parameters() if p.requires_grad]
        ds_config = deepspeed_config(cfg, self.world, load_universal=bool(resume and resume.universal))
        self.engine, _, _, _ = deepspeed.initialize(model=self.objective, model_parameters=trainable, config=ds_config)
        self.update_check = UpdateCheck.install(self.engine)
        self.device = self.engine.device
        self.bf16 = use_bf16(cfg)
        self.ema = EMA(self.engine.module.trained, cfg.train.ema_decay, cfg.train.ema_warmup)
        self.loader = self.objective.build_loader(cfg, rank=self.rank, world_size=self.world)
        self.loader_iter = None
        self.metrics = rundir.MetricLog(self.run_dir, self.is_main, self.world, resume.state if resume else None)
        if self.is_main:
            self.objective.prepare_evaluation(self.device)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.skipped_since_log = 0
        self.stop_requested = False
        self.saved_step: int | None = None
        if resume is not None:
            self._load(resume)

    # ---- state -----------------------------------------------------------------------------

    def _state(self) -> dict:
        return {"step": self.step, "data": self.loader.state_dict(), "nonfinite_total": self.nonfinite_total,
                "nonfinite_run": self.nonfinite_run, "metrics_rows": self.metrics.rows, "world_size": self.world,
                "stage": self.cfg.stage, "zero_stage": self.cfg.train.zero_stage}

    def _load(self, r: ckpt.ResumePlan) -> None:
        path, _ = self.engine.load_checkpoint(r.load_dir, tag=r.load_tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {Path(r.load_dir) / r.load_tag}")
        self.ema.load(ckpt.read_ema(self.ckpt_dir, r.tag))
        self.step = self.saved_step = int(r.state["step"])
        self.nonfinite_total = int(r.state.get("nonfinite_total", 0))
        self.nonfinite_run = int(r.state.get("nonfinite_run", 0))
        self.loader.load_state_dict(r.state["data"])
        if self.is_main:
            how = f" (written at world size {r.state.get('world_size')} with ZeRO-{r.state.get('zero_stage')}; " \
                  "loaded through the universal format)" if r.universal else ""
            log.info("resumed from %s (step %d)%s", self.ckpt_dir / r.tag, self.step, how)
            # a run that died between its last checkpoint and that checkpoint's export
            rundir.sync_exports(self.run_dir, self.cfg.stage, self.step, self.ckpt_dir, r.tag, self.cfg,
                                self._export_meta(), self.cfg.train.keep_last, log.warning,
                                contents=self.objective.export_contents)

    def _export_meta(self) -> dict:
        return {"step": self.step, "stage": self.cfg.stage, **self.objective.export_meta()}

    def save(self) -> None:
        """Checkpoint, then its export, as one transaction. DeepSpeed writes into
        checkpoints/.tmp-step_X; once every rank is done, rank 0 adds ema.safetensors and state.json,
        renames to step_X, updates `latest`, then writes the export (a rerun rewrites it when this
        process dies before). A write that fails (a full disk) removes its partial files and raises
        SaveError; the previous checkpoint stays the latest."""
        if self.saved_step == self.step:
            return
        tmp_tag = ckpt.begin_save(self.ckpt_dir, self.step, self.is_main)
        torch.distributed.barrier()  # the temporary directory is clean before anyone writes
        with ckpt.writing(self.ckpt_dir / tmp_tag, "checkpoint"):
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tmp_tag, save_latest=False)
            ckpt.sync_tree(self.ckpt_dir / tmp_tag)
        weights = self.ema.state_dict()
        torch.distributed.barrier()
        ckpt.fault_pause("written", self.step)
        if self.is_main:
            with ckpt.writing(self.ckpt_dir / tmp_tag, "checkpoint"):
                ckpt.finish_save(self.ckpt_dir, self.step, weights, self._state(), self.cfg.train.keep_last)
            ckpt.fault_pause("committed", self.step)
            w, cfg, meta = self.objective.export_contents(weights, self.cfg, self._export_meta())  # prior: a stage-1 export
            rundir.write_exports(self.run_dir, self.cfg.stage, self.step, w, cfg, meta, self.cfg.train.keep_last)
        torch.distributed.barrier()
        self.saved_step = self.step

    # ---- one step --------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over `global_batch_size` clips; advances `self.step`. A step with a
        non-finite loss, gradient or Adam moment, or whose new weights would leave +-1.8e19, on any
        rank, is not applied (weights, optimizer state, LR schedule, EMA untouched, its batches
        consumed); `max_nonfinite_skips` in a row raise NonFiniteError. Returns the step's mean logs
        (empty for a step not applied) and "clips"."""
        if self.loader_iter is None:
            self.loader_iter = iter(self.loader)
        self.update_check.reason = None
        accum = self.engine.gradient_accumulation_steps()
        step_logs: dict[str, torch.Tensor] = {}
        clips = 0
        for micro in range(accum):
            batch = self._to_device(next(self.loader_iter))
            clips += self.objective.batch_size(batch)
            gen_seed, dropout_seed = step_seeds(self.cfg.train.seed, self.step, micro * self.world + self.rank)
            g = torch.Generator(device=self.device)
            g.manual_seed(gen_seed)
            torch.manual_seed(dropout_seed)  # dropout, if a size uses it
            # bf16: weights are bf16 (DeepSpeed keeps fp32 masters); autocast lets fp32 conditioning
            # inputs (logSNR embeddings, text) meet them
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss, logs = self.engine(batch, g, self.step)
            # NaN gradients make the step be refused and drop the accumulated gradients; a
            # non-finite loss must do the same even where its gradient happens to be finite.
            # The factor is exactly 1.0 otherwise, and needs no host sync.
            loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
            self.engine.backward(loss)
            self.engine.step()
            for k, v in logs.items():
                v = v.detach().float().mean() / accum
                step_logs[k] = step_logs[k] + v if k in step_logs else v
        self.step += 1
        if self.engine.was_step_applied():
            self.ema.update(self.step)
            self.nonfinite_run = 0
            return {**step_logs, "clips": torch.tensor(float(clips * self.world))}
        # DeepSpeed's own overflow check refuses non-finite gradients before the update check sees them
        reason = self.update_check.reason or NONFINITE_GRADIENT
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self.skipped_since_log += 1
        if self.is_main:
            log.warning("step %d not applied: %s (%d in a row, %d in all); weights, optimizer state, LR schedule "
                        "and EMA are unchanged", self.step, reason, self.nonfinite_run, self.nonfinite_total)
        if self.nonfinite_run >= self.cfg.train.max_nonfinite_skips:
            good = self.step - self.nonfinite_run
            tag = ckpt.latest_tag(self.ckpt_dir)
            where = (f"the newest checkpoint, {self.ckpt_dir / tag}, holds them" if tag else
                     f"no checkpoint was written yet (train.ckpt_every = {self.cfg.train.ckpt_every})")
            raise NonFiniteError(
                f"{self.nonfinite_run} steps in a row (train.max_nonfinite_skips) were not applied, up to step "
                f"{self.step}, the last for {reason}; the weights are those of step {good} and {where}. Lower "
                "train.lr, check the data, or raise train.max_nonfinite_skips")
        return {"clips": torch.tensor(float(clips * self.world))}

    def fit(self) -> bool:
        """Train to `train.steps`. Returns False when stopped early by SIGTERM (after saving); the
        stop is checked at log steps only."""
        from tqdm import tqdm

        cfg, every = self.cfg.train, self.cfg.eval.every
        signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True, desc=f"train {self.cfg.stage}")
        t_last, clips_since = time.perf_counter(), 0.0
        while self.step < cfg.steps:
            logs = self.train_step()
            clips_since += float(logs.pop("clips"))
            if logs:
                self.metrics.accumulate(logs)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                gn = self.engine.get_global_grad_norm()
                extra = {"lr": float(self.engine.get_lr()[0]), "clips_per_s": clips_since / max(now - t_last, 1e-9),
                         "grad_norm": float(gn) if gn is not None else float("nan"),
                         "skipped_steps": self.skipped_since_log, "skipped_steps_total": self.nonfinite_total}
                # the schedule's values in the row's last step (0-based: the row's step - 1)
                extra.update(self.objective.log_constants(self.step - 1))
                row = self.metrics.write(self.step, extra)
                if self.is_main:
                    bar.set_postfix({k: f"{row[k]:.4g}" for k in self.objective.progress_keys if k in row})
                t_last, clips_since, self.skipped_since_log = now, 0.0, 0
                if self._should_stop():
                    break
            if every and self.step % every == 0:
                self.evaluate()
            if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self.save()
        bar.close()
        finished = self.step >= cfg.steps
        # the end of training is evaluated too (once: not again by a rerun of a finished run), before
        # its checkpoint, which records the metrics rows written so far
        if finished and every and self.step % every and self.step != self.saved_step:
            self.evaluate()
        self.save()
        if not finished and self.is_main:
            log.info("stopped by SIGTERM at step %d; checkpoint %s saved", self.step, ckpt.tag_for(self.step))
        return finished

    def evaluate(self) -> dict:
        """Rank 0 evaluates the EMA weights alone and without any collective, so its numbers are
        those of one process at any world size; the other ranks go on to their next collective and
        wait there. That wait must stay within the process-group timeout (DeepSpeed's, 10 min unless
        $DEEPSPEED_TIMEOUT says otherwise): a warning says when an evaluation used half of it."""
        weights = self.ema.state_dict()  # a collective under ZeRO-3: every rank takes part
        if not self.is_main:
            return {}
        t0 = time.perf_counter()
        out = self.objective.evaluate(weights, self.run_dir / "samples" / ckpt.tag_for(self.step), self.step)
        took = time.perf_counter() - t0
        if self.world > 1:
            from deepspeed.constants import default_pg_timeout

            if took > 0.5 * default_pg_timeout.total_seconds():
                log.warning("evaluation took %.0f s on rank 0 while %d ranks waited; the process-group timeout is "
                            "%.0f s ($DEEPSPEED_TIMEOUT, minutes): lower eval.num_clips or eval.decoder_steps",
                            took, self.world - 1, default_pg_timeout.total_seconds())
        if out:
            from tqdm import tqdm

            self.metrics.write(self.step, {f"eval/{k}": v for k, v in out.items()}, reduce=False)
            tqdm.write(f"eval step {self.step}: {self.objective.describe_evaluation(out)}")
        return out

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def _should_stop(self) -> bool:
        """Any rank's SIGTERM stops all of them at the same step (called at log steps only)."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)
