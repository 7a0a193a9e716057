"""Two processes on CPU (gloo), through torchrun and the deepspeed launcher: training at the same
global batch equals one-process training (ZeRO 2 and 3), and so does evaluation -- bits, PSNR,
SSIM and rFVD of stage 1, the tightness numbers of stage 2 -- which rank 0 computes alone; a
two-process ZeRO-3 run evaluates, saves, resumes and exports; the sharded ZeRO-3 EMA equals the EMA
recomputed from DeepSpeed's own consolidation of every checkpoint; a checkpoint resumes at another
world size through the universal format. Part of the default suite: tiny clips, three steps, one
thread per process."""
import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_resume as R
from test_train import WITH_TEST_PRESET  # `ulvideo` with an FVD preset small enough for CPU

pytestmark = pytest.mark.distributed
STEPS = ["--train.steps=3", "--train.ckpt_every=1", "--train.keep_last=10", "--train.ema_decay=0.5"]
# evaluations at steps 2 and 3 (the end), small enough to cost little
EVAL = ["--eval.every=2", "--eval.num_clips=2", "--eval.decoder_steps=2", "--ul.eval_logsnr_samples=2"]
# global batch 4 = 2 micro-batches of 2: accumulated on one process, one per rank on two
RTOL, ATOL = 1e-5, 1e-6  # all-reduce vs local accumulation order; Adam then normalises the step


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun():
    return (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port())


