"""Strict config loading: unknown keys and wrong types name the key and the file."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ulvideo.config import Config, ConfigError, from_dict, load_config, save_config, to_dict


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_live_in_the_schema():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.ul.latent_logsnr == 5.0 and cfg.ul.prior_logsnr_min == -10.0


def test_yaml_and_dotted_overrides(tmp_path):
    p = write(tmp_path, "a.yaml", {"train": {"lr": "1e-4", "steps": 7}, "ul": {"loss_factor": 2}})
    cfg = load_config(p, ["--train.lr=2e-4", "--data.hflip=true", "--train.betas=[0.8, 0.9]"])
    assert cfg.train.lr == 2e-4 and cfg.train.steps == 7
    assert cfg.ul.loss_factor == 2.0 and isinstance(cfg.ul.loss_factor, float)
    assert cfg.data.hflip is True and cfg.train.betas == (0.8, 0.9)


def test_unknown_key_names_key_and_file(tmp_path):
    p = write(tmp_path, "bad.yaml", {"train": {"learning_rate": 1e-3}})
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.learning_rate"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown key 'nope'"):
        load_config(None, ["--nope=1"])


@pytest.mark.parametrize("key,value", [("train.steps", "ten"), ("train.steps", 1.5), ("data.hflip", 1),
                                       ("prior.attention", "sparse"), ("train.betas", [0.9])])
def test_wrong_types_are_errors(tmp_path, key, value):
    section, name = key.split(".")
    p = write(tmp_path, "t.yaml", {section: {name: value}})
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(p)


def test_cross_key_validation():
    with pytest.raises(ConfigError, match="1 \\+ 4k"):
        load_config(None, ["--data.num_frames=8"])
    with pytest.raises(ConfigError, match="multiple"):
        load_config(None, ["--train.global_batch_size=10", "--train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="multiple of encoder.spatial_downsample"):
        load_config(None, ["--data.height=36"])


def test_inherit_and_round_trip(tmp_path):
    write(tmp_path, "parent.yaml", {"train": {"steps": 3, "lr": 0.1}})
    child = write(tmp_path, "child.yaml", {"inherit": "parent.yaml", "train": {"lr": 0.5}})
    cfg = load_config(child)
    assert (cfg.train.steps, cfg.train.lr) == (3, 0.5)
    save_config(cfg, tmp_path / "out.yaml")
    save_config(cfg, tmp_path / "out.json")
    assert load_config(tmp_path / "out.yaml") == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_cli_lists_the_six_subcommands_and_refuses_unknown_flags():
    out = subprocess.run([sys.executable, "-m", "ulvideo", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("train", "generate", "encode", "decode", "fvd", "data"):
        assert cmd in out
    for cmd in ("train", "generate", "encode", "decode", "fvd", "data"):
        r = subprocess.run([sys.executable, "-m", "ulvideo", cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout


def _parsers(parser, path=("ulvideo",)):
    """(command path, parser) for the top-level parser and every sub-command, depth first."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"{' '.join(path)} {name}: no help line in the command list"
                yield from _parsers(sub, path + (name,))


def test_every_cli_option_has_help():
    import argparse

    from ulvideo.cli import build_parser

    seen, missing = 0, []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            seen += 1
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert seen > 60 and not missing, missing


def test_missing_exports_say_where_exports_come_from():
    for argv, wanted in ((["generate", "--out", "x.mp4"], ("--export", "--base")),
                         (["encode", "--input", "a.mp4", "--out", "z"], ("--export",)),
                         (["decode", "--input", "z", "--out", "x.mp4"], ("--export",))):
        r = subprocess.run([sys.executable, "-m", "ulvideo", *argv], capture_output=True, text=True)
        assert r.returncode == 2
        for opt in wanted:
            assert f"  {opt}: a stage-" in r.stderr and "RUN/exports/latest.safetensors" in r.stderr
        assert "ulvideo train configs/ul/tiny.yaml --run-dir RUN" in r.stderr


def test_synth_defaults_are_the_data_of_the_tiny_config():
    from ulvideo.cli import build_parser

    args = build_parser().parse_args(["data", "synth", "--out", "x"])
    d = load_config(Path(__file__).resolve().parents[1] / "configs" / "ul" / "tiny.yaml").data
    assert (args.frames, args.size, args.size) == (d.num_frames, d.height, d.width)
