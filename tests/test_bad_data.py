"""Training data that cannot be used: a folder of only broken files is refused in one line before
any process group starts (one probe when the folder is healthy); corrupt latent shards are skipped
and counted like bad videos, at start-up (unreadable header) or when a sample is loaded (non-finite
values); an error found only while training ends in one line and status 2, not a traceback."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import RENDEZVOUS
from ulvideo.config import DataConfig
from ulvideo.data import DataError, build_loader, check_usable, write_latent_shard
from ulvideo.videoio import write_video

ROOT = Path(__file__).resolve().parents[1]


def broken_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("not a video\n" * 20)
    (root / "folder.mp4").mkdir()
    write_video(root / "short.mp4", np.zeros((3, 32, 32, 3), np.uint8))  # 3 frames: shorter than a 9-frame clip
    return root


def test_train_refuses_a_folder_of_only_broken_files_before_starting(tmp_path, capsys):
    from ulvideo.cli import main

    data, run = broken_folder(tmp_path / "broken"), tmp_path / "run"
    assert main(["train", str(ROOT / "configs/ul/tiny.yaml"), "--run-dir", str(run), f"--data.path={data}"]) == 2
    out, err = capsys.readouterr()
    [line] = (out + err).strip().splitlines()
    assert "Traceback" not in out + err and line.startswith("ulvideo train: ") and "no usable clips" in line
    for reason in ("1 empty file", "1 not a video", "1 directory", "1 shorter than clip"):
        assert reason in line
    assert not run.exists()  # refused before the trainer made its run directory


def test_a_healthy_folder_costs_one_probe(tmp_path, monkeypatch):
    from ulvideo.data import sources

    root = tmp_path / "ok"
    for i in range(5):
        write_video(root / f"c{i}.mp4", np.zeros((9, 32, 32, 3), np.uint8))
    calls = []
    probe = sources._probe_or_reason
    monkeypatch.setattr(sources, "_probe_or_reason", lambda p: calls.append(p) or probe(p))
    d = DataConfig(path=str(root), num_frames=9, height=32, width=32, resolution=32)
    check_usable(d)
    assert calls == [str(root / "c0.mp4")]
    (root / "c0.mp4").write_bytes(b"")  # the first is broken: the second is the one usable file found
    calls.clear()
    check_usable(d)
    assert calls == [str(root / "c0.mp4"), str(root / "c1.mp4")]
    # collect's rules: 9-frame videos are too short for 13-frame clips, unless short_video = loop
    with pytest.raises(DataError, match="no usable clips; skipped: 1 empty file, 4 shorter than clip"):
        check_usable(dataclasses.replace(d, num_frames=13))
    check_usable(dataclasses.replace(d, num_frames=13, short_video="loop"))


def _shards(root: Path, n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    zs = []
    for s in range(n):
        z = torch.randn(4, 2, 3, 2, 2, generator=gen)
        write_latent_shard(root / f"shard-{s:05d}", z, [f"c{s}{i}" for i in range(4)], [0] * 4,
                           [f"s{s}{i}" for i in range(4)], [9] * 4)
        zs.append(z)
    return zs


def _nan_data(path: Path) -> None:
    """Overwrite a safetensors file's tensor bytes with float32 NaNs; its header stays intact."""
    raw = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    raw[start:] = b"\x00\x00\xc0\x7f" * ((len(raw) - start) // 4)
    path.write_bytes(bytes(raw))


def test_corrupt_latent_shards_are_skipped_and_counted(tmp_path):
    root = tmp_path / "latents"
    zs = _shards(root)
    cut = root / "shard-00001.safetensors"
    cut.write_bytes(cut.read_bytes()[:40])  # the header itself is cut: found at start-up
    _nan_data(root / "shard-00002.safetensors")  # readable header, NaN values: found when a sample loads
    loader = build_loader(DataConfig(path=str(root)), micro_batch_size=2, seed=0)
    assert loader.kind == "latents" and loader.num_entries == 8 and loader.skip_counts() == {"unreadable shard": 1}
    seen = set()
    it = iter(loader)
    for _ in range(3 * loader.batches_per_epoch):
        b = next(it)
        assert torch.isfinite(b["z_clean"]).all()
        for z, src in zip(b["z_clean"], b["source"]):
            s, i = int(src[1]), int(src[2])
            torch.testing.assert_close(z, zs[s][i], rtol=0, atol=0)  # a replacement is a real, intact sample
            seen.add(src)
    assert {s[1] for s in seen} == {"0"}
    counts = loader.skip_counts()
    assert counts == {"unreadable shard": 1, "load failed: unreadable shard": 1}  # once per shard, like a file


def test_a_folder_of_only_corrupt_shards_is_refused_up_front(tmp_path):
    root = tmp_path / "latents"
    _shards(root, 2)
    for s in range(2):
        p = root / f"shard-{s:05d}.safetensors"
        p.write_bytes(b"\xff" * 64)
    with pytest.raises(DataError, match="no usable clips; skipped: 2 unreadable shard"):
        check_usable(DataConfig(path=str(root)))


def test_shards_are_checked_up_front_until_the_first_readable_one(tmp_path, monkeypatch):
    from ulvideo.data import latents

    root = tmp_path / "latents"
    _shards(root, 3)
    (root / "shard-00000.safetensors").write_bytes(b"\xff" * 64)
    opened = []
    check = latents._check_tensor
    monkeypatch.setattr(latents, "_check_tensor", lambda path, *a: opened.append(Path(path).name) or check(path, *a))
    check_usable(DataConfig(path=str(root)))
    assert opened == ["shard-00000.safetensors", "shard-00001.safetensors"]


def test_one_line_of_an_error_reraised_from_a_loader_worker():
    from torch._utils import ExceptionWrapper

    from ulvideo.cli_io import one_line as _one_line

    try:
        try:
            raise DataError("16 samples in a row failed to load; last: ('a.mp4', 'load failed')")
        except DataError:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
        wrapped.reraise()
    except DataError as e:
        assert "\n" in str(e)  # the worker's traceback is part of the message
        assert _one_line(e) == "16 samples in a row failed to load; last: ('a.mp4', 'load failed')"


def test_an_error_found_only_while_training_is_one_line_and_status_2(tmp_path):
    """Every file probes fine but none decodes past its first frames: found by the loader (in a
    worker process) after the process group started."""
    import av

    data = tmp_path / "late"
    data.mkdir()
    rng = np.random.default_rng(0)
    for k in range(2):
        path = data / f"late{k}.mp4"
        with av.open(str(path), "w", options={"movflags": "faststart"}) as c:  # header first, then data
            s = c.add_stream("libx264", rate=8)
            s.width = s.height = 32
            for _ in range(40):
                for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), np.uint8), format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 4])
    env = {k: v for k, v in __import__("os").environ.items() if k not in RENDEZVOUS}
    r = subprocess.run([sys.executable, "-m", "ulvideo", "train", "configs/ul/tiny.yaml", "--run-dir", str(tmp_path / "run"),
                        f"--data.path={data}", "--data.num_frames=33", "--data.num_workers=1", "--data.decoded_cache_mb=0",
                        "--train.global_batch_size=2", "--train.micro_batch_size=2", "--train.steps=2", "--eval.every=0",
                        "--data.heldout_fraction=0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    [line] = [x for x in r.stderr.splitlines() if x.startswith("ulvideo train")]  # beside the progress bar's
    assert line.startswith("ulvideo train: 16 samples in a row failed to load; last: (") and "late" in line, line
