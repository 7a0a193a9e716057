"""Every numeric config field has a stated range and a value outside it is a ConfigError naming the
key; YAML syntax errors name the file (or the flag) and the line. Through `ulvideo train` each is
one line and exit status 2, before any run directory exists."""
import dataclasses
import types
import typing
from pathlib import Path

import pytest

from ulvideo.config import Config, ConfigError, load_config
from ulvideo.config_checks import RANGES

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "ul" / "tiny.yaml"


def _numeric_kind(tp) -> tuple[str, bool] | None:
    """('int' | 'float', is a list/tuple) for a numeric annotation (optional or not), else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return _numeric_kind(args[0]) if len(args) == 1 else None
    if typing.get_origin(tp) in (list, tuple):
        inner = _numeric_kind(args[0])
        return (inner[0], True) if inner else None
    if tp is int or tp is float:
        return tp.__name__, False
    return None


def numeric_fields() -> list[tuple[str, str, bool, object]]:
    """(dotted key, 'int' | 'float', is a sequence, default) of every numeric leaf of the schema."""
    out = []
    cfg = Config()
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):
            continue
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            kind = _numeric_kind(hints[f.name])
            if kind:
                out.append((f"{section.name}.{f.name}", *kind, getattr(obj, f.name)))
    return out


FIELDS = numeric_fields()


def test_every_numeric_field_has_a_range_and_every_range_a_field():
    keys = {k for k, *_ in FIELDS}
    assert len(keys) > 60
    assert keys - set(RANGES) == set(), "numeric fields without a range in config_checks.RANGES"
    assert set(RANGES) - keys == set(), "ranges of fields the schema does not have"


def _bad_values(kind: str, seq: bool, default) -> list[str]:
    """Values no numeric field accepts: a negative int (every int counts or sizes something), a
    non-finite float. As YAML text for an override flag; a sequence gets one bad item."""
    items = ["-1"] if kind == "int" else [".nan", ".inf", "-.inf"]
    if not seq:
        return items
    n = len(default) if default else 1
    good = [str(v) for v in default] if default else []
    return [f"[{', '.join([bad] + good[1:n])}]" for bad in items]


CASES = [(key, bad) for key, kind, seq, default in FIELDS for bad in _bad_values(kind, seq, default)]


@pytest.mark.parametrize("key,bad", CASES, ids=[f"{k}={b}" for k, b in CASES])
def test_a_value_out_of_range_is_refused_naming_the_key(key, bad):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"--{key}={bad}"])
    assert str(e.value).startswith(f"{key} = "), str(e.value)
    assert "\n" not in str(e.value)


# the edges of the ranges, as the docs state them: (override flags, accepted)
EDGES = [
    (["--train.lr=0"], False), (["--train.lr=1e-9"], True),
    (["--train.global_batch_size=0"], False), (["--train.micro_batch_size=0"], False),
    (["--data.height=0"], False), (["--data.width=0"], False), (["--data.resolution=0"], False),
    (["--data.frame_stride=0"], False), (["--data.num_frames=0"], False), (["--data.target_fps=0"], True),
    (["--data.heldout_fraction=1.0"], False), (["--data.heldout_fraction=0.99"], True),
    (["--base.cond_dropout=1.0"], False), (["--base.cond_dropout=0.0"], True),
    (["--train.ema_decay=1.0"], False), (["--train.ema_decay=0.0"], True),
    (["--train.betas=[0.9, 1.0]"], False), (["--decoder.dropout=1.0"], False), (["--prior.dropout=0.5"], True),
    (["--ul.loss_factor=0"], False), (["--ul.mse_sigma=0"], False), (["--ul.kl_weight=0"], True),
    (["--train.steps=0"], True), (["--eval.every=0"], True), (["--eval.num_clips=0"], False),
    (["--eval.decoder_steps=0"], False), (["--ul.eval_logsnr_samples=0"], False),
    (["--base.text_max_tokens=0"], False), (["--train.zero_stage=4"], False), (["--train.zero_stage=3"], True),
    (["--train.grad_clip=0"], True), (["--decoder.temporal_window=0"], False),
    (["--decoder.logsnr_min=15"], False), (["--ul.prior_logsnr_min=5"], False), (["--ul.latent_logsnr=4"], True),
    (["--prior.widths=[0]"], False), (["--prior.depths=[0]"], False), (["--encoder.channels=[16, 0, 64]"], False),
    (["--encoder.patch_size=3"], False), (["--encoder.temporal_downsample=3"], False),
    (["--encoder.channels=[16, 32]"], False), (["--decoder.width=40"], False),
    (["--data.image_ratio=0.5"], False), (["--data.kind=mixed", "--data.image_ratio=0.5"], True),
    (["--data.kind=mixed", "--data.image_ratio=0.0"], False), (["--data.kind=mixed", "--data.image_ratio=1.0"], False),
]


@pytest.mark.parametrize("flags,ok", EDGES, ids=[" ".join(f) for f, _ in EDGES])
def test_range_edges(flags, ok):
    if ok:
        load_config(TINY, flags)
        return
    key = flags[-1][2:].split("=")[0]
    with pytest.raises(ConfigError, match=key.split(".")[0]):
        load_config(TINY, flags)


def test_context_frames_must_leave_a_frame_to_generate():
    base = ROOT / "configs" / "base" / "tiny.yaml"  # 9 frames: 3 latent frames
    load_config(base, ["--base.context_frames=2"])
    with pytest.raises(ConfigError, match="base.context_frames = 3 leaves no latent frame"):
        load_config(base, ["--base.context_frames=3"])


@pytest.mark.parametrize("text,line", [("train:\n  lr: [1\n", 3), ("train:\n  steps: 3\n bad: : x\n", 3),
                                       ("train: {steps: 3\n", 2)])
def test_yaml_syntax_error_names_the_file_and_line(tmp_path, text, line):
    (tmp_path / "parent.yaml").write_text(text)
    (tmp_path / "child.yaml").write_text("inherit: parent.yaml\n")
    for name in ("parent.yaml", "child.yaml"):  # an inherited file's error names that file
        with pytest.raises(ConfigError) as e:
            load_config(tmp_path / name)
        msg = str(e.value)
        assert msg.startswith(f"{(tmp_path / 'parent.yaml').resolve()}: not valid YAML (line {line}") and "\n" not in msg


def test_yaml_error_in_a_flag_and_a_file_that_is_not_text(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line: the value of '--train.lr=\[1' is not valid YAML \(line 1"):
        load_config(TINY, ["--train.lr=[1"])
    (tmp_path / "latin1.yaml").write_bytes("train:\n  steps: 3 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: cannot be read as UTF-8"):
        load_config(tmp_path / "latin1.yaml")


@pytest.mark.parametrize("flags", [["--train.global_batch_size=0"], ["--data.height=0"], ["--data.frame_stride=0"],
                                   ["--data.heldout_fraction=1.0"], ["--train.lr=-1"], ["--train.lr=.nan"],
                                   ["--train.lr=[1"], ["--base.cond_dropout=1"]])
def test_train_refuses_in_one_line_with_status_2(tmp_path, capsys, flags):
    from ulvideo.cli import main

    run = tmp_path / "run"
    assert main(["train", str(TINY), "--run-dir", str(run), *flags]) == 2
    out, err = capsys.readouterr()
    lines = (out + err).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ulvideo train: ") and "Traceback" not in out + err
    assert flags[0][2:].split("=")[0] in lines[0] and not run.exists()


def test_train_refuses_a_config_file_with_a_syntax_error(tmp_path, capsys):
    from ulvideo.cli import main

    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1\n")
    assert main(["train", str(tmp_path / "bad.yaml"), "--run-dir", str(tmp_path / "run")]) == 2
    out, err = capsys.readouterr()
    lines = (out + err).strip().splitlines()
    assert len(lines) == 1 and "bad.yaml: not valid YAML (line 3" in lines[0] and not (tmp_path / "run").exists()
