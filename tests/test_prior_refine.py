"""`stage: prior`: refining a stage-1 export's prior on its own frozen latents."""
import json
from pathlib import Path

import pytest
import torch

from conftest import run_ulvideo
from ulvideo.config import ConfigError, load_config
from ulvideo.exports import file_sha256, load_export, load_stage1, save_export
from ulvideo.train.objectives import check_shards_belong
from ulvideo.ul import UnifiedLatents

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.num_frames=5", "--data.resolution=16", "--data.height=16", "--data.width=16",
         "--data.heldout_fraction=0.0", "--encoder.latent_channels=4"]
TRAIN = ["--train.global_batch_size=8", "--train.micro_batch_size=8", "--train.log_every=5", "--train.warmup_steps=2",
         "--ul.eval_logsnr_samples=4", "--eval.num_clips=4"]


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    """A stage-1 export with an untrained prior, its prior refined for 40 steps, and fresh clips."""
    tmp = tmp_path_factory.mktemp("refine")
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/ul/tiny.yaml", SMALL)
    export = save_export(tmp / "stage1", UnifiedLatents(cfg).state_dict(), cfg,
                         {"stage": "ul", "step": 0, "latent_logsnr": 5.0, "prior_logsnr_min": -10.0})
    run_ulvideo("data", "synth", "--out", tmp / "train", "--num", 16, "--frames", 5, "--size", 16, "--seed", 1)
    run_ulvideo("data", "synth", "--out", tmp / "heldout", "--num", 8, "--frames", 5, "--size", 16, "--seed", 2)
    run = tmp / "run"
    out = run_ulvideo("train", "configs/ul/tiny.yaml", "--run-dir", run, *refine_args(export, tmp / "train"))
    return export, run, tmp / "heldout", out.stdout


def refine_args(export, data) -> list:
    return ["--stage=prior", f"--prior.stage1_export={export}", f"--data.path={data}", "--train.steps=40",
            "--train.lr=3e-3", "--train.ckpt_every=40", "--eval.every=40", *SMALL, *TRAIN]


def test_encoder_and_decoder_are_bitwise_the_source(refined):
    export, run, _, _ = refined
    src, src_cfg, _ = load_export(export)
    new, new_cfg, meta = load_export(run / "exports" / "latest.safetensors")
    assert set(new) == set(src)
    frozen = [k for k in src if not k.startswith("prior.")]
    assert frozen and all(torch.equal(new[k], src[k]) for k in frozen)
    assert any(not torch.equal(new[k], src[k]) for k in src if k.startswith("prior."))
    # a complete stage-1 export: the source's config, stage "ul", and where it came from
    assert new_cfg == src_cfg and meta["stage"] == "ul" and meta["prior_refine_steps"] == 40
    assert meta["prior_refined_from_sha256"] == file_sha256(export)
    load_stage1(run / "exports" / "latest.safetensors")


def test_refinement_lowers_the_heldout_rate(refined):
    export, run, heldout, stdout = refined
    from ulvideo.data import build_loader

    before, after = load_stage1(export), load_stage1(run / "exports" / "latest.safetensors")
    data = load_config(ROOT / "configs/ul/tiny.yaml", SMALL + [f"--data.path={heldout}"]).data
    x = next(iter(build_loader(data, micro_batch_size=8, seed=0, split="train")))["video"]
    with torch.no_grad():
        z = before.encode(x)
        assert torch.equal(z, after.encode(x))  # the same latents
        b0, b1 = before.rate_bits(z, 32, seed=0), after.rate_bits(z, 32, seed=0)
    assert b1.mean() < 0.5 * b0.mean(), (b0.mean(), b1.mean())
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    [ev] = [r for r in rows if "eval/refined_prior_bits_per_clip" in r]
    assert ev["eval/refined_prior_bits_per_clip"] < ev["eval/stage1_prior_bits_per_clip"]
    assert "eval step 40: prior" in stdout


def test_only_the_prior_is_trained(refined):
    """The objective's parameters (all DeepSpeed's optimizer can hold) are the prior copy's alone."""
    from ulvideo.train.objectives import make_objective

    export, _, heldout, _ = refined
    obj = make_objective(load_config(ROOT / "configs/ul/tiny.yaml", SMALL + [
        "--stage=prior", f"--prior.stage1_export={export}", f"--data.path={heldout}"]))
    params = list(obj.parameters())
    assert params and {id(p) for p in params} == {id(p) for p in obj.model.parameters()}
    frozen = {id(p) for p in obj.stage1.parameters()}
    assert not frozen & {id(p) for p in params}


