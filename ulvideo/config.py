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
    """Stage 1's causal 3D encoder x -> z_clean (ulvideo/nets/encoder.py)."""

    size: str = "tiny"  # a name in ulvideo.nets.SIZES; the fields below override it when set
    latent_channels: int = 16  # C: channels of z_clean, the latent the prior and the decoder see
    patch_size: int = 1  # spatial-only patching (1 = none, 2 = 2x2)
    temporal_downsample: int = 4  # 4 -> T = 1 + 4k frames give 1 + k latent frames
    spatial_downsample: int = 8  # includes the patch size
    # architecture overrides of the named size (None = the size's value, ulvideo/nets/sizes.py)
    channels: list[int] | None = None  # one width per level: log2(max(downsampling)) + 1 entries
    num_res_blocks: int | None = None  # residual blocks per level (None = the size's value)


@dataclass
class PriorConfig:
    """Stage 1's diffusion prior on z0, whose ELBO is the latent's bitrate (ulvideo/nets/transformer.py)."""

    size: str = "tiny"  # a name in ulvideo.nets.SIZES (its prior table); the fields below override it
    attention: Literal["full", "factorized"] = "full"  # full: joint space-time; factorized: space, then time
    temporal_causal: bool = False  # frame i attends frames <= i only
    prediction: Literal["x", "eps", "v"] = "x"  # the network's output; the loss is the same ELBO for each
    widths: list[int] | None = None  # overrides of the named size (None = the size's value)
    depths: list[int] | None = None  # blocks per level (None = the size's value)
    dropout: float | None = None  # dropout probability (None = the size's value)
    # stage: prior reads only this: the stage-1 export whose prior is trained further on the rate of
    # its own frozen latents (the export's prior network and settings; its encoder and decoder are
    # copied bit for bit into the refined export)
    stage1_export: str = ""


@dataclass
class DecoderConfig:
    """Stage 1's diffusion decoder p(x | z0) in pixel space (ulvideo/nets/decoder.py)."""

    size: str = "tiny"  # a name in ulvideo.nets.SIZES (its decoder table); the fields below override it
    prediction: Literal["x", "eps", "v"] = "v"  # the network's output (the loss weight is converted exactly)
    logsnr_min: float = -15.0  # lowest logSNR of the decoder's schedule (most noise; sampling starts here)
    logsnr_max: float = 15.0  # highest logSNR of the decoder's schedule (least noise)
    shift: float = 0.0  # simple diffusion's resolution shift, 2*log(base/resolution)
    attention: Literal["full", "factorized"] = "full"  # middle transformer; always causal in time
    # middle transformer: frame f attends (pixel) frames f - W + 1 .. f only; None = every earlier
    # frame. Bounds streamed decoding's key/value cache to W - 1 frames (memory flat in clip length)
    temporal_window: int | None = None
    # architecture overrides of the named size (None = the size's value, ulvideo/nets/sizes.py)
    patch_size: int | None = None  # spatial pixel patching before the first conv (1 = none)
    channels: list[int] | None = None  # conv stage widths; each stage ends in a 2x spatial downsampling
    num_res_blocks: int | None = None  # residual blocks per stage, on the way down and on the way up
    width: int | None = None  # middle transformer width
    depth: int | None = None  # middle transformer blocks
    dropout: float | None = None  # dropout probability


@dataclass
class ULConfig:
    """Stage-1 objective (ulvideo/ul.py owns these values)."""

    latent_logsnr: float = 5.0  # lambda_0: the fixed noise level of z0
    prior_logsnr_min: float = -10.0  # lambda_min: the prior's lowest logSNR (its terminal KL is taken there)
    loss_factor: float = 1.5  # c_lf: the decoder loss's weight, the dial between bits and fidelity
    sigmoid_bias: float = 0.0  # b_dec: the decoder weight is c_lf * sigmoid(b_dec - logSNR) on the eps-error
    # how each batch's diffusion times are drawn (all marginally uniform, so unbiased): i.i.d.,
    # one per stratum of [0, 1), or antithetic pairs t, 1 - t
    time_sampling: Literal["uniform", "stratified", "antithetic"] = "stratified"
    rate_hold_steps: int = 0  # prior trains on z_clean.detach() for these steps
    rate_ramp_steps: int = 0  # then the rate's gradient scale ramps 0 -> 1 over these steps
    # the start-up term (ulvideo/startup.py, a training aid of the stage-1 objective, never
    # exported): (1 - rate scale) * w / 2 * ||x - readout(z0)||^2 nats with its chroma scaled by
    # k, i.e. on during the rate hold and fading out over the ramp. 0 = off; after the ramp: exact UL
    startup_recon_weight: float = 0.0  # w
    # k: the error's part off the grey axis (e - mean_rgb(e)) counts k^2 times. An object's colour
    # is a low-variance direction of pixel space next to its luminance footprint, and an MSE
    # autoencoder learns it last
    startup_chroma_weight: float = 1.0
    # the stage-1 model: "unified" (UL), or one of the paper's Table-5 baselines
    # (ulvideo/baselines.py): "kl_vae", a Gaussian posterior with KL to N(0, I) weighted by
    # kl_weight; "mse_decoder", a deterministic decoder with loss c_lf ||x - x_hat||^2 / (2 mse_sigma^2)
    model: Literal["unified", "kl_vae", "mse_decoder"] = "unified"
    kl_weight: float = 1.0  # beta, read by model = kl_vae
    mse_sigma: float = 0.1  # read by model = mse_decoder
    eval_logsnr_samples: int = 32  # K stratified logSNRs per clip for held-out bits


