"""GPU check: attention agreement tests, attention times and peak memory, and a training step's
MFU eager vs compiled. < 5 min.

    python benchmarks/gpu_check.py                  # on a CUDA machine
    python benchmarks/gpu_check.py --cpu            # smoke run of this script on CPU (tiny sizes)

Prints JSON lines: the environment; the result of `pytest -m gpu tests/test_kernels_gpu.py`
(passed / failed / skipped per backend, first failure messages); then per (mask, pass, tokens,
backend) the median time of `--repeats` calls (CUDA events) after warm-up, the peak of
torch.cuda.max_memory_allocated above the inputs, and ratios to SDPA and to naive at the same size.
Naive runs only up to --naive-max-tokens (its score matrices are O(N²)). Then one stage-1 training
step (`--step-config`, micro-batch `--step-batch`, loss forward + backward + AdamW, bf16 autocast on
CUDA as training uses, float32 on CPU), eager and with `compile_networks` (ulvideo/train/apply.py):
the first step (compilation included), the median of `--repeats` steps after two warm-up steps, the
FLOPs of one step (`torch.utils.flop_counter`, matmuls, convolutions and attention), the achieved
FLOP/s as MFU against the chip's dense bf16 peak (NVIDIA datasheets, `train_step.PEAK_BF16_TFLOPS`,
or --peak-tflops) and as a fraction of a `torch.mm` measured here in the step's dtype. A deadline
keeps the whole run inside --budget-s; measurements past it are reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("sdpa", "flex", "chunked", "triton", "xformers", "naive")


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _environment(device: str) -> dict:
    from ulvideo.attention import available_backends

    env = {"what": "gpu_check_env", "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "backends": available_backends(device)}
    for mod in ("triton", "xformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # absent or broken install: say which
            env[mod] = f"unavailable ({type(e).__name__})"
    return env


def _run_tests(timeout: float) -> dict:
    """Run the GPU agreement tests in a subprocess; summarise the JUnit XML per backend."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={xml}", os.path.join(ROOT, "tests", "test_kernels_gpu.py")]
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"what": "gpu_check_tests", "ok": False, "error": f"timed out after {timeout} s"}
        summary = {"what": "gpu_check_tests", "returncode": proc.returncode, "seconds": round(time.time() - t0, 1)}
        if not os.path.exists(xml):
            summary.update(ok=False, error=proc.stdout[-1500:] + proc.stderr[-1500:])
            return summary
        per_backend: dict[str, dict[str, int]] = {}
        failures = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = case.get("name", "")
            backend = next((b for b in BACKENDS if f"[{b}" in name or f"-{b}-" in name or f"-{b}]" in name), "other")
            outcome = "passed"
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome = "failed"
                    failures.append({"test": name, "message": (child.get("message") or "")[:300]})
                elif child.tag == "skipped":
                    outcome = "skipped"
            per_backend.setdefault(backend, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
        summary.update(ok=proc.returncode == 0, per_backend=per_backend, failures=failures[:10])
        return summary


def _time_one(backend, n, args, mask, backward):
    """(median seconds, peak bytes above the inputs) of one configuration."""
    from ulvideo.attention import attention

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    b, h, d = args.batch, args.heads, args.head_dim
    q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    grad = torch.randn_like(q) if backward else None
    kw = {"causal": True, "causal_block": args.tokens_per_frame} if mask == "block_causal" else {}

    def call():
        out = attention(q, k, v, backend=backend, **kw)
        if backward:
            out.backward(grad)
            q.grad = k.grad = v.grad = None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.set_grad_enabled(backward):
        call()  # warm-up: compilation, autotuning, allocator
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                sync()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return statistics.median(times), peak


def _timings(args, deadline):
    from ulvideo.attention import available_backends

    usable = [bk for bk in BACKENDS if bk in available_backends(args.device)]
    for mask in ("none", "block_causal"):
        for backward in (False, True):
            for n in args.sizes:
                row = {}
                for backend in usable:
                    tag = {"what": "gpu_check_attention", "backend": backend, "tokens": n, "mask": mask,
                           "pass": "forward+backward" if backward else "forward", "dtype": args.dtype,
                           "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim}
                    if backend == "flex" and mask != "block_causal":
                        continue  # flex takes causal masks only; unmasked attention is SDPA's
                    if backend == "flex" and backward and args.device == "cpu":
                        _emit({**tag, "skipped": "FlexAttention has no CPU backward"})
                        continue
                    if backend == "naive" and n > args.naive_max_tokens:
                        _emit({**tag, "skipped": f"naive above --naive-max-tokens {args.naive_max_tokens} (O(N^2) memory)"})
                        continue
                    if time.time() > deadline:
                        _emit({**tag, "skipped": "time budget spent"})
                        continue
                    try:
                        row[backend] = _time_one(backend, n, args, mask, backward)
                    except Exception as e:  # report and continue: one broken backend must not hide the others
                        _emit({**tag, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                        continue
                    finally:
                        if args.device == "cuda":
                            torch.cuda.empty_cache()
                    t, peak = row[backend]
                    line = {**tag, "time_s": t, "peak_bytes_above_inputs": peak}
                    for ref in ("sdpa", "naive"):
                        if ref in row:
                            line[f"speed_vs_{ref}"] = row[ref][0] / t
                            if peak and row[ref][1]:
                                line[f"peak_vs_{ref}"] = peak / row[ref][1]
                    _emit(line)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _train_step_check(args, deadline) -> None:
    """Eager vs compiled stage-1 step: time, compile time, FLOPs, MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from train_step import peak_tflops
    from ulvideo.baselines import build_stage1
    from ulvideo.config import load_config
    from ulvideo.train.apply import compile_networks

    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    cfg = load_config(args.step_config, args.step_set)
    d = cfg.data
    x = torch.rand(args.step_batch, 3, d.num_frames, d.height, d.width, device=device) * 2 - 1
    tag = {"what": "gpu_check_train_step", "config": args.step_config, "overrides": args.step_set,
           "micro_batch": args.step_batch, "clip": [d.num_frames, d.height, d.width],
           "precision": "bf16 autocast" if bf16 else "float32"}
    name = torch.cuda.get_device_name() if bf16 else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if bf16 else None)
    mm = _matmul_flops_per_s(device, torch.bfloat16 if bf16 else torch.float32, args.mm_size)
    flops, eager_first, eager_step = None, None, None
    for variant in ("eager", "compiled"):
        if time.time() > deadline:
            _emit({**tag, "variant": variant, "skipped": "time budget spent"})
            continue
        torch.manual_seed(0)
        model = build_stage1(cfg).to(device)
        if variant == "compiled":
            compile_networks(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=bf16)

        def step(seed: int, with_optimizer: bool = True) -> None:
            g = torch.Generator(device=device).manual_seed(seed)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model.loss(x, g).total.mean() / x[0].numel()
            loss.backward()
            if with_optimizer:
                opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            t0 = time.perf_counter()
            step(0)
            _sync(device)
            first = time.perf_counter() - t0
            for i in range(2):
                step(1 + i)
            _sync(device)
            times = []
            for i in range(args.repeats):
                t0 = time.perf_counter()
                step(3 + i)
                _sync(device)
                times.append(time.perf_counter() - t0)
            if flops is None:  # eager: the arithmetic of a step (the compiled one does the same)
                with FlopCounterMode(display=False) as fc:
                    step(99, with_optimizer=False)
                flops = float(fc.get_total_flops())
        except Exception as e:  # report it; the other variant still runs
            _emit({**tag, "variant": variant, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            continue
        finally:
            del model, opt
            if bf16:
                torch.cuda.empty_cache()
        t = statistics.median(times)
        line = {**tag, "variant": variant, "device": name, "first_step_s": first, "step_s": t,
                "flops_per_step": flops, "achieved_tflops": flops / t / 1e12 if flops else None,
                "matmul_tflops_measured": mm / 1e12,
                "fraction_of_measured_matmul": flops / t / mm if flops else None,
                "mfu": flops / t / (peak * 1e12) if flops and peak else None,
                "mfu_peak": f"{peak} TFLOP/s dense bf16" if peak else "unknown chip peak (--peak-tflops)"}
        if variant == "eager":
            eager_first, eager_step = first, t
        elif eager_step:
            line["speedup_vs_eager"] = eager_step / t
            line["compile_s"] = first - eager_first
        _emit(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--cpu", action="store_true",
                   help="smoke run on CPU: float32, 256 tokens, no tests, a tiny training step")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens-per-frame", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--naive-max-tokens", type=int, default=4096)
    p.add_argument("--step-config", default="configs/ul/k600_128.yaml", help="config of the training-step check")
    p.add_argument("--step-set", nargs="*", default=[], help="overrides for it, e.g. --step-set --decoder.size=S")
    p.add_argument("--step-batch", type=int, default=2, help="micro-batch of the training-step check")
    p.add_argument("--mm-size", type=int, default=8192, help="matrix size of the matmul throughput measurement")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="chip peak for MFU when the name is not in the table")
    p.add_argument("--skip-step", action="store_true", help="no training-step check")
    p.add_argument("--budget-s", type=float, default=270, help="whole-run budget in seconds")
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args()
    if args.cpu:
        args.device, args.dtype, args.skip_tests, args.repeats, args.mm_size = "cpu", "float32", True, 2, 1024
        args.sizes, args.tokens_per_frame, args.batch, args.heads = [256], 64, 1, 2
        args.step_config, args.step_batch = "configs/ul/tiny.yaml", 1
        args.step_set = args.step_set or ["--data.num_frames=5", "--data.height=16", "--data.width=16"]
    t0 = time.time()
    if args.device == "cuda" and not torch.cuda.is_available():
        _emit({"what": "gpu_check_env", "error": "CUDA is not available"})
        sys.exit(1)
    _emit(_environment(args.device))
    if not args.skip_tests:
        _emit(_run_tests(timeout=0.4 * args.budget_s))
    _timings(args, deadline=t0 + 0.6 * args.budget_s)
    if not args.skip_step:
        _train_step_check(args, deadline=t0 + args.budget_s)
    _emit({"what": "gpu_check_done", "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
