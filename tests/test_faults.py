"""Fault tolerance of the steps: an update that is non-finite or overflows is never applied (the
update check, against torch's AdamW; a learning rate of 1e30 and NaN gradients in real runs), K in a
row stop the run naming a checkpoint with the pre-blow-up weights; the EMA's warm-up; a checkpoint
interrupted at any point leaves the previous complete one in place (also with a real SIGKILL), and
SIGTERM saves and exits cleanly. References: torch.optim.AdamW, the checkpoint before the fault, a
run resumed from it without faults. (Checkpoint files, exports, the lock and a full disk:
test_rundir.py.)"""
import copy
import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_resume as R
from ulvideo.train import checkpoint as ckpt
from ulvideo.train import guard

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
                       text=True, timeout=300)
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


def _adamw(params, lr=1e-2, wd=0.1):
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)


def _snapshot(opt) -> list:
    state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in opt.param_groups[0]["params"]]
    return [p.detach().clone() for p in opt.param_groups[0]["params"]], state


def _same(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    return all(torch.equal(x, y) for x, y in zip(pa, pb)) and len(sa) == len(sb) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(sa, sb))


def test_update_check_predicts_torch_adamw(monkeypatch):
    """Over three steps (bias correction, weight decay, moments from earlier steps) the largest new
    |w| the check predicts is the one torch.optim.AdamW then produces: with BOUND just below it the
    step is refused and reports that size, with BOUND just above it the step is applied, bitwise as
    an unchecked AdamW applies it."""
    torch.manual_seed(0)
    w = [torch.randn(300) * 3, torch.randn(7, 5)]
    mine = [x.clone().requires_grad_() for x in w]
    ref = [x.clone().requires_grad_() for x in w]
    opt, ref_opt = _adamw(mine), _adamw(ref)
    check = guard.UpdateCheck(opt, opt)
    for step in range(3):
        grads = [torch.randn_like(x) * 10 ** step for x in w]
        for p, q, g in zip(mine, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        probe = [x.detach().clone().requires_grad_() for x in mine]
        probe_opt = _adamw(probe)
        probe_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares the moments
        for p, g in zip(probe, grads):
            p.grad = g.clone()
        probe_opt.step()
        biggest = max(float(p.detach().abs().max()) for p in probe)
        monkeypatch.setattr(guard, "BOUND", biggest * (1 - 1e-5))
        before = _snapshot(opt)
        opt.step()
        assert check.refused and opt.overflow and "take weights to" in check.reason
        assert _same(before, _snapshot(opt))
        assert check.size == pytest.approx(biggest, rel=1e-6)
        monkeypatch.setattr(guard, "BOUND", biggest * (1 + 1e-5))
        opt.step()
        ref_opt.step()
        assert not check.refused and not opt.overflow
        assert all(torch.equal(p, q) for p, q in zip(mine, ref))
        assert all(torch.equal(p, q) for p, q in zip(mine, probe))


@pytest.mark.parametrize("lr,grad,reason", [
    (1e-2, float("nan"), "non-finite loss or gradient"),
    (1e-2, float("inf"), "non-finite loss or gradient"),
    (1e-2, 1e20, "Adam moment that would overflow"),   # finite, but g^2 is not a float32
    (1e30, 1.0, "take weights to"),                     # the learning rate that blew a run up
    (1e20, 1.0, "take weights to"),                     # weights of ~1e20: finite, but not their squares
])
def test_update_check_refuses_and_changes_nothing(lr, grad, reason):
    w = torch.randn(50).requires_grad_()
    opt = _adamw([w], lr=lr)
    check = guard.UpdateCheck(opt, opt)
    w.grad = torch.randn(50)
    opt.param_groups[0]["lr"] = 1e-2
    opt.step()  # a first, sound step: moments and step count exist
    opt.param_groups[0]["lr"] = lr
    w.grad = torch.randn(50)
    w.grad[7] = grad
    before = _snapshot(opt)
    opt.step()
    assert check.refused and opt.overflow and reason in check.reason
    assert _same(before, _snapshot(opt))  # weights, moments, step count
    assert math.isfinite(float(w.detach().abs().max()))


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
        ema.update(k)
    keep = 1.0
    for k in range(1, 6):
        keep *= min(0.99, (1 + k) / (10 + k))
    assert torch.allclose(ema.state_dict()["weight"], keep * w0 + (1 - keep) * 2.0, atol=1e-6)
    assert EMA(net, decay=0.99, warmup=True).decay_at(10_000) == 0.99  # capped at the configured decay
    assert EMA(net, decay=0.99).decay_at(1) == 0.99  # no warm-up: constant


def _fake_save(ckpt_dir: Path, step: int, keep_last: int = 3) -> None:
    tmp = ckpt_dir / ckpt.begin_save(ckpt_dir, step)
    (tmp / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    ckpt.finish_save(ckpt_dir, step, {"w": torch.full((2,), float(step))}, {"step": step, "data": {}}, keep_last)


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
    def crash(point, step):
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


@pytest.mark.parametrize("zero,precision", [pytest.param(0, "fp32", marks=pytest.mark.slow), (2, "fp32"),
                                            pytest.param(3, "fp32", marks=pytest.mark.slow),
                                            pytest.param(3, "bf16", marks=pytest.mark.slow)])
def test_non_finite_steps_are_skipped_whole(zero, precision, data, tmp_path):
    run, ref = tmp_path / "faulty", tmp_path / "ref"
    common = [f"--train.zero_stage={zero}", f"--train.precision={precision}", "--train.ckpt_every=1",
              "--train.keep_last=10", "--train.ema_decay=0.5"]
    # step index 1: NaN loss in the first micro-batch (the second one is fine and must not be applied);
    # step index 2: NaN gradient, finite loss, in the last micro-batch (the first one's gradient must be dropped)
    r = train_with_faults(run, data, {"1": ["loss", 0], "2": ["grad", 1]}, "--train.steps=4", *common)
    assert r.stderr.count("not applied: a non-finite loss or gradient") == 2
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
    assert R.messages(r) == [
        "ulvideo train: 3 steps in a row (train.max_nonfinite_skips) were not applied, up to step 3, the last for a "
        "non-finite loss or gradient; the weights are those of step 0 and no checkpoint was written yet "
        "(train.ckpt_every = 300). Lower train.lr, check the data, or raise train.max_nonfinite_skips"]


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
@pytest.mark.parametrize("point", ["written", "renamed", "committed"])
def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous_one(point, data, tmp_path):
    """Killed inside the save of step 4: before it is complete, complete but `latest` not moved, or
    `latest` moved but the export not written. The rerun resumes from the newest complete checkpoint
    `latest` names and ends with step 4's checkpoint and its export."""
    from ulvideo.train.rundir import export_step

    run = tmp_path / "r"
    common = ["--train.ckpt_every=2", "--train.keep_last=3"]
    R.train(run, data, "--train.steps=2", *common)
    proc = _popen(run, data, "--train.steps=4", *common, pause=f"{point}@4:300")
    _wait_for_line(proc, f"pausing 300 s at '{point}' of step 4")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    d = run / "checkpoints"
    committed = 4 if point == "committed" else 2
    assert (d / "latest").read_text().strip() == ckpt.tag_for(committed) == ckpt.latest_tag(d)
    assert export_step(run / "exports" / "latest.safetensors") == 2
    if point == "written":
        assert list((d / ".tmp-step_00000004").glob("*.pt")) and not (d / "step_00000004").exists()
    again = R.train(run, data, "--train.steps=4", *common)
    assert "resumed from" in again.stderr and f"{ckpt.tag_for(committed)} (step {committed})" in again.stderr
    assert ("rewriting it from" in again.stderr) == (point == "committed") and "done: step 4" in again.stdout
    assert (d / "latest").read_text().strip() == "step_00000004"
    assert not list(d.glob(".tmp-*"))
    assert R.state_json(d / "step_00000004")["step"] == 4
    ema = load_file(str(d / "step_00000004" / "ema.safetensors"))
    export = load_file(str(run / "exports" / "latest.safetensors"))
    assert export_step(run / "exports" / "latest.safetensors") == 4 and all(torch.equal(export[k], ema[k]) for k in ema)


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


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's own consolidation of a checkpoint's fp32 weights, and its EMA."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=ckpt.tag_for(step))
    return {**{f"w/{k}": v.float() for k, v in sd.items()},
            **{f"ema/{k}": v for k, v in load_file(str(tag_dir(run, step) / "ema.safetensors")).items()}}


@pytest.mark.parametrize("zero", [pytest.param(2, marks=pytest.mark.slow), 3])  # ZeRO-3: partitioned master weights
def test_a_blown_up_learning_rate_is_never_applied(zero, data, tmp_path):
    """Three ordinary steps, then the run resumed with train.lr = 1e30. Its first step still runs at
    the learning rate the optimizer state restores (an ordinary step); from then on AdamW's update
    would take weights to ~1e29 (finite, but not their squares). No such step is applied, the run
    stops with status 3 after max_nonfinite_skips of them, and the checkpoint its message names holds
    finite weights, EMA, optimizer state and LR schedule equal to those before the blow-up."""
    run = tmp_path / "r"
    common = [f"--train.zero_stage={zero}", "--train.ckpt_every=1", "--train.keep_last=2"]
    R.train(run, data, "--train.steps=3", *common)
    r = R.train(run, data, "--train.steps=8", "--train.lr=1e30", "--train.max_nonfinite_skips=2", *common, check=False)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-3000:]
    [line] = R.messages(r)
    named = tag_dir(run, 5)  # step 5 was refused, then saved: the weights of step 4
    assert line.startswith("ulvideo train: 2 steps in a row (train.max_nonfinite_skips) were not applied, up to "
                           "step 6, the last for an update that would take weights to ")
    assert f"(learning rate 1e+30); the weights are those of step 4 and the newest checkpoint, {named}, holds them" in line
    assert r.stderr.count("not applied: an update that would take weights to") == 2
    before, after = _weights(run, 4), _weights(run, 5)
    assert after.keys() == before.keys()
    assert all(torch.isfinite(v).all() and torch.equal(v, before[k]) for k, v in after.items())
    # optimizer moments and LR schedule too; DeepSpeed's counters and flag record the refused step
    R.assert_same_training_state(tag_dir(run, 4), named, ignore={"global_steps", "global_samples", "skipped_steps", "overflow"})
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [tag_dir(run, 4).name, named.name]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["skipped_steps"]) for x in rows] == [(1, 0), (2, 0), (3, 0), (4, 0), (5, 1)]
    export = load_file(str(run / "exports" / "latest.safetensors"))
    assert all(torch.equal(v, before[f"ema/{k}"]) for k, v in export.items())
