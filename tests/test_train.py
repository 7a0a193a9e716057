"""End to end: `ulvideo data synth` -> `ulvideo train` (DeepSpeed, one process) -> export -> encode/decode;
held-out evaluation in the loop (PSNR, SSIM, bits, rFVD) checked against the files it wrote."""
import hashlib
import json
import subprocess
import sys
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
         "--eval.every=3", "--train.ckpt_every=2", "--eval.num_clips=2", "--eval.decoder_steps=2",
         "--ul.eval_logsnr_samples=2", "--train.warmup_steps=2"]


def ulvideo(*args, check=True):
    return run_ulvideo(*args, check=check)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    data = tmp / "shapes"
    ulvideo("data", "synth", "--out", data, "--num", 12, "--frames", 5, "--size", 16, "--seed", 3)
    run_dir = tmp / "run"
    # 5-frame clips are too short for the preset's 16: a notice, and training goes on without rFVD
    first = ulvideo("train", "configs/ul/tiny.yaml", "--run-dir", run_dir, f"--data.path={data}", "--train.steps=3", *SMALL,
                    "--eval.fvd_preset=tats-fvd2048-16f")
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


def test_evaluation_is_printed_with_a_notice_for_clips_too_short_for_rfvd(run):
    _, run_dir, first = run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [3] and "eval/rfvd" not in evals[0]  # eval.every = 3 = the last step
    assert "loss" not in evals[0]  # an evaluation row holds evaluation numbers only
    e = evals[0]
    assert (f"eval step 3: PSNR {e['eval/psnr']:.2f} dB, SSIM {e['eval/ssim']:.4f}, "
            f"{e['eval/bits_per_pixel']:.4g} bits/pixel") in first.stdout
    notices = [line for line in first.stderr.splitlines() if "eval.fvd_preset = tats-fvd2048-16f" in line]
    assert len(notices) == 1 and "scores 16-frame clips, data.num_frames = 5: no rFVD" in notices[0]


def test_the_final_message_names_what_the_run_wrote(run):
    _, run_dir, first = run
    out = first.stdout[first.stdout.index("done: step 3"):]
    for path in (run_dir / "exports" / "latest.safetensors", run_dir / "checkpoints" / "step_00000003",
                 run_dir / "metrics.jsonl", run_dir / "samples" / "step_00000003"):
        assert str(path) in out and path.exists()


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


# ---- rFVD in the loop, with random I3D weights and a small preset registered for the test ----------

