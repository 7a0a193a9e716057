"""What the training loop trains: one `Objective` per stage, chosen once by `make_objective`.

An objective is the nn.Module DeepSpeed wraps. `forward(batch, generator, step)` returns the scalar
loss and per-sample terms to log; everything stage-specific (data, evaluation, export metadata)
lives here, so the loop never branches on the stage.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn as nn

from ulvideo.config import Config, ConfigError
from ulvideo.ul import UnifiedLatents, rate_gradient_scale

LN2 = math.log(2.0)


class Objective(nn.Module):
    progress_keys: tuple[str, ...] = ()

    @property
    def trained(self) -> nn.Module:
        """The module whose (EMA) weights are exported."""
        raise NotImplementedError

    def build_loader(self, cfg: Config, rank: int, world_size: int):
        from ulvideo.data import build_loader

        return build_loader(cfg.data, micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed,
                            rank=rank, world_size=world_size, split="train")

    def batch_size(self, batch: dict) -> int:
        return len(batch["caption"])

    def log_constants(self, step: int) -> dict[str, float]:
        return {}

    def export_meta(self) -> dict:
        return {}

    def evaluate(self, ema_weights: dict, out_dir: Path, step: int) -> dict:
        return {}


class StageOne(Objective):
    """Unified Latents: rate (prior ELBO) + loss factor x sigmoid-weighted decoder loss."""

    progress_keys = ("loss", "bits_per_pixel", "decoder_gain_bits")

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.model = UnifiedLatents(cfg)
        self._heldout = None

    @property
    def trained(self) -> nn.Module:
        return self.model

    def rate_scale(self, step: int) -> float:
        return rate_gradient_scale(step, self.cfg.ul.rate_hold_steps, self.cfg.ul.rate_ramp_steps)

    def startup_scale(self, step: int) -> float:
        """1 - the rate's scale, or the term's own hold and fade (`ul.startup_hold_steps`, `_fade_steps`)."""
        u = self.cfg.ul
        hold = u.rate_hold_steps if u.startup_hold_steps is None else u.startup_hold_steps
        fade = u.rate_ramp_steps if u.startup_fade_steps is None else u.startup_fade_steps
        return 1.0 - rate_gradient_scale(step, hold, fade)

    def forward(self, batch: dict, generator: torch.Generator, step: int):
        x = batch["video"].to(next(self.model.parameters()).dtype)
        terms = self.model.loss(x, generator, self.rate_scale(step), startup_scale=self.startup_scale(step))
        _, _, t, h, w = x.shape
        pixels = t * h * w
        # both terms are per-clip sums; their sum is divided by ONE common constant (pixels per clip)
        loss = terms.total.mean() / pixels
        c, tl, hl, wl = self.cfg.encoder.latent_channels, 1 + (t - 1) // self.cfg.encoder.temporal_downsample, \
            h // self.cfg.encoder.spatial_downsample, w // self.cfg.encoder.spatial_downsample
        logs = {
            "loss": loss.detach(),
            "bits_per_clip": terms.rate.detach() / LN2,
            "bits_per_pixel": terms.rate.detach() / LN2 / pixels,
            "bits_per_latent_dim": terms.rate.detach() / LN2 / (c * tl * hl * wl),
            "terminal_kl_bits": terms.rate_terminal.detach() / LN2,
            "decoder_loss_bits_per_pixel": terms.distortion.detach() / LN2 / pixels,
        }
        if terms.vae_kl is not None:
            logs["vae_kl_bits_per_pixel"] = terms.vae_kl.detach() / LN2 / pixels
        if terms.startup is not None:
            logs["startup_recon_bits_per_pixel"] = terms.startup.detach() / LN2 / pixels
        if step % self.cfg.train.log_every == self.cfg.train.log_every - 1:
            logs["decoder_gain_bits"] = self.model.decoder_gain(x, generator)
        return loss, logs

    def log_constants(self, step: int) -> dict[str, float]:
        u = self.cfg.ul
        return {"rate_grad_scale": self.rate_scale(step), "startup_recon_scale": self.startup_scale(step),
                "latent_logsnr": u.latent_logsnr,
                "prior_logsnr_min": u.prior_logsnr_min, "loss_factor": u.loss_factor, "sigmoid_bias": u.sigmoid_bias}

    def export_meta(self) -> dict:
        u = self.cfg.ul
        return {"latent_logsnr": u.latent_logsnr, "prior_logsnr_min": u.prior_logsnr_min,
                "loss_factor": u.loss_factor, "sigmoid_bias": u.sigmoid_bias}

    def _heldout_batch(self) -> torch.Tensor:
        """A fixed set of clips: held-out files when configured, else the first training clips."""
        if self._heldout is None:
            from ulvideo.data import build_loader

            d = self.cfg.data
            split = "heldout" if d.heldout_fraction > 0 else "train"
            loader = build_loader(d, micro_batch_size=self.cfg.eval.num_clips, seed=12345, rank=0, world_size=1, split=split)
            self._heldout = next(iter(loader))["video"]
        return self._heldout

    @torch.no_grad()
    def evaluate(self, ema_weights: dict, out_dir: Path, step: int) -> dict:
        from ulvideo.eval.reports import reconstruction_report

        model = UnifiedLatents(self.cfg)
        model.load_state_dict(ema_weights)
        model.eval()
        return reconstruction_report(model, self._heldout_batch(), out_dir, self.cfg.eval.decoder_steps, seed=step)


class StageTwo(Objective):
    """The base model on frozen stage-1 latents: sigmoid-weighted loss, CFG dropout of all conditions."""

    progress_keys = ("loss", "base_loss_bits_per_latent_dim")

    def __init__(self, cfg: Config):
        super().__init__()
        from ulvideo.exports import load_stage1
        from ulvideo.text import load_text_encoder
        from ulvideo.ul import LatentDiffusion

        self.cfg = cfg
        stage1 = load_stage1(cfg.base.stage1_export)
        self.stage1_cfg = stage1.cfg
        self.text = None if cfg.base.text_encoder == "none" else load_text_encoder(cfg.base.text_encoder, cfg.base.text_max_tokens)
        self._frozen = [stage1]  # a plain list: not a submodule, so DeepSpeed neither trains nor shards it
        self.model = LatentDiffusion(cfg, stage1.cfg, text_dim=self.text.dim if self.text else 0)
        self._heldout = None
        # text embeddings cached in latent shards are used only if the same encoder made them
        info = shard_encoding(cfg.data.path)
        self.cached_text_ok = bool(self.text and info and info.get("text_encoder") == self.text.fingerprint()
                                   and info.get("text_max_tokens") == self.text.max_tokens)
        if self.text and info and info.get("text") is not False and not self.cached_text_ok:
            logging.getLogger("ulvideo.train").warning(
                "text embeddings cached in %s were made by %s with %s tokens; this run uses %s with %d: "
                "captions are encoded every step instead", cfg.data.path, info.get("text_encoder"),
                info.get("text_max_tokens"), self.text.fingerprint(), self.text.max_tokens)

    @property
    def trained(self) -> nn.Module:
        return self.model

    @property
    def stage1(self) -> UnifiedLatents:
        return self._frozen[0]

    def batch_size(self, batch: dict) -> int:
        return len(batch["caption"])

    @torch.no_grad()
    def latents_and_condition(self, batch: dict):
        from ulvideo.ul import Condition

        z = batch["z_clean"] if "z_clean" in batch else self.stage1.encode(batch["video"].float())
        b = z.shape[0]
        cond, null = Condition(), Condition()
        if self.text is not None:
            if "text_emb" in batch and self.cached_text_ok:
                cond.text_emb, cond.text_mask = batch["text_emb"].float(), batch["text_mask"].bool()
            else:
                cond.text_emb, cond.text_mask = self.text.encode(list(batch["caption"]))
            null.text_emb, null.text_mask = self.text.null(b)
        if self.cfg.base.num_classes:
            cond.label = batch["label"].long()
            null.label = torch.full_like(cond.label, -1)
        k = self.cfg.base.context_frames
        if k:
            mask = torch.zeros(b, z.shape[2], dtype=torch.bool)
            mask[:, :k] = True
            cond.context, cond.context_mask = z * mask.view(b, 1, -1, 1, 1), mask
            null.context, null.context_mask = torch.zeros_like(z), torch.zeros_like(mask)
        return z, cond, null

    def forward(self, batch: dict, generator: torch.Generator, step: int):
        z, cond, null = self.latents_and_condition(batch)
        keep = torch.rand(z.shape[0], generator=generator) >= self.cfg.base.cond_dropout
        terms = self.model.loss(z.to(next(self.model.parameters()).dtype), cond.select(keep, null), generator)
        elems = z[0].numel()
        loss = terms.loss.mean() / elems
        return loss, {"loss": loss.detach(), "base_loss_bits_per_latent_dim": terms.loss.detach() / LN2 / elems}

    def log_constants(self, step: int) -> dict[str, float]:
        u = self.stage1_cfg.ul
        return {"latent_logsnr": u.latent_logsnr, "prior_logsnr_min": u.prior_logsnr_min,
                "base_sigmoid_bias": self.cfg.base.sigmoid_bias}

    def export_meta(self) -> dict:
        return {"stage1_export": str(self.cfg.base.stage1_export),
                "text_encoder": self.text.fingerprint() if self.text else "none",
                "text_dim": self.text.dim if self.text else 0,
                "latent_logsnr": self.stage1_cfg.ul.latent_logsnr, "prior_logsnr_min": self.stage1_cfg.ul.prior_logsnr_min}

    @torch.no_grad()
    def evaluate(self, ema_weights: dict, out_dir: Path, step: int) -> dict:
        """Tightness on held-out clips: stage-1 prior bits vs the base model's ELBO (null and conditional)."""
        from ulvideo.ul import LatentDiffusion

        if self._heldout is None:
            d = self.cfg.data
            split = "heldout" if d.heldout_fraction > 0 else "train"
            self._heldout = next(iter(self.build_loader_split(split)))
        model = LatentDiffusion(self.cfg, self.stage1_cfg, text_dim=self.model.net.text_dim)
        model.load_state_dict(ema_weights)
        model.eval()
        z, cond, null = self.latents_and_condition(self._heldout)
        k = self.stage1_cfg.ul.eval_logsnr_samples
        prior = self.stage1.rate_bits(z, k, seed=0).mean().item()
        base_null = model.elbo_bits(z, null, k, seed=0).mean().item()
        base_cond = model.elbo_bits(z, cond, k, seed=0).mean().item()
        return {"prior_bits_per_clip": prior, "base_elbo_null_bits_per_clip": base_null,
                "base_elbo_cond_bits_per_clip": base_cond, "tightness_ratio": base_null / prior, "logsnr_samples": k}

    def build_loader_split(self, split: str):
        from ulvideo.data import build_loader

        return build_loader(self.cfg.data, micro_batch_size=self.cfg.eval.num_clips, seed=12345, rank=0, world_size=1, split=split)


