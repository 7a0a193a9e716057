"""How close a training step comes to this machine's matmul throughput, and where the rest goes.

    python benchmarks/machine_limit.py --threads 1 --out benchmarks/results/machine_limit_cpu.json

In one invocation: (1) the fp32 matmul throughput of this CPU, `torch.mm` of two --mm-size square
matrices (best of 5), measured at the start and at the end (the machine may be shared: both are
reported, the fraction uses the larger); (2) per config (the tiny stage-1 and stage-2 setups of
benchmarks/compile.py, real `Trainer`, DeepSpeed ZeRO as configured) and variant (eager,
`train.compile`; both in one process, their steps timed in turn): the median step time, the step's FLOPs counted by
`torch.utils.flop_counter.FlopCounterMode` on one eager step (matmuls, convolutions and attention,
forward and backward; the compiled step does the same arithmetic), the achieved FLOP/s and its
fraction of the measured matmul throughput, and `torch.profiler`'s top operators by self time with
a coarse split into categories.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compile import ROOT, prepare_runs

CATEGORIES = (  # first match wins, on the lower-cased operator name
    ("convolution", ("conv",)),
    ("attention", ("scaled_dot_product", "flash_attention", "flex")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("norm", ("group_norm", "layer_norm", "rms_norm")),
    ("compiled graph (fused kernels)", ("compiled", "cpp_fused", "graph_", "inductor")),
    ("data loading", ("dataloader",)),
    ("copies and layout", ("copy_", "aten::cat", "aten::to", "contiguous", "clone", "as_strided", "aten::index",
                           "aten::empty", "aten::zeros", "aten::fill_", "slice", "view", "transpose", "permute",
                           "expand", "reshape", "stack", "upsample")),
    ("optimizer, gradients, DeepSpeed", ("optimizer", "foreach", "accumulategrad", "allreduce", "c10d", "lerp")),
    ("element-wise", ("aten::",)),
)


def mm_throughput(n: int, threads: int) -> float:
    """Best-of-5 FLOP/s of an n x n by n x n float32 torch.mm."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def _profile_summary(prof, top: int) -> dict:
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    cats: dict[str, float] = {}
    for e in events:
        c = _category(e.key)
        cats[c] = cats.get(c, 0.0) + e.self_cpu_time_total / total
    return {"profiled_step_s": total / 1e6,
            "top_ops": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 4),
                         "share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in events[:top]],
            "categories": {k: round(v, 4) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}}


def worker(spec: dict) -> dict:
    """Trainers of every variant in this one process, steps timed in turn round by round (as in
    benchmarks/compile.py); FLOPs on an eager step; one profiled step per variant."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from compile import build_trainers

    torch.set_num_threads(spec["threads"])
    out = {}
    with tempfile.TemporaryDirectory() as run_root:
        trainers = build_trainers({**spec, "variants": ["static" if v == "compiled" else v for v in spec["variants"]]},
                                  Path(run_root))
        trainers = {("compiled" if v == "static" else v): t for v, t in trainers.items()}
        for trainer in trainers.values():
            for _ in range(spec["warmup"]):
                trainer.train_step()
        times = {v: [] for v in trainers}
        for _ in range(spec["steps"]):
            for v, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.train_step()
                times[v].append(time.perf_counter() - t0)
        for v, trainer in trainers.items():
            out[v] = {"step_s": statistics.median(times[v]), "steps_s": times[v]}
            if v == "eager":
                with FlopCounterMode(display=False) as fc:
                    trainer.train_step()
                out[v]["flops_per_step"] = float(fc.get_total_flops())
                out[v]["flops_by_operator"] = {str(op): float(n) for op, n in
                                               sorted(fc.get_flop_counts()["Global"].items(), key=lambda kv: -kv[1])}
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                trainer.train_step()
            out[v].update(_profile_summary(prof, spec["top"]))
    return out


def _run(spec: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stdout + r.stderr)[-3000:]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mm-size", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=4, help="untimed steps (compilation, the data cache's first epoch)")
    p.add_argument("--top", type=int, default=15, help="operators listed per profile")
    p.add_argument("--variants", default="eager,compiled")
    p.add_argument("--configs", default="stage1_tiny,base_tiny")
    p.add_argument("--out", default=None)
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        print("RESULT " + json.dumps(worker(json.loads(args._worker))), flush=True)
        return
    import torch

    result = {"what": "machine_limit", "command": " ".join(["python", "benchmarks/machine_limit.py", *sys.argv[1:]]),
              "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "loadavg_1m_start": os.getloadavg()[0]},
              "threads": args.threads, "steps": args.steps, "warmup": args.warmup}
    mm_start = mm_throughput(args.mm_size, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        setups = prepare_runs(Path(tmp))
        configs = {}
        for name in args.configs.split(","):
            config, overrides = setups[name]
            r = _run({"config": config, "overrides": overrides, "variants": args.variants.split(","),
                      "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "top": args.top})
            print(json.dumps({"config": name, **r})[-1500:], flush=True)
            configs[name] = {"config": config, "overrides": overrides, **r}
    mm_end = mm_throughput(args.mm_size, args.threads)
    mm = max(mm_start, mm_end)
    result["matmul"] = {"size": args.mm_size, "dtype": "float32", "flops_per_s_start": mm_start,
                        "flops_per_s_end": mm_end, "flops_per_s": mm}
    for name, rows in configs.items():
        flops = rows.get("eager", {}).get("flops_per_step")
        for v in args.variants.split(","):
            r = rows.get(v, {})
            if "error" in rows or not flops:
                continue
            r["flops_per_step"] = flops
            r["achieved_flops_per_s"] = flops / r["step_s"]
            r["fraction_of_matmul_throughput"] = flops / r["step_s"] / mm
    result["configs"] = configs
    result["hardware"]["loadavg_1m_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
