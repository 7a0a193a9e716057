"""Shared test helpers."""
import _thread
import os
import subprocess
import sys
import threading
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


WATCHDOG_S = 420  # the longest test takes ~45 s alone on two cores; pytest prints the stacks at 400 s


@pytest.fixture(autouse=True)
def _watchdog(request):
    """A test that hangs (a deadlocked worker, a stuck collective) stops the run: pytest prints every
    thread's stack at `faulthandler_timeout`, then the test is interrupted (pytest reports where),
    and a minute later the process exits if even that did not end it -- instead of holding CI until
    its own time limit. Slow tests are exempt."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    timers = [threading.Timer(WATCHDOG_S, _thread.interrupt_main), threading.Timer(WATCHDOG_S + 60, os._exit, (1,))]
    for t in timers:
        t.daemon = True
        t.start()
    try:
        yield
    finally:
        for t in timers:
            t.cancel()
