"""Fault tolerance: non-finite steps are skipped whole, K in a row abort, the EMA never absorbs
non-finite weights, a checkpoint interrupted at any point leaves the previous complete one in
place (also with a real SIGKILL), and SIGTERM saves and exits cleanly. The references are the
checkpoint before the fault and a run resumed from it without faults."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import test_resume as R
from ulvideo.train import checkpoint as ckpt

# Runs `ulvideo` with StageOne.forward wrapped to inject faults, planned per step in $ULV_FAULTS:
# {"<step index or *>": ["loss" | "grad", micro index]}. "loss" makes the loss NaN with a finite
# gradient (only the loss check catches it); "grad" keeps the loss finite with a NaN gradient.
INJECT = r"""
import json, os, sys, torch
import ulvideo.train.objectives as O
plan = json.loads(os.environ["ULV_FAULTS"])
seen = {}
class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()
    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))
original = O.StageOne.forward
def forward(self, batch, generator, step):
    micro = seen[step] = seen.get(step, -1) + 1
    loss, logs = original(self, batch, generator, step)
    kind, where = plan.get(str(step), plan.get("*", (None, None)))
    if where == micro:
        loss = loss + float("nan") if kind == "loss" else NanGrad.apply(loss)
    return loss, logs
O.StageOne.forward = forward
from ulvideo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_with_faults(run_dir, data, faults: dict, *overrides, check=True):
    cmd = R.train_cmd(run_dir, data, *overrides)
    cmd[1:3] = ["-c", INJECT]  # python -c INJECT train ... instead of python -m ulvideo train ...
    r = subprocess.run(cmd, cwd=R.ROOT, env=R.clean_env(ULV_FAULTS=json.dumps(faults)), capture_output=True,
                       text=True, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"train failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}")
    return r


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return R.synth(tmp_path_factory.mktemp("faults") / "shapes")


def tag_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / ckpt.tag_for(step)


def copy_checkpoint(src_run: Path, step: int, dst_run: Path) -> None:
    (dst_run / "checkpoints").mkdir(parents=True)
    shutil.copytree(tag_dir(src_run, step), tag_dir(dst_run, step))
    (dst_run / "checkpoints" / "latest").write_text(ckpt.tag_for(step) + "\n")


# ---- the EMA and the checkpoint protocol, in process ---------------------------------------


def test_ema_never_absorbs_non_finite_weights():
    from ulvideo.train.loop import EMA

    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.5)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    assert ema.update() is False
    assert all(torch.equal(v, start[k]) for k, v in ema.state_dict().items())
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.fill_(-1.0)
    assert ema.update() is True  # 0.5 * old + 0.5 * new
    assert torch.allclose(ema.state_dict()["weight"], 0.5 * start["weight"] + 0.5, atol=1e-7)
    assert torch.allclose(ema.state_dict()["bias"], 0.5 * start["bias"] - 0.5, atol=1e-7)


def test_ema_warmup_decay_follows_the_closed_form():
    """Warm-up: step k uses min(decay, (1 + k) / (10 + k)); after n steps of constant weights w
    the EMA is prod(d_k) w_0 + (1 - prod(d_k)) w."""
    from ulvideo.train.loop import EMA

    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.99, warmup=True)
    w0 = ema.state_dict()["weight"].clone()
    with torch.no_grad():
        net.weight.fill_(2.0)
    for k in range(1, 6):
        assert ema.update(k)
    keep = 1.0
    for k in range(1, 6):
        keep *= min(0.99, (1 + k) / (10 + k))
    assert torch.allclose(ema.state_dict()["weight"], keep * w0 + (1 - keep) * 2.0, atol=1e-6)
    assert EMA(net, decay=0.99, warmup=True).decay_at(10_000) == 0.99  # capped at the configured decay
    assert EMA(net, decay=0.99).decay_at(1) == 0.99  # no warm-up: constant


