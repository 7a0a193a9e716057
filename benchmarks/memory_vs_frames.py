"""Peak memory and time of encode / decode vs. number of frames: one pass vs. streaming vs. tiling.

    python benchmarks/memory_vs_frames.py                                  # tiny nets, 64x64, 9..129 frames
    python benchmarks/memory_vs_frames.py --size S --height 128 --width 128 --steps 8 --frames 9 33 129
    python benchmarks/memory_vs_frames.py --device cuda --size L --height 256 --width 256 --tile 64
    python benchmarks/memory_vs_frames.py --jobs decode --decoder-window 8   # decode flat in T as well

Prints one JSON line per (job, mode, frames) and one summary line per (job, mode), fitted over
T >= 1 + chunk (below that a streamed clip is a single, shorter chunk). Goal: the streamed peak
memory is flat in T, and the tiled one also lower. Modes:
  encode full      model.encode on the whole clip (the clip is in memory).
  encode stream    streaming.stream_encode over chunks of `--chunk` frames that are generated one
                   at a time and dropped after use (neither the clip nor the latents are kept).
  encode tiled     the same, each chunk in spatial tiles of `--tile` pixels (streaming.Tiling).
  decode full      streaming.decode_full: one sampler over the whole clip.
  decode stream    streaming.stream_decode, chunk order (each chunk runs every sampler step; the
                   cache keeps state per step); output chunks are dropped after use.
  decode tiled     the same, every network evaluation in spatial tiles of `--tile` pixels.
  decode step      streaming.decode(order="step"): every chunk at step i, then step i + 1; the
                   whole x_t is held and returned.
Tiled modes also report `max_abs_error_vs_one_pass`: each chunk is compared, as it comes out,
with the one-pass result (encode full / decode full with the same noise), computed before the
measured call (`--no-error` skips it); tiling is exact, so this is fp32 round-off.
The decoder's middle transformer attends to all earlier frames, so streamed decoding keeps the
keys and values of every middle block: `history_bytes_per_frame` is their closed form per frame
kept, (steps + 1 slots in chunk order, 1 in step order) * 2 * depth * tokens per frame * width * 4
bytes, and `history_frames` the frames kept at the end: T, or min(T, W - 1) with
`--decoder-window W` (`decoder.temporal_window`: frame f attends frames f - W + 1 .. f only, older
keys and values are evicted; `history_bytes` is the product). Step order also holds the clip
(x_t and the output, 2 * 3 * H * W * 4 bytes per frame). The summary compares the measured slope
with the slope of history_bytes plus that clip term (`expected_growth_bytes_per_frame`; 0 for the
streamed encoder, and for streamed decoding with a window once T >= W - 1 over the fitted range).
A window changes the decoder's function (all decode modes, the one-pass reference included, use
the same windowed network), so compare windowed and unwindowed runs for memory and time only.

Method. Each configuration runs in a fresh subprocess (model, inputs, one call). Peak memory:
  cpu   resident-set high-water mark (VmHWM), reset just before the call by writing "5" to
        /proc/self/clear_refs (where that is not possible, getrusage's ru_maxrss, which includes
        the start-up; `hwm_reset` says which); reported as the growth over the RSS just before
        the call, i.e. what the call itself needed beyond the resident weights and inputs.
  cuda  torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated
        before the call.
Time: the wall time of that single (cold) call; the machine's load is recorded beside it.
Weights are random (memory and time do not depend on their values; the norms' affine parameters
and the zero-initialised layers are randomised so that the error check sees every path).

Reading the numbers. At the tiny sizes the one-pass peak is not monotone in T: the CPU conv3d
picks its algorithm (and workspace, hundreds of MB) by shape, which outweighs the activations
themselves; compare the streamed curve's flatness, and use --height/--width or --size to make
activations dominate. A streamed chunk attends to the keys and values of all earlier frames, so
the attention's share of the time grows with T (with --decoder-window W, of the last W - 1 frames
only: time per frame flat too). Exact tiling runs each tile once with a halo of context (the
decoder's down path twice; benchmarks/tiling.py measures its cost against the frame size).
`--out FILE` also writes every line and summary to a JSON file; summaries give each point's CPU time
(`time.process_time`, less disturbed by other load than the wall time) and peak over the first
fitted point's (`cpu_seconds_ratio`, `peak_ratio`), measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from _rss import peak_rss_bytes as _hwm_bytes, reset_peak_rss as _reset_hwm, rss_bytes as _rss_bytes

JOBS = {"encode": ("full", "stream", "tiled"), "decode": ("full", "stream", "tiled", "step")}


def _frames(torch, start: int, n: int, h: int, w: int, device):
    """Frames start .. start + n - 1 of a smooth moving pattern in [-1, 1], (1, 3, n, h, w): a chunk can be
    made on its own, so the streamed encoder never needs the whole clip."""
    t = torch.arange(start, start + n, device=device, dtype=torch.float32).view(n, 1, 1)
    y = torch.linspace(0, 6.28, h, device=device).view(1, h, 1)
    x = torch.linspace(0, 6.28, w, device=device).view(1, 1, w)
    chans = [torch.sin(x + 0.2 * t) * torch.cos(y), torch.sin(2 * y - 0.1 * t), torch.cos(x + y + 0.3 * t)]
    return torch.stack([c.expand(n, h, w) for c in chans]).unsqueeze(0)


def _randomise(torch, model) -> None:
    """Norm gains and biases and the zero-initialised layers random, so that every path carries signal."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g).to(p) * 0.1)
            elif name.endswith("weight") and p.ndim == 1 and bool((p == 1).all()):  # norm gains
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g).to(p))


