"""How tight is a stage-1 prior's rate? Its bits against a stage-2 base model's null-condition ELBO on
the same held-out latents.

    ulvideo encode --export runs/tiny/exports/latest.safetensors --data data/shapes --out data/shapes_latents
    ulvideo train configs/ul/tiny_prior.yaml --run-dir runs/tiny_prior       # the prior refined
    ulvideo train configs/base/tiny.yaml --run-dir runs/base_tight \\
        --base.stage1_export=runs/tiny_prior/exports/latest.safetensors --data.path=data/shapes_latents
    python benchmarks/rate_tightness.py --base runs/base_tight/exports/latest.safetensors \\
        --stage1 runs/tiny/exports/latest.safetensors runs/tiny_prior/exports/latest.safetensors \\
        --data data/shapes_latents --out benchmarks/results/rate_tightness.json

The held-out latents, the conditions and the estimator are the base model's own evaluation
(`StageTwo.evaluate`, `ulvideo.eval.reports.tightness_report`): the first `--clips` clips of the
held-out split, K = the stage-1 config's `ul.eval_logsnr_samples` stratified logSNRs with the same
times and noise for every model, the same logSNR range, terminal KL and normalisation. Every
`--stage1` export must encode to the same latents (a stage-1 export and its prior refinements:
the same encoder), which is checked. Prints one JSON line per stage-1 export: its prior's bits per
clip, the base model's null-condition and conditional ELBO, and `null_over_prior` (1 = as tight as
the base model; the paper's Table 5 has them equal).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="a stage-2 export trained on the latents of --data")
    p.add_argument("--stage1", nargs="+", required=True, help="stage-1 exports with one encoder (a model, its refinements)")
    p.add_argument("--data", required=True, help="the latent shards the base model was trained on")
    p.add_argument("--clips", type=int, default=None, help="held-out clips (default: the base config's eval.num_clips)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from ulvideo.config import apply_overrides
    from ulvideo.exports import file_sha256, load_export, load_stage1
    from ulvideo.train.objectives import StageTwo

    weights, base_cfg, _ = load_export(args.base)
    overrides = [f"--data.path={args.data}", f"--base.stage1_export={args.stage1[0]}"]
    if args.clips:
        overrides.append(f"--eval.num_clips={args.clips}")
    cfg = apply_overrides(base_cfg, overrides, "rate_tightness")
    objective = StageTwo(cfg)
    rows, encoder = [], None
    for s1 in args.stage1:
        stage1 = load_stage1(s1)
        enc = {k: v for k, v in stage1.state_dict().items() if k.startswith("encoder.")}
        if encoder is None:
            encoder = enc
        elif enc.keys() != encoder.keys() or not all(torch.equal(enc[k], encoder[k]) for k in enc):
            raise SystemExit(f"rate_tightness: {s1} has another encoder than {args.stage1[0]}: not the same latents")
        objective.hold(stage1)
        out = objective.evaluate(weights, Path("."), 0)
        row = {"stage1_export": s1, "stage1_sha256": file_sha256(Path(s1).with_suffix(".safetensors"))[:16],
               "prior_refine_steps": json.loads(Path(s1).with_suffix(".json").read_text())["meta"].get(
                   "prior_refine_steps", 0), **out}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"what": "rate_tightness", "command": "python benchmarks/rate_tightness.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "base_export": args.base, "data": args.data, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
