"""Attention time and peak memory vs sequence length, per backend, as ratios to SDPA and naive.

    python benchmarks/attention.py --max-tokens 16384 --threads 1
    python benchmarks/attention.py --device cuda --dtype bfloat16 --mask block_causal --backward
    python benchmarks/attention.py --mask block_causal --min-tokens 4096 --max-tokens 16384 --threads 1 \
        --backward --backends sdpa_unmasked,sdpa,chunked,auto --out benchmarks/results/attention_block_causal.json

Prints JSON lines: one per (backend, tokens), one per skipped measurement with its reason, and a
summary against the goals (peak memory within 1.2x of the O(N) bound at 16k tokens; speed
>= 0.9x SDPA where SDPA applies; for masked attention, time within 1 / 0.9 of unmasked SDPA's on
the same shape). `sdpa_unmasked` is that reference: SDPA on the same q, k, v without the mask.
`flex` on CPU is forward only (torch 2.13 has no CPU backward for it); its compilation happens in
warm-up calls at two small sizes (after which the compiled kernel takes any size), never in a
measured call.

Method. Every memory measurement (backend, tokens) runs in a fresh subprocess so that one run's allocator
state cannot hide another's peak. Peak memory:
  cpu   the process's resident-set high-water mark (VmHWM), reset just before the call by writing
        "5" to /proc/self/clear_refs (falls back to getrusage's ru_maxrss, which cannot be reset;
        then `hwm_reset` is false and a peak below the earlier high-water mark reads as 0). It sees
        every byte torch touches (tracemalloc sees none of torch's allocations), including pages
        of fused kernels' scratch, and nothing that is reserved but never touched.
  cuda  torch.cuda.max_memory_allocated after reset_peak_memory_stats (exact for torch allocations).
Reported `peak_bytes` = resident inputs + the growth during the call. The O(N) bound is the bytes
that must exist anyway: q, k, v, out (forward); plus dO, dq, dk, dv (--backward).
Time: one more subprocess per token count runs all backends after a warm-up call each,
interleaved round by round (`--repeats` rounds), and reports the minimum (and the median), so
that load from other processes falls on every backend alike; with --repeats 0 the cold time of
the memory run is reported instead. Ratios compare backends of this same invocation.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _rss import peak_rss_bytes as _hwm_bytes, reset_peak_rss as _reset_hwm, rss_bytes as _rss_bytes

DENSE_MASK_LIMIT = 1 << 22  # ulvideo.attention.DENSE_MASK_LIMIT (not imported: the driver stays light)
LINES: list[dict] = []  # every JSON line printed by the driver, for --out


def _emit(obj: dict) -> None:
    LINES.append(obj)
    print(json.dumps(obj), flush=True)

# "auto" is the dispatcher's own choice: the speed goal applies to it where SDPA applies.
BACKENDS = ("sdpa", "auto", "flex", "chunked", "triton", "xformers", "naive")
REFERENCE = "sdpa_unmasked"  # not a backend: SDPA on the same shape without the mask
GOAL_TOKENS = 16384
GOAL_MEMORY_RATIO = 1.2
GOAL_SPEED_VS_SDPA = 0.9


class _Setup:
    """Inputs and one attention call (+ backward) for a spec, built in a worker process."""

    def __init__(self, spec: dict):
        import torch

        from ulvideo.attention import block_causal_mask, key_padding_mask

        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        self.spec, self.torch = spec, torch
        self.device = torch.device(spec["device"])
        dtype = getattr(torch, spec["dtype"])
        b, h, n, d = spec["batch"], spec["heads"], spec["tokens"], spec["head_dim"]
        g = torch.Generator(device=self.device).manual_seed(0)
        self.backward = spec["backward"]
        self.q, self.k, self.v = (torch.randn(b, h, n, d, generator=g, device=self.device, dtype=dtype,
                                              requires_grad=self.backward) for _ in range(3))
        self.grad_out = torch.randn(b, h, n, d, generator=g, device=self.device, dtype=dtype) if self.backward else None
        kw = {}
        if spec["mask"] == "causal":
            kw = {"causal": True}
        elif spec["mask"] == "block_causal":  # structured: no (N, N) tensor unless the backend builds one
            kw = {"causal": True, "causal_block": spec["tokens_per_frame"]}
        elif spec["mask"] == "banded":
            kw = {"causal": True, "causal_block": spec["tokens_per_frame"], "window": spec["window"]}
        elif spec["mask"] == "block_causal_dense":
            kw = {"mask": block_causal_mask(n // spec["tokens_per_frame"], spec["tokens_per_frame"], self.device)}
        elif spec["mask"] == "key_padding":
            valid = torch.arange(n, device=self.device)[None, :] < (3 * n) // 4
            kw = {"mask": key_padding_mask(valid.expand(b, n))}
        self.kw = kw
        elem = self.q.element_size() * self.q.numel()
        self.resident_inputs = (4 if self.backward else 3) * elem + sum(
            t.numel() * t.element_size() for t in kw.values() if torch.is_tensor(t))
        self.bound = (8 if self.backward else 4) * elem

    def call(self, backend: str, q=None):
        from ulvideo.attention import attention

        torch = self.torch
        q = self.q if q is None else q
        k, v = (self.k, self.v) if q is self.q else (q, q)
        kw = self.kw if q is self.q else {key: val for key, val in self.kw.items() if not torch.is_tensor(val)}
        if backend == REFERENCE:
            backend, kw = "sdpa", {}
        with torch.set_grad_enabled(self.backward):
            out = attention(q, k, v, backend=backend, **kw)
            if self.backward:
                out.backward(self.grad_out if q is self.q else torch.ones_like(out))
                for t in (q, k, v):
                    t.grad = None
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def tiny_call(self, backend: str):
        """Initialises libraries (BLAS scratch, lazy kernels, Triton compilation) at 64 tokens,
        without raising the high-water mark a real call is measured against. FlexAttention
        compiles per shape until a second shape makes torch.compile build a dynamic-shape kernel:
        it is called at 128 tokens too, so that the measured call compiles nothing."""
        for n in ((self.spec["tokens_per_frame"], 2 * self.spec["tokens_per_frame"]) if backend == "flex" else (64,)):
            q = self.torch.randn(*self.q.shape[:2], n, self.q.shape[-1], device=self.device, dtype=self.q.dtype,
                                 requires_grad=self.backward)
            self.call(backend, q)


def _memory_worker(spec: dict) -> dict:
    """Peak memory of one call in this fresh process (and its cold time)."""
    s = _Setup(spec)
    torch = s.torch
    s.tiny_call(spec["backend"])
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base, hwm_reset = torch.cuda.memory_allocated(), True
    else:
        base, hwm_reset = _rss_bytes(), _reset_hwm()
    t0 = time.perf_counter()
    s.call(spec["backend"])
    cold = time.perf_counter() - t0
    growth = (torch.cuda.max_memory_allocated() if s.device.type == "cuda" else _hwm_bytes()) - base
    return {"peak_bytes": s.resident_inputs + max(0, growth), "growth_bytes": growth,
            "linear_bound_bytes": s.bound, "hwm_reset": hwm_reset, "cold_time_s": cold}


def _time_worker(spec: dict) -> dict:
    """Times of all backends in one process, interleaved round by round, so that load from other
    processes on a shared machine falls on every backend alike."""
    s = _Setup(spec)
    times: dict[str, list[float]] = {}
    errors = {}
    for backend in spec["backends"]:
        try:
            s.tiny_call(backend)
            s.call(backend)  # full-size warm-up
            times[backend] = []
        except Exception as e:  # report it; the other backends still get timed
            errors[backend] = f"{type(e).__name__}: {str(e)[:300]}"
    for _ in range(spec["repeats"]):
        for backend in times:
            t0 = time.perf_counter()
            s.call(backend)
            times[backend].append(time.perf_counter() - t0)
    return {"times": {b: {"min": min(t), "median": statistics.median(t)} for b, t in times.items() if t},
            "errors": errors}


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
    if backend == "sdpa" and args.mask in ("block_causal", "banded"):
        # past the dense-mask limit one call per frame, no mask; below it a small dense mask
        return 0 if n * n > DENSE_MASK_LIMIT else 6 * n * n
    if backend in ("sdpa", "xformers") and args.mask in ("block_causal", "banded", "block_causal_dense"):
        return 4 * n * n + 2 * n * n  # the bias SDPA/xformers builds from the mask, the bool masks
    return 0


def _usable(args) -> list[str]:
    from ulvideo.attention import available_backends

    usable = ["auto", REFERENCE, *available_backends(args.device)]
    wanted = args.backends.split(",") if args.backends else [b for b in BACKENDS if b != "triton" or args.device == "cuda"]
    if args.mask == "none":
        wanted = [b for b in wanted if b not in (REFERENCE, "flex")]  # the same as sdpa / causal masks only
    return [b for b in wanted if b in usable]


def _run(mode: str, spec: dict, timeout: float) -> dict:
    """Run a worker in a fresh interpreter; {"error": ...} instead of raising."""
    try:
        proc = subprocess.run([sys.executable, __file__, f"--_{mode}", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": f"worker failed (rc {proc.returncode}): {proc.stderr.strip()[-400:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(n: int, backends: list[str], config: dict, args) -> dict[str, dict]:
    """Memory (one fresh process per backend) and time (one process, interleaved) at n tokens."""
    base = {**config, "tokens": n, "tokens_per_frame": args.tokens_per_frame, "window": args.window}
    runnable = []
    for backend in backends:
        dense = _dense_bytes(backend, args, n)
        if backend == "flex" and args.backward and args.device == "cpu":
            _emit({"what": "attention", "backend": backend, "tokens": n, "skipped": True,
                   "reason": "FlexAttention has no CPU backward in this torch"})
        elif dense > args.dense_max_bytes:
            _emit({"what": "attention", "backend": backend, "tokens": n, "skipped": True,
                   "reason": f"its O(N^2) tensors need ~{dense / 2**30:.1f} GiB > "
                             f"--dense-max-bytes {args.dense_max_bytes / 2**30:.1f} GiB"})
        else:
            runnable.append(backend)
    results = {}
    for backend in runnable:
        r = _run("memory", {**base, "backend": backend}, args.timeout)
        if "error" in r:
            _emit({"what": "attention", "backend": backend, "tokens": n, "skipped": True, "reason": r["error"]})
        else:
            results[backend] = r
    timed = {"times": {}, "errors": {}}
    if args.repeats > 0 and results:
        timed = _run("time", {**base, "backends": list(results), "repeats": args.repeats},
                     args.timeout * (1 + args.repeats) * len(results))
        if "error" in timed:
            _emit({"what": "attention", "tokens": n, "timing_error": timed["error"]})
            timed = {"times": {}, "errors": {}}
    for backend, r in results.items():
        t = timed["times"].get(backend)
        r["time_s"], r["time_median_s"] = (t["min"], t["median"]) if t else (r["cold_time_s"], None)
        r["time_is_cold"] = t is None
        if backend in timed["errors"]:
            r["timing_error"] = timed["errors"][backend]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--min-tokens", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mask", default="none",
                   choices=["none", "causal", "block_causal", "banded", "block_causal_dense", "key_padding"])
    p.add_argument("--tokens-per-frame", type=int, default=256)
    p.add_argument("--window", type=int, default=4, help="frames of the band (--mask banded)")
    p.add_argument("--out", default=None, help="also write every JSON line to this file (a JSON list)")
    p.add_argument("--backends", default="", help="comma list (default: all usable; triton only on cuda)")
    p.add_argument("--backward", action="store_true", help="time and measure forward + backward")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (0: report the cold memory-run time)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dense-max-bytes", type=float, default=4e9,
                   help="skip a backend whose O(N^2) tensors would exceed this many bytes")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per call budget of a worker")
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    p.add_argument("--_time", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory or args._time:
        worker = _memory_worker if args._memory else _time_worker
        print(json.dumps(worker(json.loads(args._memory or args._time))))
        return

    tokens = [n for n in (args.min_tokens << i for i in range(32)) if n <= args.max_tokens]
    config = {k: getattr(args, k) for k in ("batch", "heads", "head_dim", "dtype", "device", "mask", "backward", "threads", "repeats")}
    if args.mask.startswith("block_causal") or args.mask == "banded":
        config["tokens_per_frame"] = args.tokens_per_frame
    if args.mask == "banded":
        config["window"] = args.window
    hardware = _hardware(args.device)
    method = ("fresh subprocess per memory measurement; " + ("torch.cuda.max_memory_allocated" if args.device == "cuda"
              else "RSS high-water mark (VmHWM reset via /proc/self/clear_refs)") + " + resident inputs; "
              "linear bound = q,k,v,out" + (",dO,dq,dk,dv" if args.backward else "") +
              "; time = min over rounds, backends interleaved in one process")
    backends = _usable(args)
    results: dict[tuple[str, int], dict] = {}
    for n in tokens:
        if (args.mask.startswith("block_causal") or args.mask == "banded") and n % args.tokens_per_frame:
            _emit({"what": "attention", "tokens": n, "skipped": True, "reason": "tokens not a multiple of --tokens-per-frame"})
            continue
        at_n = _measure(n, backends, config, args)
        for backend, r in at_n.items():
            results[(backend, n)] = r
            line = {"what": "attention", "backend": backend, "tokens": n, "config": config, "hardware": hardware,
                    **{k: r[k] for k in ("time_s", "time_median_s", "time_is_cold", "peak_bytes", "linear_bound_bytes", "hwm_reset")},
                    "peak_over_linear_bound": r["peak_bytes"] / r["linear_bound_bytes"], "memory_method": method}
            for ref in ("sdpa", "naive", REFERENCE):
                if ref in at_n:
                    line[f"speed_vs_{ref}"] = at_n[ref]["time_s"] / r["time_s"]
                    line[f"peak_vs_{ref}"] = r["peak_bytes"] / at_n[ref]["peak_bytes"]
                elif ref in backends:
                    line[f"{ref}_note"] = f"{ref} not measured at {n} tokens (skipped or failed): no ratio"
            _emit(line)
    summary = {"what": "attention_goals", "config": config, "goal_tokens": GOAL_TOKENS,
               "goal_memory_ratio": GOAL_MEMORY_RATIO, "goal_speed_vs_sdpa": GOAL_SPEED_VS_SDPA}
    for backend in backends:
        r16 = results.get((backend, GOAL_TOKENS))
        if r16:
            summary[f"{backend}_peak_over_linear_bound_16k"] = r16["peak_bytes"] / r16["linear_bound_bytes"]
            summary[f"{backend}_memory_goal_met"] = r16["peak_bytes"] <= GOAL_MEMORY_RATIO * r16["linear_bound_bytes"]
        speeds = [results[("sdpa", n)]["time_s"] / results[(backend, n)]["time_s"]
                  for n in tokens if (backend, n) in results and ("sdpa", n) in results]
        if speeds and backend not in ("sdpa", "naive", REFERENCE):
            summary[f"{backend}_min_speed_vs_sdpa"] = min(speeds)
            summary[f"{backend}_speed_goal_met"] = min(speeds) >= GOAL_SPEED_VS_SDPA
        ref16 = results.get((REFERENCE, GOAL_TOKENS))
        if r16 and ref16 and backend != REFERENCE:  # masked attention against unmasked SDPA, same shape
            summary[f"{backend}_speed_vs_sdpa_unmasked_16k"] = ref16["time_s"] / r16["time_s"]
            summary[f"{backend}_masked_speed_goal_met"] = ref16["time_s"] / r16["time_s"] >= GOAL_SPEED_VS_SDPA
    _emit(summary)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/attention.py " + " ".join(sys.argv[1:]),
                                              "lines": LINES}, indent=1) + "\n")


if __name__ == "__main__":
    main()