def test_prior_stage_needs_a_stage1_export(tmp_path):
    r = run_ulvideo("train", "configs/ul/tiny.yaml", "--run-dir", tmp_path / "run", "--stage=prior",
                    f"--prior.stage1_export={tmp_path / 'missing.safetensors'}", check=False)
    assert r.returncode == 2 and "missing.safetensors" in r.stdout + r.stderr
    with pytest.raises(ConfigError):
        load_config(ROOT / "configs/ul/tiny.yaml", ["--stage=refine"])


def test_an_export_lost_after_its_checkpoint_is_rewritten_whole(refined, tmp_path):
    """A run that died between its checkpoint and the export: the rerun rewrites the export from the
    checkpoint through the same path as a save, so it is again a complete stage-1 export (not the
    prior's weights alone)."""
    import shutil

    export, run, _, _ = refined
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("train.lock"))
    want = load_export(copy / "exports" / "latest.safetensors")
    for f in (copy / "exports").iterdir():
        f.unlink()
    r = run_ulvideo("train", "configs/ul/tiny.yaml", "--run-dir", copy, *refine_args(export, run.parent / "train"))
    assert "rewriting it from" in r.stdout + r.stderr
    got = load_export(copy / "exports" / "latest.safetensors")
    assert set(got[0]) == set(want[0]) and all(torch.equal(got[0][k], want[0][k]) for k in want[0])
    assert got[1] == want[1] and got[2]["stage"] == "ul" and got[2]["prior_refine_steps"] == 40
    load_stage1(copy / "exports" / "latest.safetensors")


def test_rate_tightness_reproduces_the_base_models_own_evaluation(refined, tmp_path):
    """benchmarks/rate_tightness.py: for the stage-1 export a base model was trained on, the same
    numbers as that run's logged held-out evaluation; for its refinement the same base ELBO (the
    latents are the same) and that prior's own bits; an export with another encoder is refused."""
    import sys

    sys.path.append(str(ROOT / "benchmarks"))
    import rate_tightness

    export, run, _, _ = refined
    latents, base_run = tmp_path / "latents", tmp_path / "base"
    run_ulvideo("encode", "--export", export, "--data", refined[0].parent / "train", "--out", latents)
    # the refinement's encoder is the source's: stage 2 may train on the source's shards with it
    check_shards_belong(str(latents), str(run / "exports" / "latest.safetensors"), "base.stage1_export")
    run_ulvideo("train", "configs/base/tiny.yaml", "--run-dir", base_run, f"--base.stage1_export={export}",
                f"--data.path={latents}", "--train.steps=2", "--eval.every=2", "--data.heldout_fraction=0.25",
                "--base.text_encoder=none", *TRAIN)
    [logged] = [r for r in map(json.loads, (base_run / "metrics.jsonl").read_text().splitlines())
                if "eval/null_over_prior" in r]
    source, refinement = rate_tightness.main(["--base", str(base_run / "exports" / "latest.safetensors"), "--stage1",
                                              str(export), str(run / "exports" / "latest.safetensors"),
                                              "--data", str(latents)])["rows"]
    for k in ("stage1_prior_bits_per_clip", "base_elbo_null_bits_per_clip", "null_over_prior"):
        assert source[k] == pytest.approx(logged[f"eval/{k}"], rel=1e-5)  # the log keeps 6 digits
    assert refinement["base_elbo_null_bits_per_clip"] == source["base_elbo_null_bits_per_clip"]
    assert refinement["prior_refine_steps"] == 40
    assert refinement["stage1_prior_bits_per_clip"] != source["stage1_prior_bits_per_clip"]
    torch.manual_seed(1)
    cfg = load_config(ROOT / "configs/ul/tiny.yaml", SMALL)
    other = save_export(tmp_path / "other", UnifiedLatents(cfg).state_dict(), cfg,
                        {"stage": "ul", "step": 0, "latent_logsnr": 5.0, "prior_logsnr_min": -10.0})
    with pytest.raises(ConfigError, match="holds latents of another stage-1 export"):
        check_shards_belong(str(latents), str(other), "base.stage1_export")
    with pytest.raises(SystemExit, match="another encoder"):
        rate_tightness.main(["--base", str(base_run / "exports" / "latest.safetensors"), "--stage1", str(export),
                             str(other), "--data", str(latents)])
