"""The paper's Table-5 baselines, each a `UnifiedLatents` with its own loss (`ul.model`).

    kl_vae       L = L_prior(sg[z]) + L_dec(z0) + beta * KL(q(z | x) || N(0, I))
                 q(z | x) = N(mu(x), diag exp(logvar(x))),  z = mu + exp(logvar / 2) eps
    mse_decoder  L = L_prior(z_clean) + c_lf ||x - x_hat(z0)||^2 / (2 sigma^2)

Both keep UL's networks, its fixed-noise latent z0 = alpha_0 z + sigma_0 eps_z and its diffusion
prior, so their bits are measured the way UL's are. The KL-VAE's encoder predicts a mean and a
log-variance (twice the latent channels); its prior is fitted to the detached latents sg[z], so the
rate measures them and the encoder pays only beta * KL (`ul.kl_weight`); `encode` returns the mean.
The MSE decoder is the same decoder network used once, as a plain conditional regressor: its
x-prediction from an all-zero input at its lowest logSNR, where only z0 informs it; `decode` is
that prediction (no sampler) and sigma is `ul.mse_sigma`.

    model = build_stage1(cfg)   # UnifiedLatents, KLVAE or MSEDecoder, as cfg.ul.model names
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ulvideo import diffusion as D
from ulvideo.config import Config
from ulvideo.nets import Encoder
from ulvideo.ul import ULTerms, UnifiedLatents


@dataclass
class KLVAETerms(ULTerms):
    vae_kl: torch.Tensor  # (B,) KL(q(z | x) || N(0, I)), nats
    kl_weight: float  # beta

    @property
    def total(self) -> torch.Tensor:
        return self.rate + self.distortion + self.kl_weight * self.vae_kl

    def extra(self) -> dict[str, torch.Tensor]:
        return {"vae_kl": self.vae_kl}


class KLVAE(UnifiedLatents):
    """A Gaussian posterior with learned variance, KL to N(0, I) weighted by beta."""

    def build_encoder(self, cfg: Config) -> Encoder:
        return Encoder(dataclasses.replace(cfg.encoder, latent_channels=2 * cfg.encoder.latent_channels))

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z | x), each (B, C, T', H', W')."""
        out = self.encoder(x)
        return out[:, : self.latent_channels], out[:, self.latent_channels:].clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x)[0]

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None, rate_scale: float = 1.0) -> KLVAETerms:
        """Draw order: the posterior's noise, then as `UnifiedLatents.loss`. `rate_scale` has nothing
        to scale: the prior never sends a gradient into the encoder."""
        mean, logvar = self.posterior(x)
        eps = torch.randn(mean.shape, generator=generator, device=x.device, dtype=torch.float32)
        z = mean + torch.exp(0.5 * logvar) * eps
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
        prior = self.prior_elbo(z.detach(), generator)
        z0 = self.noisy_latent(z, generator)
        dist, dec_logsnr = self.decoder_loss(x, z0, generator)
        return KLVAETerms(prior.total, prior.diffusion, prior.terminal, self.cfg.ul.loss_factor * dist, prior.logsnr,
                          dec_logsnr, z0, kl, self.cfg.ul.kl_weight)


class MSEDecoder(UnifiedLatents):
    """A deterministic decoder x_hat(z0) with loss c_lf ||x - x_hat||^2 / (2 sigma^2) nats. Decoding
    (`decode`, streamed and tiled alike) is its one prediction from zeros at the lowest logSNR."""

    deterministic_decoder = True

    def predict(self, z0: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """x_hat(z0) (B, 3, T, H, W): the decoder's x-prediction from zeros at its lowest logSNR."""
        e, d = self.cfg.encoder, self.cfg.decoder
        b, _, tl, hl, wl = z0.shape
        t = num_frames or 1 + e.temporal_downsample * (tl - 1)
        zeros = torch.zeros(b, 3, t, hl * e.spatial_downsample, wl * e.spatial_downsample, device=z0.device,
                            dtype=z0.dtype)
        lam = torch.full((b,), d.logsnr_min, device=z0.device)
        return D.predict_x_eps(self.decoder(zeros, z0, lam), zeros, lam, d.prediction)[0]

    def decoder_loss(self, x: torch.Tensor, z0: torch.Tensor, generator: torch.Generator | None = None,
                     t: torch.Tensor | None = None, eps: torch.Tensor | None = None):
        """Per-clip ||x - x_hat(z0)||^2 / (2 sigma^2) (before the loss factor); no draws, so the
        decoder gain's shared times and noises (`t`, `eps`) are unused."""
        err = (x.float() - self.predict(z0, x.shape[2]).float()) ** 2
        logsnr = torch.full((x.shape[0],), self.cfg.decoder.logsnr_min, device=x.device)
        return err.flatten(1).sum(1) / (2 * self.cfg.ul.mse_sigma ** 2), logsnr


STAGE1_MODELS: dict[str, type[UnifiedLatents]] = {"unified": UnifiedLatents, "kl_vae": KLVAE, "mse_decoder": MSEDecoder}


def build_stage1(cfg: Config) -> UnifiedLatents:
    """The stage-1 model `cfg.ul.model` names."""
    return STAGE1_MODELS[cfg.ul.model](cfg)
