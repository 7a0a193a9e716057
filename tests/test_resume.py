"""Exact resume: "train 4 steps" equals "train 2, stop, resume, train 2" bitwise in fp32 (weights,
optimizer moments, LR schedule, EMA, data position; noise shows through all of them), per ZeRO stage.
The reference is the uninterrupted run. Also: the generated DeepSpeed config and the checks that run
before any process group. Helpers here are shared with test_faults.py and test_distributed.py."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
# tiny clips and a global batch of 4 as 2 micro-batches of 2 (gradient accumulation 2 on one process)
SMALL = ["--data.num_frames=5", "--data.resolution=16", "--data.height=16", "--data.width=16",
         "--data.heldout_fraction=0.0", "--data.num_workers=0", "--encoder.latent_channels=4",
         "--train.global_batch_size=4", "--train.micro_batch_size=2", "--train.log_every=1",
         "--eval.every=0", "--train.warmup_steps=2", "--train.precision=fp32"]
# log_every=1 also exercises the decoder-gain term (its own draws from the step generator)


def clean_env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ULVIDEO_FAULT_SAVE_PAUSE"):
        if k not in extra:
            env.pop(k, None)
    return env


def train_cmd(run_dir, data, *overrides, launcher=()) -> list[str]:
    """python -m ulvideo train ..., or LAUNCHER ... -m ulvideo train ... (LAUNCHER ... --module ulvideo train ...)."""
    start = list(launcher) or [sys.executable]
    if start[-1] != "--module":
        start.append("-m")
    return [*start, "ulvideo", "train", "configs/ul/tiny.yaml", "--run-dir", str(run_dir), f"--data.path={data}",
            *SMALL, *map(str, overrides)]


def train(run_dir, data, *overrides, launcher=(), check=True, env=None, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run(train_cmd(run_dir, data, *overrides, launcher=launcher), cwd=ROOT, env=env or clean_env(),
                       capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"train failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}")
    return r


def messages(r: subprocess.CompletedProcess) -> list[str]:
    """The lines `ulvideo train` itself printed about a failure (DeepSpeed logs to stdout as well)."""
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("ulvideo train:")]


def synth(out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "ulvideo", "data", "synth", "--out", str(out), "--num", "12", "--frames", "5",
                    "--size", "16", "--seed", "3"], cwd=ROOT, env=clean_env(), check=True, capture_output=True)
    return out


def load_tree(tag_dir: Path) -> dict:
    """Every DeepSpeed file of one checkpoint (our own pickles, from this test's run dirs)."""
    return {p.name: torch.load(p, map_location="cpu", weights_only=False) for p in sorted(Path(tag_dir).glob("*.pt"))}


IGNORED = {"ds_config", "ds_version"}


def differences(a, b, path="", ignore=frozenset()) -> list[str]:
    """Paths where two nested checkpoint structures differ (tensors compared bitwise)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a if str(k) not in ignore for d in differences(a[k], b[k], f"{path}/{k}", ignore)]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]", ignore)]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return [] if a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) else [f"{path}: tensors differ"]
    if type(a).__module__.startswith("deepspeed") or callable(a):
        return []  # loss-scaler objects, fragment addresses: layout metadata, not state
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def assert_same_training_state(a: Path, b: Path, ignore=frozenset()) -> None:
    ta, tb = load_tree(a), load_tree(b)
    diffs = differences(ta, tb, ignore=IGNORED | set(ignore))
    ea, eb = load_file(str(a / "ema.safetensors")), load_file(str(b / "ema.safetensors"))
    diffs += [f"ema/{k}" for k in ea if not torch.equal(ea[k], eb[k])]
    assert not diffs, f"{a} vs {b}:\n" + "\n".join(diffs[:20])


def state_json(tag_dir: Path) -> dict:
    return json.loads((tag_dir / "state.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("resume") / "shapes")


@pytest.mark.parametrize("zero,offload", [pytest.param(0, False, marks=pytest.mark.slow),
                                         pytest.param(1, False, marks=pytest.mark.slow), (2, False),
                                         pytest.param(3, False, marks=pytest.mark.slow),
                                         pytest.param(2, True, marks=pytest.mark.slow),
                                         pytest.param(3, True, marks=pytest.mark.slow)])
def test_train_4_equals_train_2_resume_2(zero, offload, data, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [f"--train.zero_stage={zero}", f"--train.offload_optimizer={str(offload).lower()}",
              "--train.ckpt_every=100", "--train.ema_decay=0.5"]
    train(straight, data, "--train.steps=4", *common)
    first = train(split, data, "--train.steps=2", *common)
    assert "done: step 2" in first.stdout
    second = train(split, data, "--train.steps=4", *common)
    assert "resumed from" in second.stderr and "(step 2)" in second.stderr
    a, b = straight / "checkpoints" / "step_00000004", split / "checkpoints" / "step_00000004"
    # step, data position (epoch, batch), counters, metrics rows; not the file sizes of DeepSpeed's
    # pickles, which hold a few bytes more after a resume
    assert {**state_json(a), "files": None} == {**state_json(b), "files": None}
    assert_same_training_state(a, b)
    ea = load_file(str(straight / "exports" / "latest.safetensors"))
    eb = load_file(str(split / "exports" / "latest.safetensors"))
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    # the start-up term (on in all 4 steps: the tiny config holds the rate for 900) is part of the
    # training state compared above, weights and optimizer moments, and of no export
    if zero < 3:
        module = load_tree(a)["mp_rank_00_model_states.pt"]["module"]
        assert any(k.startswith("startup.readout.") for k in module)
    assert not any(k.startswith("startup.") or "readout" in k for k in ea)
    rows = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]


# ---- the generated DeepSpeed config and the checks before any process group ---------------


def test_deepspeed_config_follows_the_training_config():
    from ulvideo.config import ConfigError, load_config
    from ulvideo.train.loop import deepspeed_config

    cfg = load_config("configs/ul/tiny.yaml", ["--train.global_batch_size=32", "--train.micro_batch_size=2",
                                                "--train.zero_stage=3", "--train.offload_optimizer=true"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["gradient_accumulation_steps"] * ds["train_micro_batch_size_per_gpu"] * 4 == ds["train_batch_size"] == 32
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] == torch.cuda.is_available()  # precision auto: bf16 on GPU, fp32 on CPU
    assert deepspeed_config(cfg, world_size=16)["gradient_accumulation_steps"] == 1
    with pytest.raises(ConfigError, match="global_batch_size"):
        deepspeed_config(cfg, world_size=3)
    assert ds["zero_optimization"]["sub_group_size"] >= 10**12  # one sub-group: the update check's unit
    z0 = load_config("configs/ul/tiny.yaml", ["--train.zero_stage=0"])
    assert deepspeed_config(z0, 1)["optimizer"]["type"] == "AdamW"  # every stage: DeepSpeed's AdamW, checked
    with pytest.raises(ConfigError, match="offload_optimizer"):
        deepspeed_config(load_config("configs/ul/tiny.yaml", ["--train.zero_stage=0", "--train.offload_optimizer=true"]), 1)


# Calls `ulvideo train` in one fresh process for each case: its exit code, its message, and whether a
# process group exists afterwards. "WORLD_SIZE": "3" poses as rank 0 of 3 launched processes (had a
# check come after the process group, it would wait for peers that never come and time out).
ERRORS = r"""
import contextlib, io, json, os, sys, torch
from ulvideo.cli import main
out = []
for env, argv in json.loads(sys.argv[1]):
    os.environ.update(env)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(argv)
    out.append([rc, buf.getvalue(), torch.distributed.is_initialized()])
    for k in env:
        del os.environ[k]
print(json.dumps(out))
"""


def _errors(cases: list[tuple[dict, list[str]]]) -> list:
    r = subprocess.run([sys.executable, "-c", ERRORS, json.dumps(cases)], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_clear_errors_before_any_process_group(data, tmp_path):
    from safetensors.torch import save_file

    from ulvideo.train.rundir import _start_time

    run, empty, old, broken, busy = (tmp_path / n for n in ("r", "empty", "old", "broken", "busy"))
    empty.mkdir()
    for d, zero in ((old, 2), (broken, 2)):  # a ZeRO-2 checkpoint to resume (its DeepSpeed files are not read)
        tag = d / "checkpoints" / "step_00000002"
        tag.mkdir(parents=True)
        save_file({"w": torch.zeros(3)}, str(tag / "ema.safetensors"))
        size = (tag / "ema.safetensors").stat().st_size
        (tag / "state.json").write_text(json.dumps({"step": 2, "data": {}, "stage": "ul", "zero_stage": zero,
                                                    "world_size": 1, "files": {"ema.safetensors": size}}))
    ema = broken / "checkpoints" / "step_00000002" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-4])  # truncated: the last weight is missing
    busy.mkdir()  # in use by a live trainer: this test's own process
    (busy / "train.lock").write_text(json.dumps({"pid": os.getpid(), "host": __import__("socket").gethostname(),
                                                 "started": _start_time(os.getpid()), "since": "today"}))
    before = {p: p.read_bytes() for d in (old, broken, busy) for p in sorted(d.rglob("*")) if p.is_file()}
    rank0_of_3 = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29499"}
    cases = [
        ({}, ["--data.num_frames=6"], "1 + 4k"),
        ({}, ["--train.micro_batch_size=4", "--train.global_batch_size=6"], "global_batch_size"),
        (rank0_of_3, [], "micro_batch_size × world size"),
        ({}, ["--train.warmup=3"], "unknown key 'train.warmup'"),
        ({}, [f"--data.path={tmp_path / 'nowhere'}"], "does not exist"),
        ({}, [f"--data.path={empty}"], "no videos, images or latent shards"),
        ({}, ["--stage=base", f"--base.stage1_export={tmp_path / 'none.safetensors'}"], "export weights not found"),
        ({}, ["--train.zero_stage=0", "--train.offload_optimizer=true"], "offload_optimizer"),
    ]
    argvs = [(env, train_cmd(run, data, "--train.steps=1", *extra)[3:]) for env, extra, _ in cases]
    argvs.append(({}, train_cmd(old, data, "--train.zero_stage=0")[3:]))
    cases.append(({}, [], "written with train.zero_stage=2"))
    argvs.append(({}, train_cmd(broken, data)[3:]))
    cases.append(({}, [], f"no intact checkpoint to resume in {broken / 'checkpoints'}: "
                          f"{broken / 'checkpoints' / 'step_00000002' / 'ema.safetensors'} is truncated ({size - 4} of "
                          f"{size} bytes)"))
    argvs.append(({}, train_cmd(busy, data)[3:]))
    cases.append(({}, [], f"{busy} is in use by another trainer (pid {os.getpid()} on host "
                          f"{__import__('socket').gethostname()}, since today); if that process is gone, delete "
                          f"{busy / 'train.lock'}"))
    for (rc, message, initialized), (_, _, expect) in zip(_errors(argvs), cases):
        assert rc == 2 and expect in message and not initialized, message
        assert len(message.strip().splitlines()) == 1  # one clear line, no traceback
    assert not run.exists()
    # nothing already written changed, and the refused runs leave no lock behind
    assert before == {p: p.read_bytes() for d in (old, broken, busy) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_bf16_training_tracks_fp32_and_exports_full_fp32_weights(data, tmp_path):
    """bf16 (DeepSpeed's bf16 weights, fp32 masters) against the same run in fp32: close, not equal."""
    common = ["--train.zero_stage=3", "--train.steps=3", "--train.ema_decay=0.5"]
    train(tmp_path / "fp32", data, *common, "--train.precision=fp32")
    train(tmp_path / "bf16", data, *common, "--train.precision=bf16")
    a = load_file(str(tmp_path / "fp32" / "exports" / "latest.safetensors"))
    b = load_file(str(tmp_path / "bf16" / "exports" / "latest.safetensors"))
    assert a.keys() == b.keys() and all(v.dtype == torch.float32 for v in b.values())
    # bf16 keeps 8 bits of mantissa (0.4 %); Adam moves each weight by about lr per step either way
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-2, atol=5e-3, msg=lambda m: f"{k}: {m}")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_startup_term_resumes_bit_exactly_while_in_use_and_after(data, tmp_path):
    """ZeRO-3, rate held 2 steps and ramped over 2: the start-up term's scale is 1, 1, 0.5, 0. After
    resuming at step 2 the readout is used once more (its restored weights shape step 3's loss),
    then gets no gradient at all (ZeRO-3's partitioned parameters must keep training); the run
    equals the uninterrupted one bitwise, and no export holds the readout."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--train.zero_stage=3", "--ul.rate_hold_steps=2", "--ul.rate_ramp_steps=2", "--train.ckpt_every=100"]
    train(straight, data, "--train.steps=4", *common)
    train(split, data, "--train.steps=2", *common)
    second = train(split, data, "--train.steps=4", *common)
    assert "(step 2)" in second.stderr
    rows = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["startup_recon_scale"] for r in rows] == [1.0, 1.0, 0.5, 0.0]
    assert ["startup_recon_bits_per_pixel" in r for r in rows] == [True, True, True, False]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref] and all(math.isfinite(r["loss"]) for r in rows)
    assert_same_training_state(straight / "checkpoints" / "step_00000004", split / "checkpoints" / "step_00000004")
    export = load_file(str(split / "exports" / "latest.safetensors"))
    assert any(k.startswith("decoder.") for k in export) and not any("readout" in k for k in export)