def _worker(spec: dict) -> dict:
    import torch

    from ulvideo import streaming as S
    from ulvideo.config import load_config
    from ulvideo.ul import UnifiedLatents

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    overrides = [f"--encoder.size={spec['size']}", f"--decoder.size={spec['size']}", f"--prior.size={spec['size']}"]
    window = spec.get("decoder_window")
    if window is not None:
        overrides.append(f"--decoder.temporal_window={window}")
    cfg = load_config(None, overrides)
    model = UnifiedLatents(cfg).eval().to(device)
    _randomise(torch, model)
    e = cfg.encoder
    T, H, W, chunk = spec["frames"], spec["height"], spec["width"], spec["chunk"]
    plan = S.chunk_plan(T, chunk, None, e.temporal_downsample)
    lplan = S.latent_plan(plan, e.temporal_downsample)
    lat_shape = (1, e.latent_channels, 0, H // e.spatial_downsample, W // e.spatial_downsample)
    steps, sampler = spec["steps"], spec["sampler"]
    job, mode = spec["job"], spec["mode"]
    tiling = S.Tiling(spec["tile"]) if mode == "tiled" else None

    def latents(start, n):
        return S.clip_noise(7, 99, 0, start, lat_shape[:2] + (n,) + lat_shape[3:], device)

    def chunk_starts(sizes):
        return [sum(sizes[:i]) for i in range(len(sizes))]

    inputs = reference = None
    error = [0.0]
    if job == "encode" and mode == "full":
        inputs = _frames(torch, 0, T, H, W, device)
    if job == "decode" and mode in ("full", "step"):
        inputs = latents(0, sum(lplan))
    if mode == "tiled" and spec["error"]:  # the one-pass result, before the measured call
        with torch.no_grad():
            if job == "encode":
                reference = model.encode(_frames(torch, 0, T, H, W, device))
            else:
                reference = S.decode_full(model, latents(0, sum(lplan)), steps, sampler, seed=0)

    def checked(parts, sizes):
        """Yields the frame count of each part, recording its largest difference from the reference."""
        for start, part in zip(chunk_starts(sizes), parts):
            if reference is not None:
                ref = reference[:, :, start:start + part.shape[2]]
                error[0] = max(error[0], float((part - ref).abs().max()))
            yield part.shape[2]

    def call():
        if job == "encode" and mode == "full":
            return model.encode(inputs).shape[2]
        if job == "encode":
            gen = (_frames(torch, s, n, H, W, device) for s, n in zip(chunk_starts(plan), plan))
            return sum(checked(S.stream_encode(model, gen, tiling), lplan))
        if mode == "full":
            return S.decode_full(model, inputs, steps, sampler, seed=0).shape[2]
        if mode == "step":
            return S.decode(model, inputs, chunk, steps=steps, sampler=sampler, seed=0, order="step").shape[2]
        gen = (latents(s, n) for s, n in zip(chunk_starts(lplan), lplan))
        return sum(checked(S.stream_decode(model, gen, steps, sampler, seed=0, tiling=tiling), plan))

    cuda = device.type == "cuda"
    with torch.no_grad():
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            reset = True
        else:
            reset = _reset_hwm()
            before = _rss_bytes()
        t0, c0 = time.perf_counter(), time.process_time()
        out_frames = call()
        if cuda:
            torch.cuda.synchronize()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = (torch.cuda.max_memory_allocated() if cuda else _hwm_bytes()) - before
    dec = model.decoder
    tokens = (H // dec.mid_downsampling) * (W // dec.mid_downsampling)
    slots = {"stream": steps + 1, "tiled": steps + 1, "step": 1}.get(mode, 0) if job == "decode" else 0
    history = slots * 2 * dec.size.depth * tokens * dec.size.width * 4
    kept = T if window is None else min(T, window - 1)  # frames of keys and values held at the end
    clip = 2 * 3 * H * W * 4 if (job, mode) == ("decode", "step") else 0  # x_t per chunk + the output
    result = {"peak_bytes": peak, "before_bytes": before, "hwm_reset": reset, "seconds": seconds, "cpu_seconds": cpu_seconds,
              "out_frames": out_frames, "chunk_plan": plan, "decoder_window": window,
              "history_bytes_per_frame": history, "history_frames": kept, "history_bytes": history * kept,
              "clip_bytes_per_frame": clip,
              "expected_growth_bytes_per_frame": (history if kept == T else 0) + clip}
    if mode == "tiled":
        result["tile"] = spec["tile"]
        result["max_abs_error_vs_one_pass"] = error[0] if reference is not None else None
        result["one_pass_max_abs"] = float(reference.abs().max()) if reference is not None else None
    return result


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


def _run(spec: dict, timeout: float) -> dict:
    try:
        # A fixed glibc mmap threshold: every large tensor is its own mapping, returned to the OS
        # when freed, so the resident set follows live memory (with the default dynamic threshold
        # freed blocks stay in the heap and the high-water mark depends on allocation order).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": f"worker failed (rc {proc.returncode}): {proc.stderr.strip()[-400:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of y on x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny", help="network size for encoder and decoder (ulvideo.nets.SIZES)")
    p.add_argument("--frames", type=int, nargs="+", default=[9, 17, 33, 65, 129])
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16, help="pixel frames per streamed chunk (the first has 1 + chunk)")
    p.add_argument("--tile", type=int, default=32, help="tile core in pixels for the tiled modes (multiple of the "
                   "alignment: 8 for the encoder, lcm(8, mid_downsampling) for the decoder)")
    p.add_argument("--modes", nargs="+", default=None, help="only these modes (full, stream, tiled, step)")
    p.add_argument("--no-error", dest="error", action="store_false",
                   help="tiled modes: skip the one-pass reference and the error check")
    p.add_argument("--steps", type=int, default=4, help="decoder sampler steps")
    p.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    p.add_argument("--jobs", nargs="+", default=["encode", "decode"], choices=list(JOBS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--decoder-window", dest="decoder_window", type=int, default=None, metavar="W",
                   help="decoder.temporal_window: the middle transformer attends the last W frames only "
                   "(default: every earlier frame)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--out", default="", help="also write every line and summary to this JSON file")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        print(json.dumps(_worker(json.loads(args._worker))))
        return

    keys = ("size", "height", "width", "chunk", "tile", "error", "steps", "sampler", "device", "threads",
            "decoder_window")
    config = {k: getattr(args, k) for k in keys}
    peak = ("torch.cuda.max_memory_allocated minus allocated before the call" if args.device == "cuda" else
            "RSS high-water mark (VmHWM reset via /proc/self/clear_refs; else ru_maxrss) minus RSS before the call, "
            "glibc MALLOC_MMAP_THRESHOLD_=131072")
    method = f"fresh subprocess per configuration; {peak}; time = one cold call"
    printed = []

    def emit(line: dict) -> None:
        printed.append(line)
        print(json.dumps(line), flush=True)

    for job in args.jobs:
        for mode in JOBS[job]:
            if args.modes and mode not in args.modes:
                continue
            points = []
            for frames in args.frames:
                spec = {**config, "job": job, "mode": mode, "frames": frames}
                r = _run(spec, args.timeout)
                line = {"what": "memory_vs_frames", "job": job, "mode": mode, "frames": frames, "config": config,
                        "hardware": _hardware(args.device), "memory_method": method}
                if "error" in r:
                    emit({**line, "skipped": True, "reason": r["error"]})
                    continue
                points.append((frames, r))
                emit({**line, "value": r["peak_bytes"], "unit": "bytes", **r,
                      "seconds_per_frame": r["seconds"] / frames})
            # below 1 + chunk frames a streamed clip is one shorter chunk: the slope is taken from there on
            fit = [(f, r) for f, r in points if f >= 1 + args.chunk]
            if len(fit) < 2:
                continue
            fs = [f for f, _ in fit]
            peaks = [r["peak_bytes"] for _, r in fit]
            summary = {"what": "memory_vs_frames_summary", "job": job, "mode": mode, "config": config,
                       "frames": fs, "peak_bytes": peaks, "seconds": [round(r["seconds"], 3) for _, r in fit],
                       "peak_ratio_last_to_first": peaks[-1] / max(1, peaks[0]),
                       "cpu_seconds": [round(r["cpu_seconds"], 3) for _, r in fit],
                       "cpu_seconds_ratio": [round(r["cpu_seconds"] / fit[0][1]["cpu_seconds"], 3) for _, r in fit],
                       "peak_ratio": [round(v / max(1, peaks[0]), 3) for v in peaks],
                       "slope_bytes_per_frame": _slope(fs, peaks)}
            errors = [r["max_abs_error_vs_one_pass"] for _, r in fit if r.get("max_abs_error_vs_one_pass") is not None]
            if errors:
                summary["max_abs_error_vs_one_pass"] = max(errors)
            if mode != "full":
                # the closed-form state's slope over the fitted frames (history_bytes is linear in T
                # without a window, flat with one once T >= W - 1), plus the clip step order holds
                expected = _slope(fs, [r["history_bytes"] for _, r in fit]) + fit[-1][1]["clip_bytes_per_frame"]
                summary["expected_growth_bytes_per_frame"] = expected
                # flat: over the whole range, the growth beyond the expected per-frame state is < 10 % of the first peak
                extra = (summary["slope_bytes_per_frame"] - expected) * (fs[-1] - fs[0])
                summary["flat_beyond_expected"] = extra < 0.1 * peaks[0]
            emit(summary)
    if args.out:
        from pathlib import Path

        out = Path(__file__).resolve().parents[1] / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                                   "lines": printed}, indent=1) + "\n")


if __name__ == "__main__":
    main()
