"""The one training loop, both stages, under DeepSpeed ZeRO.

    ulvideo train configs/ul/tiny.yaml --run-dir runs/tiny                 # one process, no launcher
    torchrun --nproc_per_node 2 -m ulvideo train configs/ul/tiny.yaml --run-dir runs/tiny2
    deepspeed --num_gpus 8 -m ulvideo train configs/ul/k600_128.yaml --run-dir runs/k600

Rerunning the same command resumes from RUN/checkpoints/latest. The run dir holds config.yaml,
metrics.jsonl, TensorBoard events (tb/), checkpoints/ and exports/ (EMA weights + config).
Randomness is derived from (seed, rank, step, micro-step) so that a resumed run repeats exactly.
The DeepSpeed config is generated from the training config (`deepspeed_config`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import time
from pathlib import Path

import torch

from ulvideo import checkpoint as ckpt
from ulvideo.checkpoint import ExportError
from ulvideo.config import Config, ConfigError, load_config, save_config
from ulvideo.objectives import Objective, make_objective, preflight

log = logging.getLogger("ulvideo.train")


# --------------------------------------------------------------------------------------------
# Process group and DeepSpeed config
# --------------------------------------------------------------------------------------------


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
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def use_bf16(cfg: Config) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and torch.cuda.is_available())


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON, derived from `cfg.train` (there is no second, hand-kept file)."""
    t = cfg.train
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size = {t.global_batch_size} is not a multiple of micro_batch_size × world size "
            f"= {t.micro_batch_size} × {world_size}")
    zero: dict = {"stage": t.zero_stage}
    if t.offload_optimizer and t.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if t.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // per_step,
        "gradient_clipping": t.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8,
                                                  "weight_decay": t.weight_decay, "torch_adam": t.torch_adam}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": t.lr,
                                                     "warmup_num_steps": max(1, t.warmup_steps), "warmup_type": "linear"}},
        "zero_optimization": zero,
        "bf16": {"enabled": use_bf16(cfg)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# --------------------------------------------------------------------------------------------
# EMA (full fp32 copy on every rank; under ZeRO-3 the parameters are gathered for the update)
# --------------------------------------------------------------------------------------------


def _gathered(params):
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class EMA:
    """Exponential moving average of the trained module's weights, kept in float32.

    Under ZeRO-3 each update gathers the partitioned parameters (an all-gather per step), so the
    EMA and every export are full, consolidated weights. Non-finite weights are never absorbed.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        with _gathered([p for _, p in module.named_parameters()]):
            self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad}
            self.buffers = {n: b.detach().float().clone() for n, b in module.named_buffers()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> bool:
        params = dict(module.named_parameters())
        with _gathered(list(params.values())):
            current = [params[n].detach().float() for n in self.names]
            if not all(torch.isfinite(c).all() for c in current):
                return False
            shadow = [self.shadow[n] for n in self.names]
            torch._foreach_lerp_(shadow, current, 1.0 - self.decay)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, **self.buffers}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.shadow:
            self.shadow[n].copy_(state[n])
        for n in self.buffers:
            if n in state:
                self.buffers[n].copy_(state[n])


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


class MetricLog:
    """Running means of per-step scalars between log lines; .item() only when a line is written."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
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

    def write(self, step: int, extra: dict[str, float]) -> dict[str, float]:
        row = {k: (v / max(self.count, 1)).item() for k, v in self.sums.items()}
        row.update(extra)
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}}
        self.sums, self.count = {}, 0
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


