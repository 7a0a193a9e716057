"""Shared test helpers."""
import faulthandler
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_ulvideo(*args, check: bool = True, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m ulvideo ARGS` from the repository root, as a fresh single process."""
    full = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    full.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    r = subprocess.run([sys.executable, "-m", "ulvideo", *map(str, args)], cwd=ROOT, env=full,
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"ulvideo {' '.join(map(str, args))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


WATCHDOG_S = 420  # the longest test takes ~45 s alone on two cores; a hang ends the run with every thread's stack


@pytest.fixture(autouse=True)
def _watchdog(request):
    """A test that hangs (a deadlocked worker, a stuck collective) ends the run with every thread's
    stack printed, instead of holding CI until its own time limit. Slow tests are exempt."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
