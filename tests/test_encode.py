"""`ulvideo encode`: the round trip keeps every frame (1 + 4k of the file, streamed through the
causal encoder, equal to a one-pass encode of an independent PyAV decode), and `encode --data`
resumed after a real SIGKILL writes the same shards as one uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import ROOT, RENDEZVOUS, run_ulvideo
from ulvideo.config import load_config
from ulvideo.data.encode import FAULT_ENV
from ulvideo.data.loader import resize_crop
from ulvideo.exports import load_stage1, save_export
from ulvideo.ul import UnifiedLatents
from ulvideo.videoio import to_float, write_video

SMALL = ["--data.num_frames=5", "--data.resolution=16", "--data.height=16", "--data.width=16",
         "--encoder.latent_channels=4"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs/ul/tiny.yaml", SMALL)
    return save_export(tmp_path_factory.mktemp("encode") / "stage1", UnifiedLatents(cfg).state_dict(), cfg,
                       {"stage": "ul", "step": 0})


def smooth(t: int, h: int = 24, w: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([np.stack([(xx * 7 + i * 9) % 256, (yy * 5 + i * 3) % 256, np.full_like(xx, 16 * (i % 16))], -1)
                     for i in range(t)]).astype(np.uint8)


def pyav_frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("frames,expect", [(17, 17), (33, 33), (20, 17)])
def test_round_trip_keeps_every_frame(export, tmp_path, frames, expect):
    src = tmp_path / "clip.mp4"
    write_video(src, smooth(frames), fps=12)
    r = run_ulvideo("encode", "--export", export, "--input", src, "--out", tmp_path / "z.safetensors", "--chunk", "8")
    assert (f"{frames - expect} dropped at the end" in r.stdout) == (frames != expect)
    z = load_file(str(tmp_path / "z.safetensors"))["z_clean"]
    with safe_open(str(tmp_path / "z.safetensors"), "pt") as f:
        assert f.metadata()["num_frames"] == str(expect)
    model = load_stage1(export)
    d = model.cfg.data
    x = to_float(resize_crop(pyav_frames(src)[:expect], d.height, d.width, d.resolution, None, None, False))[None]
    with torch.no_grad():
        torch.testing.assert_close(z, model.encode(x)[0], rtol=1e-4, atol=1e-4)  # chunked read + stream == one pass
    out = run_ulvideo("decode", "--export", export, "--input", tmp_path / "z.safetensors", "--out", tmp_path / "o.mp4",
                      "--steps", "2")
    assert json.loads(out.stdout.strip().splitlines()[-1])["frames"] == expect
    with av.open(str(tmp_path / "o.mp4")) as c:
        assert c.streams.video[0].average_rate == 12
    assert len(pyav_frames(tmp_path / "o.mp4")) == expect


def test_bad_chunk_is_refused_before_compute(export, tmp_path):
    write_video(tmp_path / "c.mp4", smooth(9), fps=8)
    r = run_ulvideo("encode", "--export", export, "--input", tmp_path / "c.mp4", "--out", tmp_path / "z.safetensors",
                    "--chunk", "6", check=False)
    assert r.returncode == 2 and "chunks of" in r.stderr and not (tmp_path / "z.safetensors").exists()


def shard_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("shard-"))


def test_encode_data_resumes_after_sigkill_to_the_same_shards(export, tmp_path):
    data = tmp_path / "shapes"
    run_ulvideo("data", "synth", "--out", data, "--num", 10, "--frames", 5, "--size", 16, "--seed", 2)
    common = ["encode", "--export", export, "--data", data, "--shard-size", 4, "--batch-size", 3, "--text-encoder", "none"]
    run_ulvideo(*common, "--out", tmp_path / "straight")
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update(PYTHONUNBUFFERED="1", **{FAULT_ENV: "shard:1:120"})
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "ulvideo", *map(str, common), "--out", str(cut)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if "pausing" in line:
                break
        proc.send_signal(signal.SIGKILL)  # shard 1's latents are written, its JSON is not
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert "shard-00001.safetensors" in shard_files(cut) and "shard-00001.json" not in shard_files(cut)
    assert json.loads((cut / "encoding.json").read_text())["complete"] is False
    r = run_ulvideo(*common, "--out", cut)
    assert "1 complete shard(s) kept" in r.stdout
    assert shard_files(cut) == shard_files(tmp_path / "straight") and len(shard_files(cut)) == 3 * 2
    for name in shard_files(cut):
        a, b = tmp_path / "straight" / name, cut / name
        if name.endswith(".json"):
            assert json.loads(a.read_text()) == json.loads(b.read_text())
        else:
            za, zb = load_file(str(a)), load_file(str(b))
            assert za.keys() == zb.keys() and all(torch.equal(za[k], zb[k]) for k in za)
    info = json.loads((cut / "encoding.json").read_text())
    assert info["complete"] and info["clips"] == 10 and info["shards"] == 3
    again = run_ulvideo(*common, "--out", cut)  # a complete folder is left as it is
    assert '"already": true' in again.stdout
    other = run_ulvideo(*common[:-4], "--shard-size", 5, "--text-encoder", "none", "--out", cut, check=False)
    assert other.returncode == 2 and "other settings (shard_size" in other.stderr
