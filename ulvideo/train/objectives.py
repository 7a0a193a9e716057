"""What the training loop trains: one `Objective` per stage, chosen once by `make_objective`.

An objective is the nn.Module DeepSpeed wraps. `forward(batch, generator, step)` returns the scalar
loss and per-sample terms to log; everything stage-specific (data, evaluation, export metadata)
lives here, so the loop never branches on the stage.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn

from ulvideo.baselines import build_stage1
from ulvideo.config import Config, ConfigError
from ulvideo import diffusion as D
from ulvideo.diffusion import LN2
from ulvideo.startup import StartupTerm
from ulvideo.ul import UnifiedLatents, rate_gradient_scale


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

    def export_contents(self, weights: dict, cfg: Config, meta: dict) -> tuple[dict, Config, dict]:
        """What an export holds: by default the trained module's EMA weights, the run's config and `meta`."""
        return weights, cfg, meta

    def prepare_evaluation(self, device) -> None:
        """Once, on rank 0, before the first step: load what evaluation needs, say what it will skip."""

    def evaluate(self, ema_weights: dict, out_dir: Path, step: int) -> dict:
        return {}

    def describe_evaluation(self, out: dict) -> str:
        """One line for the terminal from `evaluate`'s numbers."""
        return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items())


class StageOne(Objective):
    """Stage 1: the model's loss (UL's rate + loss factor x sigmoid-weighted decoder loss, or a
    baseline's, `ul.model`) plus, while the rate is held and ramps in, the start-up term
    (ulvideo/startup.py). The term is a submodule here, not of the model: DeepSpeed trains and
    resumes it with the rest, and exports (`trained`, the model's EMA weights) leave it out."""

    progress_keys = ("loss", "bits_per_pixel", "decoder_gain_bits")

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.model = build_stage1(cfg)
        self.startup = StartupTerm(cfg) if cfg.ul.startup_recon_weight > 0 else None
        self._heldout = None
        self._extractor = None  # I3D features for rFVD (rank 0), from prepare_evaluation

    @property
    def trained(self) -> nn.Module:
        return self.model

    def rate_scale(self, step: int) -> float:
        return rate_gradient_scale(step, self.cfg.ul.rate_hold_steps, self.cfg.ul.rate_ramp_steps)

    def forward(self, batch: dict, generator: torch.Generator, step: int):
        x = batch["video"].to(next(self.model.parameters()).dtype)
        terms = self.model.loss(x, generator, self.rate_scale(step))
        total = terms.total
        _, _, t, h, w = x.shape
        pixels = t * h * w
        c, tl, hl, wl = self.cfg.encoder.latent_channels, 1 + (t - 1) // self.cfg.encoder.temporal_downsample, \
            h // self.cfg.encoder.spatial_downsample, w // self.cfg.encoder.spatial_downsample
        logs = {
            "bits_per_clip": terms.rate.detach() / LN2,
            "bits_per_pixel": terms.rate.detach() / LN2 / pixels,
            "bits_per_latent_dim": terms.rate.detach() / LN2 / (c * tl * hl * wl),
            "terminal_kl_bits": terms.rate_terminal.detach() / LN2,
            "decoder_loss_bits_per_pixel": terms.distortion.detach() / LN2 / pixels,
            # RMS of the noisy latent the decoder sees: sigma_0 = 0.082 when z_clean has collapsed to 0
            "z0_rms": terms.z0.detach().float().pow(2).flatten(1).mean(1).sqrt(),
        }
        for name, value in terms.extra().items():
            logs[f"{name}_bits_per_pixel"] = value.detach() / LN2 / pixels
        scale = self.startup.scale(step) if self.startup is not None else 0.0
        if scale > 0:
            startup = self.startup(x, terms.z0, scale)
            total = total + startup
            logs["startup_recon_bits_per_pixel"] = startup.detach() / LN2 / pixels
        # every term is a per-clip sum; their sum is divided by ONE common constant (pixels per clip)
        loss = total.mean() / pixels
        logs["loss"] = loss.detach()
        if step % self.cfg.train.log_every == self.cfg.train.log_every - 1:
            logs["decoder_gain_bits"] = self.model.decoder_gain(x, generator)
        return loss, logs

    def log_constants(self, step: int) -> dict[str, float]:
        u = self.cfg.ul
        startup = {} if self.startup is None else {"startup_recon_scale": self.startup.scale(step)}
        return {"rate_grad_scale": self.rate_scale(step), **startup, "latent_logsnr": u.latent_logsnr,
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

    def prepare_evaluation(self, device) -> None:
        """Load the I3D network for rFVD when `eval.fvd_preset` names a preset; when it cannot be
        computed (evaluation off, clips shorter than the preset's, no weights) say so once."""
        e, log = self.cfg.eval, logging.getLogger("ulvideo.train")
        if not e.fvd_preset:
            return
        from ulvideo.eval import fvd

        if not e.every:
            log.warning("eval.fvd_preset = %s is unused: eval.every = 0 (no evaluation)", e.fvd_preset)
            return
        need = fvd.get_preset(e.fvd_preset).num_frames
        if self.cfg.data.num_frames < need:
            log.warning("eval.fvd_preset = %s scores %d-frame clips, data.num_frames = %d: no rFVD in this run "
                        "(PSNR, SSIM and bits are still evaluated)", e.fvd_preset, need, self.cfg.data.num_frames)
            return
        self._extractor, why = fvd.try_load_extractor(e, device)
        if self._extractor is None:
            log.warning("eval.fvd_preset = %s: no rFVD in this run (set eval.i3d_weights or $ULVIDEO_I3D): %s",
                        e.fvd_preset, " ".join(why.split()))
        else:
            w = self._extractor.weights
            log.info("rFVD at every evaluation: preset %s, I3D %s (sha256 %s)", e.fvd_preset, w["file"], w["sha256"])

    @torch.no_grad()
    def evaluate(self, ema_weights: dict, out_dir: Path, step: int) -> dict:
        from ulvideo.eval.reports import reconstruction_report

        model = build_stage1(self.cfg)
        model.load_state_dict(ema_weights)
        model.eval()
        videos, ext = self._heldout_batch(), self._extractor
        if ext is not None:
            ext = ext if videos.shape[2] >= ext.protocol.num_frames else None  # images of mixed data: no rFVD
        return reconstruction_report(model, videos, out_dir, self.cfg.eval.decoder_steps, seed=step, extractor=ext)

    def describe_evaluation(self, out: dict) -> str:
        line = (f"PSNR {out['psnr']:.2f} dB, SSIM {out['ssim']:.4f}, {out['bits_per_pixel']:.4g} bits/pixel "
                f"({out['bits_per_clip']:.1f} bits/clip, K = {out['rate_logsnr_samples']})")
        if "rfvd" in out:
            line += f", rFVD {out['rfvd']:.2f} ({out['fvd_preset']}, {int(out['num_clips'])} clips)"
        return line


class OnFrozenStageOne(Objective):
    """An objective that trains `self.model` on the latents of a stage-1 model it holds frozen."""

    def hold(self, stage1: UnifiedLatents) -> None:
        self._frozen = [stage1]  # a plain list: not a submodule, so DeepSpeed neither trains nor shards it

    @property
    def trained(self) -> nn.Module:
        return self.model

    @property
    def stage1(self) -> UnifiedLatents:
        return self._frozen[0]

    def batch_size(self, batch: dict) -> int:
        return len(batch["caption"])


class StageTwo(OnFrozenStageOne):
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
        self.hold(stage1)
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
        from ulvideo.eval.reports import tightness_report
        from ulvideo.ul import LatentDiffusion

        if self._heldout is None:
            d = self.cfg.data
            split = "heldout" if d.heldout_fraction > 0 else "train"
            self._heldout = next(iter(self.build_loader_split(split)))
        model = LatentDiffusion(self.cfg, self.stage1_cfg, text_dim=self.model.net.text_dim)
        model.load_state_dict(ema_weights)
        model.eval()
        z, cond, null = self.latents_and_condition(self._heldout)
        return tightness_report(self.stage1, model, z, cond, null, self.stage1_cfg.ul.eval_logsnr_samples, seed=0)

    def describe_evaluation(self, out: dict) -> str:
        return (f"stage-1 prior {out['stage1_prior_bits_per_clip']:.1f} bits/clip vs base ELBO "
                f"{out['base_elbo_null_bits_per_clip']:.1f} (null condition, ratio {out['null_over_prior']:.3f}), "
                f"{out['base_elbo_cond_bits_per_clip']:.1f} (conditional); K = {out['logsnr_samples']}")

    def build_loader_split(self, split: str):
        from ulvideo.data import build_loader

        return build_loader(self.cfg.data, micro_batch_size=self.cfg.eval.num_clips, seed=12345, rank=0, world_size=1, split=split)


class PriorRefinement(OnFrozenStageOne):
    """`stage: prior`: the prior of a stage-1 export (`prior.stage1_export`) trained further on the rate
    of that export's own latents, L_prior(z_clean) exactly as in stage 1 (same network, prediction,
    lambda range and estimator), with the encoder frozen.

    Only the prior is a submodule: the encoder and decoder sit in a plain list, outside what
    DeepSpeed wraps, so no optimizer state exists for them and nothing can move them. Every export
    is a complete stage-1 export (stage "ul"): the source's config and weights, bit for bit, with
    the prior's replaced by the EMA of the refined one; `meta` keeps the source's and adds
    `prior_refine_steps` and the source's file and sha256. Any prior gives an upper bound on the
    same latents' bitrate, so a lower held-out rate is a tighter bound on the same code.
    """

    progress_keys = ("loss", "bits_per_pixel")

    def __init__(self, cfg: Config):
        super().__init__()
        import copy

        from ulvideo.exports import file_sha256, load_export, load_stage1

        self.cfg = cfg
        path = Path(cfg.prior.stage1_export).with_suffix(".safetensors")
        self._source, _, self._source_meta = load_export(path)
        self._source_file = (str(path), file_sha256(path))
        stage1 = load_stage1(path)
        self.hold(stage1)
        self.model = copy.deepcopy(stage1.prior).requires_grad_(True).train()
        self._heldout = None

    def _latents(self, batch: dict, device, dtype) -> torch.Tensor:
        s1 = self.stage1
        if next(s1.parameters()).device != device:
            s1.to(device)
        with torch.no_grad():
            z = batch["z_clean"] if "z_clean" in batch else s1.encode(batch["video"].to(device, torch.float32))
        return z.to(dtype)

    def _pixels(self, z: torch.Tensor) -> int:
        e = self.stage1.cfg.encoder
        return (1 + e.temporal_downsample * (z.shape[2] - 1)) * z.shape[3] * z.shape[4] * e.spatial_downsample ** 2

    def forward(self, batch: dict, generator: torch.Generator, step: int):
        p = next(self.model.parameters())
        z = self._latents(batch, p.device, p.dtype)
        s1 = self.stage1
        terms = D.elbo(self.model, z, s1.prior_schedule, s1.cfg.prior.prediction, generator=generator,
                       time_sampling=s1.cfg.ul.time_sampling)
        rate = terms.total
        loss = rate.mean() / z[0].numel()
        bits = rate.detach() / LN2
        return loss, {"loss": loss.detach(), "bits_per_clip": bits, "bits_per_pixel": bits / self._pixels(z),
                      "bits_per_latent_dim": bits / z[0].numel(), "terminal_kl_bits": terms.terminal.detach() / LN2}

    def log_constants(self, step: int) -> dict[str, float]:
        u = self.stage1.cfg.ul
        return {"latent_logsnr": u.latent_logsnr, "prior_logsnr_min": u.prior_logsnr_min, "loss_factor": u.loss_factor,
                "sigmoid_bias": u.sigmoid_bias}

    def export_contents(self, weights: dict, cfg: Config, meta: dict) -> tuple[dict, Config, dict]:
        full = dict(self._source)
        for k, v in weights.items():
            full[f"prior.{k}"] = v
        # the encoder is the source's, bit for bit: latents made by the source (or by what it refines) are this
        # export's latents too (`check_shards_belong`)
        same = [*self._source_meta.get("same_latents_as_sha256", []), self._source_file[1]]
        meta = {**self._source_meta, "prior_refine_steps": meta["step"], "prior_refined_from": self._source_file[0],
                "prior_refined_from_sha256": self._source_file[1], "same_latents_as_sha256": same}
        return full, self.stage1.cfg, meta

    @torch.no_grad()
    def evaluate(self, ema_weights: dict, out_dir: Path, step: int) -> dict:
        """Held-out rate before (the source export's prior) and after refinement, K stratified logSNRs."""
        import copy

        from ulvideo.data import build_loader

        if self._heldout is None:
            d = self.cfg.data
            split = "heldout" if d.heldout_fraction > 0 else "train"
            self._heldout = next(iter(build_loader(d, micro_batch_size=self.cfg.eval.num_clips, seed=12345, rank=0,
                                                   world_size=1, split=split)))
        s1 = self.stage1
        z = self._latents(self._heldout, torch.device("cpu"), torch.float32)
        refined = copy.deepcopy(s1).cpu()
        refined.prior.load_state_dict(ema_weights)
        k = s1.cfg.ul.eval_logsnr_samples
        before, after = s1.cpu().rate_bits(z, k, seed=0).mean().item(), refined.rate_bits(z, k, seed=0).mean().item()
        return {"latents": z.shape[0], "logsnr_samples": k, "stage1_prior_bits_per_clip": before,
                "refined_prior_bits_per_clip": after, "refined_bits_per_pixel": after / self._pixels(z),
                "refined_over_stage1": after / before}

    def describe_evaluation(self, out: dict) -> str:
        return (f"prior {out['stage1_prior_bits_per_clip']:.1f} -> {out['refined_prior_bits_per_clip']:.1f} bits/clip "
                f"(x{out['refined_over_stage1']:.3f}, {out['refined_bits_per_pixel']:.4g} bits/pixel; "
                f"K = {out['logsnr_samples']})")


OBJECTIVES = {"ul": StageOne, "prior": PriorRefinement, "base": StageTwo}


def shard_encoding(path: str) -> dict | None:
    """The `encoding.json` that `ulvideo encode --data` writes beside latent shards, if any."""
    f = Path(path) / "encoding.json"
    return json.loads(f.read_text()) if f.is_file() else None


def check_shards_belong(data_path: str, export: str, key: str) -> None:
    """Latent shards (`ulvideo encode --data`) must come from the stage-1 export the run names."""
    info = shard_encoding(data_path)
    if info is not None:
        from ulvideo.exports import export_path, file_sha256

        path = export_path(export)
        side = path.with_suffix(".json")
        same = json.loads(side.read_text()).get("meta", {}).get("same_latents_as_sha256", []) if side.is_file() else []
        if info.get("stage1_sha256") not in (file_sha256(path), *same):  # same: a prior refinement's sources
            raise ConfigError(f"data.path '{data_path}' holds latents of another stage-1 export "
                              f"({info.get('stage1_export')}), not of {key} = {path}")


def make_objective(cfg: Config) -> Objective:
    if cfg.stage not in OBJECTIVES:
        raise ConfigError(f"stage '{cfg.stage}' is not available in this version (known: {', '.join(OBJECTIVES)})")
    return OBJECTIVES[cfg.stage](cfg)


def preflight(cfg: Config) -> None:
    """Checks that need no process group: the data exist and hold usable clips."""
    if cfg.stage not in OBJECTIVES:
        raise ConfigError(f"stage '{cfg.stage}' is not available in this version (known: {', '.join(OBJECTIVES)})")
    if cfg.eval.fvd_preset:
        from ulvideo.eval.fvd import PRESETS

        if cfg.stage != "ul":
            raise ConfigError(f"eval.fvd_preset = {cfg.eval.fvd_preset}: rFVD is a stage-1 evaluation (reconstructions); "
                              "stage 2 evaluates bits. Score its generated clips with `ulvideo fvd calc`")
        if cfg.eval.fvd_preset not in PRESETS:
            raise ConfigError(f"eval.fvd_preset = {cfg.eval.fvd_preset!r} is not an FVD preset (known: {', '.join(PRESETS)})")
    if cfg.stage == "prior":
        from ulvideo.exports import ExportError, load_export

        _, _, meta = load_export(cfg.prior.stage1_export)  # raises a clear error when missing or broken
        if meta.get("stage", "ul") != "ul":
            raise ExportError(f"prior.stage1_export = {cfg.prior.stage1_export} is a '{meta.get('stage')}' export, "
                              "not a stage-1 (ul) export")
        check_shards_belong(cfg.data.path, cfg.prior.stage1_export, "prior.stage1_export")
    if cfg.stage == "base":
        from ulvideo.exports import load_export

        load_export(cfg.base.stage1_export)  # raises a clear error when missing or broken
        name = cfg.base.text_encoder
        if name not in ("none", "minilm") and not Path(name).is_dir():
            raise ConfigError(f"base.text_encoder = '{name}': no such local text-encoder folder "
                              "(use 'minilm', 'none', or a local Hugging Face T5/CLIP folder)")
        check_shards_belong(cfg.data.path, cfg.base.stage1_export, "base.stage1_export")
    from ulvideo.data.storage import is_url

    remote = is_url(cfg.data.path) or "{" in cfg.data.path or "::" in cfg.data.path  # URLs, brace patterns, a::b
    if not (remote or cfg.data.manifest) and not Path(cfg.data.path).exists():
        raise FileNotFoundError(f"data.path '{cfg.data.path}' does not exist (for the built-in data: "
                                f"ulvideo data synth --out {cfg.data.path})")
    from ulvideo.data import check_usable

    check_usable(cfg.data)  # a folder of only broken files fails here, not after the process group starts
