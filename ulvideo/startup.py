"""The start-up term: a training aid of the stage-1 objective, on only while the rate is held.

    S(x, z0, step) = (1 - r(step)) * w/2 * ||P_k (x - R(z0))||^2        nats per clip
    P_k e = m + k (e - m),  m = mean of e over RGB (the grey part of e)
    r(step) = the rate's gradient scale: 0 during `ul.rate_hold_steps`, then a linear ramp to 1
              over `ul.rate_ramp_steps` (ulvideo.ul.rate_gradient_scale)

R is a `LatentReadout`, a small per-latent-position network z0 -> pixels; w is
`ul.startup_recon_weight`, k `ul.startup_chroma_weight`. So S is on during the hold, fades out as
the rate ramps in, and is exactly 0 after the ramp: from then on the objective is exact UL.

Why (DESIGN.md "Start-up dynamics"): at initialisation the decoder learns to denoise long before
it reads z0, so nothing asks the encoder to write into z0, and it shrinks z_clean below the sigma_0
noise floor. S makes z0 count from the first step: its gradient reaches the encoder through z0
(and trains R); it never reaches the decoder or the prior, which stay with their own losses.
The chroma weight: an object's colour is a low-variance direction of pixel space beside its
luminance footprint, and a squared-error autoencoder learns it last; k = 3 counts it 9 times.

`StartupTerm` is a submodule of the objective (`ulvideo.train.objectives.StageOne`), not of the
model: it is trained and resumed with the DeepSpeed-wrapped objective (weights and optimizer
state) and left out of every export, which hold `StageOne.trained`, the model, only.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ulvideo.config import Config
from ulvideo.nets import LatentReadout
from ulvideo.ul import rate_gradient_scale

# Width of the readout's two convs. Not a user choice: R only has to tell where each object is
# and its colour from z0 during the hold; its cost is ~nothing beside the decoder's.
READOUT_WIDTH = 128


def chroma_scaled(err: torch.Tensor, k: float) -> torch.Tensor:
    """RGB error (B, 3, ...) with its chroma scaled by k: grey part m = mean over RGB, m + k (err - m).

    The two parts are orthogonal, so ||chroma_scaled(e, k)||^2 = ||m||^2 + k^2 ||e - m||^2.
    """
    grey = err.mean(dim=1, keepdim=True)
    return grey + k * (err - grey)


class StartupTerm(nn.Module):
    """`StartupTerm(cfg)`: `scale(step)` is 1 - r(step); `forward(x, z0, scale)` the per-clip term S."""

    def __init__(self, cfg: Config):
        super().__init__()
        u, e = cfg.ul, cfg.encoder
        self.weight, self.chroma_weight = u.startup_recon_weight, u.startup_chroma_weight
        self.hold_steps, self.ramp_steps = u.rate_hold_steps, u.rate_ramp_steps
        self.readout = LatentReadout(e.latent_channels, READOUT_WIDTH, e.temporal_downsample, e.spatial_downsample)

    def scale(self, step: int) -> float:
        """1 during the rate hold, fading linearly as the rate ramps in, 0 after."""
        return 1.0 - rate_gradient_scale(step, self.hold_steps, self.ramp_steps)

    def forward(self, x: torch.Tensor, z0: torch.Tensor, scale: float) -> torch.Tensor:
        """x (B, 3, T, H, W) in [-1, 1], z0 (B, C, T', H', W') as the decoder saw it -> S (B,) nats."""
        err = chroma_scaled(x.float() - self.readout(z0).float(), self.chroma_weight)
        return scale * self.weight * 0.5 * (err ** 2).flatten(1).sum(1)
