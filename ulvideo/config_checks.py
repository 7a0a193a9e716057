"""`validate`: the range of every numeric config field, and the checks across fields.

`RANGES` is the one statement of what each numeric field accepts (docs/configuration.md shows it
beside the field): ">= n" / "> n" bounds, an interval "[a, b)" (square: included, round:
excluded), or "finite". A list field's range holds for each item; a field that may be null is
checked when set. Every float must be finite whatever its range (YAML reads `.nan` and `.inf`).
`load_config` and `from_dict` call `validate`, so a bad value is a `ConfigError` naming the key
before anything is built.

Fractions, and why their ends are open or closed:
  data.heldout_fraction  [0, 1)  1 would hold out every file and leave nothing to train on
  base.cond_dropout      [0, 1)  1 would drop every condition: the model never sees one
  *.dropout              [0, 1)  1 zeroes every activation
  train.ema_decay        [0, 1)  1 would keep the initial weights forever
  train.betas            [0, 1)  AdamW's moment decays
  data.image_ratio       [0, 1]  read by kind = mixed only, where it must lie in (0, 1): 0 (no image
                                 batches) and 1 (no video batches) are kinds video and image
"""
from __future__ import annotations

import math
import re

from ulvideo.config import Config, ConfigError

RANGES: dict[str, str] = {
    "encoder.latent_channels": ">= 1", "encoder.patch_size": ">= 1", "encoder.temporal_downsample": ">= 1",
    "encoder.spatial_downsample": ">= 1", "encoder.channels": ">= 1", "encoder.num_res_blocks": ">= 0",
    "prior.widths": ">= 2", "prior.depths": ">= 1", "prior.dropout": "[0, 1)",
    "decoder.logsnr_min": "finite", "decoder.logsnr_max": "finite", "decoder.shift": "finite",
    "decoder.temporal_window": ">= 1", "decoder.patch_size": ">= 1", "decoder.channels": ">= 1",
    "decoder.num_res_blocks": ">= 0", "decoder.width": ">= 2", "decoder.depth": ">= 0", "decoder.dropout": "[0, 1)",
    "ul.latent_logsnr": "finite", "ul.prior_logsnr_min": "finite", "ul.loss_factor": "> 0", "ul.sigmoid_bias": "finite",
    "ul.rate_hold_steps": ">= 0", "ul.rate_ramp_steps": ">= 0", "ul.startup_recon_weight": ">= 0",
    "ul.startup_chroma_weight": "> 0", "ul.kl_weight": ">= 0", "ul.mse_sigma": "> 0", "ul.eval_logsnr_samples": ">= 1",
    "base.sigmoid_bias": "finite", "base.text_max_tokens": ">= 1", "base.num_classes": ">= 0",
    "base.context_frames": ">= 0", "base.cond_dropout": "[0, 1)", "base.widths": ">= 2", "base.depths": ">= 1",
    "base.dropout": "[0, 1)",
    "data.image_ratio": "[0, 1]", "data.num_frames": ">= 1", "data.frame_stride": ">= 1", "data.target_fps": ">= 0",
    "data.resolution": ">= 1", "data.height": ">= 1", "data.width": ">= 1", "data.num_workers": ">= 0",
    "data.decoded_cache_mb": ">= 0", "data.heldout_fraction": "[0, 1)",
    "eval.every": ">= 0", "eval.num_clips": ">= 1", "eval.decoder_steps": ">= 1",
    "train.seed": ">= 0", "train.steps": ">= 0", "train.global_batch_size": ">= 1", "train.micro_batch_size": ">= 1",
    "train.lr": "> 0", "train.weight_decay": ">= 0", "train.betas": "[0, 1)", "train.warmup_steps": ">= 0",
    "train.grad_clip": ">= 0", "train.ema_decay": "[0, 1)", "train.zero_stage": "[0, 3]", "train.log_every": ">= 1",
    "train.ckpt_every": ">= 1", "train.keep_last": ">= 1", "train.max_nonfinite_skips": ">= 1",
}

_BOUND = re.compile(r"(>=|>) (-?[0-9.]+)")
_INTERVAL = re.compile(r"([\[(])(-?[0-9.]+), (-?[0-9.]+)([\])])")


def in_range(value: float, rule: str) -> bool:
    """`value` against one `RANGES` rule (NaN and infinities are never in range)."""
    if not math.isfinite(value):
        return False
    if rule == "finite":
        return True
    m = _BOUND.fullmatch(rule)
    if m:
        low = float(m.group(2))
        return value >= low if m.group(1) == ">=" else value > low
    m = _INTERVAL.fullmatch(rule)
    if m:
        lo, hi = float(m.group(2)), float(m.group(3))
        return (value >= lo if m.group(1) == "[" else value > lo) and (value <= hi if m.group(4) == "]" else value < hi)
    raise ValueError(f"unknown range rule {rule!r}")  # pragma: no cover - RANGES is fixed here


