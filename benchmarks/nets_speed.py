"""Forward+backward time of each network, and parameter counts of every registry size.

    python benchmarks/nets_speed.py [--size tiny] [--shapes 9x32x32 17x64x64] [--batch 8] [--repeats 3] [--threads N]
    python benchmarks/nets_speed.py --params-only

One JSON line per (network, clip shape): median wall time of forward + backward (sum of outputs)
over `--repeats` runs after one warm-up, fp32 on the current device; then one line per registry
size with the parameter counts (prior; base model with text_dim = 384, 1000 classes and context).
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch

from ulvideo.config import BaseConfig, DecoderConfig, EncoderConfig, PriorConfig
from ulvideo.nets import SIZES, Decoder, Encoder, LatentTransformer


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--shapes", nargs="+", default=["9x32x32", "17x64x64"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--params-only", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hardware = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    torch.manual_seed(0)
    if not args.params_only:
        enc = Encoder(EncoderConfig(size=args.size)).to(device)
        prior = LatentTransformer(PriorConfig(size=args.size), enc.latent_channels).to(device)
        dec = Decoder(DecoderConfig(size=args.size), enc.latent_channels).to(device)
        for shape in args.shapes:
            t, h, w = (int(v) for v in shape.split("x"))
            x = torch.rand(args.batch, 3, t, h, w, device=device) * 2 - 1
            with torch.no_grad():
                z = enc(x)
            logsnr = torch.randn(args.batch, device=device)
            runs = {
                "encoder": lambda: enc(x).sum().backward(),
                "prior": lambda: prior(z, logsnr).sum().backward(),
                "decoder": lambda: dec(x, z, logsnr).sum().backward(),
            }

            def step():  # one stage-1 shaped step: encode once, prior and decoder both on the latent
                zc = enc(x)
                (prior(zc, logsnr).sum() + dec(x, zc, logsnr).sum()).backward()

            runs["encoder+prior+decoder"] = step
            for name, fn in runs.items():
                sec = timed(fn, args.repeats)
                print(json.dumps({"what": "fwd_bwd_time", "network": name, "size": args.size, "clip": shape,
                                  "batch": args.batch, "hardware": hardware,
                                  "load_avg_1min": round(os.getloadavg()[0], 2), "value": round(sec, 4), "unit": "s"}))
    for name in SIZES:
        e = Encoder(EncoderConfig(size=name))
        counts = {
            "encoder": e.num_params(),
            "prior": LatentTransformer(PriorConfig(size=name), 16).num_params(),
            "decoder": Decoder(DecoderConfig(size=name), 16).num_params(),
            "base": LatentTransformer(BaseConfig(size=name, num_classes=1000, context_frames=2), 16,
                                      text_dim=384).num_params(),
        }
        print(json.dumps({"what": "num_params", "size": name, "latent_channels": 16, **counts, "unit": "params"}))


if __name__ == "__main__":
    main()
