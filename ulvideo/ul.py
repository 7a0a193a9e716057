"""Unified Latents, stage 1: encoder + diffusion prior + diffusion decoder, one objective.

    L = L_prior + L_dec                                              (nats per clip, DESIGN.md §1)
    L_prior = 1/2 int_{lambda_min}^{lambda_0} ||eps - eps_hat(z_lambda, lambda)||^2 dlambda + KL_terminal
    L_dec   = c_lf * 1/2 E_t[(-dlambda/dt) sigmoid(b - lambda) ||eps - eps_hat(x_lambda, z0, lambda)||^2]
    z0      = alpha_0 z_clean + sigma_0 eps_z,  lambda_0 = 5, fresh eps_z every step.

This module owns lambda_0 (`latent_logsnr`), lambda_min (`prior_logsnr_min`), the loss factor and the
decoder's sigmoid bias (`ULConfig`). Terms come back per sample; the training loop reduces them.
Both terms are per-clip sums; the loop divides their sum by one common constant only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from ulvideo import diffusion as D
from ulvideo import streaming
from ulvideo.config import Config
from ulvideo.nets import Decoder, Encoder, LatentReadout, LatentTransformer


@dataclass
class ULTerms:
    """Per-sample terms, nats. `rate` is the prior's ELBO (the latent's bitrate bound)."""

    rate: torch.Tensor  # (B,) L_prior = rate_diffusion + rate_terminal
    rate_diffusion: torch.Tensor  # (B,)
    rate_terminal: torch.Tensor  # (B,)
    distortion: torch.Tensor  # (B,) L_dec, already multiplied by the loss factor
    prior_logsnr: torch.Tensor  # (B,)
    decoder_logsnr: torch.Tensor  # (B,)
    vae_kl: torch.Tensor | None = None  # (B,) KL(q(z|x) || N(0, I)) of the KL-VAE baseline
    kl_weight: float = 1.0  # beta of the KL-VAE baseline
    startup: torch.Tensor | None = None  # (B,) start-up reconstruction term, already scaled (0 after the ramp)

    @property
    def total(self) -> torch.Tensor:
        total = self.rate + self.distortion
        if self.vae_kl is not None:
            # KL-VAE baseline: the encoder pays beta * KL; the prior only measures (its input is detached)
            total = total + self.kl_weight * self.vae_kl
        if self.startup is not None:
            total = total + self.startup
        return total


def _sum(err: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squares."""
    return (err.float() ** 2).flatten(1).sum(1)


