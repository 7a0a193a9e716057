"""Training-step speed and memory per ZeRO stage and world size, through the real `Trainer`.

    python benchmarks/train_step.py                                  # ZeRO 0-3 x world 1, 2 on this machine
    python benchmarks/train_step.py --stages 2 3 --worlds 1 2 4 --steps 10 --set --prior.widths=[1024]
    python benchmarks/train_step.py --precision bf16 --worlds 8      # on a GPU node: adds bf16 MFU

Each (stage, world size) runs in fresh processes (torchrun for world > 1) on the same synthetic
data and config: `--warmup` untimed steps, then `--steps` timed ones. JSON lines (what, config,
hardware, value, unit), each with `ratio_to_zero0_world1`, the same quantity divided by the ZeRO-0
single-process run of this invocation (`--stages` must include 0 and `--worlds` 1 for ratios):
  step_time    median seconds per optimizer step (global batch), rank 0's clock
  clips_per_s  global batch / step_time
  peak_memory  CPU: the largest per-rank peak RSS while building the engine and training (MiB),
               measured from a reset high-water mark, minus the RSS just before (libraries excluded);
               GPU: the largest per-rank torch.cuda.max_memory_allocated (MiB)
  mfu          GPU only: model FLOPs per step / (step_time x world size x chip peak). FLOPs are
               counted by torch.utils.flop_counter on one forward + backward of the objective (a
               plain copy, outside DeepSpeed); the chip peak is dense bf16 tensor throughput
               looked up by device name in PEAK_BF16_TFLOPS (NVIDIA datasheets) or --peak-tflops.
               This GPU path has not yet been run on GPU hardware.
The default config is the tiny CPU model with a wide prior (`--set` adds overrides), so that
parameters and optimizer state, which ZeRO partitions, dominate memory rather than activations.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _rss import peak_rss_bytes, reset_peak_rss, rss_bytes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SET = ["--data.num_frames=5", "--data.resolution=16", "--data.height=16", "--data.width=16",
               "--data.heldout_fraction=0.0", "--data.num_workers=0", "--encoder.latent_channels=4",
               "--prior.widths=[512]", "--prior.depths=[6]", "--eval.every=0", "--train.log_every=1000000",
               "--train.ckpt_every=1000000", "--train.warmup_steps=1"]
# dense bf16 tensor-core TFLOP/s per GPU, from NVIDIA's datasheets (the "with sparsity" figures halved)
PEAK_BF16_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                    "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 6000 Ada": 364.0}


def peak_tflops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # most specific name first
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


# ---- worker (one rank) --------------------------------------------------------------------------


def count_flops(cfg, batch: dict, device) -> float:
    """FLOPs of one forward + backward of the objective on one micro-batch (outside DeepSpeed)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ulvideo.train.objectives import make_objective

    obj = make_objective(cfg).to(device)
    g = torch.Generator(device=device)
    g.manual_seed(0)
    with FlopCounterMode(display=False) as fc:  # the count does not depend on the dtype
        loss, _ = obj(batch, g, 0)
        loss.backward()
    return float(fc.get_total_flops())


def worker(spec: dict) -> None:
    import torch

    from ulvideo.config import load_config
    from ulvideo.train.loop import Trainer, use_bf16

    cfg = load_config(spec["config"], spec["overrides"])
    reset_ok = reset_peak_rss()
    rss0 = rss_bytes() / 2**20
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir))
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(spec["warmup"] + spec["steps"]):
            t0 = time.perf_counter()
            trainer.train_step()
            if cuda:
                torch.cuda.synchronize()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_bytes() / 2**20 - (rss0 if reset_ok else 0.0)
        flops = None
        if cuda and use_bf16(cfg) and trainer.rank == 0:
            batch = trainer._to_device(next(trainer.loader_iter))
            flops = count_flops(cfg, batch, trainer.device) * trainer.engine.gradient_accumulation_steps() * trainer.world
        peaks = [None] * trainer.world
        torch.distributed.all_gather_object(peaks, peak)
        if trainer.rank == 0:
            step = statistics.median(times)
            out = {"step_time": step, "clips_per_s": cfg.train.global_batch_size / step, "peak_memory": max(peaks),
                   "peak_is_growth": not cuda and reset_ok, "flops_per_step": flops,
                   "device": torch.cuda.get_device_name() if cuda else "cpu",
                   "params": sum(getattr(p, "ds_numel", p.numel()) for p in trainer.objective.trained.parameters())}
            print("RESULT " + json.dumps(out), flush=True)
        torch.distributed.barrier()