def _fake_save(ckpt_dir: Path, step: int, keep_last: int = 3) -> None:
    tmp = ckpt_dir / ckpt.begin_save(ckpt_dir, step)
    (tmp / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    ckpt.finish_save(ckpt_dir, step, {"w": torch.full((2,), float(step))}, {"step": step}, keep_last)


def test_checkpoint_completes_atomically_and_rotates(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _fake_save(d, step, keep_last=2)
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    # crash after DeepSpeed wrote its files: a .tmp dir, never picked up
    tmp = d / ckpt.begin_save(d, 5)
    (tmp / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"partial")
    assert ckpt.latest_tag(d) == "step_00000004"

    # crash after the rename, before `latest` moved: the pointer still names the previous one
    def crash(point):
        if point == "renamed":
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ckpt, "fault_pause", crash)
    with pytest.raises(KeyboardInterrupt):
        _fake_save(d, 5, keep_last=2)
    assert (d / "latest").read_text().strip() == "step_00000004" == ckpt.latest_tag(d)
    monkeypatch.undo()
    _fake_save(d, 5, keep_last=2)  # the retry replaces the orphan, then rotates and cleans up
    assert sorted(p.name for p in d.iterdir()) == ["latest", "step_00000004", "step_00000005"]
    assert ckpt.read_ema(d, "step_00000005")["w"].tolist() == [5.0, 5.0]
    # `latest` naming a removed checkpoint: fall back to the newest complete one
    (d / "latest").write_text("step_00000009\n")
    assert ckpt.latest_tag(d) == "step_00000005"


# ---- real processes -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (2, "fp32"), (3, "fp32"), (3, "bf16")])
def test_non_finite_steps_are_skipped_whole(zero, precision, data, tmp_path):
    run, ref = tmp_path / "faulty", tmp_path / "ref"
    common = [f"--train.zero_stage={zero}", f"--train.precision={precision}", "--train.ckpt_every=1",
              "--train.keep_last=10", "--train.ema_decay=0.5"]
    # step index 1: NaN loss in the first micro-batch (the second one is fine and must not be applied);
    # step index 2: NaN gradient, finite loss, in the last micro-batch (the first one's gradient must be dropped)
    r = train_with_faults(run, data, {"1": ["loss", 0], "2": ["grad", 1]}, "--train.steps=4", *common)
    assert r.stderr.count("step skipped") == 2
    rows = {x["step"]: x for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert [rows[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 0] and rows[4]["skipped_steps_total"] == 2
    assert "loss" in rows[1] and "loss" not in rows[2] and "loss" not in rows[3]
    # weights, optimizer moments, LR schedule and EMA after the skipped steps = after step 1
    counters = {"global_steps", "global_samples", "skipped_steps", "overflow"}
    R.assert_same_training_state(tag_dir(run, 1), tag_dir(run, 2), ignore=counters)
    R.assert_same_training_state(tag_dir(run, 1), tag_dir(run, 3), ignore=counters)
    states = [R.state_json(tag_dir(run, s)) for s in (1, 2, 3)]
    assert [s["nonfinite_total"] for s in states] == [0, 1, 2]
    assert [s["data"]["batch"] for s in states] == [2, 4, 6]  # a skipped step still consumes its batches
    # no gradient of the skipped steps leaks into step 4: same as resuming from step 3 without faults
    copy_checkpoint(run, 3, ref)
    R.train(ref, data, "--train.steps=4", *common)
    R.assert_same_training_state(tag_dir(run, 4), tag_dir(ref, 4), ignore=counters)


@pytest.mark.slow
def test_consecutive_non_finite_steps_abort_with_a_clear_message(data, tmp_path):
    r = train_with_faults(tmp_path / "r", data, {"*": ["grad", 0]}, "--train.steps=6", "--train.max_nonfinite_skips=3",
                          check=False)
    assert r.returncode == 3, r.stderr[-3000:]
    assert "3 steps in a row (train.max_nonfinite_skips)" in r.stdout and "up to step 3" in r.stdout


def _popen(run, data, *overrides, pause=None):
    env = R.clean_env(**({"ULVIDEO_FAULT_SAVE_PAUSE": pause} if pause else {}))
    return subprocess.Popen(R.train_cmd(run, data, *overrides), cwd=R.ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_line(proc, text: str, limit_s: float = 600) -> str:
    seen, end = [], time.monotonic() + limit_s
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {text!r}:\n{''.join(seen)[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["written", "renamed"])
def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(point, data, tmp_path):
    run = tmp_path / "r"
    common = ["--train.ckpt_every=2", "--train.keep_last=3"]
    R.train(run, data, "--train.steps=2", *common)
    proc = _popen(run, data, "--train.steps=4", *common, pause=f"{point}:300")
    _wait_for_line(proc, f"pausing 300 s at '{point}'")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    d = run / "checkpoints"
    assert (d / "latest").read_text().strip() == "step_00000002" == ckpt.latest_tag(d)
    if point == "written":
        assert list((d / ".tmp-step_00000004").glob("*.pt")) and not (d / "step_00000004").exists()
    again = R.train(run, data, "--train.steps=4", *common)
    assert "resumed from" in again.stderr and "step_00000002 (step 2)" in again.stderr
    assert (d / "latest").read_text().strip() == "step_00000004"
    assert not list(d.glob(".tmp-*"))
    assert R.state_json(d / "step_00000004")["step"] == 4


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(data, tmp_path):
    """The stop is checked at log steps only (every 3rd here): the run stops at the first log step
    after the signal, saves there and exits with status 0."""
    run = tmp_path / "r"
    proc = _popen(run, data, "--train.steps=1000", "--train.ckpt_every=1000", "--train.log_every=3")
    metrics = run / "metrics.jsonl"
    end = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.monotonic() < end:
        time.sleep(0.2)
    seen = json.loads(metrics.read_text().splitlines()[-1])["step"]
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped (SIGTERM)" in out
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert last % 3 == 0 and seen <= last <= seen + 6  # the first log step after the signal
    d = run / "checkpoints"
    assert ckpt.latest_tag(d) == ckpt.tag_for(last) and R.state_json(d / ckpt.tag_for(last))["step"] == last
    again = R.train(run, data, f"--train.steps={last + 1}", "--train.ckpt_every=1000")
    assert f"(step {last})" in again.stderr and f"done: step {last + 1}" in again.stdout
