"""Training-step time eager vs `train.compile: true`, tiny stage 1 and tiny stage 2, and the compile time.

    python benchmarks/compile.py --threads 1 --steps 8 --repeats 2 --out benchmarks/results/compile.json

One process per repeat and config builds a real `Trainer` (DeepSpeed ZeRO as the config says) per
variant, all in the same process on the same built-in data (32 clips, decoded once into the
loader's cache during the untimed first epoch, `--warmup` steps), then times their steps in turn,
round by round, so that load from other processes on a shared machine falls on every variant
alike. Configs: `configs/ul/tiny.yaml` on 9x32x32 shapes clips (batch 8), and
`configs/base/tiny.yaml` on their latents under a freshly initialised tiny stage-1 export (made
here: stage 2 needs one; the base model's speed does not depend on its weights) with cached MiniLM
text embeddings (batch 32); `stage1_real48` (not run by default) is `configs/ul/real_48.yaml`
(9x48x48 crops, batch 8) on 64x64 shapes clips. Variants:
  eager         train.compile false
  static        train.compile true (static shapes, what the project uses)
  dynamic       train.compile with dynamic=True forced in the worker (one graph for every shape)
Every repeat starts from an empty inductor cache directory; one more process (eager and static)
then reuses the first repeat's: `static_warm_cache`, what a resumed run, or the next run of the
same shapes, pays to compile. Reported per variant: `step_s` (median over the timed steps, median
over repeats), `first_step_s` (for compiled variants it holds tracing and code generation),
`compile_s` = first_step_s - eager's first_step_s of the same process(es), and `speedup` = eager
step_s / variant step_s. Goal: >= 1.5x on the tiny stage-1 step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.5


def build_trainers(spec: dict, run_root: Path) -> dict:
    """A Trainer per variant (eager first; dynamic last, after torch.compile is patched)."""
    import torch

    from ulvideo.config import load_config
    from ulvideo.train.loop import Trainer

    trainers = {}
    for v in spec["variants"]:
        if v == "dynamic":  # the benchmark's only way in: force dynamic shapes on every later compile
            compile_ = torch.compile
            torch.compile = lambda fn, _c=compile_, **kw: _c(fn, **{**kw, "dynamic": True})
        cfg = load_config(spec["config"], spec["overrides"] + [f"--train.compile={v != 'eager'}"])
        trainers[v] = Trainer(cfg, run_root / v)
    return trainers


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as run_root:
        trainers = build_trainers(spec, Path(run_root))
        out = {v: {"warmup_s": []} for v in trainers}
        for v, trainer in list(trainers.items()):  # compilation happens in the first step
            try:
                for _ in range(spec["warmup"]):
                    t0 = time.perf_counter()
                    trainer.train_step()
                    out[v]["warmup_s"].append(time.perf_counter() - t0)
            except Exception as e:  # a variant that does not compile is reported, the others still run
                out[v] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"}
                del trainers[v]
        times = {v: [] for v in trainers}
        for _ in range(spec["steps"]):
            for v, trainer in trainers.items():
                t0 = time.perf_counter()
                trainer.train_step()
                times[v].append(time.perf_counter() - t0)
    for v in trainers:
        out[v].update(first_step_s=out[v]["warmup_s"][0], step_s=statistics.median(times[v]), steps_s=times[v])
    return out


def _run(spec: dict, cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(spec["threads"]), TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        return {"error": (r.stdout + r.stderr)[-3000:]}
    return json.loads(lines[-1][len("RESULT "):])


def prepare_runs(tmp: Path) -> dict[str, tuple[str, list[str]]]:
    """Data, a tiny stage-1 export and its latent shards; the (config, overrides) of both benchmarks."""
    import torch

    from ulvideo.config import load_config
    from ulvideo.exports import save_export
    from ulvideo.ul import UnifiedLatents

    py = [sys.executable, "-m", "ulvideo"]
    data, latents = tmp / "shapes", tmp / "latents"
    subprocess.run([*py, "data", "synth", "--out", str(data), "--num", "32", "--seed", "0"], cwd=ROOT, check=True,
                   capture_output=True)
    data64 = tmp / "shapes64"  # the real-footage recipe's clip shape (its speed does not depend on content)
    subprocess.run([*py, "data", "synth", "--out", str(data64), "--num", "32", "--seed", "0", "--size", "64"], cwd=ROOT,
                   check=True, capture_output=True)
    s1 = load_config(ROOT / "configs/ul/tiny.yaml", [f"--data.path={data}"])
    torch.manual_seed(0)
    export = save_export(tmp / "stage1", UnifiedLatents(s1).state_dict(), s1, {"stage": "ul", "step": 0})
    subprocess.run([*py, "encode", "--export", str(export), "--data", str(data), "--out", str(latents),
                    "--text-encoder", "minilm"], cwd=ROOT, check=True, capture_output=True)
    quiet = ["--eval.every=0", "--train.log_every=1000000", "--train.ckpt_every=1000000", "--data.heldout_fraction=0.0"]
    return {"stage1_tiny": ("configs/ul/tiny.yaml", [f"--data.path={data}", "--data.num_workers=0", *quiet]),
            "base_tiny": ("configs/base/tiny.yaml", [f"--data.path={latents}", f"--base.stage1_export={export}", *quiet]),
            "stage1_real48": ("configs/ul/real_48.yaml", [f"--data.path={data64}", "--data.num_workers=0", *quiet])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    p.add_argument("--steps", type=int, default=6, help="timed steps after the warm-up")
    p.add_argument("--warmup", type=int, default=4, help="untimed steps (one epoch of the 32 clips at batch 8)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--variants", default="eager,static,dynamic")
    p.add_argument("--configs", default="stage1_tiny,base_tiny")
    p.add_argument("--out", default=None, help="also write the result JSON here")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._worker:
        print("RESULT " + json.dumps(worker(json.loads(args._worker))), flush=True)
        return
    variants = args.variants.split(",")
    result = {"what": "compile_speedup", "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(),
              "python": platform.python_version(), "loadavg_1m_start": os.getloadavg()[0]},
              "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "goal_speedup": GOAL, "command": " ".join(["python", "benchmarks/compile.py", *sys.argv[1:]]),
              "configs": {}}
    import torch

    result["hardware"]["torch"] = torch.__version__
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        setups = prepare_runs(tmp)
        for name in args.configs.split(","):
            config, overrides = setups[name]
            reps, first_cache = [], None
            for rep in range(args.repeats):
                cache = tempfile.mkdtemp(dir=tmp, prefix=f"inductor-{name}-{rep}-")  # empty: a cold compile
                first_cache = first_cache or cache
                spec = {"config": config, "overrides": overrides, "variants": variants, "threads": args.threads,
                        "steps": args.steps, "warmup": args.warmup}
                r = _run(spec, cache)
                print(json.dumps({"config": name, "repeat": rep, **r})[-1500:], flush=True)
                if "error" not in r:
                    reps.append(r)
            out = {"config": config, "overrides": overrides}
            if not reps:
                out["error"] = r["error"]
            for v in variants if reps else []:
                if any("error" in r[v] for r in reps):
                    out[v] = {"error": next(r[v]["error"] for r in reps if "error" in r[v])}
                    continue
                step = statistics.median(r[v]["step_s"] for r in reps)
                first = statistics.median(r[v]["first_step_s"] for r in reps)
                row = {"step_s": step, "first_step_s": first, "runs": [r[v] for r in reps]}
                if v != "eager" and "eager" in variants:
                    row["speedup"] = statistics.median(r["eager"]["step_s"] for r in reps) / step
                    row["compile_s"] = first - statistics.median(r["eager"]["first_step_s"] for r in reps)
                out[v] = row
            if reps and "static" in variants and "eager" in variants:
                r = _run({**spec, "variants": ["eager", "static"]}, first_cache)
                print(json.dumps({"config": name, "warm_cache": True, **r})[-1500:], flush=True)
                if "error" not in r:
                    out["static_warm_cache"] = {"step_s": r["static"]["step_s"], "first_step_s": r["static"]["first_step_s"],
                                                "speedup": r["eager"]["step_s"] / r["static"]["step_s"],
                                                "compile_s": r["static"]["first_step_s"] - r["eager"]["first_step_s"],
                                                "runs": [r["static"], r["eager"]]}
            if "speedup" in out.get("static", {}):
                out["goal_met"] = out["static"]["speedup"] >= GOAL
            result["configs"][name] = out
    result["hardware"]["loadavg_1m_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
