"""The one training loop, both stages, under DeepSpeed ZeRO.

    ulvideo train configs/ul/tiny.yaml --run-dir runs/tiny                 # one process, no launcher
    torchrun --nproc_per_node 2 -m ulvideo train configs/ul/tiny.yaml --run-dir runs/tiny2
    deepspeed --num_gpus 8 --module ulvideo train configs/ul/k600_128.yaml --run-dir runs/k600

Rerunning the same command resumes from RUN/checkpoints/latest, also at another world size (the
checkpoint is converted to DeepSpeed's universal format once). The run dir holds config.yaml,
metrics.jsonl, TensorBoard events (tb/), checkpoints/ and exports/ (EMA weights + config); stage 1's
evaluations (every `eval.every` steps and at the end) add samples/step_X/ (reconstructions).
SIGTERM saves a checkpoint and stops at the next log step (within `train.log_every` steps): the stop
check is a collective with a host sync, so it runs with the log line, not every step.

Determinism: micro-batch `slot = micro * world_size + rank` of step `s` is global batch
`s * (global_batch_size / micro_batch_size) + slot` of the data order, and all of its randomness
(times, noises, dropout) is seeded by (seed, s, slot). The same global batch therefore sees the same
clips and noises at any world size, and a resumed run repeats the uninterrupted one exactly.
The DeepSpeed config is generated from the training config (`deepspeed_config`).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import torch

from ulvideo.config import Config, ConfigError, save_config
from ulvideo.exports import save_export
from ulvideo.train import checkpoint as ckpt
from ulvideo.train.objectives import Objective, make_objective, preflight

log = logging.getLogger("ulvideo.train")


class NonFiniteError(RuntimeError):
    """`train.max_nonfinite_skips` steps in a row had a non-finite loss or gradient."""


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
    for section, key, low in (("train", "steps", 0), ("train", "ckpt_every", 1), ("train", "keep_last", 1),
                              ("train", "log_every", 1), ("train", "max_nonfinite_skips", 1), ("train", "warmup_steps", 0),
                              ("eval", "every", 0), ("eval", "num_clips", 1), ("eval", "decoder_steps", 1)):
        value = getattr(getattr(cfg, section), key)
        if value < low:
            raise ConfigError(f"{section}.{key} = {value} must be >= {low}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay = {t.ema_decay} must lie in [0, 1)")


def preflight_all(cfg: Config, run_dir: Path, world_size: int) -> None:
    """Every check that needs no process group: config, data, exports, the checkpoint to resume."""
    from ulvideo.data import resolve_kind

    preflight(cfg)
    check_config(cfg, world_size)
    resolve_kind(cfg.data)  # an empty data folder fails here, not after the process group starts
    ckpt.check_resumable(run_dir / "checkpoints", cfg.stage, cfg.train.zero_stage)


def use_bf16(cfg: Config) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed JSON, derived from `cfg.train` (there is no second, hand-kept file).

    ZeRO-1/2/3 use DeepSpeed's AdamW; ZeRO-0 gets `FiniteAdamW` from the client side (see there), so
    this dict has no optimizer section then."""
    check_config(cfg, world_size)
    t = cfg.train
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # exports come from the EMA instead
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
    if t.zero_stage > 0:
        out["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8,
                                                        "weight_decay": t.weight_decay, "torch_adam": t.torch_adam}}
    if load_universal:
        out["checkpoint"] = {"load_universal": True}
    return out


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite and says so in `.overflow`.

    The ZeRO optimizers already skip such steps (and DeepSpeed then leaves the LR schedule alone);
    plain ZeRO-0 hands torch's optimizer to the engine unwrapped, and this gives it the same contract."""

    overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        return None if self.overflow else super().step(closure)