def deepspeed_launcher():
    return (sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", _port(), "--module")


def run_script(script: Path, launcher, *args) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS`, or under torchrun `torchrun ... SCRIPT ARGS`."""
    r = subprocess.run([*(launcher or [sys.executable]), str(script), *map(str, args)], cwd=R.ROOT, env=R.clean_env(),
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}")
    return r


def fp32_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """DeepSpeed's offline consolidation (zero_to_fp32) of one checkpoint: independent of our EMA code."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=f"step_{step:08d}")
    return {k.removeprefix("model."): v.float() for k, v in sd.items()}


def ema(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "ema.safetensors"))


def assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {k}: {m}")


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in rows(run) if "loss" in r]


def evaluations(run: Path) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")} for r in rows(run) if any(
        k.startswith("eval/") for k in r)}


def assert_same_evaluations(one: Path, two: Path, step: int, keys: list[str]) -> None:
    """The evaluation rows of a one- and a two-process run at the same global batch: equal to round-off
    of the weights (the EMAs agree to RTOL), and bit for bit where the EMAs are bitwise equal."""
    a, b = evaluations(one), evaluations(two)
    assert a.keys() == b.keys() and step in a
    for s in a:
        assert a[s].keys() == b[s].keys() and all(f"eval/{k}" in a[s] for k in keys), (a[s], b[s])
        for k, v in a[s].items():
            assert b[s][k] == (pytest.approx(v, rel=1e-4, abs=1e-6) if isinstance(v, float) else v), k
    ea, eb = ema(one, step), ema(two, step)
    if all(torch.equal(ea[k], eb[k]) for k in ea):
        assert a == b


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return R.synth(tmp_path_factory.mktemp("dist") / "shapes")


@pytest.fixture(scope="module")
def rfvd(tmp_path_factory):
    """9-frame clips, random I3D weights and a script registering the small preset."""
    from test_i3d import random_state

    tmp = tmp_path_factory.mktemp("rfvd")
    subprocess.run([sys.executable, "-m", "ulvideo", "data", "synth", "--out", str(tmp / "shapes"), "--num", "12",
                    "--frames", "9", "--size", "16", "--seed", "3"], cwd=R.ROOT, env=R.clean_env(), check=True,
                   capture_output=True)
    torch.save(random_state(0), tmp / "i3d_pretrained_400.pt")
    (tmp / "ulvideo_loop_test.py").write_text(WITH_TEST_PRESET)
    return tmp


@pytest.fixture(scope="module", params=[2, 3])
def runs(request, data, rfvd, tmp_path_factory):
    """(zero, one-process run, two-process run) with evaluations at steps 2 and 3.
    ZeRO-2 via torchrun, on 9-frame clips with rFVD. ZeRO-3 via the deepspeed launcher, two steps,
    then resumed for the third by a second two-process launch."""
    zero = request.param
    base = tmp_path_factory.mktemp(f"zero{zero}")
    one, two = base / "one", base / "two"
    common = [f"--train.zero_stage={zero}", *STEPS, *EVAL]
    if zero == 2:
        script = rfvd / "ulvideo_loop_test.py"
        extra = ["--data.num_frames=9", "--eval.fvd_preset=loop-test", f"--eval.i3d_weights={rfvd / 'i3d_pretrained_400.pt'}"]
        args = lambda run: R.train_cmd(run, rfvd / "shapes", *common, *extra)[3:]  # noqa: E731
        run_script(script, (), *args(one))
        r = run_script(script, torchrun(), *args(two))
    else:
        R.train(one, data, *common)
        first = R.train(two, data, *common, "--train.steps=2", launcher=deepspeed_launcher())
        assert "done: step 2" in first.stdout and evaluations(two).keys() == {2}
        r = R.train(two, data, *common, launcher=deepspeed_launcher())
        assert "resumed from" in r.stderr and "step_00000002 (step 2)" in r.stderr and "done: step 3" in r.stdout
    # each rank reads its half of the training clips (12 clips, 2 per micro-batch, 2 ranks)
    assert (r.stdout + r.stderr).count("12 train clips (video), 3 batches per epoch on this rank") == 2
    return zero, one, two


def test_two_processes_equal_one_process_at_the_same_global_batch(runs):
    zero, one, two = runs
    assert len(list((two / "checkpoints" / "step_00000003").glob("zero_pp_rank_1_*optim_states.pt"))) == 1
    assert_close(fp32_weights(two, 3), fp32_weights(one, 3), f"ZeRO-{zero} weights")
    assert_close(ema(two, 3), ema(one, 3), f"ZeRO-{zero} EMA")
    export = load_file(str(two / "exports" / "latest.safetensors"))
    assert all(torch.equal(export[k], v) for k, v in ema(two, 3).items())  # full, consolidated weights
    assert sorted(p.name for p in (two / "exports").glob("ul_step_*.safetensors")) == [
        f"ul_step_0000000{s}.safetensors" for s in (1, 2, 3)]
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)  # rows average over ranks
    assert [r["step"] for r in rows(two) if "loss" in r] == [1, 2, 3]  # the resumed run repeats no row


def test_evaluation_is_the_same_at_one_and_two_processes(runs):
    """Rank 0 evaluates alone (no collective): bits, PSNR, SSIM (and rFVD) equal those of one process."""
    zero, one, two = runs
    keys = ["psnr", "ssim", "bits_per_clip", "bits_per_pixel"] + (["rfvd"] if zero == 2 else [])
    assert_same_evaluations(one, two, 3, keys)
    assert sorted(evaluations(two)) == [2, 3]
    if zero == 2:
        assert evaluations(two)[3]["eval/num_clips"] == 2 and evaluations(two)[3]["eval/rfvd"] > 0


def test_stage2_tightness_is_the_same_at_one_and_two_processes(runs, data, tmp_path):
    """Stage 2 on the ZeRO-3 stage-1 export: the held-out prior bits and the base model's ELBOs that
    rank 0 reports equal those of one process."""
    zero, one, _ = runs
    if zero != 3:
        pytest.skip("one stage-2 pair is enough")
    args = lambda run: ["train", "configs/base/tiny.yaml", "--run-dir", run, f"--data.path={data}",  # noqa: E731
                        f"--base.stage1_export={one / 'exports' / 'latest.safetensors'}", "--base.text_encoder=none",
                        "--data.num_frames=5", "--data.resolution=16", "--data.height=16", "--data.width=16",
                        "--data.heldout_fraction=0.0", "--data.num_workers=0", "--train.global_batch_size=4",
                        "--train.micro_batch_size=2", "--train.steps=2", "--train.log_every=1", "--eval.every=2",
                        "--eval.num_clips=2", "--train.precision=fp32"]
    for run, launcher in ((tmp_path / "one", ()), (tmp_path / "two", torchrun())):
        cmd = [*(launcher or [sys.executable]), "-m", "ulvideo", *map(str, args(run))]
        r = subprocess.run(cmd, cwd=R.ROOT, env=R.clean_env(), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_same_evaluations(tmp_path / "one", tmp_path / "two", 2, [
        "stage1_prior_bits_per_clip", "base_elbo_null_bits_per_clip", "base_elbo_cond_bits_per_clip", "null_over_prior"])


def test_ema_equals_the_average_of_consolidated_checkpoints(runs):
    """EMA_n = d^n w_0 + sum_k (1 - d) d^(n-k) w_k, with w_k from zero_to_fp32 and w_0 rebuilt from the seed."""
    from ulvideo.config import load_config
    from ulvideo.train.objectives import make_objective

    zero, _, two = runs
    cfg = load_config(two / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    w = [{k: v.detach().float() for k, v in make_objective(cfg).trained.named_parameters()}]
    w += [fp32_weights(two, s) for s in (1, 2, 3)]
    # with warm-up, step k uses d_k = min(decay, (1 + k) / (10 + k)):
    # EMA_n = prod_{k<=n} d_k w_0 + sum_j (1 - d_j) prod_{j<k<=n} d_k w_j
    assert cfg.train.ema_warmup
    d = [None] + [min(cfg.train.ema_decay, (1 + k) / (10 + k)) for k in (1, 2, 3)]
    prod = lambda a, b: math.prod(d[a:b + 1])  # noqa: E731
    for n in (1, 3):
        expected = {k: prod(1, n) * w[0][k] + sum((1 - d[j]) * prod(j + 1, n) * w[j][k] for j in range(1, n + 1))
                    for k in w[0]}
        got = {k: v for k, v in ema(two, n).items() if k in expected}
        assert_close(got, expected, f"ZeRO-{zero} sharded EMA at step {n}")
    assert any(not torch.allclose(got[k], w[3][k]) for k in got)  # the EMA is not just the weights


def test_resume_at_another_world_size(runs, tmp_path):
    """ZeRO-2: two processes -> one; ZeRO-3: one -> two. Step 3 equals the straight run's step 3."""
    zero, one, two = runs
    source, target, launcher = (two, one, ()) if zero == 2 else (one, two, torchrun())
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step_00000002", run / "checkpoints" / "step_00000002")
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    data = __import__("yaml").safe_load((source / "config.yaml").read_text())["data"]
    r = R.train(run, data["path"], f"--train.zero_stage={zero}", *STEPS, f"--data.num_frames={data['num_frames']}",
                launcher=launcher)
    assert "through the universal format" in r.stderr
    assert (run / "checkpoints" / "step_00000002" / "universal" / "zero").is_dir()
    assert_close(fp32_weights(run, 3), fp32_weights(target, 3), f"ZeRO-{zero} weights after resuming")
    assert_close(ema(run, 3), ema(target, 3), f"ZeRO-{zero} EMA after resuming")
    state = R.state_json(run / "checkpoints" / "step_00000003")
    assert state["data"] == R.state_json(target / "checkpoints" / "step_00000003")["data"]
