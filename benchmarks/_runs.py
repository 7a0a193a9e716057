"""Helpers the benchmarks share for run directories and command lines."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def parse_with_overrides(p: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[str]]:
    """The parser's arguments, plus every extra `--a.b=v` config override; anything else is an error."""
    args, extra = p.parse_known_args()
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if bad:
        p.error(f"unrecognized arguments: {' '.join(bad)} (config overrides are --a.b=v)")
    return args, extra


def logged_step_seconds(run: str | Path) -> float:
    """Seconds a run spent in training steps, from the throughput each log line of its
    metrics.jsonl records over the steps since the line before. Counts every call of a resumed
    run, so a run trained by an earlier call still shows its cost."""
    from ulvideo.config import load_config

    run = Path(run)
    batch = load_config(run / "config.yaml").train.global_batch_size
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds, prev = 0.0, 0
    for r in rows:
        if r.get("clips_per_s", 0) > 0:
            seconds += max(0, r["step"] - prev) * batch / r["clips_per_s"]
            prev = r["step"]
    return seconds
