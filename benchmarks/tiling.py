"""Tiled vs untiled encode and decoder evaluation: time and peak memory vs frame size.

    python benchmarks/tiling.py                                  # 17 x 512 x 512, 256 px tile cores
    python benchmarks/tiling.py --sizes 128 256 384 --tile 128   # memory vs frame size
    python benchmarks/tiling.py --config "" --set --encoder.size=S --decoder.size=S   # other networks

Networks: `--config` (default configs/ul/tiny.yaml, the tiny stage-1 networks that are trained;
"" = the registry defaults) plus `--set` overrides, random weights (zero-initialised layers and
norm scales randomised, so that every path carries signal). Jobs, each (job, mode, size) in a
fresh subprocess:
  encode   model.encoder on a smooth moving clip (B = 1, `--frames` frames);
  decoder  one evaluation of the diffusion decoder network (x_t and z0 per-frame noise, logSNR 0),
with mode `untiled` (the one-pass network) or `tiled` (streaming.encode / streaming.tiled_denoise
with `Tiling(--tile)`). A first call counts FLOPs (torch.utils.flop_counter: convolutions, matmuls,
attention); then time = the CPU time of the single-threaded worker (`time.process_time`), the
minimum over `--repeats` calls: on a shared machine far less disturbed by other load than the wall
time, reported beside it (`wall_seconds`).
Peak memory: the resident set's high-water mark over the timed calls (reset via /proc/self/clear_refs
just before) minus the RSS before them, glibc MALLOC_MMAP_THRESHOLD_=131072 so that freed
tensors leave the resident set. The untiled run saves its output; the tiled one reports its
largest difference from it (tiling is exact, so this is fp32 round-off).

Summary per (job, size): `time_ratio` tiled / untiled; for the decoder also `conv_time_ratio`,
the same without the middle transformer (timed inside both runs), which runs once on the whole
token grid in both modes and would otherwise dilute the ratio; `peak_ratio`; the halo's
geometric overhead `((tile + 2 halo) / tile)^2` (the decoder's output halo) and `area_ratio`,
the pixels the tiles actually run on over the frame's (edges clipped; the decoder's down path
runs twice, once with its narrower halo). Goals (tiled encode and decoder conv stages):
time <= 1.2 x the geometric overhead and <= 1.5 x untiled; peak memory that of one tile.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _rss import peak_rss_bytes, reset_peak_rss, rss_bytes

ROOT = Path(__file__).resolve().parents[1]


def _model(spec: dict):
    import torch

    from ulvideo.config import load_config
    from ulvideo.ul import UnifiedLatents

    torch.manual_seed(0)
    cfg = load_config(ROOT / spec["config"] if spec["config"] else None, spec["set"])
    model = UnifiedLatents(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("weight") and p.ndim == 1 and bool((p == 1).all()):  # norm scales
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


def _clip(torch, t: int, h: int, w: int):
    """A smooth moving pattern in [-1, 1], (1, 3, t, h, w)."""
    f = torch.arange(t, dtype=torch.float32).view(t, 1, 1)
    y = torch.linspace(0, 6.28, h).view(1, h, 1)
    x = torch.linspace(0, 6.28, w).view(1, 1, w)
    chans = [torch.sin(x + 0.2 * f) * torch.cos(y), torch.sin(2 * y - 0.1 * f), torch.cos(x + y + 0.3 * f)]
    return torch.stack([c.expand(t, h, w) for c in chans]).unsqueeze(0)


def _worker(spec: dict) -> dict:
    import torch

    from ulvideo import streaming as S

    torch.set_num_threads(spec["threads"])
    model = _model(spec)
    T, n, tiled = spec["frames"], spec["size"], spec["mode"] == "tiled"
    tiling = S.Tiling(spec["tile"])
    enc, dec = model.encoder, model.decoder
    info, middle = {}, [0.0]
    if spec["job"] == "encode":
        x = _clip(torch, T, n, n)
        halo = S.encoder_halo(enc)
        layout = S.tile_layout(n, n, spec["tile"], halo, enc.spatial_downsample)
        areas = [sum((t.y1 - t.y0) * (t.x1 - t.x0) for t in layout)]
        info["halo"] = halo

        def call():
            return S.encode(model, x, None, tiling=tiling) if tiled else enc(x)
    else:
        s = dec.spatial_downsample
        z0 = S.clip_noise(7, 99, 0, 0, (1, dec.latent_channels, 1 + (T - 1) // 4, n // s, n // s))
        x_t = S.clip_noise(7, 98, 0, 0, (1, 3, T, n, n))
        lam = torch.zeros(1)
        down, halo = S.decoder_halos(dec)
        layout = S.decoder_layout(dec, n, n, tiling, (down, halo))
        areas = [sum((t.y1 - t.y0) * (t.x1 - t.x0) for t in lay) for lay in (layout.down, layout.full)]
        info.update(halo=halo, down_halo=down)
        run_middle = dec.middle

        def timed_middle(*a, **k):  # the middle transformer's share, the same work in both modes
            t0 = time.process_time()
            out = run_middle(*a, **k)
            middle[0] += time.process_time() - t0
            return out

        dec.middle = timed_middle
        denoise = S.tiled_denoise(model, z0, tiling)

        def call():
            return denoise(x_t, lam) if tiled else dec(x_t, z0, lam)

    from torch.utils.flop_counter import FlopCounterMode

    seconds, wall, middles = [], [], []
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:  # the first call counts FLOPs, untimed and unmeasured
            out = call()
        del out
        reset = reset_peak_rss()
        before = rss_bytes()
        for _ in range(spec["repeats"]):
            middle[0] = 0.0
            t0, w0 = time.process_time(), time.perf_counter()
            out = call()
            seconds.append(time.process_time() - t0)
            wall.append(time.perf_counter() - w0)
            middles.append(middle[0])
        peak = peak_rss_bytes() - before
    best = min(range(len(seconds)), key=seconds.__getitem__)
    result = {"seconds": seconds[best], "seconds_all": seconds, "wall_seconds": wall[best], "peak_bytes": peak,
              "before_bytes": before, "flops": counter.get_total_flops(),
              "hwm_reset": reset, "area_ratio": [a / (n * n) for a in areas], **info}
    if spec["job"] == "decoder":
        result["middle_seconds"] = middles[best]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            dec.middle(torch.zeros(1, dec.size.channels[-1], T, n // dec.mid_downsampling, n // dec.mid_downsampling),
                       dec.embed(lam, x_t))
        result["middle_flops"] = counter.get_total_flops()
    ref = Path(spec["ref"])
    if not tiled:
        torch.save(out, ref)
    elif ref.is_file():
        full = torch.load(ref, weights_only=True)
        result["max_abs_error_vs_untiled"] = float((out - full).abs().max())
        result["untiled_max_abs"] = float(full.abs().max())
    return result


def _run(spec: dict, timeout: float) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": str(spec["threads"])}
    try:
        proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": f"worker failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/ul/tiny.yaml", help='networks of this config ("" = registry defaults)')
    p.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. --set --decoder.size=S")
    p.add_argument("--sizes", type=int, nargs="+", default=[512], help="square frame sizes (pixels)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--tile", type=int, default=256, help="tile core (pixels)")
    p.add_argument("--jobs", nargs="+", default=["encode", "decoder"], choices=["encode", "decoder"])
    p.add_argument("--repeats", type=int, default=2, help="timed calls (after one that counts FLOPs)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    p.add_argument("--timeout", type=float, default=580, help="seconds per configuration")
    p.add_argument("--out", default="", help="also write the lines and summaries to this JSON file")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        print(json.dumps(_worker(json.loads(args._worker))))
        return

    config = {"config": args.config, "set": args.set, "frames": args.frames, "tile": args.tile,
              "repeats": args.repeats, "threads": args.threads}
    hardware = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                "torch_threads": args.threads, "python": platform.python_version()}
    method = ("fresh subprocess per (job, mode, size); seconds = CPU time (process_time, 1 thread), min over "
              "repeats; peak = VmHWM (reset via /proc/self/clear_refs) minus RSS before the calls, "
              "MALLOC_MMAP_THRESHOLD_=131072")
    lines, summaries = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for job in args.jobs:
                got = {}
                for mode in ("untiled", "tiled"):
                    spec = {**config, "job": job, "mode": mode, "size": size, "ref": f"{tmp}/{job}_{size}.pt"}
                    load = os.getloadavg()[0]
                    r = _run(spec, args.timeout)
                    line = {"what": "tiling", "job": job, "mode": mode, "size": size, "config": config,
                            "hardware": hardware, "load_avg_1min": round(load, 2), "method": method, **r}
                    print(json.dumps(line), flush=True)
                    lines.append(line)
                    got[mode] = r
                if any("error" in r for r in got.values()):
                    continue
                u, t = got["untiled"], got["tiled"]
                geometric = ((args.tile + 2 * t["halo"]) / args.tile) ** 2
                summary = {"what": "tiling_summary", "job": job, "size": size, "frames": args.frames,
                           "tile": args.tile, "halo": t["halo"], "geometric_overhead": round(geometric, 4),
                           "area_ratio": [round(a, 4) for a in t["area_ratio"]],
                           "untiled_seconds": round(u["seconds"], 3), "tiled_seconds": round(t["seconds"], 3),
                           "time_ratio": round(t["seconds"] / u["seconds"], 4),
                           "wall_time_ratio": round(t["wall_seconds"] / u["wall_seconds"], 4),
                           "flop_ratio": round(t["flops"] / u["flops"], 4),
                           "untiled_peak_bytes": u["peak_bytes"], "tiled_peak_bytes": t["peak_bytes"],
                           "peak_ratio": round(t["peak_bytes"] / max(1, u["peak_bytes"]), 4),
                           "max_abs_error_vs_untiled": t.get("max_abs_error_vs_untiled"),
                           "untiled_max_abs": t.get("untiled_max_abs")}
                ratio = summary["time_ratio"]
                if job == "decoder":
                    conv = (t["seconds"] - t["middle_seconds"]) / (u["seconds"] - u["middle_seconds"])
                    summary.update(down_halo=t["down_halo"], middle_seconds=[round(u["middle_seconds"], 3),
                                                                            round(t["middle_seconds"], 3)],
                                   conv_time_ratio=round(conv, 4), middle_flops=t["middle_flops"],
                                   conv_flop_ratio=round((t["flops"] - t["middle_flops"]) / (u["flops"] - u["middle_flops"]), 4))
                    ratio = conv
                summary["goal"] = {"time_ratio_max": 1.5, "geometric_factor_max": 1.2}
                summary["goal_met"] = ratio <= 1.5 and ratio <= 1.2 * geometric
                print(json.dumps(summary), flush=True)
                summaries.append(summary)
    if args.out:
        result = {"what": "tiling", "config": config, "hardware": hardware, "method": method,
                  "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                  "summaries": summaries, "runs": lines}
        out = ROOT / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