def _values(value) -> list:
    """The numbers a field holds: none when null, its items when a list or tuple."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_ranges(cfg: Config) -> None:
    for key, rule in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        for v in _values(value):
            if not in_range(v, rule):
                shown = f"{value!r}" + (f" (item {v!r})" if value is not v else "")
                raise ConfigError(f"{key} = {shown}: must be {describe(rule, finite=not math.isfinite(v))}")


def describe(rule: str, finite: bool = False) -> str:
    """A rule as words: '>= 1', 'a finite number', 'in [0, 1)'; `finite` stresses finiteness."""
    if rule == "finite":
        return "a finite number"
    text = f"in {rule}" if rule[0] in "[(" else rule
    return f"a finite number {text}" if finite else text


def _power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def validate(cfg: Config) -> None:
    """Ranges (`RANGES`), then checks across keys that the types alone cannot express, before any
    compute starts."""
    check_ranges(cfg)
    e, d, t, u = cfg.encoder, cfg.data, cfg.train, cfg.ul
    if not _power_of_two(e.temporal_downsample):
        raise ConfigError(f"encoder.temporal_downsample = {e.temporal_downsample} must be a power of 2")
    if not _power_of_two(e.patch_size):
        raise ConfigError(f"encoder.patch_size = {e.patch_size} must be a power of 2")
    if e.spatial_downsample % e.patch_size or not _power_of_two(e.spatial_downsample // e.patch_size):
        raise ConfigError(f"encoder.spatial_downsample = {e.spatial_downsample} must be encoder.patch_size = "
                          f"{e.patch_size} times a power of 2 (the patch is part of the downsampling)")
    if (d.num_frames - 1) % e.temporal_downsample:
        raise ConfigError(
            f"data.num_frames = {d.num_frames}: frames must be 1 + {e.temporal_downsample}k "
            "(the causal encoder maps 1 + 4k frames to 1 + k latent frames)"
        )
    for name in ("height", "width"):
        if getattr(d, name) % e.spatial_downsample:
            raise ConfigError(
                f"data.{name} = {getattr(d, name)} must be a multiple of encoder.spatial_downsample "
                f"= {e.spatial_downsample}"
            )
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size = {t.global_batch_size} must be a positive multiple of "
            f"train.micro_batch_size = {t.micro_batch_size}"
        )
    if not u.prior_logsnr_min < u.latent_logsnr:
        raise ConfigError(f"ul.prior_logsnr_min = {u.prior_logsnr_min} must be below ul.latent_logsnr = "
                          f"{u.latent_logsnr}")
    if not cfg.decoder.logsnr_min < cfg.decoder.logsnr_max:
        raise ConfigError(f"decoder.logsnr_min = {cfg.decoder.logsnr_min} must be below decoder.logsnr_max = "
                          f"{cfg.decoder.logsnr_max}")
    if u.startup_recon_weight > 0 and u.rate_hold_steps + u.rate_ramp_steps == 0:
        raise ConfigError(f"ul.startup_recon_weight = {u.startup_recon_weight} needs ul.rate_hold_steps or "
                          "ul.rate_ramp_steps > 0: the term is on while the rate is held and fades as it ramps in")
    if d.kind == "mixed" and not 0.0 < d.image_ratio < 1.0:
        raise ConfigError(f"data.image_ratio = {d.image_ratio}: data.kind = mixed needs a fraction in (0, 1) "
                          "(0 is data.kind video, 1 is data.kind image)")
    if d.kind != "mixed" and d.image_ratio != 0.0:
        raise ConfigError(f"data.image_ratio = {d.image_ratio} is read by data.kind = mixed only (data.kind is "
                          f"{d.kind!r}): leave it 0")
    latent_frames = 1 + (d.num_frames - 1) // e.temporal_downsample
    if cfg.stage == "base" and cfg.base.context_frames >= latent_frames:
        raise ConfigError(f"base.context_frames = {cfg.base.context_frames} leaves no latent frame to generate: "
                          f"data.num_frames = {d.num_frames} gives {latent_frames} latent frames")
    _check_sizes(cfg)


def _check_sizes(cfg: Config) -> None:
    """The named network sizes with their overrides, as the networks will resolve them."""
    from ulvideo.nets import sizes

    checks = [("encoder", lambda: sizes.resolve_encoder(cfg.encoder)),
              ("decoder", lambda: sizes.resolve_decoder(cfg.decoder))]
    checks.append(("prior", lambda: sizes.resolve_transformer(cfg.prior, "prior")) if cfg.stage == "ul"
                  else ("base", lambda: sizes.resolve_transformer(cfg.base, "base")))
    for section, resolve in checks:
        try:
            size = resolve()
        except ValueError as err:
            raise ConfigError(f"{section}: {err}") from None
        if section == "encoder":
            levels = int(math.log2(max(cfg.encoder.spatial_downsample // cfg.encoder.patch_size,
                                       cfg.encoder.temporal_downsample))) + 1
            if len(size.channels) != levels:
                raise ConfigError(f"encoder.channels = {list(size.channels)} needs {levels} entries: one per level of "
                                  f"{levels - 1} downsamplings (spatial {cfg.encoder.spatial_downsample // cfg.encoder.patch_size}x, "
                                  f"temporal {cfg.encoder.temporal_downsample}x)")
