"""End to end: `ulvideo data synth` -> `ulvideo train` (DeepSpeed, one process) -> export -> encode/decode."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_ulvideo
from ulvideo.exports import load_export
from ulvideo.exports import load_stage1
from ulvideo.ul import UnifiedLatents

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.num_frames=5", "--data.resolution=16", "--data.height=16", "--data.width=16",
         "--data.heldout_fraction=0.0", "--data.num_workers=0", "--encoder.latent_channels=4",
         "--train.global_batch_size=4", "--train.micro_batch_size=4", "--train.log_every=1",
         "--train.recon_every=3", "--train.ckpt_every=2", "--eval.num_clips=2", "--eval.decoder_steps=2",
         "--ul.eval_logsnr_samples=2", "--train.warmup_steps=2"]


def ulvideo(*args, check=True):
    return run_ulvideo(*args, check=check)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = tmp / "shapes"
    ulvideo("data", "synth", "--out", data, "--num", 12, "--frames", 5, "--size", 16, "--seed", 3)
    run_dir = tmp / "run"
    first = ulvideo("train", "configs/ul/tiny.yaml", "--run-dir", run_dir, f"--data.path={data}", "--train.steps=3", *SMALL)
    return data, run_dir, first


def test_run_writes_metrics_checkpoint_export_and_reconstructions(run):
    _, run_dir, first = run
    assert (run_dir / "config.yaml").is_file()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        for key in ("bits_per_pixel", "bits_per_clip", "decoder_loss_bits_per_pixel", "grad_norm", "clips_per_s"):
            assert key in r and r[key] == r[key]  # present and not NaN
        assert r["bits_per_clip"] == pytest.approx(r["bits_per_pixel"] * 5 * 16 * 16, rel=1e-4)
    assert any("eval/psnr" in r for r in rows)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert (run_dir / "checkpoints" / "step_00000002" / "state.json").is_file()
    assert list((run_dir / "samples").rglob("*.mp4")) and list((run_dir / "samples").rglob("*.png"))
    assert list((run_dir / "tb").iterdir())
    assert "exports" in first.stdout


def test_export_reloads_to_identical_outputs(run):
    _, run_dir, _ = run
    weights, cfg, meta = load_export(run_dir / "exports" / "latest.safetensors")
    assert meta["stage"] == "ul" and meta["step"] == 3 and meta["latent_logsnr"] == 5.0
    reloaded = load_stage1(run_dir / "exports" / "latest.safetensors")
    reference = UnifiedLatents(cfg)
    reference.load_state_dict(load_file(str(run_dir / "checkpoints" / "step_00000003" / "ema.safetensors")))
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        z = reloaded.encode(x)
        assert torch.equal(z, reference.encode(x))
        a = reloaded.decode(z, steps=2, seed=0)
        b = reference.decode(z, steps=2, seed=0)
    assert torch.equal(a, b)


def test_rerunning_resumes(run, tmp_path):
    data, run_dir, _ = run
    again = ulvideo("train", "configs/ul/tiny.yaml", "--run-dir", run_dir, f"--data.path={data}", "--train.steps=4", *SMALL)
    assert "resumed from" in again.stderr + again.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert json.loads((run_dir / "checkpoints" / "step_00000004" / "state.json").read_text())["step"] == 4


def test_encode_and_decode_commands(run, tmp_path):
    data, run_dir, _ = run
    export = run_dir / "exports" / "latest.safetensors"
    z_path = tmp_path / "z.safetensors"
    ulvideo("encode", "--export", export, "--input", data / "shape_00000.mp4", "--out", z_path)
    z = load_file(str(z_path))["z_clean"]
    enc = load_stage1(export).cfg.encoder  # 5 frames at 16x16
    assert z.shape == (enc.latent_channels, 1 + 4 // enc.temporal_downsample, 16 // enc.spatial_downsample,
                       16 // enc.spatial_downsample)
    out = tmp_path / "clip.mp4"
    r = ulvideo("decode", "--export", export, "--input", z_path, "--out", out, "--steps", 2)
    assert out.is_file() and json.loads(r.stdout.strip().splitlines()[-1])["frames"] == 5
    # streamed/tiled paths through the CLI: the tiled latent equals the one-pass latent
    tiled = tmp_path / "z_tiled.safetensors"
    ulvideo("encode", "--export", export, "--input", data / "shape_00000.mp4", "--out", tiled, "--chunk", 4, "--tile", 8)
    torch.testing.assert_close(load_file(str(tiled))["z_clean"], z, rtol=1e-5, atol=1e-5)
    r = ulvideo("decode", "--export", export, "--input", z_path, "--out", tmp_path / "tiled.mp4", "--steps", 2,
                "--chunk", 4, "--tile", 8)
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert (tmp_path / "tiled.mp4").is_file() and info["frames"] == 5 and info["tile"] == 8
    # stopping the decoder's sampling early: reported, and an end outside the schedule is refused
    r = ulvideo("decode", "--export", export, "--input", z_path, "--out", tmp_path / "early.mp4", "--steps", 2,
                "--logsnr-end", 0)
    assert json.loads(r.stdout.strip().splitlines()[-1])["logsnr_end"] == 0.0
    r = ulvideo("decode", "--export", export, "--input", z_path, "--out", tmp_path / "bad.mp4", "--logsnr-end", 99,
                check=False)
    assert r.returncode == 2 and "logsnr_end = 99" in r.stderr and not (tmp_path / "bad.mp4").exists()
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_config_fails_before_any_process_group(tmp_path):
    r = ulvideo("train", "configs/ul/tiny.yaml", "--run-dir", tmp_path / "r", "--train.nope=1", check=False)
    assert r.returncode == 2 and "train.nope" in r.stdout + r.stderr
    r = ulvideo("train", "configs/ul/tiny.yaml", "--run-dir", tmp_path / "r", f"--data.path={tmp_path / 'missing'}", check=False)
    assert r.returncode == 2 and "does not exist" in r.stdout + r.stderr
    assert not (tmp_path / "r").exists()

