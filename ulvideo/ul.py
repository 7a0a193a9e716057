"""Unified Latents, stage 1: encoder + diffusion prior + diffusion decoder, one objective.

    L = L_prior + L_dec                                              (nats per clip, DESIGN.md §1)
    L_prior = 1/2 int_{lambda_min}^{lambda_0} ||eps - eps_hat(z_lambda, lambda)||^2 dlambda + KL_terminal
    L_dec   = c_lf * 1/2 E_t[(-dlambda/dt) sigmoid(b - lambda) ||eps - eps_hat(x_lambda, z0, lambda)||^2]
    z0      = alpha_0 z_clean + sigma_0 eps_z,  lambda_0 = 5, fresh eps_z every step.

This module owns lambda_0 (`latent_logsnr`), lambda_min (`prior_logsnr_min`), the loss factor and the
decoder's sigmoid bias (`ULConfig`). Terms come back per sample; the training loop reduces them.
Both terms are per-clip sums; the loop divides their sum by one common constant only.

`loss` reads no mode flag. Its one start-up handle is the rate hold (DESIGN.md "Start-up dynamics"):
`rate_scale` r scales the rate's gradient into the encoder, never its value; the objective passes
0 during `ul.rate_hold_steps`, then ramps it to 1 over `ul.rate_ramp_steps`. The start-up term that
accompanies the hold is the objective's (ulvideo/startup.py); the paper's baselines are subclasses
with their own losses (ulvideo/baselines.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ulvideo import diffusion as D
from ulvideo import streaming
from ulvideo.config import Config
from ulvideo.nets import Decoder, Encoder, LatentTransformer


@dataclass
class ULTerms:
    """Per-sample terms, nats. `rate` is the prior's ELBO (the latent's bitrate bound)."""

    rate: torch.Tensor  # (B,) L_prior = rate_diffusion + rate_terminal
    rate_diffusion: torch.Tensor  # (B,)
    rate_terminal: torch.Tensor  # (B,)
    distortion: torch.Tensor  # (B,) L_dec, already multiplied by the loss factor
    prior_logsnr: torch.Tensor  # (B,)
    decoder_logsnr: torch.Tensor  # (B,)
    # (B, C, T', H', W') the noisy latent the decoder saw, still in the encoder's graph: what a
    # training aid of the objective (ulvideo/startup.py) reads
    z0: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.rate + self.distortion

    def extra(self) -> dict[str, torch.Tensor]:
        """Per-sample terms (nats) beyond rate and distortion that `total` contains, by name, to log."""
        return {}


def _sum(err: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squares."""
    return (err.float() ** 2).flatten(1).sum(1)


