"""Two processes on CPU (gloo), through torchrun and the deepspeed launcher: training at the same
global batch equals one-process training (ZeRO 2 and 3), the sharded ZeRO-3 EMA equals the EMA
recomputed from DeepSpeed's own consolidation of every checkpoint, and a checkpoint resumes at
another world size through the universal format. Run with `pytest -m distributed`."""
import json
import math
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_resume as R

pytestmark = pytest.mark.distributed
STEPS = ["--train.steps=3", "--train.ckpt_every=1", "--train.keep_last=10", "--train.ema_decay=0.5"]
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


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return R.synth(tmp_path_factory.mktemp("dist") / "shapes")


@pytest.fixture(scope="module", params=[2, 3])
def runs(request, data, tmp_path_factory):
    """(zero, one-process run, two-process run): ZeRO-2 via torchrun, ZeRO-3 via the deepspeed launcher."""
    zero = request.param
    base = tmp_path_factory.mktemp(f"zero{zero}")
    one, two = base / "one", base / "two"
    R.train(one, data, f"--train.zero_stage={zero}", *STEPS)
    launcher = torchrun() if zero == 2 else deepspeed_launcher()
    r = R.train(two, data, f"--train.zero_stage={zero}", *STEPS, launcher=launcher)
    assert r.stdout.count("batches per epoch on this rank") + r.stderr.count("batches per epoch on this rank") == 2
    return zero, one, two


def test_two_processes_equal_one_process_at_the_same_global_batch(runs):
    zero, one, two = runs
    assert len(list((two / "checkpoints" / "step_00000003").glob("zero_pp_rank_1_*optim_states.pt"))) == 1
    assert_close(fp32_weights(two, 3), fp32_weights(one, 3), f"ZeRO-{zero} weights")
    assert_close(ema(two, 3), ema(one, 3), f"ZeRO-{zero} EMA")
    export = load_file(str(two / "exports" / "latest.safetensors"))
    assert all(torch.equal(export[k], v) for k, v in ema(two, 3).items())  # full, consolidated weights
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)  # rows average over ranks


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
    r = R.train(run, data_of(source), f"--train.zero_stage={zero}", *STEPS, launcher=launcher)
    assert "through the universal format" in r.stderr
    assert (run / "checkpoints" / "step_00000002" / "universal" / "zero").is_dir()
    assert_close(fp32_weights(run, 3), fp32_weights(target, 3), f"ZeRO-{zero} weights after resuming")
    assert_close(ema(run, 3), ema(target, 3), f"ZeRO-{zero} EMA after resuming")
    state = R.state_json(run / "checkpoints" / "step_00000003")
    assert state["data"] == R.state_json(target / "checkpoints" / "step_00000003")["data"]


def data_of(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["data"]["path"]