# ---- driver ---------------------------------------------------------------------------------------


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_one(stage: int, world: int, args, data: Path) -> dict:
    overrides = [f"--data.path={data}", *DEFAULT_SET, *args.set, f"--train.zero_stage={stage}",
                 f"--train.micro_batch_size={args.micro}", f"--train.global_batch_size={args.global_batch}",
                 f"--train.precision={args.precision}"]
    if args.offload and stage > 0:
        overrides.append("--train.offload_optimizer=true")
    spec = {"config": args.config, "overrides": overrides, "warmup": args.warmup, "steps": args.steps}
    launch = [sys.executable] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", _port()]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # the same total of CPU threads at every world size (torchrun alone would set 1 per process)
    env["OMP_NUM_THREADS"] = str(args.threads or max(1, (os.cpu_count() or 1) // world))
    r = subprocess.run([*launch, __file__, "--_worker", json.dumps(spec)], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stdout + r.stderr)[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def _median(reps: list[dict]) -> dict:
    ok = [r for r in reps if "error" not in r]
    if not ok:
        return reps[-1]
    out = dict(ok[0])
    for key in ("step_time", "peak_memory"):
        out[key] = statistics.median(r[key] for r in ok)
    out["clips_per_s"] = ok[0]["clips_per_s"] * ok[0]["step_time"] / out["step_time"]
    out["repeats"] = len(ok)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="whole sweeps; each number is the median over them")
    p.add_argument("--micro", type=int, default=2, help="micro_batch_size")
    p.add_argument("--global-batch", type=int, default=4, help="global_batch_size (a multiple of micro x every world size)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--offload", action="store_true", help="CPU optimizer offload for ZeRO 1-3")
    p.add_argument("--config", default="configs/ul/tiny.yaml")
    p.add_argument("--set", nargs="*", default=[], help="more config overrides, e.g. --set --prior.depths=[8]")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per process (0: cpus / world size)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="chip peak for MFU when the name is not in the table")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        worker(json.loads(args._worker))
        return
    hardware = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shapes"
        subprocess.run([sys.executable, "-m", "ulvideo", "data", "synth", "--out", str(data), "--num", "16", "--frames", "5",
                        "--size", "16", "--seed", "0"], cwd=ROOT, check=True, capture_output=True)
        runs: dict[tuple[int, int], list[dict]] = {}
        for _ in range(args.repeats):  # sweeps interleaved, so slow phases of a shared machine hit every config
            for world in args.worlds:
                for stage in args.stages:
                    runs.setdefault((stage, world), []).append(run_one(stage, world, args, data))
        reference = _median(runs[0, 1]) if (0, 1) in runs else None
        if reference and "error" in reference:
            reference = None
        for (stage, world), reps in runs.items():
            res = _median(reps)
            config = {"zero_stage": stage, "world_size": world, "micro_batch_size": args.micro,
                      "global_batch_size": args.global_batch, "precision": args.precision, "offload": args.offload,
                      "overrides": args.set, "params": res.get("params"), "steps": args.steps,
                      "repeats": res.get("repeats", 0),
                      "threads_per_process": args.threads or max(1, (os.cpu_count() or 1) // world)}
            if "error" in res:
                print(json.dumps({"what": "train_step", "config": config, "error": res["error"]}), flush=True)
                continue
            hw = {**hardware, "device": res["device"]}
            metrics = [("step_time", res["step_time"], "s"), ("clips_per_s", res["clips_per_s"], "clips/s"),
                       ("peak_memory", res["peak_memory"], "MiB (growth over libraries)" if res["peak_is_growth"] else "MiB")]
            if res["flops_per_step"]:
                peak = args.peak_tflops or peak_tflops(res["device"])
                mfu = res["flops_per_step"] / (res["step_time"] * world * peak * 1e12) if peak else None
                metrics.append(("mfu", mfu, "fraction of dense bf16 peak" if peak else "unknown chip peak"))
            for what, value, unit in metrics:
                ratio = value / reference[what] if reference and value and reference.get(what) else None
                print(json.dumps({"what": what, "config": config, "hardware": hw, "value": value, "unit": unit,
                                  "ratio_to_zero0_world1": ratio}), flush=True)


if __name__ == "__main__":
    main()
