"""Peak memory and time of one stage-1 training step (forward + backward) with and without
activation checkpointing, each measured in a fresh process.

    python benchmarks/activation_checkpointing.py [--frames 17 --size 64 --batch 8]

Peak memory: the growth of the resident set's high-water mark (reset through
/proc/self/clear_refs) during the first step, after the model and batch exist (it includes the CPU
convolution's workspaces and allocator slack), and the bytes of activations the autograd graph
saves for the backward (with checkpointing: only the blocks' inputs, each block's activations are
recomputed one block at a time). Goal: checkpointing cuts the peak by >= 40% at the tiny size.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _rss import peak_rss_bytes, reset_peak_rss


def worker(spec: dict) -> dict:
    import torch

    from ulvideo.train.apply import apply_activation_checkpointing
    from ulvideo.config import load_config
    from ulvideo.ul import UnifiedLatents

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = load_config(spec["config"], [f"--data.num_frames={spec['frames']}", f"--data.height={spec['size']}",
                                       f"--data.width={spec['size']}"])
    model = UnifiedLatents(cfg)
    wrapped = apply_activation_checkpointing(model) if spec["checkpointing"] else 0
    x = torch.rand(spec["batch"], 3, spec["frames"], spec["size"], spec["size"]) * 2 - 1
    # no warm-up step: memory freed by a warm-up stays resident (allocator caches) and would hide the
    # activations; gradients are allocated alike in both cases
    reset_peak_rss()  # the high-water mark restarts from the current resident set
    base = peak_rss_bytes()
    t0 = time.perf_counter()
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        # activations the autograd graph keeps for the backward (each storage counted once);
        # parameters are excluded: they are resident either way
        if not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.loss(x, torch.Generator().manual_seed(1)).total.mean()
    loss.backward()
    dt = time.perf_counter() - t0
    return {"checkpointing": spec["checkpointing"], "blocks_wrapped": wrapped,
            "saved_activations_mb": round(sum(saved.values()) / 2**20, 1),
            "peak_step_mb": round((peak_rss_bytes() - base) / 2**20, 1), "step_s": round(dt, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/ul/tiny.yaml")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))))
        return
    rows = []
    for ckpt in (False, True):
        spec = {"config": args.config, "frames": args.frames, "size": args.size, "batch": args.batch,
                "threads": args.threads, "checkpointing": ckpt}
        out = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row.update({"what": "activation_checkpointing", "config": args.config, "clip": [args.frames, args.size, args.size],
                    "batch": args.batch, "device": "cpu", "memory_method": "VmHWM growth during one fwd+bwd, fresh process"})
        rows.append(row)
        print(json.dumps(row), flush=True)
    cut = 1 - rows[1]["peak_step_mb"] / rows[0]["peak_step_mb"]
    saved_cut = 1 - rows[1]["saved_activations_mb"] / rows[0]["saved_activations_mb"]
    print(json.dumps({"what": "activation_checkpointing_summary", "peak_reduction": round(cut, 3),
                      "saved_activations_reduction": round(saved_cut, 3),
                      "time_ratio": round(rows[1]["step_s"] / rows[0]["step_s"], 3), "goal_peak_reduction": 0.4,
                      "goal_met": cut >= 0.4}))


if __name__ == "__main__":
    main()
