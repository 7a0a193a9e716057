"""Strict config loading: unknown keys and wrong types name the key and the file."""
import subprocess
import sys

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