OBJECTIVES = {"ul": StageOne, "base": StageTwo}


def shard_encoding(path: str) -> dict | None:
    """The `encoding.json` that `ulvideo encode --data` writes beside latent shards, if any."""
    f = Path(path) / "encoding.json"
    return json.loads(f.read_text()) if f.is_file() else None


def make_objective(cfg: Config) -> Objective:
    if cfg.stage not in OBJECTIVES:
        raise ConfigError(f"stage '{cfg.stage}' is not available in this version (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[cfg.stage](cfg)


def preflight(cfg: Config) -> None:
    """Checks that need no process group: the data exist and hold usable clips."""
    if cfg.stage not in OBJECTIVES:
        raise ConfigError(f"stage '{cfg.stage}' is not available in this version (known: {', '.join(OBJECTIVES)})")
    if cfg.stage == "base":
        from ulvideo.exports import load_export

        load_export(cfg.base.stage1_export)  # raises a clear error when missing or broken
        name = cfg.base.text_encoder
        if name not in ("none", "minilm") and not Path(name).is_dir():
            raise ConfigError(f"base.text_encoder = '{name}': no such local text-encoder folder "
                              "(use 'minilm', 'none', or a local Hugging Face T5/CLIP folder)")
        info = shard_encoding(cfg.data.path)
        if info is not None:
            from ulvideo.exports import file_sha256

            export = Path(cfg.base.stage1_export).with_suffix(".safetensors")
            if info.get("stage1_sha256") != file_sha256(export):
                raise ConfigError(f"data.path '{cfg.data.path}' holds latents of another stage-1 export "
                                  f"({info.get('stage1_export')}), not of base.stage1_export = {export}")
    from ulvideo.data.storage import is_url

    remote = is_url(cfg.data.path) or "{" in cfg.data.path or "::" in cfg.data.path  # URLs, brace patterns, a::b
    if not (remote or cfg.data.manifest) and not Path(cfg.data.path).exists():
        raise FileNotFoundError(f"data.path '{cfg.data.path}' does not exist (for the built-in data: "
                                f"ulvideo data synth --out {cfg.data.path})")