def client_optimizer(cfg: Config):
    t = cfg.train
    return lambda params: FiniteAdamW(params, lr=t.lr, betas=tuple(t.betas), eps=1e-8, weight_decay=t.weight_decay)


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
# EMA
# --------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the trained module's weights, kept in float32.

    ZeRO-0/1/2: every rank holds the full parameters after each step, so every rank keeps the same
    full EMA. ZeRO-3: every rank keeps the EMA of its own partition only (`param.ds_tensor`, the
    slice [rank·n, (rank+1)·n) of the flattened, zero-padded parameter): no per-step all-gather and
    1/world of the memory. `state_dict()` consolidates the full weights (a collective under ZeRO-3:
    every rank calls it, rank 0 receives them). A step whose weights are not all finite (on any
    rank) is not absorbed.
    """

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False):
        self.decay = decay
        self.warmup = warmup
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.sharded = any(hasattr(p, "ds_tensor") for _, p in self.params)
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in self.params}
        self.buffers = {n: b.detach().float().clone() for n, b in module.named_buffers()}

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if hasattr(p, "ds_tensor") else p

    def decay_at(self, step: int) -> float:
        """Decay used by the update that ends optimizer step `step` (1-based). With warm-up it is
        min(decay, (1 + step) / (10 + step)), so early averages do not drag in the initial weights."""
        return min(self.decay, (1.0 + step) / (10.0 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int | None = None) -> bool:
        decay = self.decay if step is None else self.decay_at(step)
        current = [self._local(p).detach() for _, p in self.params]
        finite = torch.isfinite(torch.stack(torch._foreach_norm(current))).all().float()
        if self.sharded and self.world > 1:  # every shard must take the same decision
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite):
            return False
        torch._foreach_lerp_([self.shadow[n] for n, _ in self.params], [c.float() for c in current], 1.0 - decay)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights and buffers on CPU (under ZeRO-3: on rank 0; other ranks get {})."""
        if not self.sharded:
            return {n: v.cpu() for n, v in {**self.shadow, **self.buffers}.items()}
        out = {}
        for n, p in self.params:  # one parameter at a time bounds the gathering memory
            part = self.shadow[n]
            parts = [torch.empty_like(part) for _ in range(self.world)] if self.rank == 0 else None
            torch.distributed.gather(part, parts, dst=0)
            if self.rank == 0:
                out[n] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        return {**out, **{n: b.cpu() for n, b in self.buffers.items()}} if self.rank == 0 else {}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """From full weights (any world size wrote them): each rank takes its own slice under ZeRO-3."""
        for n, _ in self.params:
            mine = self.shadow[n]
            src = state[n].to(mine.device, torch.float32).flatten()
            if self.sharded:
                src = src[self.rank * mine.numel():(self.rank + 1) * mine.numel()]
                mine.zero_()
                mine[: src.numel()].copy_(src)
            else:
                mine.copy_(src.view_as(mine))
        for n in self.buffers:
            if n in state:
                self.buffers[n].copy_(state[n])


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class MetricLog:
    """Running means of per-step scalars between log lines, averaged over ranks when a line is
    written (the only all-reduce and .item() of the logs)."""

    def __init__(self, run_dir: Path, enabled: bool, world_size: int = 1):
        self.enabled, self.world = enabled, world_size
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
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
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.tb.add_scalar(k, v, step)
                self.tb.flush()
        return row


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def step_seeds(seed: int, step: int, slot: int) -> tuple[int, int]:
    """(generator seed, dropout seed) of global micro-batch `slot` of `step`: no rank, no world size."""
    a, b, c, d = np.random.SeedSequence([seed, step, slot]).generate_state(4, dtype=np.uint32).tolist()
    return (a << 31) ^ b, (c << 31) ^ d


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path):
        import deepspeed

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        resume = ckpt.plan_resume(self.ckpt_dir, self.world, cfg.train.zero_stage, self.is_main)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        from ulvideo.attention import set_backend

        set_backend(cfg.train.attention_backend)
        self.objective: Objective = make_objective(cfg)
        if cfg.train.activation_checkpointing:
            from ulvideo.train.apply import apply_activation_checkpointing

            apply_activation_checkpointing(self.objective.trained)
        trainable = [p for p in self.objective.parameters() if p.requires_grad]
        extra = {"optimizer": client_optimizer(cfg)} if cfg.train.zero_stage == 0 else {}
        ds_config = deepspeed_config(cfg, self.world, load_universal=bool(resume and resume.universal))
        self.engine, _, _, _ = deepspeed.initialize(model=self.objective, model_parameters=trainable,
                                                    config=ds_config, **extra)
        self.device = self.engine.device
        self.bf16 = use_bf16(cfg)
        self.ema = EMA(self.engine.module.trained, cfg.train.ema_decay, cfg.train.ema_warmup)
        self.loader = self.objective.build_loader(cfg, rank=self.rank, world_size=self.world)
        self.loader_iter = None
        self.metrics = MetricLog(self.run_dir, self.is_main, self.world)
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
                "world_size": self.world, "stage": self.cfg.stage, "zero_stage": self.cfg.train.zero_stage}

    def _load(self, r: ckpt.ResumePlan) -> None:
        path, _ = self.engine.load_checkpoint(r.load_dir, tag=r.load_tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {Path(r.load_dir) / r.load_tag}")
        self.ema.load(ckpt.read_ema(self.ckpt_dir, r.tag))
        self.step = self.saved_step = int(r.state["step"])
        self.nonfinite_total = int(r.state.get("nonfinite_total", 0))
        self.loader.load_state_dict(r.state["data"])
        if self.is_main:
            how = f" (written at world size {r.state.get('world_size')} with ZeRO-{r.state.get('zero_stage')}; " \
                  "loaded through the universal format)" if r.universal else ""
            log.info("resumed from %s (step %d)%s", self.ckpt_dir / r.tag, self.step, how)

    def save(self) -> None:
        """Atomic checkpoint + export. DeepSpeed writes into checkpoints/.tmp-step_X; once every rank
        is done, rank 0 adds ema.safetensors and state.json, renames to step_X, then updates `latest`."""
        if self.saved_step == self.step:
            return
        tmp_tag = ckpt.begin_save(self.ckpt_dir, self.step, self.is_main)
        torch.distributed.barrier()  # the temporary directory is clean before anyone writes
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tmp_tag, save_latest=False)
        ckpt.sync_tree(self.ckpt_dir / tmp_tag)
        weights = self.ema.state_dict()
        torch.distributed.barrier()
        ckpt.fault_pause("written")
        if self.is_main:
            ckpt.finish_save(self.ckpt_dir, self.step, weights, self._state(), self.cfg.train.keep_last)
            self.export(weights)
        torch.distributed.barrier()
        self.saved_step = self.step

    def export(self, weights: dict[str, torch.Tensor] | None = None) -> Path | None:
        """Full consolidated EMA weights + config (a collective when `weights` is None under ZeRO-3)."""
        weights = self.ema.state_dict() if weights is None else weights
        if not self.is_main:
            return None
        meta = {"step": self.step, "stage": self.cfg.stage, **self.objective.export_meta()}
        weights, cfg, meta = self.objective.export_contents(weights, self.cfg, meta)  # stage prior: a stage-1 export
        out = save_export(self.run_dir / "exports" / f"{self.cfg.stage}_{ckpt.tag_for(self.step)}", weights, cfg, meta)
        save_export(self.run_dir / "exports" / "latest", weights, cfg, meta)
        return out

    # ---- one step --------------------------------------------------------------------------

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over `global_batch_size` clips; advances `self.step`. A step with a
        non-finite loss or gradient on any rank is skipped whole (weights, optimizer, LR schedule,
        EMA untouched, its batches consumed); `max_nonfinite_skips` in a row raise NonFiniteError.
        Returns the step's mean logs (empty for a skipped step) and "clips"."""
        if self.loader_iter is None:
            self.loader_iter = iter(self.loader)
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
            # NaN gradients make the optimizers skip the step and drop the accumulated gradients;
            # a non-finite loss must do the same even where its gradient happens to be finite.
            # The factor is exactly 1.0 otherwise, and needs no host sync.
            loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))
            self.engine.backward(loss)
            self.engine.step()
            for k, v in logs.items():
                v = v.detach().float().mean() / accum
                step_logs[k] = step_logs[k] + v if k in step_logs else v
        self.step += 1
        if self.engine.was_step_applied() and self.ema.update(self.step):
            self.nonfinite_run = 0
            return {**step_logs, "clips": torch.tensor(float(clips * self.world))}
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self.skipped_since_log += 1
        if self.is_main:
            log.warning("step %d: non-finite loss, gradient or weights: step skipped (%d in a row, %d in all)",
                        self.step, self.nonfinite_run, self.nonfinite_total)
        if self.nonfinite_run >= self.cfg.train.max_nonfinite_skips:
            raise NonFiniteError(
                f"{self.nonfinite_run} steps in a row (train.max_nonfinite_skips) had a non-finite loss or gradient, "
                f"up to step {self.step}; weights are unchanged since step {self.step - self.nonfinite_run}. The last "
                f"complete checkpoint is {ckpt.latest_tag(self.ckpt_dir) or 'none'}; lower train.lr, check the data, "
                "or raise train.max_nonfinite_skips.")
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
        self.save()
        if finished and every and self.step % every:
            self.evaluate()
        if not finished and self.is_main:
            log.info("stopped by SIGTERM at step %d; checkpoint %s saved", self.step, ckpt.tag_for(self.step))
        return finished

    def evaluate(self) -> dict:
        weights = self.ema.state_dict()  # a collective under ZeRO-3: every rank takes part
        if not self.is_main:
            return {}
        out = self.objective.evaluate(weights, self.run_dir / "samples" / ckpt.tag_for(self.step), self.step)
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
