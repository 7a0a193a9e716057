"""What a run directory promises besides exact resume: a damaged checkpoint falls back to the previous
intact one; `checkpoints/latest` never leads outside checkpoints/; exports always belong to the
newest checkpoint and are rewritten from it when they do not; one trainer per run directory; a full
disk fails a save in one line and keeps the previous checkpoint; metrics rows are never repeated.
Every case checks the exit status, the one line a user sees and that nothing already written changed.
References: the checkpoint's own files, an uninterrupted run, a real tmpfs."""
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_faults as F
import test_resume as R
from ulvideo.config import load_config
from ulvideo.train import checkpoint as ckpt
from ulvideo.train import rundir


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return R.synth(tmp_path_factory.mktemp("rundir") / "shapes")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def fake_checkpoints(d: Path, steps=(1, 2, 3)) -> None:
    """Checkpoints as finish_save writes them, with a stand-in for DeepSpeed's shard."""
    for step in steps:
        tmp = d / ckpt.begin_save(d, step)
        (tmp / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * (100 + step))
        ckpt.finish_save(d, step, {"w": torch.full((4,), float(step))}, {"step": step, "data": {}}, keep_last=10)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-3])


def _symlink(p: Path) -> None:
    outside = p.parents[3] / "elsewhere.pt"
    outside.write_bytes(p.read_bytes())
    p.unlink()
    p.symlink_to(outside)


