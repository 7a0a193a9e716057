"""Configuration: dataclasses hold the only defaults; YAML files and CLI flags hold overrides.

    cfg = load_config("configs/ul/tiny.yaml", ["--train.lr=2e-4", "--data.num_frames=9"])

Loading is strict: an unknown key or a value of the wrong type is a `ConfigError` that names the
key and the file (or the command-line flag) it came from. A YAML file may start with
`inherit: other.yaml` (a path relative to it) to layer its overrides on another file's.
The resolved config is written with every run (`save_config`) and with every export (`to_dict`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value that cannot be accepted; the message names the key and its source."""


# --------------------------------------------------------------------------------------------
# Schema. Every default of the project lives here.
# --------------------------------------------------------------------------------------------


@dataclass
class EncoderConfig:
    size: str = "tiny"  # a name in ulvideo.nets.SIZES; the fields below override it when set
    latent_channels: int = 16
    patch_size: int = 1  # spatial-only patching (1 = none, 2 = 2x2)
    temporal_downsample: int = 4  # 4 -> T = 1 + 4k frames give 1 + k latent frames
    spatial_downsample: int = 8  # includes the patch size
    # architecture overrides of the named size (None = the size's value, ulvideo/nets/sizes.py)
    channels: list[int] | None = None  # one width per level: log2(max(downsampling)) + 1 entries
    num_res_blocks: int | None = None
    # groups of the output head's per-frame norm: 1 keeps each channel group's contrast (an
    # object's colour) relative to the others; 0 = the trunk's grouping (ulvideo/nets/encoder.py)
    head_norm_groups: int = 1


@dataclass
class PriorConfig:
    size: str = "tiny"
    attention: Literal["full", "factorized"] = "full"
    temporal_causal: bool = False  # frame i attends frames <= i only
    prediction: Literal["x", "eps", "v"] = "x"
    widths: list[int] | None = None  # overrides of the named size (None = the size's value)
    depths: list[int] | None = None
    dropout: float | None = None


@dataclass
class DecoderConfig:
    size: str = "tiny"
    prediction: Literal["x", "eps", "v"] = "v"
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0
    shift: float = 0.0  # simple diffusion's resolution shift, 2*log(base/resolution)
    loss: Literal["diffusion", "mse"] = "diffusion"  # "mse": the paper's Table-5 ablation
    mse_sigma: float = 0.1  # loss = c_lf * ||x - x_hat||^2 / (2 mse_sigma^2) nats, for loss = mse
    # sampling stops at this logSNR and returns the network's clean prediction there (None = at
    # logsnr_max). Lower ends keep more of the posterior mean and less sampled detail: the
    # prediction at logSNR 0 averages over what the decoder would still invent above it
    sample_logsnr_end: float | None = None
    attention: Literal["full", "factorized"] = "full"  # middle transformer; always causal in time
    # middle transformer: frame f attends (pixel) frames f - W + 1 .. f only; None = every earlier
    # frame. Bounds streamed decoding's key/value cache to W - 1 frames (memory flat in clip length)
    temporal_window: int | None = None
    # architecture overrides of the named size (None = the size's value)
    patch_size: int | None = None
    channels: list[int] | None = None
    num_res_blocks: int | None = None
    width: int | None = None
    depth: int | None = None
    dropout: float | None = None
    # std of the output conv's initial weights: 0 = zero (ADM: the first prediction is 0 for every
    # input); > 0 = small random weights, so the output's colour channels do not start identical
    output_init_std: float = 0.0