WITH_TEST_PRESET = """
import sys
from ulvideo.eval import fvd
fvd.PRESETS["loop-test"] = fvd.Protocol("loop-test", "tests", "i3d_pretrained_400", 9, 16, "bilinear-round",
                                        "bilinear-round", "name", "bilinear", "first", "first", True, 4, 4,
                                        "unbiased", "train")
fvd.I3D_SIZE = 32  # keeps the I3D input small on CPU
from ulvideo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_rfvd_in_the_loop_equals_fvd_of_the_written_reconstructions(tmp_path):
    """13-frame clips, a preset scoring their first 9 frames at 16x16 (bilinear to 32x32 for I3D).
    Reference: the inputs and reconstructions read back from the lossless PNG sheet the evaluation
    wrote, their first 9 frames through InceptionI3d with the random weights, the Frechet distance of
    the two feature sets (unbiased covariances); PSNR by scikit-image."""
    import imageio.v3 as iio
    import numpy as np
    import torch.nn.functional as F
    from skimage.metrics import peak_signal_noise_ratio

    from conftest import RENDEZVOUS
    from test_i3d import random_state
    from ulvideo.eval.i3d import InceptionI3d
    from ulvideo.eval.metrics import frechet_distance

    data, run_dir, weights = tmp_path / "shapes", tmp_path / "run", tmp_path / "i3d_pretrained_400.pt"
    ulvideo("data", "synth", "--out", data, "--num", 12, "--frames", 13, "--size", 16, "--seed", 3)
    torch.save(random_state(0), weights)
    env = {k: v for k, v in __import__("os").environ.items() if k not in RENDEZVOUS}
    r = subprocess.run([sys.executable, "-c", WITH_TEST_PRESET, "train", "configs/ul/tiny.yaml", "--run-dir", str(run_dir),
                        f"--data.path={data}", *SMALL, "--data.num_frames=13", "--train.steps=2", "--eval.every=2",
                        "--eval.num_clips=3", "--eval.fvd_preset=loop-test", f"--eval.i3d_weights={weights}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"rFVD at every evaluation: preset loop-test, I3D {weights} (sha256 {digest})" in r.stderr
    row = next(json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/rfvd" in x)
    assert row["step"] == 2 and row["eval/fvd_preset"] == "loop-test" and row["eval/num_clips"] == 3
    assert row["eval/i3d_sha256"] == digest
    assert f"rFVD {row['eval/rfvd']:.2f} (loop-test, 3 clips)" in r.stdout

    sheet = iio.imread(run_dir / "samples" / "step_00000002" / "recon_sheet.png")  # (rows*H, T*W, 3)
    clips = sheet.reshape(6, 16, 13, 16, 3).transpose(0, 2, 1, 3, 4)  # (rows, T, H, W, 3): input, recon, ...
    real, recon = clips[0::2], clips[1::2]
    psnr = np.mean([peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(real, recon)])
    assert row["eval/psnr"] == pytest.approx(psnr, rel=1e-5)

    net = InceptionI3d().eval()
    missing, unexpected = net.load_state_dict(random_state(0), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing)

    def features(u8):
        x = torch.from_numpy(np.ascontiguousarray(u8[:, :9])).float()  # the preset's 9 frames
        b, t = x.shape[:2]
        x = F.interpolate(x.flatten(0, 1).permute(0, 3, 1, 2), size=(32, 32), mode="bilinear", align_corners=False)
        x = (x * 2 / 255 - 1).reshape(b, t, 3, 32, 32).permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            return net(x).double().numpy()

    fr, fg = features(real), features(recon)
    ref = frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), fg.mean(0), np.cov(fg, rowvar=False))
    assert ref > 1e-3 and row["eval/rfvd"] == pytest.approx(ref, rel=1e-4)


def test_rfvd_notices_and_preset_errors(tmp_path, monkeypatch, caplog):
    """A preset without weights or with evaluation off is one warning at start-up; a preset that does
    not exist, or one for stage 2 (whose evaluation decodes nothing), is refused before training."""
    import logging

    from ulvideo.config import ConfigError, load_config
    from ulvideo.train.objectives import StageOne, preflight

    monkeypatch.setenv("ULVIDEO_CACHE", str(tmp_path))
    monkeypatch.delenv("ULVIDEO_I3D", raising=False)
    caplog.set_level(logging.INFO, logger="ulvideo.train")
    cfg = load_config(ROOT / "configs/ul/tiny.yaml", ["--data.num_frames=17", "--eval.fvd_preset=tats-fvd2048-16f"])
    objective = StageOne(cfg)
    objective.prepare_evaluation("cpu")
    assert objective._extractor is None
    [notice] = [r.getMessage() for r in caplog.records]
    assert "eval.fvd_preset = tats-fvd2048-16f: no rFVD in this run" in notice and "\n" not in notice
    assert "i3d_pretrained_400.pt" in notice and str(tmp_path) in notice  # what it needs and where it looked
    caplog.clear()
    StageOne(load_config(ROOT / "configs/ul/tiny.yaml", ["--eval.fvd_preset=tats-fvd2048-16f", "--eval.every=0"])
             ).prepare_evaluation("cpu")
    assert [r.getMessage() for r in caplog.records] == ["eval.fvd_preset = tats-fvd2048-16f is unused: eval.every = 0 "
                                                        "(no evaluation)"]
    with pytest.raises(ConfigError, match="'nope' is not an FVD preset"):
        preflight(load_config(ROOT / "configs/ul/tiny.yaml", ["--eval.fvd_preset=nope"]))
    with pytest.raises(ConfigError, match="rFVD is a stage-1 evaluation"):
        preflight(load_config(ROOT / "configs/base/tiny.yaml", ["--eval.fvd_preset=k600-5to11"]))