def step_generator(seed: int, rank: int, step: int, micro: int) -> torch.Generator:
    """All randomness of one micro-step (times, noises, dropout-free) from (seed, rank, step, micro)."""
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + rank) * 1_000_033 + step) * 1009 + micro)
    return g


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path):
        import deepspeed

        self.cfg, self.run_dir = cfg, run_dir
        self.rank, self.world = init_distributed()
        self.is_main = self.rank == 0
        self.ckpt_dir = run_dir / "checkpoints"
        if self.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.objective: Objective = make_objective(cfg)
        if cfg.train.activation_checkpointing:
            from ulvideo.activation_checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(self.objective.trained)
        trainable = [p for p in self.objective.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(model=self.objective, model_parameters=trainable,
                                                    config=deepspeed_config(cfg, self.world))
        self.dtype = torch.bfloat16 if use_bf16(cfg) else torch.float32
        self.ema = EMA(self.engine.module.trained, cfg.train.ema_decay)
        self.loader = self.objective.build_loader(cfg, rank=self.rank, world_size=self.world)
        self.metrics = MetricLog(run_dir, self.is_main)
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.stop_requested = False
        self._resume()

    # ---- state -----------------------------------------------------------------------------

    def _state(self) -> dict:
        return {"step": self.step, "data": self.loader.state_dict(), "nonfinite_total": self.nonfinite_total,
                "world_size": self.world, "stage": self.cfg.stage}

    def _resume(self) -> None:
        tag = ckpt.latest_tag(self.ckpt_dir)
        if tag is None:
            return
        state, ema = ckpt.read_state(self.ckpt_dir, tag)
        if state.get("world_size", self.world) != self.world:
            raise RuntimeError(
                f"{self.ckpt_dir / tag} was written by {state['world_size']} processes, this run has {self.world}. "
                "Convert it with DeepSpeed's universal checkpoint (see README, 'Resuming at another world size').")
        self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        self.ema.load(ema)
        self.step = state["step"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.loader.load_state_dict(state["data"])
        if self.is_main:
            log.info("resumed from %s (step %d)", self.ckpt_dir / tag, self.step)

    def save(self) -> None:
        tmp_tag = ckpt.begin_save(self.ckpt_dir, self.step)
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tmp_tag, save_latest=False)
        torch.distributed.barrier()
        if self.is_main:
            ckpt.finish_save(self.ckpt_dir, self.step, self.ema.state_dict(), self._state(), self.cfg.train.keep_last)
            self.export()
        torch.distributed.barrier()

    def export(self) -> Path:
        weights = self.ema.state_dict()
        meta = {"step": self.step, "stage": self.cfg.stage, **self.objective.export_meta()}
        out = ckpt.save_export(self.run_dir / "exports" / f"{self.cfg.stage}_{ckpt.tag_for(self.step)}", weights, self.cfg, meta)
        ckpt.save_export(self.run_dir / "exports" / "latest", weights, self.cfg, meta)
        return out

    # ---- one step --------------------------------------------------------------------------

    def _micro_step(self, batch: dict, micro: int) -> tuple[torch.Tensor, dict]:
        g = step_generator(self.cfg.train.seed, self.rank, self.step, micro)
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))  # dropout, if a size uses it
        return self.engine(batch, g, self.step)

    def train_step(self) -> dict:
        accum = self.engine.gradient_accumulation_steps()
        step_logs: dict[str, torch.Tensor] = {}
        clips = 0
        for micro in range(accum):
            batch = next(self.loader_iter)
            clips += self.objective.batch_size(batch)
            loss, logs = self._micro_step(batch, micro)
            self.engine.backward(loss)
            self.engine.step()
            for k, v in logs.items():
                step_logs[k] = step_logs[k] + v.detach().float().mean() / accum if k in step_logs else v.detach().float().mean() / accum
        self.ema.update(self.engine.module.trained)
        step_logs["clips"] = torch.tensor(float(clips * self.world))
        return step_logs

    def fit(self) -> None:
        from tqdm import tqdm

        cfg = self.cfg.train
        self.loader_iter = iter(self.loader)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True, desc=f"train {self.cfg.stage}")
        t_last, clips_since = time.perf_counter(), 0.0
        while self.step < cfg.steps and not self._should_stop():
            logs = self.train_step()
            clips_since += float(logs.pop("clips"))
            self.metrics.accumulate(logs)
            self.step += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                gn = self.engine.get_global_grad_norm()
                extra = {"lr": float(self.engine.get_lr()[0]), "clips_per_s": clips_since / max(now - t_last, 1e-9),
                         "grad_norm": float(gn) if gn is not None else float("nan")}
                extra.update(self.objective.log_constants(self.step))
                row = self.metrics.write(self.step, extra)
                if self.is_main:
                    bar.set_postfix({k: f"{row[k]:.4g}" for k in self.objective.progress_keys if k in row})
                t_last, clips_since = now, 0.0
            if self.is_main and cfg.recon_every and self.step % cfg.recon_every == 0:
                self.evaluate()
            if self.step % cfg.ckpt_every == 0 and self.step < cfg.steps:
                self.save()
        bar.close()
        self.save()
        if self.is_main and cfg.recon_every and self.step % cfg.recon_every:
            self.evaluate()

    def evaluate(self) -> dict:
        out = self.objective.evaluate(self.ema.state_dict(), self.run_dir / "samples" / ckpt.tag_for(self.step), self.step)
        if out:
            self.metrics.write(self.step, {f"eval/{k}": v for k, v in out.items()})
        return out

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0])
        if self.world > 1:
            torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)


def main(args) -> int:
    """`ulvideo train CONFIG --run-dir DIR [--a.b=v ...]`"""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg)  # every check that needs no process group, before one starts
    except (ConfigError, ExportError, FileNotFoundError, ValueError) as e:
        print(f"ulvideo train: {e}", flush=True)
        return 2
    trainer = Trainer(cfg, Path(args.run_dir))
    trainer.fit()
    if trainer.is_main:
        print(f"done: step {trainer.step}; exports in {Path(args.run_dir) / 'exports'}; "
              f"reconstructions in {Path(args.run_dir) / 'samples'}", flush=True)
    return 0
