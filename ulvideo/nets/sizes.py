"""Named network sizes (`SIZES`) and their resolution against a config.

A config section names a size (`encoder.size: tiny`); every architecture field it sets explicitly
(not None) overrides that size's value. `tiny` is for tests and CPU runs; `S`, `B`, `L` are GPU
sizes. `L` follows the paper's image models (PAPER.md §1, Heek et al. §5.1): encoder ResNet
[128, 256, 512, 512] with 2 blocks per stage and 3 in the last; prior ViT 8 x 1024; decoder U-ViT
with conv stages [128, 256, 512] around an 8 x 1024 transformer, dropout 0.1; base model a 2-level
ViT [512, 1024] x [6, 16], dropout 0.1. `S` and `B` are ours (the paper does not give its
"small"/"medium" sizes).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class EncoderSize:
    channels: tuple[int, ...]  # one per resolution level; len = number of downsamplings + 1
    num_res_blocks: int  # residual blocks per level before each downsampling
    num_mid_blocks: int  # residual blocks at the lowest resolution


@dataclass(frozen=True)
class TransformerSize:
    widths: tuple[int, ...]  # token width per level; level l+1 merges 2x2 tokens of level l
    depths: tuple[int, ...]  # blocks per level (split half before / half after deeper levels)
    head_dim: int = 64
    mlp_ratio: float = 4.0
    dropout: float = 0.0


@dataclass(frozen=True)
class DecoderSize:
    patch_size: int  # spatial pixel patching before the first conv (1 = none)
    channels: tuple[int, ...]  # conv stage widths; each stage ends in a 2x spatial downsampling
    num_res_blocks: int  # residual blocks per stage, on the way down and on the way up
    width: int  # middle transformer width
    depth: int  # middle transformer blocks
    head_dim: int = 64
    dropout: float = 0.0


@dataclass(frozen=True)
class NetSize:
    encoder: EncoderSize
    prior: TransformerSize
    decoder: DecoderSize
    base: TransformerSize


SIZES: dict[str, NetSize] = {
    # CPU: a stage-1 training step on 8 clips of 9x32x32 well under a second on 2 cores.
    "tiny": NetSize(
        encoder=EncoderSize(channels=(8, 16, 32, 64), num_res_blocks=1, num_mid_blocks=1),
        prior=TransformerSize(widths=(64,), depths=(2,), head_dim=16),
        decoder=DecoderSize(patch_size=2, channels=(8, 16), num_res_blocks=1, width=64, depth=2, head_dim=16),
        base=TransformerSize(widths=(64, 128), depths=(2, 2), head_dim=16),
    ),
    "S": NetSize(
        encoder=EncoderSize(channels=(64, 128, 256, 256), num_res_blocks=2, num_mid_blocks=2),
        prior=TransformerSize(widths=(512,), depths=(6,)),
        decoder=DecoderSize(patch_size=2, channels=(64, 128, 256), num_res_blocks=2, width=512, depth=4,
                            dropout=0.1),
        base=TransformerSize(widths=(256, 512), depths=(4, 8), dropout=0.1),
    ),
    "B": NetSize(
        encoder=EncoderSize(channels=(96, 192, 384, 384), num_res_blocks=2, num_mid_blocks=3),
        prior=TransformerSize(widths=(768,), depths=(8,)),
        decoder=DecoderSize(patch_size=2, channels=(96, 192, 384), num_res_blocks=2, width=768, depth=6,
                            dropout=0.1),
        base=TransformerSize(widths=(384, 768), depths=(4, 12), dropout=0.1),
    ),
    "L": NetSize(
        encoder=EncoderSize(channels=(128, 256, 512, 512), num_res_blocks=2, num_mid_blocks=3),
        prior=TransformerSize(widths=(1024,), depths=(8,)),
        decoder=DecoderSize(patch_size=2, channels=(128, 256, 512), num_res_blocks=2, width=1024, depth=8,
                            dropout=0.1),
        base=TransformerSize(widths=(512, 1024), depths=(6, 16), dropout=0.1),
    ),
}


def _lookup(name: str) -> NetSize:
    if name not in SIZES:
        raise ValueError(f"unknown network size '{name}' (known: {', '.join(SIZES)})")
    return SIZES[name]


def _override(size, cfg, fields: dict[str, str]):
    """Replace size fields by the config fields (cfg name -> size name) that are set (not None)."""
    updates = {}
    for cfg_name, size_name in fields.items():
        value = getattr(cfg, cfg_name, None)
        if value is not None:
            updates[size_name] = tuple(value) if isinstance(value, list) else value
    return dataclasses.replace(size, **updates)


def resolve_encoder(cfg) -> EncoderSize:
    size = _override(_lookup(cfg.size).encoder, cfg, {"channels": "channels", "num_res_blocks": "num_res_blocks"})
    if size.num_res_blocks < 0 or size.num_mid_blocks < 0 or min(size.channels) < 1:
        raise ValueError(f"encoder size {size} has a non-positive entry")
    return size


def resolve_decoder(cfg) -> DecoderSize:
    size = _override(
        _lookup(cfg.size).decoder,
        cfg,
        {"patch_size": "patch_size", "channels": "channels", "num_res_blocks": "num_res_blocks",
         "width": "width", "depth": "depth", "dropout": "dropout"},
    )
    if size.width % size.head_dim:
        raise ValueError(f"decoder width {size.width} must be a multiple of head_dim {size.head_dim}")
    if size.width % 2 or min(size.channels) < 1 or size.patch_size < 1:
        raise ValueError(f"decoder size {size} is invalid (width must be even, channels/patch positive)")
    return size


def resolve_transformer(cfg, family: str) -> TransformerSize:
    """`family` is 'prior' or 'base': which table of the named size the config refers to."""
    size = _override(getattr(_lookup(cfg.size), family), cfg,
                     {"widths": "widths", "depths": "depths", "dropout": "dropout"})
    if len(size.widths) != len(size.depths) or not size.widths:
        raise ValueError(f"{family}: widths {size.widths} and depths {size.depths} must have the same length")
    for w in size.widths:
        if w % size.head_dim or w % 2:
            raise ValueError(f"{family}: width {w} must be even and a multiple of head_dim {size.head_dim}")
    if min(size.depths) < 1:
        raise ValueError(f"{family}: every level needs at least one block, got depths {size.depths}")
    return size