@dataclass
class ULConfig:
    """Stage-1 objective (ulvideo/ul.py owns these values)."""

    latent_logsnr: float = 5.0  # lambda_0: the fixed noise level of z0
    prior_logsnr_min: float = -10.0
    loss_factor: float = 1.5  # c_lf
    sigmoid_bias: float = 0.0  # b_dec
    time_sampling: Literal["uniform", "stratified", "antithetic"] = "stratified"
    rate_hold_steps: int = 0  # prior trains on z_clean.detach() for these steps
    rate_ramp_steps: int = 0  # then the rate's gradient scale ramps 0 -> 1 over these steps
    # start-up reconstruction term: while the rate is held (and fading out as it ramps in), add
    # (1 - rate scale) * w / 2 * ||x - x_hat(x_lmin, z0, lmin)||^2 nats, the decoder's prediction at
    # its lowest logSNR (where only z0 informs it) made to count. 0 = off; after the ramp: exact UL.
    startup_recon_weight: float = 0.0
    # its own schedule (None = the rate's): scale 1 for startup_hold_steps, then a linear fade to 0
    # over startup_fade_steps. Ending it before the rate ramps in leaves the decoder's diffusion
    # loss steps without the term (its gradient dominates the decoder's while it is on)
    startup_hold_steps: int | None = None
    startup_fade_steps: int | None = None
    # clips of each batch the start-up term is computed on (0 = all; with startup_pass shared,
    # 0 = half): a separate pass costs one more decoder pass over them, so fewer clips make a
    # start-up step cheaper; the term is rescaled by B / k
    startup_clips: int = 0
    # "separate": the term's own decoder pass (over startup_clips clips); "shared": no extra pass,
    # the first k = startup_clips clips (0 = half the batch) of the decoder's one pass are put at
    # its lowest logSNR and carry the term, the other B - k carry the diffusion loss (each part
    # rescaled so its batch mean stays unbiased); a start-up step then costs what a later one does
    startup_pass: Literal["separate", "shared"] = "separate"
    # the decoder's input for the start-up term: "noise", x at the lowest logSNR (what sampling
    # starts from), or "zeros" (the MSE decoder's input)
    startup_input: Literal["noise", "zeros"] = "noise"
    # scale k of the start-up error's chroma (its part orthogonal to grey, e - mean_rgb(e)): its
    # squared error counts k^2 times. An object's colour is a low-variance direction of pixel space
    # next to its luminance footprint, and an MSE autoencoder learns it last (ulvideo/ul.py)
    startup_chroma_weight: float = 1.0
    # what makes the start-up term's prediction: "decoder", the diffusion decoder at its lowest
    # logSNR (one more decoder pass; its gradient then dominates the decoder's and the diffusion
    # loss waits for the term to fade), or "readout", a small per-latent-position network z0 ->
    # pixels (`LatentReadout`, width startup_readout_width) that leaves the decoder to the
    # diffusion loss alone and costs ~nothing. Only the encoder is shared with the diffusion terms.
    startup_head: Literal["decoder", "readout"] = "decoder"
    startup_readout_width: int = 128
    regularizer: Literal["diffusion_prior", "kl_vae"] = "diffusion_prior"
    kl_weight: float = 1.0  # beta, for regularizer = kl_vae
    eval_logsnr_samples: int = 32  # K stratified logSNRs per clip for held-out bits


@dataclass
class BaseConfig:
    """Stage-2 base model."""

    size: str = "tiny"
    stage1_export: str = ""  # path to a stage-1 export (.safetensors with its .json beside it)
    prediction: Literal["x", "eps", "v"] = "v"
    sigmoid_bias: float = 0.0  # b_base
    text_encoder: str = "minilm"  # "minilm", "none", or a local Hugging Face folder
    text_max_tokens: int = 32
    # also add the prompt's masked-mean token embedding (what a sentence encoder such as MiniLM is
    # trained to compare) to the logSNR conditioning, beside the cross-attention to its tokens
    text_pooled: bool = False
    num_classes: int = 0
    context_frames: int = 0  # latent frames given as clean conditioning (frame prediction)
    cond_dropout: float = 0.1  # CFG dropout probability
    attention: Literal["full", "factorized"] = "full"
    temporal_causal: bool = False  # frame i attends frames <= i only
    widths: list[int] | None = None  # overrides of the named size (None = the size's value)
    depths: list[int] | None = None
    dropout: float | None = None