DAMAGE = {  # name: (how, the file named, what the warning says)
    "truncated ema": (lambda d: _truncate(d / "ema.safetensors"), "ema.safetensors", "is truncated ("),
    "garbage state.json": (lambda d: (d / "state.json").write_bytes(b"\x89PNG{garbage"), "state.json",
                           "is not this checkpoint's state"),
    "state.json of another step": (lambda d: shutil.copy(d.parent / "step_00000002" / "state.json", d / "state.json"),
                                   "state.json", "is not this checkpoint's state (ValueError: it describes step 2)"),
    "missing shard": (lambda d: (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink(),
                      "zero_pp_rank_0_mp_rank_00_optim_states.pt", "is missing"),
    "truncated shard": (lambda d: _truncate(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "has 100 bytes, 103 were written"),
    "shard linked from elsewhere": (lambda d: _symlink(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt", "is a symbolic link"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_checkpoint_falls_back_to_the_previous_intact_one(case, tmp_path):
    d = tmp_path / "run" / "checkpoints"
    fake_checkpoints(d)
    how, name, says = DAMAGE[case]
    how(d / "step_00000003")
    before = files(d)
    warnings = []
    found = ckpt.find_resumable(d, warnings.append)
    assert found.tag == "step_00000002" and found.state["step"] == 2
    [line] = warnings
    assert line.startswith(f"checkpoint damaged, skipped: {d / 'step_00000003' / name} {says}")
    assert line.endswith(f"; resuming from {d / 'step_00000002'}")
    assert files(d) == before  # finding reads, it never deletes
    # nothing intact left: one line naming every damaged file
    for step in (1, 2):
        how(d / ckpt.tag_for(step)) if case != "state.json of another step" else _truncate(d / ckpt.tag_for(step) / "ema.safetensors")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.find_resumable(d, warnings.append)
    assert str(e.value).startswith(f"no intact checkpoint to resume in {d}: {d / 'step_00000003' / name} {says}")
    assert str(e.value).count("; ") == 2 and "\n" not in str(e.value) and len(warnings) == 1


def _evil(where: Path) -> Path:
    """A complete-looking checkpoint outside the run whose DeepSpeed file, if ever unpickled, leaves a mark."""
    where.mkdir(parents=True)
    fake_checkpoints(where, steps=(7,))
    marker = where / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for p in (where / "step_00000007").glob("*.pt"):
        p.write_bytes(pickle.dumps(Payload()))
    return where / "step_00000007"


@pytest.mark.parametrize("named", ["../..", "ABS", "step_00000002/../../../evil/step_00000007", "evil_link",
                                   "step_00000009", ""])
def test_latest_must_name_a_step_folder_of_checkpoints(named, tmp_path):
    d = tmp_path / "run" / "checkpoints"
    fake_checkpoints(d, steps=(1, 2))
    evil = _evil(tmp_path / "evil")
    (d / "evil_link").symlink_to(evil)
    (d / "step_00000005").symlink_to(evil)  # a step folder's name, but a link to elsewhere
    named = str(evil) if named == "ABS" else named
    (d / "latest").write_text(named + "\n")
    warnings = []
    found = ckpt.find_resumable(d, warnings.append)
    assert found.tag == "step_00000002"
    assert warnings == [f"{d / 'latest'} names {named!r}, which is not a step folder of {d}: ignored; resuming "
                        f"from {d / 'step_00000002'}, the newest intact step folder, instead"]
    plan = ckpt.plan_resume(d, found, 1, 2, True)
    assert (plan.load_dir, plan.load_tag) == (str(d), "step_00000002")
    assert not (evil.parent / "UNPICKLED").exists()


def test_a_run_dir_holding_only_a_latest_pointing_elsewhere_starts_afresh(data, tmp_path):
    """End to end: DeepSpeed is never handed the payload; the run warns, trains from scratch and
    replaces `latest`."""
    run = tmp_path / "run"
    evil = _evil(tmp_path / "evil")
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(str(evil) + "\n")
    r = R.train(run, data, "--train.steps=1")
    assert (f"{run / 'checkpoints' / 'latest'} names {str(evil)!r}, which is not a step folder of "
            f"{run / 'checkpoints'}: ignored; there is no step folder here, so the run starts afresh") in r.stderr
    assert "resumed from" not in r.stderr and "done: step 1" in r.stdout
    assert not (evil.parent / "UNPICKLED").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"


# ---- exports ------------------------------------------------------------------------------------


@pytest.fixture
def exported(tmp_path):
    """A run dir with checkpoints 2 and 3 and the exports of both, as a finished run leaves them."""
    cfg = load_config("configs/ul/tiny.yaml")
    run = tmp_path / "run"
    d = run / "checkpoints"
    fake_checkpoints(d, steps=(2, 3))
    for step in (2, 3):
        rundir.write_exports(run, "ul", step, ckpt.read_ema(d, ckpt.tag_for(step)), cfg, {"step": step}, 3)
    return run, cfg


def _stale(run):  # what a death after `latest` moved, before the export, leaves
    for ext in (".safetensors", ".json"):
        shutil.copy(run / "exports" / f"ul_step_00000002{ext}", run / "exports" / f"latest{ext}")


def _mixed(run):  # died between the two renames of a rewrite
    shutil.copy(run / "exports" / "ul_step_00000002.json", run / "exports" / "latest.json")


STALE = {"missing": lambda run: [(run / "exports" / f"latest{e}").unlink() for e in (".safetensors", ".json")],
         "older step": _stale, "weights and config of two saves": _mixed,
         "truncated": lambda run: _truncate(run / "exports" / "latest.safetensors"),
         "per-step export missing": lambda run: (run / "exports" / "ul_step_00000003.safetensors").unlink()}


@pytest.mark.parametrize("case", list(STALE))
def test_exports_behind_the_newest_checkpoint_are_rewritten_from_it(case, exported):
    run, cfg = exported
    d = run / "checkpoints"
    STALE[case](run)
    ckpts = files(d)
    warnings = []
    assert rundir.sync_exports(run, "ul", 3, d, "step_00000003", cfg, {"step": 3}, 3, warnings.append)
    [line] = warnings
    latest = run / "exports" / "latest.safetensors"
    assert line.startswith(f"{latest} ") and line.endswith(f"not step 3 of the newest checkpoint: rewriting it from "
                                                             f"{d / 'step_00000003' / 'ema.safetensors'}")
    ema = load_file(str(d / "step_00000003" / "ema.safetensors"))
    for out in (latest, run / "exports" / "ul_step_00000003.safetensors"):
        got = load_file(str(out))
        assert got.keys() == ema.keys() and all(torch.equal(got[k], ema[k]) for k in ema)
        assert rundir.export_step(out) == 3 and json.loads(out.with_suffix(".json").read_text())["meta"]["step"] == 3
    assert files(d) == ckpts
    # current exports are left alone
    kept = files(run / "exports")
    assert not rundir.sync_exports(run, "ul", 3, d, "step_00000003", cfg, {"step": 3}, 3, warnings.append)
    assert files(run / "exports") == kept and len(warnings) == 1


def test_per_step_exports_rotate_like_checkpoints_and_latest_is_the_newest(tmp_path):
    cfg = load_config("configs/ul/tiny.yaml")
    run = tmp_path / "run"
    for step in range(1, 6):
        rundir.write_exports(run, "ul", step, {"w": torch.full((3,), float(step))}, cfg, {"step": step}, keep_last=2)
    assert sorted(p.name for p in (run / "exports").iterdir()) == [
        "latest.json", "latest.safetensors", "ul_step_00000004.json", "ul_step_00000004.safetensors",
        "ul_step_00000005.json", "ul_step_00000005.safetensors"]
    assert load_file(str(run / "exports" / "latest.safetensors"))["w"].tolist() == [5.0] * 3
    assert rundir.export_step(run / "exports" / "latest.safetensors") == 5


# ---- the lock -----------------------------------------------------------------------------------


def _holder(run: Path, pid: int, host: str | None = None) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "train.lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                                "started": rundir._start_time(pid), "since": "then"}))


def test_one_trainer_per_run_directory(tmp_path):
    run = tmp_path / "run"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        _holder(run, sleeper.pid)
        with pytest.raises(rundir.RunLocked) as e:
            rundir.RunLock.acquire(run, print)
        host = socket.gethostname()
        assert str(e.value) == (f"{run} is in use by another trainer (pid {sleeper.pid} on host {host}, since then); "
                                f"if that process is gone, delete {run / 'train.lock'}")
    finally:
        sleeper.kill()
        sleeper.wait()
    warnings = []
    lock = rundir.RunLock.acquire(run, warnings.append)  # its holder is gone: taken over
    assert warnings == [f"{run / 'train.lock'}: taking over the lock of pid {sleeper.pid} on {host}, which is no "
                        "longer running"]
    assert json.loads((run / "train.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / "train.lock").exists()
    _holder(run, sleeper.pid, host="another-node")  # a dead pid, but on another host: we cannot know
    with pytest.raises(rundir.RunLocked, match=f"pid {sleeper.pid} on host another-node"):
        rundir.RunLock.acquire(run, print)
    (run / "train.lock").write_text("{not json")
    warnings = []
    rundir.RunLock.acquire(run, warnings.append).release()
    assert warnings == [f"{run / 'train.lock'}: taking over the lock of an unreadable lock"]
    assert sorted(p.name for p in run.iterdir()) == []


# ---- a failed write -----------------------------------------------------------------------------


@pytest.mark.parametrize("error,full", [(OSError(28, "No space left on device"), False),
                                        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), True),
                                        (OSError(5, "Input/output error"), False)])
def test_a_failed_write_removes_its_partial_folder_and_says_so_in_one_line(error, full, tmp_path, monkeypatch):
    """Injected errors (the tmpfs test below fills a real disk): ENOSPC, torch.save's errno-less
    message on a full filesystem, another I/O error. Other errors pass through, after the cleanup."""
    if full:
        monkeypatch.setattr(ckpt, "free_bytes", lambda path: 4096)
    tmp = tmp_path / "checkpoints" / ".tmp-step_00000002"
    tmp.mkdir(parents=True)
    with pytest.raises(ckpt.SaveError) as e:
        with ckpt.writing(tmp, "checkpoint"):
            (tmp / "mp_rank_00_model_states.pt").write_bytes(b"partial")
            raise error
    why = "Input/output error" if getattr(error, "errno", None) == 5 else "no space left on device ("
    assert str(e.value).startswith(why) and str(e.value).endswith(f"writing checkpoint {tmp} failed; its partial files are removed")
    assert not tmp.exists()
    monkeypatch.undo()  # room left on the disk: a RuntimeError is no write failure
    tmp.mkdir()
    with pytest.raises(RuntimeError, match="a bug"):
        with ckpt.writing(tmp, "checkpoint"):
            raise RuntimeError("a bug")
    assert not tmp.exists()


FULL_DISK = r"""
set -e
mount -t tmpfs -o size=256m tmpfs "$T"
"$PY" -m ulvideo "$@" --train.steps=1 >"$OUT/first.log" 2>&1
cp -a "$T/run" "$OUT/before"
used=$(du -sk "$T" | cut -f1)
mount -o remount,size=$((used + 12 * 1024))k "$T"    # room for 12 MiB more: not for a checkpoint (~40 MiB)
set +e
"$PY" -m ulvideo "$@" --train.steps=2 >"$OUT/second.log" 2>&1
echo $? >"$OUT/rc"
used_after=$(du -sk "$T" | cut -f1)
echo $((used_after - used)) >"$OUT/grown_kib"
cp -a "$T/run" "$OUT/after"
"""


def test_a_full_disk_fails_the_save_cleanly(data, tmp_path):
    """A real full disk: the run dir on a tmpfs with room for the first checkpoint but not the second
    (a user and mount namespace, skipped where none can be made)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"],
                                                     capture_output=True).returncode:
        pytest.skip("no user and mount namespace for a tmpfs here; the injected errors above still run")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    args = R.train_cmd(mnt / "run", data, "--train.ckpt_every=1")[3:]
    env = R.clean_env(T=str(mnt), OUT=str(out), PY=sys.executable)
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", FULL_DISK, "sh", *args],
                       cwd=R.ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr + (out / "first.log").read_text()[-3000:]
    second = (out / "second.log").read_text()
    assert (out / "rc").read_text().strip() == "4", second[-3000:]
    lines = [x for x in second.splitlines() if x.startswith("ulvideo train:")]
    tmp = mnt / "run" / "checkpoints" / ".tmp-step_00000002"
    assert len(lines) == 1 and lines[0].startswith("ulvideo train: no space left on device (")
    assert lines[0].endswith(f"writing checkpoint {tmp} failed; its partial files are removed; the latest complete "
                             f"checkpoint is {mnt / 'run' / 'checkpoints' / 'step_00000001'}")
    before, after = out / "before", out / "after"
    assert not (after / "checkpoints" / ".tmp-step_00000002").exists()
    assert files(before / "checkpoints") == files(after / "checkpoints")  # step 1 and `latest` untouched
    assert files(before / "exports") == files(after / "exports")
    assert int((out / "grown_kib").read_text()) < 64  # the partial checkpoint no longer fills the disk
    rows = [json.loads(x)["step"] for x in (after / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2] and not (after / "train.lock").exists()


# ---- a run that dies and a second trainer -------------------------------------------------------


def test_an_interrupted_run_resumes_without_repeating_rows_and_repairs_its_exports(data, tmp_path):
    """A run killed while saving step 4 (after its rows 3 and 4 were written), a second trainer
    started meanwhile, the rerun, then exports left behind the newest checkpoint and a damaged newest
    checkpoint: every rerun ends equal to the uninterrupted run."""
    common = ["--train.steps=4", "--train.ckpt_every=2", "--train.keep_last=2"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    R.train(straight, data, *common)
    ref_rows = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    d = run / "checkpoints"

    def same_as_straight():
        R.assert_same_training_state(straight / "checkpoints" / "step_00000004", d / "step_00000004")
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in rows] == [1, 2, 3, 4] and [x["loss"] for x in rows] == [x["loss"] for x in ref_rows]
        ema = load_file(str(d / "step_00000004" / "ema.safetensors"))
        export = load_file(str(run / "exports" / "latest.safetensors"))
        assert export.keys() == ema.keys() and all(torch.equal(export[k], ema[k]) for k in ema)
        assert sorted(p.name for p in (run / "exports").glob("ul_step_*.safetensors")) == [
            "ul_step_00000002.safetensors", "ul_step_00000004.safetensors"]
        assert not list(d.glob(".tmp-*")) and not (run / "train.lock").exists()

    first = F._popen(run, data, *common, pause="written@4:300")
    try:
        F._wait_for_line(first, "pausing 300 s at 'written' of step 4")
        written = files(run)
        second = R.train(run, data, *common, check=False)
        assert second.returncode == 2 and R.messages(second) == [
            f"ulvideo train: {run} is in use by another trainer (pid {first.pid} on host {socket.gethostname()}, "
            f"since {json.loads((run / 'train.lock').read_text())['since']}); if that process is gone, delete "
            f"{run / 'train.lock'}"]
        assert files(run) == written
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (d / ".tmp-step_00000004").is_dir() and (d / "latest").read_text().strip() == "step_00000002"

    again = R.train(run, data, *common)
    assert f"{run / 'train.lock'}: taking over the lock of pid {first.pid}" in again.stderr
    assert "resumed from" in again.stderr and "(step 2)" in again.stderr
    same_as_straight()

    # exports of step 2 where step 4 is the newest checkpoint (a death between the two)
    _stale(run)
    (run / "exports" / "ul_step_00000004.json").unlink()
    ckpts = files(d)
    again = R.train(run, data, *common)
    assert (f"{run / 'exports' / 'latest.safetensors'} holds step 2, not step 4 of the newest checkpoint: rewriting "
            f"it from {d / 'step_00000004' / 'ema.safetensors'}") in again.stderr
    assert "done: step 4" in again.stdout and files(d) == ckpts
    same_as_straight()

    # the newest checkpoint damaged: back to step 2, steps 3 and 4 again
    _truncate(d / "step_00000004" / "ema.safetensors")
    again = R.train(run, data, *common)
    assert f"checkpoint damaged, skipped: {d / 'step_00000004' / 'ema.safetensors'} is truncated (" in again.stderr
    assert "(step 2)" in again.stderr
    same_as_straight()


@pytest.mark.parametrize("resume,kept", [(None, []), ({"step": 2, "metrics_rows": 3}, [1, 2, 2]),
                                         ({"step": 2}, [1, 2, 2])])
def test_metrics_rows_after_the_resumed_checkpoint_are_dropped(resume, kept, tmp_path):
    """Rows 1, 2, an evaluation row at 2, then 3 and 4 that a dead run wrote after its checkpoint of
    step 2 (which recorded 3 rows; older checkpoints record none: then the rows up to its step stay)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": i}) + "\n" for i, s in enumerate([1, 2, 2, 3, 4])))
    log = rundir.MetricLog(tmp_path, True, resume=resume)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == kept and log.rows == len(kept)
    following = 3 if resume else 1  # the step the run writes next
    log.write(following, {"y": 1.0}, reduce=False)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == kept + [following]