@dataclass
class BaseConfig:
    """Stage-2 base model on frozen stage-1 latents (ulvideo/ul.py `LatentDiffusion`)."""

    size: str = "tiny"  # a name in ulvideo.nets.SIZES (its base table); the fields below override it
    stage1_export: str = ""  # path to a stage-1 export (.safetensors with its .json beside it)
    prediction: Literal["x", "eps", "v"] = "v"  # the network's output (the loss weight is converted exactly)
    sigmoid_bias: float = 0.0  # b_base: the base model's loss weight is sigmoid(b_base - logSNR) on the eps-error
    text_encoder: str = "minilm"  # "minilm", "none", or a local Hugging Face folder
    text_max_tokens: int = 32  # prompts are cut to this many tokens
    num_classes: int = 0  # > 0: class-conditional on the manifest's `label` column (0 .. num_classes - 1)
    context_frames: int = 0  # latent frames given as clean conditioning (frame prediction)
    cond_dropout: float = 0.1  # CFG dropout probability
    attention: Literal["full", "factorized"] = "full"  # full: joint space-time; factorized: space, then time
    temporal_causal: bool = False  # frame i attends frames <= i only
    widths: list[int] | None = None  # overrides of the named size (None = the size's value)
    depths: list[int] | None = None  # blocks per level (None = the size's value)
    dropout: float | None = None  # dropout probability (None = the size's value)


@dataclass
class DataConfig:
    """Training clips (ulvideo/data/)."""

    # a folder of videos (recursive) or images, latent shards, or WebDataset shards (a folder, a text
    # file listing them, a brace pattern); local or a URL (s3://, gs://, https://: docs/data.md)
    path: str = "data/shapes"
    # what data.path holds; auto: latent shards if it has them, else videos, else images
    kind: Literal["auto", "video", "image", "mixed", "latents", "webdataset"] = "auto"
    image_path: str = ""  # images for kind = mixed
    image_ratio: float = 0.0  # fraction of image (T = 1) batches for kind = mixed
    # CSV, JSONL or Parquet: path, text, num_frames, fps, height, width, start, end, label (docs/data.md);
    # rows with num_frames and fps are not probed at start-up (`ulvideo data scan --out M.parquet` writes one)
    manifest: str = ""
    num_frames: int = 17  # clip length, 1 + 4k frames (images are 1-frame clips)
    frame_stride: int = 1  # take every n-th frame of the video
    target_fps: float = 0.0  # > 0 picks frames at this rate instead of frame_stride
    temporal_offset: Literal["random", "center"] = "random"  # where a training clip starts in its video (held-out: center)
    resolution: int = 64  # short side after resize
    height: int = 64  # crop size
    width: int = 64  # crop size
    crop: Literal["center", "random"] = "center"  # where a training clip's crop is taken (held-out: center)
    hflip: bool = False  # flip each clip left-right with probability 1/2
    short_video: Literal["skip", "loop"] = "skip"  # videos shorter than a clip: left out, or looped
    missing_caption: Literal["empty", "skip"] = "empty"  # videos without a caption: caption "", or left out
    # video decoder; auto: decord, and PyAV for rotated streams and those decord cannot read
    backend: Literal["auto", "decord", "pyav", "torchcodec"] = "auto"
    num_workers: int = 0  # DataLoader worker processes per rank (0 = decode in the training process)
    # decoded frames kept per loading process (LRU, MiB; 0 = off): a small dataset is decoded in
    # its first epoch only (loader workers live for the whole run)
    decoded_cache_mb: float = 0.0
    # files (shards for kind webdataset) held out for evaluation by a hash of the path; at least one
    # when > 0 and there are two or more
    heldout_fraction: float = 0.0


