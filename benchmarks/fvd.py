"""FVD feature extraction: clips per second and peak memory, per preset preprocessing and batch size.

    python benchmarks/fvd.py                       # CPU, batch 1 and 4, 2 timed batches each
    python benchmarks/fvd.py --device cuda --batch 8 32 --repeats 5

Prints JSON lines (what, config, hardware, value, unit): clips/s and peak bytes for each
(preset, batch), plus the share of the time spent in preprocessing (the preset's resize to its resolution, then to 224).

Method. Each (preset, batch) runs in a fresh subprocess. The network is the I3D with random
weights in the i3d_pretrained_400 layout (the compute is the same for the TorchScript port);
inputs are random uint8 clips of the preset's length at its resolution, so resizing costs what it
costs on real data. One untimed call warms the kernels up; the clips/s is the total over
`--repeats` timed calls. Peak memory: on CPU the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs just before the timed calls; `hwm_reset` says whether that worked), on CUDA
torch.cuda.max_memory_allocated. Both include the model's weights and the input batch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from _rss import peak_rss_bytes as _hwm_bytes, reset_peak_rss as _reset_hwm


def measure(preset: str, batch: int, repeats: int, device: str) -> dict:
    import torch

    from ulvideo.eval import fvd
    from ulvideo.eval.i3d import InceptionI3d

    p = fvd.get_preset(preset)
    net = InceptionI3d().to(device).eval()
    ext = fvd.FeatureExtractor(p, net, {"kind": "random"}, device=device, batch_size=batch)
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (batch, p.num_frames, p.resolution, p.resolution, 3), generator=g,
                          dtype=torch.uint8)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ext(clips)  # warm-up
    sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        reset = True
    else:
        reset = _reset_hwm()
    t0 = time.perf_counter()
    for _ in range(repeats):
        ext(clips)
    sync()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _hwm_bytes()
    t1 = time.perf_counter()
    for _ in range(repeats):
        fvd.i3d_input(torch.stack([fvd.prepare_video(c, p) for c in clips]).to(device), p)
    sync()
    pre = time.perf_counter() - t1
    return {"clips_per_s": batch * repeats / elapsed, "peak_bytes": peak, "hwm_reset": reset,
            "preprocess_share": pre / elapsed, "threads": torch.get_num_threads(), "torch": torch.__version__}


def hardware(device: str) -> dict:
    hw = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "device": device}
    if device.startswith("cuda"):
        import torch

        hw["gpu"] = torch.cuda.get_device_name()
    return hw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tats-fvd2048-16f", "cdfvd-i3d-16f-128px", "k600-5to11"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", nargs=2, metavar=("PRESET", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.repeats, args.device)))
        return
    hw = hardware(args.device)
    for preset in args.presets:
        for b in args.batch:
            cmd = [sys.executable, __file__, "--child", preset, str(b), "--repeats", str(args.repeats),
                   "--device", args.device]
            run = subprocess.run(cmd, capture_output=True, text=True)
            config = {"preset": preset, "batch": b, "repeats": args.repeats, "weights": "random (i3d_pretrained_400 layout)"}
            if run.returncode != 0:
                print(json.dumps({"what": "fvd_features", "config": config, "hardware": hw,
                                  "skipped": run.stderr.strip().splitlines()[-1:]}))
                continue
            r = json.loads(run.stdout.strip().splitlines()[-1])
            config |= {"threads": r["threads"], "torch": r["torch"]}
            print(json.dumps({"what": "fvd_features_speed", "config": config, "hardware": hw,
                              "value": round(r["clips_per_s"], 4), "unit": "clips/s",
                              "preprocess_share": round(r["preprocess_share"], 4)}))
            print(json.dumps({"what": "fvd_features_peak_memory", "config": config, "hardware": hw,
                              "value": r["peak_bytes"], "unit": "bytes", "hwm_reset": r["hwm_reset"]}))


if __name__ == "__main__":
    main()
