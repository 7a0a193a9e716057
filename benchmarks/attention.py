"""Attention time and peak memory vs sequence length, per backend, as ratios to SDPA and naive.

    python benchmarks/attention.py --max-tokens 16384 --threads 1 --repeats 1
    python benchmarks/attention.py --device cuda --dtype bfloat16 --mask block_causal --backward

Prints JSON lines: one per (backend, tokens), one per skipped measurement with its reason, and a
summary against the goals (peak memory within 1.2x of the O(N) bound at 16k tokens; speed
>= 0.9x SDPA where SDPA applies).

Method. Every (backend, tokens) runs in a fresh subprocess so that one measurement's allocator
state cannot hide another's peak. Peak memory:
  cpu   the process's resident-set high-water mark (VmHWM), reset just before the call by writing
        "5" to /proc/self/clear_refs (falls back to getrusage's ru_maxrss, which cannot be reset;
        then `hwm_reset` is false and a peak below the earlier high-water mark reads as 0). It sees
        every byte torch touches (tracemalloc sees none of torch's allocations), including pages
        of fused kernels' scratch, and nothing that is reserved but never touched.
  cuda  torch.cuda.max_memory_allocated after reset_peak_memory_stats (exact for torch allocations).
Reported `peak_bytes` = resident inputs + the growth during the call. The O(N) bound is the bytes
that must exist anyway: q, k, v, out (forward); plus dO, dq, dk, dv (--backward).
Time: the median of `--repeats` calls after the memory-measuring call (which also warms up);
with --repeats 0 the single cold call is reported. Ratios compare runs of this same invocation.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

BACKENDS = ("sdpa", "chunked", "triton", "xformers", "naive")
GOAL_TOKENS = 16384
GOAL_MEMORY_RATIO = 1.2
GOAL_SPEED_VS_SDPA = 0.9


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _worker(spec: dict) -> dict:
    """One measurement in this (fresh) process; returns a JSON-able dict."""
    import torch

    from ulvideo.attention import attention, block_causal_mask, key_padding_mask

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    b, h, n, d = spec["batch"], spec["heads"], spec["tokens"], spec["head_dim"]
    g = torch.Generator(device=device).manual_seed(0)
    backward = spec["backward"]
    q, k, v = (torch.randn(b, h, n, d, generator=g, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
    grad_out = torch.randn(b, h, n, d, generator=g, device=device, dtype=dtype) if backward else None
    kw = {}
    if spec["mask"] == "causal":
        kw = {"causal": True}
    elif spec["mask"] == "block_causal":  # structured: no (N, N) tensor unless the backend builds one
        kw = {"causal": True, "causal_block": spec["tokens_per_frame"]}
    elif spec["mask"] == "block_causal_dense":
        kw = {"mask": block_causal_mask(n // spec["tokens_per_frame"], spec["tokens_per_frame"], device)}
    elif spec["mask"] == "key_padding":
        valid = torch.arange(n, device=device)[None, :] < (3 * n) // 4
        kw = {"mask": key_padding_mask(valid.expand(b, n))}

    def call():
        out = attention(q, k, v, backend=spec["backend"], **kw)
        if backward:
            out.backward(grad_out)
            q.grad = k.grad = v.grad = None
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # A tiny call first initialises libraries (BLAS scratch, lazy kernels, Triton compilation)
    # without raising the high-water mark the real call is measured against.
    w = torch.randn(b, h, 64, d, device=device, dtype=dtype, requires_grad=backward)
    tiny = {key: val for key, val in kw.items() if not torch.is_tensor(val)}
    wo = attention(w, w, w, backend=spec["backend"], **tiny)
    if backward:
        wo.backward(torch.ones_like(wo))
    del w, wo

    elem = q.element_size() * q.numel()
    resident_inputs = (4 if backward else 3) * elem + sum(t.numel() * t.element_size() for t in kw.values() if torch.is_tensor(t))
    bound = (8 if backward else 4) * elem
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        hwm_reset = True
    else:
        base = _rss_bytes()
        hwm_reset = _reset_hwm()
    t0 = time.perf_counter()
    with torch.no_grad() if not backward else torch.enable_grad():
        out = call()
    sync()
    cold = time.perf_counter() - t0
    growth = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _hwm_bytes()) - base
    del out
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        with torch.no_grad() if not backward else torch.enable_grad():
            call()
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "time_s": statistics.median(times) if times else cold,
        "time_is_cold": not times,
        "peak_bytes": resident_inputs + max(0, growth),
        "growth_bytes": growth,
        "linear_bound_bytes": bound,
        "hwm_reset": hwm_reset,
    }


def _hardware(device: str) -> dict:
    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
    return info


def _dense_bytes(backend: str, args, n: int) -> int:
    """Memory a backend needs for O(N²) tensors at n tokens (0 where it needs none)."""
    bh = args.batch * args.heads
    if backend == "naive":
        return 3 * bh * n * n * 4  # scores, exp, probabilities (float32 or wider)
    if backend in ("sdpa", "xformers") and args.mask in ("block_causal", "block_causal_dense"):
        return 4 * n * n + 2 * n * n  # the bias SDPA/xformers builds from the mask, the bool masks
    return 0


def _usable(args) -> list[str]:
    from ulvideo.attention import available_backends

    usable = available_backends(args.device)
    wanted = args.backends.split(",") if args.backends else [b for b in BACKENDS if b != "triton" or args.device == "cuda"]
    return [b for b in wanted if b in usable]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--min-tokens", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mask", default="none", choices=["none", "causal", "block_causal", "block_causal_dense", "key_padding"])
    p.add_argument("--tokens-per-frame", type=int, default=256)
    p.add_argument("--backends", default="", help="comma list (default: all usable; triton only on cuda)")
    p.add_argument("--backward", action="store_true", help="time and measure forward + backward")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dense-max-bytes", type=float, default=4e9,
                   help="skip a backend whose O(N²) tensors would exceed this many bytes")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        print(json.dumps(_worker(json.loads(args._worker))))
        return

    tokens = []
    n = args.min_tokens
    while n <= args.max_tokens:
        tokens.append(n)
        n *= 2
    config = {k: getattr(args, k) for k in ("batch", "heads", "head_dim", "dtype", "device", "mask", "backward", "threads", "repeats")}
    if args.mask.startswith("block_causal"):
        config["tokens_per_frame"] = args.tokens_per_frame
    hardware = _hardware(args.device)
    method = ("fresh subprocess per measurement; " + ("torch.cuda.max_memory_allocated" if args.device == "cuda"
              else "RSS high-water mark (VmHWM reset via /proc/self/clear_refs)") + " + resident inputs; "
              "linear bound = q,k,v,out" + (",dO,dq,dk,dv" if args.backward else ""))
    backends = _usable(args)
    results: dict[tuple[str, int], dict] = {}
    for n in tokens:
        if args.mask.startswith("block_causal") and n % args.tokens_per_frame:
            print(json.dumps({"what": "attention", "skipped": "all", "tokens": n, "reason": "tokens not a multiple of --tokens-per-frame"}))
            continue
        for backend in backends:
            dense = _dense_bytes(backend, args, n)
            if dense > args.dense_max_bytes:
                print(json.dumps({"what": "attention", "backend": backend, "tokens": n, "skipped": True,
                                  "reason": f"its O(N^2) tensors need ~{dense / 2**30:.1f} GiB > --dense-max-bytes {args.dense_max_bytes / 2**30:.1f} GiB"}))
                continue
            spec = {**config, "tokens": n, "backend": backend, "tokens_per_frame": args.tokens_per_frame}
            try:
                proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)],
                                      capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(json.dumps({"what": "attention", "backend": backend, "tokens": n, "skipped": True,
                                  "reason": f"timed out after {args.timeout} s"}))
                continue
            if proc.returncode != 0:
                print(json.dumps({"what": "attention", "backend": backend, "tokens": n, "skipped": True,
                                  "reason": f"worker failed (rc {proc.returncode}): {proc.stderr.strip()[-400:]}"}))
                continue
            results[(backend, n)] = json.loads(proc.stdout.strip().splitlines()[-1])
        for backend in backends:  # printed once every backend ran at n, so all ratios exist
            if (backend, n) not in results:
                continue
            r = results[(backend, n)]
            line = {"what": "attention", "backend": backend, "tokens": n, "config": config, "hardware": hardware,
                    "time_s": r["time_s"], "time_is_cold": r["time_is_cold"], "peak_bytes": r["peak_bytes"],
                    "linear_bound_bytes": r["linear_bound_bytes"],
                    "peak_over_linear_bound": r["peak_bytes"] / r["linear_bound_bytes"], "hwm_reset": r["hwm_reset"],
                    "memory_method": method}
            for ref in ("sdpa", "naive"):
                if (ref, n) in results:
                    line[f"time_vs_{ref}"] = r["time_s"] / results[(ref, n)]["time_s"]
                    line[f"speed_vs_{ref}"] = results[(ref, n)]["time_s"] / r["time_s"]
                    line[f"peak_vs_{ref}"] = r["peak_bytes"] / results[(ref, n)]["peak_bytes"]
                elif ref in backends:
                    line[f"{ref}_note"] = f"{ref} was not measured at {n} tokens (skipped or failed); no ratio"
            print(json.dumps(line), flush=True)
    summary = {"what": "attention_goals", "config": config, "goal_tokens": GOAL_TOKENS}
    for backend in backends:
        r16 = results.get((backend, GOAL_TOKENS))
        if r16:
            summary[f"{backend}_peak_over_linear_bound_16k"] = r16["peak_bytes"] / r16["linear_bound_bytes"]
            summary[f"{backend}_memory_goal_met"] = r16["peak_bytes"] <= GOAL_MEMORY_RATIO * r16["linear_bound_bytes"]
        speeds = [results[("sdpa", n)]["time_s"] / results[(backend, n)]["time_s"]
                  for n in tokens if (backend, n) in results and ("sdpa", n) in results]
        if speeds and backend != "sdpa":
            summary[f"{backend}_min_speed_vs_sdpa"] = min(speeds)
            summary[f"{backend}_speed_goal_met"] = min(speeds) >= GOAL_SPEED_VS_SDPA
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
