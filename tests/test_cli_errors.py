"""Bad input to a command: exit status 2, exactly one line on stderr (no traceback), nothing that
was already on disk changed, and no output written. Run in process (`ulvideo.cli.main`) on tiny
exports made here; every case builds its own bad input."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ulvideo.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.num_frames=5", "--data.resolution=16", "--data.height=16", "--data.width=16",
         "--encoder.latent_channels=4", "--data.heldout_fraction=0.0"]
C = 4  # latent channels of the stage-1 export; a 5-frame 16x16 clip gives z_clean (4, 2, 4, 4)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A stage-1 export, a text-conditioned base export on its latents, a few shapes clips."""
    from ulvideo.config import load_config
    from ulvideo.data.shapes import write_dataset
    from ulvideo.exports import save_export
    from ulvideo.text import load_text_encoder
    from ulvideo.ul import LatentDiffusion, UnifiedLatents

    tmp = tmp_path_factory.mktemp("cli_errors")
    torch.manual_seed(0)
    cfg1 = load_config(ROOT / "configs/ul/tiny.yaml", SMALL)
    meta1 = {"stage": "ul", "latent_logsnr": 5.0, "prior_logsnr_min": -10.0}
    s1 = save_export(tmp / "stage1", UnifiedLatents(cfg1).state_dict(), cfg1, meta1)
    cfg2 = load_config(ROOT / "configs/base/tiny.yaml", SMALL + [f"--base.stage1_export={s1}"])
    text = load_text_encoder("minilm", cfg2.base.text_max_tokens)
    base = save_export(tmp / "base", LatentDiffusion(cfg2, cfg1, text_dim=text.dim).state_dict(), cfg2,
                       {**meta1, "stage": "base", "text_dim": text.dim, "text_encoder": text.fingerprint()})
    write_dataset(tmp / "shapes", 3, 5, 16, 0, 8)
    z = tmp / "z.safetensors"
    save_file({"z_clean": torch.randn(C, 2, 4, 4)}, str(z), metadata={"fps": "8"})
    return {"tmp": tmp, "s1": s1, "base": base, "clip": tmp / "shapes" / "shape_00000.mp4", "z": z,
            "data": tmp / "shapes"}


def snapshot(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(capsys, env, argv, *expect) -> str:
    """Run `ulvideo ARGV`; assert status 2, one stderr line holding `expect`, and an unchanged disk."""
    before = snapshot(env["tmp"])
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, out, err)
    assert "Traceback" not in out + err
    command = " ".join(str(a) for a in argv[:2] if str(a) in ("fvd", "data", "ref", "calc", "scan", "pack")) or argv[0]
    assert lines[0].startswith(f"ulvideo {command}: "), lines[0]
    for text in expect:
        assert text in lines[0], (text, lines[0])
    assert snapshot(env["tmp"]) == before, "a refused command changed or wrote files"
    return lines[0]


@pytest.fixture()
def work(env):
    """A fresh folder inside the watched tree for one case's inputs and outputs."""
    d = env["tmp"] / "work"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


# ---- exports ---------------------------------------------------------------------------------


def _copy_export(env, dst: Path, src_key="s1", weights=None, side=None) -> Path:
    src = env[src_key]
    w = load_file(str(src))
    if weights:
        w = weights(w)
    save_file(w, str(dst))
    info = json.loads(src.with_suffix(".json").read_text())
    dst.with_suffix(".json").write_text(side(info) if side else json.dumps(info))
    return dst


def _first(w):
    return next(iter(w))