@dataclass
class DataConfig:
    # a folder of videos (recursive) or images, latent shards, or WebDataset shards (a folder, a text
    # file listing them, a brace pattern); local or a URL (s3://, gs://, https://: docs/data.md)
    path: str = "data/shapes"
    kind: Literal["auto", "video", "image", "mixed", "latents", "webdataset"] = "auto"
    image_path: str = ""  # images for kind = mixed
    image_ratio: float = 0.0  # fraction of image (T = 1) batches for kind = mixed
    # CSV, JSONL or Parquet: path, text, num_frames, fps, height, width, start, end, label (docs/data.md);
    # rows with num_frames and fps are not probed at start-up (`ulvideo data scan --out M.parquet` writes one)
    manifest: str = ""
    num_frames: int = 17  # 1 + 4k
    frame_stride: int = 1
    target_fps: float = 0.0  # > 0 picks frames at this rate instead of frame_stride
    temporal_offset: Literal["random", "center"] = "random"
    resolution: int = 64  # short side after resize
    height: int = 64  # crop size
    width: int = 64
    crop: Literal["center", "random"] = "center"
    hflip: bool = False
    short_video: Literal["skip", "loop"] = "skip"
    missing_caption: Literal["empty", "skip"] = "empty"
    backend: Literal["auto", "decord", "pyav", "torchcodec"] = "auto"
    num_workers: int = 0
    # decoded frames kept per loading process (LRU, MiB; 0 = off): a small dataset is decoded in
    # its first epoch only (loader workers live for the whole run)
    decoded_cache_mb: float = 0.0
    # files (shards for kind webdataset) held out for evaluation by a hash of the path; at least one
    # when > 0 and there are two or more
    heldout_fraction: float = 0.0


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations on the held-out set (0 = off)
    num_clips: int = 8
    decoder_steps: int = 32
    fvd_preset: str = ""  # a name in ulvideo.eval.fvd.PRESETS; rFVD is logged only when set and weights exist
    i3d_weights: str = ""  # file or folder; empty: $ULVIDEO_I3D, then the cache dir
    i3d_sha256: str = ""  # confirms a TorchScript I3D file whose hash no publisher states


@dataclass
class TrainConfig:
    seed: int = 0
    steps: int = 1000
    global_batch_size: int = 8
    micro_batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # decay min(ema_decay, (1 + step) / (10 + step)): short runs and early exports are not dominated
    # by the initial weights (the warm-up of diffusers' and timm's EMA)
    ema_warmup: bool = True
    zero_stage: int = 2
    offload_optimizer: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    torch_adam: bool = True  # False uses DeepSpeed's fused/CPU Adam (compiled at first use)
    activation_checkpointing: bool = False
    attention_backend: str = "auto"
    log_every: int = 10
    recon_every: int = 200
    ckpt_every: int = 200
    keep_last: int = 3
    max_nonfinite_skips: int = 20


