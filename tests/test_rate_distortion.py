"""benchmarks/rate_distortion.py's quick path end to end on a few real-footage clips (2 steps each),
its cache, and the summary's logic against hand-made points."""
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("skimage")
pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))
import rate_distortion as rd  # noqa: E402
import real_footage as rf  # noqa: E402

TINY = ["--data.num_frames=5", "--data.resolution=32", "--data.height=32", "--data.width=32", "--data.num_workers=0",
        "--encoder.latent_channels=4", "--train.global_batch_size=2", "--train.micro_batch_size=2",
        "--train.warmup_steps=1", "--ul.rate_hold_steps=1", "--ul.rate_ramp_steps=1"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rd")
    # two training photos (camera moves: mp4s) and one test photo, 5 frames of 32x32
    rf.build(tmp / "footage", frames=5, size=32, sources=["astronaut", "coffee", "chelsea"], pans=1, zooms=1)
    args = ["--quick", "--train-data", str(tmp / "footage" / "train"), "--test-data", str(tmp / "footage"),
            "--steps", "2", "--refine-steps", "2", "--decoder-steps", "2", "--crfs", "23,38",
            "--runs", str(tmp / "runs"), "--out", str(tmp / "rd.json"), *TINY]
    first = rd.main(args)
    trained = sorted(p.name for p in (tmp / "runs").iterdir())
    again = rd.main(args)  # everything cached: no new run directory, the same numbers
    return tmp, first, again, trained


def test_quick_sweep_writes_every_point(sweep):
    tmp, res, _, trained = sweep
    assert [r["loss_factor"] for r in res["ul"]] == [1.5] and [r["kl_weight"] for r in res["kl_vae"]] == [0.01]
    assert len(trained) == 2
    for r in res["ul"] + res["kl_vae"]:
        assert r["clips"] == res["protocol"]["num_clips"] == 2  # chelsea's pan and zoom
        assert r["bpp"] > 0 and math.isfinite(r["psnr"]) and 0 < r["ssim"] <= 1
        assert Path(r["export"]).parent.parent.name.startswith("prior_refine-")  # rates from refined priors
        meta = json.loads(Path(r["export"]).with_suffix(".json").read_text())["meta"]
        assert meta["stage"] == "ul" and meta["prior_refine_steps"] == 2
    assert "vae_kl_bpp" in res["kl_vae"][0]
    assert [c["codec"] for c in res["codecs"]] == ["libx264", "libx265"]
    assert all(len(c["records"]) == 2 for c in res["codecs"])
    p = res["protocol"]
    assert p["clip"] == "5x32x32" and p["decoder_steps"] == 2 and p["sampler"] == "ddpm"
    assert p["rate_logsnr_samples"] == 32
    assert json.loads((tmp / "rd.json").read_text())["summary"] == res["summary"]
    assert (tmp / "rd.png").stat().st_size > 1000


def test_rerun_reuses_the_cached_runs(sweep):
    tmp, first, again, trained = sweep
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == trained
    for a, b in zip(first["ul"] + first["kl_vae"], again["ul"] + again["kl_vae"]):
        assert a == b


def test_run_key_follows_config_and_data_not_location():
    cfg = {"data": {"path": "/a", "num_frames": 9}, "ul": {"loss_factor": 1.5}}
    moved = {"data": {"path": "/b", "num_frames": 9}, "ul": {"loss_factor": 1.5}}
    other = {"data": {"path": "/a", "num_frames": 9}, "ul": {"loss_factor": 2.0}}
    assert rd.config_key(cfg, "x") == rd.config_key(moved, "x")
    assert rd.config_key(cfg, "x") != rd.config_key(other, "x") != rd.config_key(cfg, "y")


def test_summary_logic():
    ul = [{"loss_factor": 1.5, "bpp": 0.05, "psnr": 25.0, "ssim": 0.7}, {"loss_factor": 3.0, "bpp": 0.1, "psnr": 28.0,
                                                                        "ssim": 0.8}]
    assert rd.monotone(ul) == {"bits_rise": True, "psnr_rise": True, "ssim_rise": True}
    assert rd.monotone([ul[0], {**ul[1], "psnr": 24.0}])["psnr_rise"] is False
    vae = [{"kl_weight": 0.1, "bpp": 0.06, "psnr": 24.0}, {"kl_weight": 0.01, "bpp": 0.2, "psnr": 29.0}]
    d = rd.dominance(ul, vae)
    assert d["per_point"][0]["dominated_by_loss_factors"] == [1.5] and d["per_point"][1]["dominated_by_loss_factors"] == []
    assert d["ul_dominates_kl_vae"] is False
    x265 = [{"crf": 51, "bpp": 0.04, "psnr": 25.5}, {"crf": 43, "bpp": 0.06, "psnr": 27.0}, {"crf": 38, "bpp": 0.09,
                                                                                           "psnr": 29.0}]
    assert rd.beaten_by(ul[0], x265) == [51] and rd.beaten_by(ul[1], x265) == [38]
    codec = [{"bpp": 0.1, "psnr": 24.0}, {"bpp": 0.4, "psnr": 30.0}]
    # log-linear between the two points: at 27 dB, sqrt(0.1 * 0.4) = 0.2
    assert rd.codec_bpp_at(27.0, codec) == pytest.approx(0.2)
    assert rd.codec_bpp_at(31.0, codec) is None


def test_export_mode_measures_an_export_the_same_way(sweep, tmp_path):
    """`--export`: a copy of a sweep's export (no cached measurement beside it) measured afresh gives the
    sweep's numbers; nothing is trained."""
    import shutil

    tmp, res, _, trained = sweep
    src = Path(res["ul"][0]["export"])
    dst = tmp_path / "copy" / "latest.safetensors"
    dst.parent.mkdir()
    shutil.copy(src, dst)
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    out = rd.main(["--export", str(dst), "--test-data", str(tmp / "footage"), "--decoder-steps", "2",
                   "--out", str(tmp_path / "m.json"), *TINY])
    [row] = out["exports"]
    want = res["ul"][0]
    for k in ("bpp", "psnr", "ssim", "decoder_gain_bits_per_clip"):
        assert row[k] == pytest.approx(want[k], rel=1e-5), k
    assert json.loads((tmp_path / "m.json").read_text())["exports"][0]["bpp"] == row["bpp"]
    assert sorted(p.name for p in (tmp / "runs").iterdir()) == trained
    with pytest.raises(SystemExit):
        rd.main(["--export", str(tmp_path / "missing"), "--test-data", str(tmp / "footage"), *TINY])