def rate_gradient_scale(step: int, hold_steps: int, ramp_steps: int) -> float:
    """0 during the rate hold, then a linear ramp to 1 (DESIGN.md "Start-up dynamics")."""
    if step < hold_steps:
        return 0.0
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step - hold_steps + 1) / ramp_steps)


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Same values as x; the gradient flowing back through it is multiplied by `scale`."""
    if scale == 1.0:
        return x
    d = x.detach()
    return d if scale == 0.0 else d + scale * (x - d)


class UnifiedLatents(nn.Module):
    """Stage 1: `encode`, `decode`, and `loss` = L_prior + L_dec exactly as DESIGN.md §1.

    The paper's Table-5 baselines subclass it in ulvideo/baselines.py (`ul.model`), each with its
    own loss; `ulvideo.baselines.build_stage1(cfg)` builds the one a config names.
    """

    deterministic_decoder = False  # the MSE baseline (ulvideo/baselines.py) decodes in one pass

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        u, e = cfg.ul, cfg.encoder
        self.latent_channels = e.latent_channels
        self.encoder = self.build_encoder(cfg)
        self.prior = LatentTransformer(cfg.prior, e.latent_channels)
        self.decoder = Decoder(cfg.decoder, e.latent_channels, e.temporal_downsample, e.spatial_downsample)
        # the rate's lambda density: p(lambda) ~ sigmoid(lambda) (`diffusion.SoftplusSchedule`), the shape of
        # the unweighted ELBO's integrand, an importance-sampled estimate of the same L_prior
        self.prior_schedule = D.SoftplusSchedule(u.latent_logsnr, u.prior_logsnr_min)
        self.decoder_schedule = D.CosineSchedule(cfg.decoder.logsnr_max, cfg.decoder.logsnr_min, cfg.decoder.shift)
        a0, s0 = D.alpha_sigma(torch.tensor(u.latent_logsnr, dtype=torch.float64))
        self.alpha0, self.sigma0 = float(a0), float(s0)

    def build_encoder(self, cfg: Config) -> Encoder:
        return Encoder(cfg.encoder)

    # ---- the jobs --------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> z_clean (B, C, T', H', W'), deterministic."""
        return self.encoder(x)

    def noisy_latent(self, z_clean: torch.Tensor, noise: torch.Generator | int | None = None, mode: str = "sample",
                     start: int = 0) -> torch.Tensor:
        """z0 = alpha_0 z_clean + sigma_0 eps_z ("sample", what the decoder sees in training) or alpha_0 z_clean ("mean").

        eps_z comes from `noise`: a generator (or None, the global RNG) draws it for the whole batch, as
        training does; an int seed draws it per latent frame (`streaming.clip_noise`, frame `start` + j),
        so that a clip's z0 does not depend on how it is cut into chunks (what decoding uses).
        """
        if mode == "mean":
            return self.alpha0 * z_clean
        if mode != "sample":
            raise ValueError(f"latent noise mode '{mode}' (sample, mean)")
        if isinstance(noise, int):
            eps = streaming.clip_noise(noise, streaming.NOISE_LATENT, 0, start, z_clean.shape, z_clean.device)
        else:
            eps = torch.randn(z_clean.shape, generator=noise, device=z_clean.device, dtype=torch.float32)
        return (self.alpha0 * z_clean.float() + self.sigma0 * eps).to(z_clean.dtype)

    def prior_denoise(self, z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        return self.prior(z, logsnr)

    def decoder_denoise(self, z0: torch.Tensor):
        return lambda x_t, logsnr: self.decoder(x_t, z0, logsnr)

    def prior_elbo(self, z: torch.Tensor, generator: torch.Generator | None = None) -> D.ELBOTerms:
        """L_prior of latents z: z_lambda is built from z with its own noise (never by re-noising z0)."""
        return D.elbo(self.prior_denoise, z, self.prior_schedule, self.cfg.prior.prediction,
                      generator=generator, time_sampling=self.cfg.ul.time_sampling)

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None, rate_scale: float = 1.0) -> ULTerms:
        """L_prior + L_dec for a batch of clips x (B, 3, T, H, W) in [-1, 1] (DESIGN.md §1).

        Independent times and noises for prior and decoder, all drawn from `generator` in this
        order: prior (times, noise), eps_z, decoder (times, noise). `rate_scale` scales the rate's
        gradient into the encoder, not its value: 0 during the rate hold, ramping to 1 (exact UL).
        """
        z_clean = self.encode(x)
        prior = self.prior_elbo(scale_gradient(z_clean, rate_scale), generator)
        z0 = self.noisy_latent(z_clean, generator)
        dist, dec_logsnr = self.decoder_loss(x, z0, generator)
        return ULTerms(prior.total, prior.diffusion, prior.terminal, self.cfg.ul.loss_factor * dist, prior.logsnr,
                       dec_logsnr, z0)

    def decoder_loss(self, x: torch.Tensor, z0: torch.Tensor, generator: torch.Generator | None = None,
                     t: torch.Tensor | None = None, eps: torch.Tensor | None = None):
        """Per-sample decoder loss (before the loss factor) and the logSNRs used."""
        d, u = self.cfg.decoder, self.cfg.ul
        return D.sigmoid_weighted_loss(self.decoder_denoise(z0), x, self.decoder_schedule, d.prediction, u.sigmoid_bias,
                                       t=t, eps=eps, generator=generator, time_sampling=u.time_sampling)

    @torch.no_grad()
    def decoder_gain(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-clip bits the decoder saves by seeing the right latent instead of another clip's.

        Weighted decoder loss with the batch's latents rolled by one, minus with the right ones,
        same times and noises. Near 0 means the latent carries nothing the decoder uses (collapse).
        """
        b = x.shape[0]
        if b < 2:
            return torch.zeros(b, device=x.device)
        z0 = self.noisy_latent(self.encode(x), generator)
        t = D.sample_times(b, self.cfg.ul.time_sampling, generator, x.device)
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        right, _ = self.decoder_loss(x, z0, t=t, eps=eps)
        wrong, _ = self.decoder_loss(x, z0.roll(1, dims=0), t=t, eps=eps)
        return D.nats_to_bits(self.cfg.ul.loss_factor * (wrong - right))

    @torch.no_grad()
    def rate_bits(self, z_clean: torch.Tensor, num_logsnrs: int | None = None, seed: int = 0) -> torch.Tensor:
        """Held-out rate per clip in bits: the prior's ELBO at K stratified logSNRs per clip, fixed seed
        (K = `ul.eval_logsnr_samples` by default)."""
        k = num_logsnrs or self.cfg.ul.eval_logsnr_samples
        return D.stratified_elbo_bits(self.prior_denoise, z_clean, self.prior_schedule, self.cfg.prior.prediction, k, seed)

    def decoder_logsnr_end(self, end: float | None = None) -> float:
        """Where decoding stops and takes the clean prediction: `end`, which must lie in the decoder's
        (logsnr_min, logsnr_max], or logsnr_max for None. Lower ends keep more of the posterior mean
        and less sampled detail: the prediction at logSNR 0 averages over what the decoder would
        still invent above it."""
        d = self.cfg.decoder
        if end is None:
            return float(d.logsnr_max)
        if not d.logsnr_min < end <= d.logsnr_max:
            raise ValueError(f"decoder logsnr_end = {end} must lie in (decoder.logsnr_min, decoder.logsnr_max] "
                             f"= ({d.logsnr_min}, {d.logsnr_max}]")
        return float(end)

    @torch.no_grad()
    def decode(self, z0: torch.Tensor, steps: int = 32, sampler: str = "ddpm", seed: int = 0,
               logsnr_end: float | None = None) -> torch.Tensor:
        """z0 (B, C, T', H', W') -> clips (B, 3, 1 + 4 (T' - 1), H, W) in [-1, 1].

        x ~ N(0, I) at the decoder's lambda_min, `steps` sampler steps up to `decoder_logsnr_end(logsnr_end)`,
        then the clean prediction there, clipped to [-1, 1] (the MSE baseline: its one prediction).
        All noise is drawn per frame from `seed` (`streaming.frame_noise`): the one-pass decode of
        `streaming.decode`, which gives the same clip chunked or tiled.
        """
        return streaming.decode(self, z0, None, steps=steps, sampler=sampler, seed=seed, logsnr_end=logsnr_end)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, steps: int = 32, sampler: str = "ddpm", latent_noise: str = "sample",
                    seed: int = 0, logsnr_end: float | None = None) -> torch.Tensor:
        """decode(noisy_latent(encode(x))): z0's noise and the decoder's from the same `seed`, per frame."""
        z0 = self.noisy_latent(self.encode(x), seed, latent_noise)
        return self.decode(z0, steps, sampler, seed, logsnr_end)


# ============================================================================================
# Stage 2
# ============================================================================================


@dataclass
class BaseTerms:
    loss: torch.Tensor  # (B,) sigmoid-weighted, nats
    logsnr: torch.Tensor  # (B,)


@dataclass
class Condition:
    """What the base model is conditioned on; every field optional. `context` holds clean latent
    frames, `context_mask` (B, T') marks which of them are given."""

    text_emb: torch.Tensor | None = None  # (B, L, D)
    text_mask: torch.Tensor | None = None  # (B, L) bool
    label: torch.Tensor | None = None  # (B,) long, -1 = none
    context: torch.Tensor | None = None  # (B, C, T', H', W')
    context_mask: torch.Tensor | None = None  # (B, T') bool

    def select(self, keep: torch.Tensor, null: "Condition") -> "Condition":
        """Per sample: this condition where `keep`, the null condition elsewhere (CFG dropout)."""
        def pick(a, b):
            if a is None:
                return None
            k = keep.view(-1, *[1] * (a.ndim - 1))
            return torch.where(k, a, b)

        return Condition(pick(self.text_emb, null.text_emb), pick(self.text_mask, null.text_mask),
                         pick(self.label, null.label), pick(self.context, null.context),
                         pick(self.context_mask, null.context_mask))


class LatentDiffusion(nn.Module):
    """The stage-2 base model on frozen stage-1 latents z_clean (DESIGN.md §1, "Stage 2").

    z_lambda = alpha z_clean + sigma eps for lambda in [lambda_min, lambda_0]; sigmoid-weighted loss
    with its own bias b_base. lambda_0 and lambda_min come from the stage-1 export (`stage1_cfg`).
    Context frames are clean conditioning, excluded from the loss and kept fixed by the sampler.
    """

    def __init__(self, cfg: Config, stage1_cfg: Config, text_dim: int = 0):
        super().__init__()
        self.cfg, self.stage1_cfg = cfg, stage1_cfg
        self.latent_channels = stage1_cfg.encoder.latent_channels
        self.net = LatentTransformer(cfg.base, self.latent_channels, text_dim=text_dim)
        u = stage1_cfg.ul
        self.schedule = D.CosineSchedule(u.latent_logsnr, u.prior_logsnr_min)  # training and sampling
        # the unweighted ELBO (tightness) is estimated as the stage-1 prior's rate is, with the same draws
        self.elbo_schedule = D.SoftplusSchedule(u.latent_logsnr, u.prior_logsnr_min)

    def denoise(self, cond: Condition):
        return lambda z, logsnr: self.net(z, logsnr, text_emb=cond.text_emb, text_mask=cond.text_mask,
                                          label=cond.label, context=cond.context, context_mask=cond.context_mask)

    def target_mask(self, z_clean: torch.Tensor, cond: Condition) -> torch.Tensor | None:
        """1 on the latent frames the model generates, 0 on given context frames."""
        if cond.context_mask is None:
            return None
        return (~cond.context_mask).to(z_clean.dtype).view(z_clean.shape[0], 1, -1, 1, 1)

    def loss(self, z_clean: torch.Tensor, cond: Condition, generator: torch.Generator | None = None) -> BaseTerms:
        loss, logsnr = D.sigmoid_weighted_loss(
            self.denoise(cond), z_clean, self.schedule, self.cfg.base.prediction, self.cfg.base.sigmoid_bias,
            generator=generator, time_sampling=self.stage1_cfg.ul.time_sampling, mask=self.target_mask(z_clean, cond))
        return BaseTerms(loss, logsnr)

    @torch.no_grad()
    def elbo_bits(self, z_clean: torch.Tensor, cond: Condition, num_logsnrs: int = 32, seed: int = 0) -> torch.Tensor:
        """Unweighted ELBO per clip in bits over the generated frames, K stratified logSNRs per clip with
        a fixed seed: with the null condition the quantity the stage-1 prior's bits bound (the tightness check)."""
        return D.stratified_elbo_bits(self.denoise(cond), z_clean, self.elbo_schedule, self.cfg.base.prediction,
                                      num_logsnrs, seed, self.target_mask(z_clean, cond))

    @torch.no_grad()
    def sample(self, shape: tuple[int, ...], cond: Condition, null: Condition | None = None, guidance: float = 1.0,
               steps: int = 64, sampler: str = "ddpm", generator: torch.Generator | None = None,
               progress=None) -> D.SampleResult:
        """z ~ N(0, I) at lambda_min -> `steps` steps ending exactly at lambda_0: (z0, final clean prediction)."""
        z = torch.randn(shape, generator=generator, dtype=torch.float32)
        denoise = self.denoise(cond)
        if guidance != 1.0:
            if null is None:
                raise ValueError("guidance != 1 needs the null condition")
            denoise = D.guided(denoise, self.denoise(null), guidance)
        known = None
        if cond.context is not None and cond.context_mask is not None and bool(cond.context_mask.any()):
            eps_known = torch.randn(shape, generator=generator, dtype=torch.float32)  # one fixed draw
            known = (cond.context, cond.context_mask.to(torch.float32).view(shape[0], 1, -1, 1, 1), eps_known)
        logsnrs = D.sampling_logsnrs(self.schedule, steps)
        return D.sample(denoise, z, logsnrs, self.cfg.base.prediction, sampler, generator=generator,
                        progress=progress, known=known)