@dataclass
class Config:
    stage: Literal["ul", "base"] = "ul"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    ul: ULConfig = field(default_factory=ULConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------
# Strict merging of plain data into the schema.
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail(expect: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}' expects {expect}, got {value!r} ({type(value).__name__})")

    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            if arm is type(None) and value is None:
                return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce(value, arm, key, source)
            except ConfigError:
                pass
        raise fail(_type_name(tp))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(_type_name(tp))
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise fail(f"{len(args)} items")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise fail("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise fail("a number")
    if tp is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise fail(_type_name(tp))  # pragma: no cover - schema uses only the types above


def merge(obj: Any, data: dict, source: str, prefix: str = "") -> Any:
    """Return a copy of dataclass `obj` with `data` (nested dicts) merged in, strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    updates = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{dotted}' (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            updates[key] = merge(current, value, source, dotted + ".")
        else:
            updates[key] = _coerce(value, hints[key], dotted, source)
    return dataclasses.replace(obj, **updates)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The layers of a YAML file, inherited ones first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'inherit' cycle through {', '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    layers: list[tuple[dict, str]] = []
    parent = data.pop("inherit", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: key 'inherit' expects a path string")
        layers += _read_yaml(path.parent / parent, seen + (path,))
    layers.append((data, str(path)))
    return layers


def parse_override(flag: str) -> dict:
    """'--train.lr=2e-4' -> {'train': {'lr': 2e-4}} (the value is read as YAML)."""
    text = flag[2:] if flag.startswith("--") else flag
    if "=" not in text:
        raise ConfigError(f"command line: override '{flag}' must look like --section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"command line: bad override key in '{flag}'")
    value = yaml.safe_load(raw) if raw != "" else ""
    nested: dict = {}
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    cfg = Config()
    if path is not None:
        for data, source in _read_yaml(Path(path)):
            cfg = merge(cfg, data, source)
    for flag in overrides:
        cfg = merge(cfg, parse_override(flag), f"command line '{flag}'")
    validate(cfg)
    return cfg


def check_sample_logsnr_end(decoder: DecoderConfig, end: float | None) -> None:
    """`decoder.sample_logsnr_end` must lie in (logsnr_min, logsnr_max] (None: logsnr_max)."""
    if end is not None and not decoder.logsnr_min < end <= decoder.logsnr_max:
        raise ConfigError(f"decoder.sample_logsnr_end = {end} must lie in (decoder.logsnr_min, decoder.logsnr_max] "
                          f"= ({decoder.logsnr_min}, {decoder.logsnr_max}]")


def validate(cfg: Config) -> None:
    """Checks across keys that the types alone cannot express, before any compute starts."""
    d = cfg.data
    if d.num_frames < 1 or (d.num_frames - 1) % cfg.encoder.temporal_downsample:
        raise ConfigError(
            f"data.num_frames = {d.num_frames}: frames must be 1 + {cfg.encoder.temporal_downsample}k "
            "(the causal encoder maps 1 + 4k frames to 1 + k latent frames)"
        )
    for name in ("height", "width"):
        if getattr(d, name) % cfg.encoder.spatial_downsample:
            raise ConfigError(
                f"data.{name} = {getattr(d, name)} must be a multiple of encoder.spatial_downsample "
                f"= {cfg.encoder.spatial_downsample}"
            )
    t = cfg.train
    if t.micro_batch_size < 1 or t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size = {t.global_batch_size} must be a positive multiple of "
            f"train.micro_batch_size = {t.micro_batch_size}"
        )
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage = {t.zero_stage} must be 0, 1, 2 or 3")
    if not cfg.ul.prior_logsnr_min < cfg.ul.latent_logsnr:
        raise ConfigError("ul.prior_logsnr_min must be below ul.latent_logsnr")
    if not cfg.decoder.logsnr_min < cfg.decoder.logsnr_max:
        raise ConfigError("decoder.logsnr_min must be below decoder.logsnr_max")
    check_sample_logsnr_end(cfg.decoder, cfg.decoder.sample_logsnr_end)
    w = cfg.decoder.temporal_window
    if w is not None and (isinstance(w, bool) or w < 1):
        raise ConfigError(f"decoder.temporal_window = {w}: a positive number of frames, or null (unlimited)")
    if d.decoded_cache_mb < 0:
        raise ConfigError(f"data.decoded_cache_mb = {d.decoded_cache_mb} must be >= 0 (0 = off)")
    if cfg.ul.startup_clips < 0:
        raise ConfigError(f"ul.startup_clips = {cfg.ul.startup_clips} must be >= 0 (0 = every clip of the batch)")
    if cfg.decoder.output_init_std < 0:
        raise ConfigError(f"decoder.output_init_std = {cfg.decoder.output_init_std} must be >= 0")
    if cfg.ul.startup_chroma_weight <= 0:
        raise ConfigError(f"ul.startup_chroma_weight = {cfg.ul.startup_chroma_weight} must be > 0 (1 = plain squared error)")
    for name in ("startup_hold_steps", "startup_fade_steps"):
        if getattr(cfg.ul, name) is not None and getattr(cfg.ul, name) < 0:
            raise ConfigError(f"ul.{name} = {getattr(cfg.ul, name)} must be >= 0 (or null: the rate's schedule)")
    if cfg.ul.startup_recon_weight < 0:
        raise ConfigError(f"ul.startup_recon_weight = {cfg.ul.startup_recon_weight} must be >= 0")
    if cfg.ul.startup_head == "readout":
        if cfg.ul.startup_pass == "shared":
            raise ConfigError("ul.startup_pass = shared shares the decoder's pass; ul.startup_head = readout "
                              "does not use the decoder (use startup_pass: separate)")
        if cfg.ul.startup_readout_width < 1:
            raise ConfigError(f"ul.startup_readout_width = {cfg.ul.startup_readout_width} must be >= 1")
    if not 0.0 <= d.image_ratio <= 1.0:
        raise ConfigError(f"data.image_ratio = {d.image_ratio} must lie in [0, 1]")


def to_dict(cfg: Any) -> dict:
    """Plain nested dicts and lists (tuples become lists), ready for YAML or JSON."""
    return _asdict(cfg)


def _asdict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _asdict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_asdict(x) for x in obj]
    return obj


def from_dict(data: dict, source: str = "<dict>") -> Config:
    cfg = merge(Config(), data, source)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (YAML, or JSON when the name ends in .json)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = to_dict(cfg)
    with open(tmp, "w") as f:
        if path.suffix == ".json":
            json.dump(data, f, indent=2, sort_keys=False)
        else:
            yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, path)