EXPORTS = {
    "wrong shape": (dict(weights=lambda w: {**w, _first(w): torch.zeros(3, 3)}), ["do not fit", "(3, 3)"]),
    "config does not match the weights": (
        dict(side=lambda i: json.dumps({**i, "config": {**i["config"], "encoder": {**i["config"]["encoder"],
                                                                                   "latent_channels": 8}}})),
        ["do not fit", "of another shape"]),
    "json is a list": (dict(side=lambda i: "[1, 2]"), ["not a ulvideo export config", "got list"]),
    "json syntax": (dict(side=lambda i: "{'config': "), ["not a ulvideo export config"]),
    "config out of range": (dict(side=lambda i: json.dumps({**i, "config": {**i["config"], "train": {
        **i["config"]["train"], "lr": -1}}})), ["train.lr = -1"]),
    "NaN weights": (dict(weights=lambda w: {k: v.fill_(float("nan")) if k == _first(w) else v for k, v in w.items()}),
                    ["NaN or infinite"]),
    "fp16 weights": (dict(weights=lambda w: {k: v.half() for k, v in w.items()}), ["not float32", "float16"]),
    "int weights": (dict(weights=lambda w: {k: v.long() for k, v in w.items()}), ["not float32", "int64"]),
    "missing tensor": (dict(weights=lambda w: {k: v for k, v in list(w.items())[1:]}), ["do not fit", "1 missing"]),
    "base export given as stage 1": (dict(), ["not a stage-1 (ul) export"]),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_bad_stage1_export(capsys, env, work, case):
    how, expect = EXPORTS[case]
    export = _copy_export(env, work / "e.safetensors", "base" if "base" in case else "s1", **how)
    refused(capsys, env, ["encode", "--export", export, "--input", env["clip"], "--out", work / "z.safetensors"],
            str(export.with_suffix(".json") if "json" in case else export) if case != "config out of range" else "",
            *expect)


def test_truncated_or_missing_export_files(capsys, env, work):
    export = _copy_export(env, work / "e.safetensors")
    export.write_bytes(export.read_bytes()[:1000])
    refused(capsys, env, ["encode", "--export", export, "--input", env["clip"], "--out", work / "z.safetensors"],
            "cannot read safetensors")
    export.with_suffix(".json").unlink()
    refused(capsys, env, ["decode", "--export", export, "--input", env["z"], "--out", work / "x.mp4"],
            "export config not found")
    refused(capsys, env, ["decode", "--export", work / "none.safetensors", "--input", env["z"], "--out", work / "x.mp4"],
            "export weights not found")
    for empty in ("", "."):  # Path("").with_suffix raised ValueError inside the loader
        refused(capsys, env, ["encode", "--export", empty, "--input", env["clip"], "--out", work / "z.safetensors"],
                f"export path {empty!r} names no file")


def test_bad_base_export(capsys, env, work):
    base = _copy_export(env, work / "b.safetensors", "base", weights=lambda w: {**w, _first(w): torch.zeros(2)})
    refused(capsys, env, ["generate", "--export", env["s1"], "--base", base, "--prompt", "a", "--out", work / "g.mp4"],
            str(base), "do not fit the base model")


# ---- decode: the latent file ------------------------------------------------------------------


def _z(path: Path, tensor=None, key="z_clean", metadata=None) -> Path:
    save_file({key: torch.zeros(C, 2, 4, 4) if tensor is None else tensor}, str(path), metadata=metadata)
    return path


LATENTS = {
    "truncated": (lambda p: p.write_bytes(_z(p).read_bytes()[:60]), ["not a readable safetensors file"]),
    "not safetensors": (lambda p: p.write_text("z_clean = 1"), ["not a readable safetensors file"]),
    "wrong key": (lambda p: _z(p, key="z"), ["no 'z_clean' tensor", "it holds z"]),
    "3-D": (lambda p: _z(p, torch.zeros(C, 2, 4)), ["shape (4, 2, 4)", "expected (4, T', H', W')"]),
    "wrong channels": (lambda p: _z(p, torch.zeros(3, 2, 4, 4)), ["shape (3, 2, 4, 4)"]),
    "a batch of 2": (lambda p: _z(p, torch.zeros(2, C, 2, 4, 4)), ["shape (2, 4, 2, 4, 4)"]),
    "fp16": (lambda p: _z(p, torch.zeros(C, 2, 4, 4).half()), ["torch.float16, expected float32"]),
    "int64": (lambda p: _z(p, torch.zeros(C, 2, 4, 4, dtype=torch.long)), ["torch.int64, expected float32"]),
    "NaN": (lambda p: _z(p, torch.zeros(C, 2, 4, 4).index_fill_(0, torch.tensor([1]), float("nan"))),
            ["32 NaN or infinite values"]),
    "odd size": (lambda p: _z(p, torch.zeros(C, 2, 3, 5)), ["must be divisible"]),
    "bad fps metadata": (lambda p: _z(p, metadata={"fps": "fast"}), ["fps = 'fast' is not a frame rate"]),
    "missing": (lambda p: None, ["no such file"]),
}


@pytest.mark.parametrize("case", list(LATENTS))
def test_bad_latent_file(capsys, env, work, case):
    make, expect = LATENTS[case]
    z = work / "in.safetensors"
    make(z)
    line = refused(capsys, env, ["decode", "--export", env["s1"], "--input", z, "--out", work / "x.mp4", "--steps", 2],
                   *expect)
    assert case == "odd size" or str(z) in line


DECODE_ARGS = {
    "unsupported suffix": (["--out", "{w}/x.avi"], ["unsupported suffix '.avi'"]),
    "no suffix": (["--out", "{w}/x"], ["unsupported suffix ''"]),
    "steps 0": (["--out", "{w}/x.mp4", "--steps", "0"], ["--steps 0: must be >= 1"]),
    "tile 0": (["--out", "{w}/x.mp4", "--tile", "0"], ["--tile 0: must be >= 1"]),
    "chunk not a multiple of 4": (["--out", "{w}/x.mp4", "--chunk", "3"], ["chunk"]),
    "stop outside the schedule": (["--out", "{w}/x.mp4", "--logsnr-end", "99"], ["logsnr_end = 99"]),
    "out is a folder": (["--out", "{w}/dir.mp4"], ["is a directory"]),
}


@pytest.mark.parametrize("case", list(DECODE_ARGS))
def test_bad_decode_arguments(capsys, env, work, case):
    args, expect = DECODE_ARGS[case]
    (work / "dir.mp4").mkdir()
    refused(capsys, env, ["decode", "--export", env["s1"], "--input", env["z"],
                          *[a.format(w=work) for a in args]], *expect)


# ---- outputs: never an input, never an existing file without --overwrite -----------------------


def test_decode_never_replaces_the_png_beside_its_video(capsys, env, work):
    (work / "X.png").write_bytes(b"an unrelated picture")
    refused(capsys, env, ["decode", "--export", env["s1"], "--input", env["z"], "--out", work / "X.mp4", "--steps", 2],
            f"{work / 'X.png'} exists; pass --overwrite")
    (work / "Y.mp4").write_bytes(b"an earlier clip")
    refused(capsys, env, ["decode", "--export", env["s1"], "--input", env["z"], "--out", work / "Y.mp4", "--steps", 2],
            f"{work / 'Y.mp4'} exists")
    # with --overwrite both are replaced by the decoded clip and its sheet
    assert main(["decode", "--export", str(env["s1"]), "--input", str(env["z"]), "--out", str(work / "X.mp4"),
                 "--steps", "2", "--overwrite"]) == 0
    assert (work / "X.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (work / "X.mp4").stat().st_size > 100


def test_encode_outputs(capsys, env, work):
    export = _copy_export(env, work / "e.safetensors")
    for flags in ([], ["--overwrite"]):  # an input is never replaced, --overwrite or not
        refused(capsys, env, ["encode", "--export", export, "--input", env["clip"], "--out", export, *flags],
                "is also an input")
    refused(capsys, env, ["encode", "--export", env["s1"], "--input", env["clip"], "--out", env["clip"]],
            "a latent file is written as NAME.safetensors")
    (work / "z.safetensors").write_bytes(b"earlier")
    refused(capsys, env, ["encode", "--export", env["s1"], "--input", env["clip"], "--out", work / "z.safetensors"],
            "exists; pass --overwrite")
    assert main(["encode", "--export", str(env["s1"]), "--input", str(env["clip"]), "--out", str(work / "z.safetensors"),
                 "--overwrite"]) == 0
    assert load_file(str(work / "z.safetensors"))["z_clean"].shape == (C, 2, 4, 4)
    assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_encode_data_outputs(capsys, env, work):
    refused(capsys, env, ["encode", "--export", env["s1"], "--data", env["data"], "--out", env["data"] / "latents"],
            "lies inside --data")
    refused(capsys, env, ["encode", "--export", env["s1"], "--data", env["data"], "--out", env["data"]],
            "lies inside --data")
    refused(capsys, env, ["encode", "--export", env["s1"], "--data", env["data"], "--out", work / "l", "--tile", 8],
            "apply to --input")
    refused(capsys, env, ["encode", "--export", env["s1"], "--data", env["data"], "--out", work / "l", "--num-frames", 6],
            "--num-frames 6: clips must have 1 + 4k frames")
    (work / "file").write_text("x")
    refused(capsys, env, ["encode", "--export", env["s1"], "--data", env["data"], "--out", work / "file"],
            "is a file")
    broken = work / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"b{i}.mp4").write_bytes(b"\0" * (100 * i))
    refused(capsys, env, ["encode", "--export", env["s1"], "--data", broken, "--out", work / "l"],
            "no usable clips", "empty file", "not a video")


ENCODE_INPUTS = {
    "not a video": (lambda p: p.write_text("hello\n" * 50), "clip.mp4", ["not a video"]),
    "empty": (lambda p: p.write_bytes(b""), "clip.mp4", ["clip.mp4: empty file"]),
    "missing": (lambda p: None, "clip.mp4", ["missing file"]),
    "a text file": (lambda p: p.write_text("hello"), "notes.txt", ["notes.txt"]),
    "broken image": (lambda p: p.write_bytes(b"\x89PNG not really"), "frame.png", ["unreadable image", "frame.png"]),
    "missing image": (lambda p: None, "frame.png", ["frame.png"]),
}


@pytest.mark.parametrize("case", list(ENCODE_INPUTS))
def test_bad_encode_input(capsys, env, work, case):
    make, name, expect = ENCODE_INPUTS[case]
    make(work / name)
    refused(capsys, env, ["encode", "--export", env["s1"], "--input", work / name, "--out", work / "z.safetensors"],
            *expect)


@pytest.mark.parametrize("flags,expect", [(["--num-frames", "6"], "cannot take 6 frames"),
                                          (["--num-frames", "0"], "--num-frames 0: must be >= 1"),
                                          (["--chunk", "0"], "--chunk 0: must be >= 1"),
                                          (["--chunk", "6"], "chunk")])
def test_bad_encode_arguments(capsys, env, work, flags, expect):
    refused(capsys, env, ["encode", "--export", env["s1"], "--input", env["clip"], "--out", work / "z.safetensors",
                          *flags], expect)


# ---- generate ----------------------------------------------------------------------------------


GENERATE = {
    "num-frames 6": (["--prompt", "a", "--num-frames", "6", "--out", "{w}/g.mp4"], ["--num-frames 6: must be 1 + 4k"]),
    "steps 0": (["--prompt", "a", "--steps", "0", "--out", "{w}/g.mp4"], ["--steps 0"]),
    "decoder-steps 0": (["--prompt", "a", "--decoder-steps", "0", "--out", "{w}/g.mp4"], ["--decoder-steps 0"]),
    "batch-size 0": (["--prompt", "a", "--batch-size", "0", "--out", "{w}/g.mp4"], ["--batch-size 0"]),
    "guidance nan": (["--prompt", "a", "--guidance", "nan", "--out", "{w}/g.mp4"], ["--guidance nan"]),
    "unsupported suffix": (["--prompt", "a", "--out", "{w}/g.avi"], ["unsupported suffix '.avi'"]),
    "several clips to one file": (["--prompt", "a", "--prompt", "b", "--out", "{w}/g.mp4"], ["2 clips", "folder"]),
    "prompts not UTF-8": (["--prompts", "{w}/latin1.txt", "--out", "{w}/g.mp4"], ["not UTF-8 text (line 2"]),
    "prompts empty": (["--prompts", "{w}/empty.txt", "--out", "{w}/g.mp4"], ["no prompts"]),
    "prompts missing": (["--prompts", "{w}/none.txt", "--out", "{w}/g.mp4"], ["no such file"]),
    "labels for a text model": (["--label", "1", "--out", "{w}/g.mp4"], ["no class labels"]),
    "prompts and labels differ": (["--prompt", "a", "--label", "0", "--label", "1", "--out", "{w}/g"],
                                  ["1 prompts and 2 labels"]),
    "context for a model without": (["--prompt", "a", "--context", "{clip}", "--out", "{w}/g.mp4"],
                                    ["trained without context frames"]),
    "stop outside the schedule": (["--prompt", "a", "--decoder-logsnr-end", "99", "--out", "{w}/g.mp4"],
                                  ["logsnr_end = 99"]),
    "out is the context video": (["--prompt", "a", "--context", "{w}/c.mp4", "--out", "{w}/c.mp4", "--overwrite"],
                                 ["is also an input"]),
    "existing video": (["--prompt", "a", "--out", "{w}/old.mp4"], ["old.mp4 exists; pass --overwrite"]),
    "existing png beside it": (["--prompt", "a", "--out", "{w}/pic.mp4"], ["pic.png exists"]),
    "existing sample in the folder": (["--prompt", "a", "--prompt", "b", "--out", "{w}/dir"],
                                      ["sample_0001.png exists"]),
}


@pytest.mark.parametrize("case", list(GENERATE))
def test_bad_generate(capsys, env, work, case):
    args, expect = GENERATE[case]
    (work / "latin1.txt").write_bytes("a red circle\nun caf\xe9 rouge\n".encode("latin-1"))
    (work / "empty.txt").write_text("\n  \n")
    shutil.copy(env["clip"], work / "c.mp4")
    (work / "old.mp4").write_bytes(b"old")
    (work / "pic.png").write_bytes(b"pic")
    (work / "dir").mkdir()
    (work / "dir" / "sample_0001.png").write_bytes(b"pic")
    argv = ["generate", "--export", env["s1"], "--base", env["base"], "--steps", "2", "--decoder-steps", "2"]
    refused(capsys, env, argv + [a.format(w=work, clip=env["clip"]) for a in args], *expect)


def test_long_prompts_are_named_once_each_with_the_limit(capsys, env, work):
    from ulvideo.text import load_text_encoder

    long = "a small red circle moving slowly to the left " * 6
    tok = load_text_encoder("minilm", 32).tokenizer
    n = len(tok(long)["input_ids"])  # untruncated, with [CLS] and [SEP]
    assert n > 32
    assert main(["generate", "--export", str(env["s1"]), "--base", str(env["base"]), "--steps", "1", "--decoder-steps",
                 "1", "--prompt", long, "--prompt", "a blue square", "--prompt", long, "--out", str(work / "g")]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning: prompt" in line]
    assert len(warnings) == 1 and f"is {n} tokens" in warnings[0] and "reads the first 32" in warnings[0]
    assert repr(long[:57] + "...") in warnings[0]
    assert sorted(p.name for p in (work / "g").iterdir()) == [f"sample_000{i}.{e}" for i in range(3) for e in ("mp4", "png")]


# ---- fvd and data --------------------------------------------------------------------------------


def test_fvd_and_data_outputs(capsys, env, work):
    (work / "ref.npz").write_bytes(b"statistics")
    refused(capsys, env, ["fvd", "calc", "--videos", env["data"], "--ref", work / "ref.npz", "--out", work / "ref.npz",
                          "--overwrite"], "is also an input")
    (work / "fvd.json").write_text("{}")
    refused(capsys, env, ["fvd", "calc", "--videos", env["data"], "--ref", work / "ref.npz", "--out", work / "fvd.json"],
            "fvd.json exists")
    refused(capsys, env, ["fvd", "calc", "--videos", env["data"], "--ref", work / "ref.npz", "--batch-size", 0],
            "--batch-size 0")
    refused(capsys, env, ["fvd", "ref", "--data", env["data"], "--preset", "tats-fvd2048-16f", "--out",
                          work / "ref.npz"], "ref.npz exists")
    (work / "scan.json").write_text("{}")
    refused(capsys, env, ["data", "scan", env["data"], "--out", work / "scan.json"], "scan.json exists")
    refused(capsys, env, ["data", "pack", env["data"], "--out", env["data"]], "is the source folder")
