"""GPU check of the attention backends: agreement tests, then times and peak memory. < 5 min.

    python benchmarks/gpu_check.py                  # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --sizes 256 --skip-tests   # smoke run of this script

Prints JSON lines: the environment; the result of `pytest -m gpu tests/test_kernels_gpu.py`
(passed / failed / skipped per backend, first failure messages); then per (mask, pass, tokens,
backend) the median time of `--repeats` calls (CUDA events) after warm-up, the peak of
torch.cuda.max_memory_allocated above the inputs, and ratios to SDPA and to naive at the same size.
Naive runs only up to --naive-max-tokens (its score matrices are O(N²)). A deadline keeps the
whole run inside --budget-s; measurements past it are reported as skipped.
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
BACKENDS = ("sdpa", "chunked", "triton", "xformers", "naive")


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tokens-per-frame", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--naive-max-tokens", type=int, default=4096)
    p.add_argument("--budget-s", type=float, default=270, help="whole-run budget in seconds")
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args()
    t0 = time.time()
    if args.device == "cuda" and not torch.cuda.is_available():
        _emit({"what": "gpu_check_env", "error": "CUDA is not available"})
        sys.exit(1)
    _emit(_environment(args.device))
    if not args.skip_tests:
        _emit(_run_tests(timeout=0.6 * args.budget_s))
    _timings(args, deadline=t0 + args.budget_s)
    _emit({"what": "gpu_check_done", "seconds": round(time.time() - t0, 1)})


if __name__ == "__main__":
    main()