def chroma_scaled(err: torch.Tensor, k: float) -> torch.Tensor:
    """RGB error (B, 3, ...) with its chroma scaled by k: grey part m = mean over RGB, m + k (err - m).

    The two parts are orthogonal, so ||chroma_scaled(e, k)||^2 = ||m||^2 + k^2 ||e - m||^2.
    """
    if k == 1.0:
        return err
    grey = err.mean(dim=1, keepdim=True)
    return grey + k * (err - grey)


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
    """Stage 1. Two baselines share the networks (selected by config, for the paper's ablations):
    `ul.regularizer = kl_vae` — a Gaussian posterior with learned variance (the encoder predicts mean
    and log-variance), KL to N(0, I) weighted by `ul.kl_weight`, and the diffusion prior fitted to the
    detached latents so its rate is measured the same way as UL's; `decoder.loss = mse` — a
    deterministic decoder x_hat(z0) with loss c_lf ||x - x_hat||^2 / (2 mse_sigma^2)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        u, e = cfg.ul, cfg.encoder
        self.latent_channels = e.latent_channels
        self.vae = u.regularizer == "kl_vae"
        self.encoder = Encoder(dataclasses.replace(e, latent_channels=2 * e.latent_channels) if self.vae else e)
        self.prior = LatentTransformer(cfg.prior, e.latent_channels)
        self.decoder = Decoder(cfg.decoder, e.latent_channels, e.temporal_downsample, e.spatial_downsample)
        if u.startup_head == "readout":  # trained by the start-up term only; unused after it
            self.readout = LatentReadout(e.latent_channels, u.startup_readout_width, e.temporal_downsample,
                                         e.spatial_downsample)
        self.prior_schedule = D.CosineSchedule(u.latent_logsnr, u.prior_logsnr_min)
        self.decoder_schedule = D.CosineSchedule(cfg.decoder.logsnr_max, cfg.decoder.logsnr_min, cfg.decoder.shift)
        a0, s0 = D.alpha_sigma(torch.tensor(u.latent_logsnr, dtype=torch.float64))
        self.alpha0, self.sigma0 = float(a0), float(s0)

    # ---- the jobs --------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> z_clean (B, C, T', H', W'), deterministic (the KL-VAE's mean)."""
        out = self.encoder(x)
        return out[:, : self.latent_channels] if self.vae else out

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KL-VAE baseline: (mean, log-variance) of q(z | x)."""
        out = self.encoder(x)
        return out[:, : self.latent_channels], out[:, self.latent_channels:].clamp(-30.0, 20.0)

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

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None, rate_scale: float = 1.0,
             startup_scale: float = 0.0) -> ULTerms:
        """Stage-1 terms for a batch of clips x (B, 3, T, H, W) in [-1, 1].

        Independent times and noises for prior and decoder, all drawn from `generator`.
        `rate_scale` scales the rate's gradient into the encoder (1 after the start-up ramp);
        `startup_scale` scales the start-up reconstruction term (`ul.startup_recon_weight`).
        """
        u = self.cfg.ul
        vae_kl = None
        if self.vae:
            mean, logvar = self.posterior(x)
            eps = torch.randn(mean.shape, generator=generator, device=x.device, dtype=torch.float32)
            z_clean = mean + torch.exp(0.5 * logvar) * eps
            vae_kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(1)
            z_for_prior = z_clean.detach()
        else:
            z_clean = self.encode(x)
            z_for_prior = scale_gradient(z_clean, rate_scale)
        # z_lambda is built from z_clean with its own noise (never by re-noising z0)
        prior = D.elbo(self.prior_denoise, z_for_prior, self.prior_schedule, self.cfg.prior.prediction,
                       generator=generator, time_sampling=u.time_sampling)
        z0 = self.noisy_latent(z_clean, generator)
        startup_on = startup_scale > 0 and u.startup_recon_weight > 0 and self.cfg.decoder.loss == "diffusion"
        if startup_on and u.startup_pass == "shared" and x.shape[0] >= 2:
            dist, dec_logsnr, err = self.shared_startup_pass(x, z0, generator)
        else:
            dist, dec_logsnr = self.decoder_loss(x, z0, generator)
            err = self.startup_recon_error(x, z0, generator) if startup_on else None
        startup = None if err is None else startup_scale * u.startup_recon_weight * 0.5 * err
        return ULTerms(prior.total, prior.diffusion, prior.terminal, u.loss_factor * dist, prior.logsnr, dec_logsnr,
                       vae_kl, u.kl_weight, startup)

    def startup_recon_error(self, x: torch.Tensor, z0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample ||x - x_hat||^2 of the decoder's x-prediction from x at its lowest logSNR.

        There x_lambda is (almost) pure noise, so the Bayes-optimal prediction is E[x | z0]: the
        same target the diffusion loss has at that logSNR, where its weight is ~e^lambda_min. This
        term gives it weight during start-up, so the decoder learns to read z0 (and the encoder to
        write into it) as fast as a plain autoencoder does. `ul.startup_input = zeros` takes the
        prediction from an all-zero input instead (the MSE decoder's); `ul.startup_clips` = k
        computes it on the first k clips of the batch only (one decoder pass over k clips, not B).
        `ul.startup_head = readout` takes the prediction from `LatentReadout(z0)` instead of the
        decoder: the encoder learns to write into z0 just the same, the decoder is left to the
        diffusion loss, and no decoder pass is added.
        """
        u = self.cfg.ul
        b = x.shape[0]
        k = min(b, u.startup_clips or b)
        xs, zs = x[:k], z0[:k]
        if u.startup_head == "readout":
            return self._startup_error(xs, self.readout(zs).float(), b)
        x_in = self._startup_input(xs, generator)
        return self._startup_error(xs, self._x_at_lowest_logsnr(x_in, zs), b)

    def _startup_error(self, xs: torch.Tensor, x_hat: torch.Tensor, b: int) -> torch.Tensor:
        """Per-clip chroma-scaled squared error of the first k = len(xs) clips of a batch of b. For
        k < b those clips carry the term, scaled by b / k so the batch mean is an unbiased estimate
        of the all-clip term, and the others carry 0."""
        k = xs.shape[0]
        err = _sum(chroma_scaled(xs.float() - x_hat, self.cfg.ul.startup_chroma_weight))
        return err if k == b else torch.cat([err * (b / k), err.new_zeros(b - k)])

    def _startup_input(self, xs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The decoder's input for the start-up term: x at the lowest logSNR, or zeros."""
        if self.cfg.ul.startup_input == "zeros":
            return torch.zeros_like(xs)
        lam = torch.full((xs.shape[0],), self.cfg.decoder.logsnr_min, device=xs.device)
        a, s = (v.view(-1, 1, 1, 1, 1) for v in D.alpha_sigma(lam))
        eps = torch.randn(xs.shape, generator=generator, device=xs.device, dtype=torch.float32)
        return (a * xs.float() + s * eps).to(xs.dtype)

    def shared_startup_pass(self, x: torch.Tensor, z0: torch.Tensor, generator: torch.Generator | None = None):
        """`ul.startup_pass = shared`: the diffusion loss and the start-up error from ONE decoder pass.

        The first k clips (`ul.startup_clips`, 0 = B // 2) enter at the lowest logSNR and give the
        start-up error (scaled B / k); the other B - k give the sigmoid-weighted diffusion loss at
        stratified times (scaled B / (B - k)); each part is 0 on the other's clips, so both batch
        means are unbiased estimates of the all-clip terms. The network treats clips independently,
        so this equals the two separate passes with the same draws. Draw order: the diffusion
        clips' times and noise, then the start-up clips' noise.
        -> (per-clip diffusion loss before the loss factor, decoder logSNRs, per-clip start-up error)
        """
        d, u = self.cfg.decoder, self.cfg.ul
        b = x.shape[0]
        k = min(b - 1, u.startup_clips or b // 2)
        xs, xd = x[:k], x[k:]
        t = D.sample_times(b - k, u.time_sampling, generator, x.device)
        eps = torch.randn(xd.shape, generator=generator, device=x.device, dtype=torch.float32)
        xs_in = self._startup_input(xs, generator)
        lam_s = torch.full((k,), d.logsnr_min, device=x.device)
        start = {}

        def denoise(xd_t, lam_d):  # one decoder call; the start-up clips' output is kept aside
            out = self.decoder(torch.cat([xs_in, xd_t]), z0, torch.cat([lam_s, lam_d]))
            start["out"] = out[:k]
            return out[k:]

        dist, lam_d = D.sigmoid_weighted_loss(denoise, xd, self.decoder_schedule, d.prediction, u.sigmoid_bias,
                                              t=t, eps=eps)
        x_hat = D.predict_x_eps(start["out"], xs_in, lam_s, d.prediction)[0]
        return (torch.cat([dist.new_zeros(k), dist * (b / (b - k))]), torch.cat([lam_s, lam_d]),
                self._startup_error(xs, x_hat, b))

    def _x_at_lowest_logsnr(self, x_t: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """The decoder's x-prediction from x_t at its lowest logSNR (where only z0 informs it)."""
        lam = torch.full((x_t.shape[0],), self.cfg.decoder.logsnr_min, device=x_t.device)
        return D.predict_x_eps(self.decoder(x_t, z0, lam), x_t, lam, self.cfg.decoder.prediction)[0]

    def decoder_loss(self, x: torch.Tensor, z0: torch.Tensor, generator: torch.Generator | None = None,
                     t: torch.Tensor | None = None, eps: torch.Tensor | None = None):
        """Per-sample decoder loss (before the loss factor) and the logSNRs used."""
        d, u = self.cfg.decoder, self.cfg.ul
        if d.loss == "mse":
            x_hat = self._mse_decode(z0)
            return _sum(x.float() - x_hat) / (2 * d.mse_sigma**2), torch.full((x.shape[0],), d.logsnr_min, device=x.device)
        return D.sigmoid_weighted_loss(self.decoder_denoise(z0), x, self.decoder_schedule, d.prediction, u.sigmoid_bias,
                                       t=t, eps=eps, generator=generator, time_sampling=u.time_sampling)

    def _mse_decode(self, z0: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """The MSE baseline's deterministic decoder: the network's x-prediction from an all-zero
        input at the lowest logSNR (the same network, used as a plain conditional regressor)."""
        e = self.cfg.encoder
        b, _, tl, hl, wl = z0.shape
        t = num_frames or 1 + e.temporal_downsample * (tl - 1)
        zeros = torch.zeros(b, 3, t, hl * e.spatial_downsample, wl * e.spatial_downsample, device=z0.device, dtype=z0.dtype)
        return self._x_at_lowest_logsnr(zeros, z0)

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
        self.schedule = D.CosineSchedule(u.latent_logsnr, u.prior_logsnr_min)

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
        return D.stratified_elbo_bits(self.denoise(cond), z_clean, self.schedule, self.cfg.base.prediction,
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