@dataclass
class EvalConfig:
    """Held-out evaluation during training, on rank 0 (ulvideo/train/objectives.py)."""

    # steps between evaluations, plus one at the end of training (0 = none). Stage 1: PSNR, SSIM
    # and bits of the held-out clips, their reconstructions written to RUN/samples/step_X/, and
    # rFVD (fvd_preset); stage 2: the stage-1 prior's bits beside the base model's ELBO
    every: int = 1000
    # clips per evaluation: held-out files (data.heldout_fraction > 0), else the first training
    # clips. rFVD from few clips is biased upward: compare it only at equal num_clips
    num_clips: int = 8
    decoder_steps: int = 32  # DDPM steps of the stage-1 reconstructions
    # stage 1: a preset of ulvideo.eval.fvd.PRESETS; each evaluation then also computes the FVD of
    # the reconstructions against their inputs (rFVD) with that preset's frames and preprocessing.
    # Needs clips of at least the preset's frames and I3D weights (below); without them training
    # says so once and goes on. Stage 2 has no decoder pass in its evaluation (bits only): "" there;
    # score its generated clips with `ulvideo fvd calc`
    fvd_preset: str = ""
    # I3D weights file or folder for fvd_preset; "": $ULVIDEO_I3D, then $ULVIDEO_CACHE/i3d or
    # ~/.cache/ulvideo/i3d (nothing is downloaded)
    i3d_weights: str = ""
    i3d_sha256: str = ""  # confirms a TorchScript I3D file (it can run code) whose hash no publisher states


@dataclass
class TrainConfig:
    """The training loop under DeepSpeed (ulvideo/train/loop.py)."""

    seed: int = 0  # initial weights and every step's noise: (seed, step, micro-batch slot)
    steps: int = 1000  # optimizer steps
    global_batch_size: int = 8  # clips per optimizer step, over all ranks
    # clips per forward pass on one rank; accumulation = global / (micro x world size) must be whole
    micro_batch_size: int = 8
    lr: float = 2e-4  # AdamW learning rate after the warm-up
    weight_decay: float = 0.0  # AdamW (decoupled) weight decay
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW betas
    warmup_steps: int = 100  # linear learning-rate warm-up from 0
    grad_clip: float = 1.0  # global gradient-norm clipping
    ema_decay: float = 0.999  # EMA of the weights; exports and evaluation use the EMA
    # decay min(ema_decay, (1 + step) / (10 + step)): short runs and early exports are not dominated
    # by the initial weights (the warm-up of diffusers' and timm's EMA)
    ema_warmup: bool = True
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3 (what is sharded over ranks: 1 optimizer, 2 + gradients, 3 + weights)
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer state and step on the CPU
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    torch_adam: bool = True  # False uses DeepSpeed's fused/CPU Adam (compiled at first use)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    # torch.compile every network (inductor, one graph each, static shapes): the first step of each
    # clip shape compiles (minutes on a small CPU; seconds with a warm cache), later steps run the
    # fused kernels. ZeRO 0-2; weights, checkpoints and exports are those of the eager networks
    compile: bool = False
    attention_backend: str = "auto"  # one of ulvideo.attention.BACKENDS (auto: the fastest that applies)
    # steps between log lines (metrics.jsonl, TensorBoard, the progress bar). The stop check (an
    # all-reduce and a host sync) runs only on these steps: a SIGTERM is acted on at the next one,
    # so keep log_every x step time within a scheduler's grace period before it kills the job
    log_every: int = 10
    ckpt_every: int = 200  # steps between checkpoints (and exports); one more at the end
    keep_last: int = 3  # checkpoints kept (older ones are deleted)
    max_nonfinite_skips: int = 20  # non-finite steps in a row that stop the run (status 3)


@dataclass
class Config:
    """One run: the stage, its networks and objective, data, evaluation and training."""

    # ul: stage 1 (encoder, prior, decoder); prior: refine a stage-1 export's prior on its frozen
    # latents (prior.stage1_export); base: stage 2 (base model)
    stage: Literal["ul", "prior", "base"] = "ul"
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


def _yaml_problem(e: yaml.YAMLError) -> str:
    """'line L, column C: what is wrong' of a YAML error, on one line."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e).splitlines()[0]
    return (f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else "") + problem


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The layers of a YAML file, inherited ones first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'inherit' cycle through {', '.join(map(str, seen))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text ({e})") from None
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
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"command line: the value of '{flag}' is not valid YAML ({_yaml_problem(e)}); "
                          "quote a string, write a list as [a, b]") from None
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
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], where: str = "command line") -> Config:
    """`cfg` with `--section.key=value` flags applied on top, validated."""
    for flag in overrides:
        cfg = merge(cfg, parse_override(flag), f"{where} '{flag}'")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every value in its range, and the checks across keys (ulvideo/config_checks.py)."""
    from ulvideo.config_checks import validate as check

    check(cfg)


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
