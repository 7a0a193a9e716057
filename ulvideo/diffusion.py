"""Diffusion math in log-SNR form. Torch only; everything takes denoise *functions*.

Conventions (DESIGN.md §1):
  * variance preserving: alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr),
    z_t = alpha * x + sigma * eps, eps ~ N(0, I);
  * a denoiser is a callable `denoise(z_t, logsnr) -> output`, where `logsnr` has shape (B,)
    and the output is an x-, eps- or v-prediction (`v = alpha * eps - sigma * x`);
  * time t in [0, 1] maps to a strictly decreasing logSNR, lambda(0) = logsnr_max, lambda(1) = logsnr_min;
  * squared errors are SUMS over all elements of one sample; losses come back per sample in nats
    (in bits only where the name says so: `stratified_elbo_bits`);
  * samplers are the pure steps `ddpm_step` / `ddim_step`, and `sample` takes its ancestral noise
    from a hook `noise(step, shape)` (k-diffusion's noise sampler), by default a torch generator.
Schedule, weighting and loss math runs in float32 even when the network runs in bf16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

Prediction = Literal["x", "eps", "v"]
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LN2 = math.log(2.0)


def nats_to_bits(nats: torch.Tensor | float) -> torch.Tensor | float:
    return nats / LN2


def _out(value: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Schedule outputs are float32, or float64 when asked in float64 (for exact checks)."""
    return value.double() if t.dtype == torch.float64 else value.float()


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) matching `like`'s rank."""
    return a.reshape(a.shape + (1,) * (like.ndim - a.ndim))


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = sqrt(sigmoid(lambda)), sigma = sqrt(sigmoid(-lambda))."""
    logsnr = torch.as_tensor(logsnr, dtype=torch.float32) if not torch.is_tensor(logsnr) else logsnr.float()
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def logsnr_from_alpha_sigma(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return 2.0 * (torch.log(alpha) - torch.log(sigma))


def add_noise(x: torch.Tensor, logsnr: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = alpha * x + sigma * eps, with per-sample logsnr of shape (B,)."""
    a, s = alpha_sigma(logsnr)
    return _bcast(a, x) * x + _bcast(s, x) * eps


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def _check_order(logsnr_max: float, logsnr_min: float) -> None:
    if not logsnr_min < logsnr_max:
        raise ValueError(f"logsnr_min {logsnr_min} must be below logsnr_max {logsnr_max}")


@dataclass(frozen=True)
class CosineSchedule:
    """Truncated shifted cosine: lambda(t) = -2 log tan(u0 + t (u1 - u0)) + shift.

    u0, u1 are chosen so that lambda(0) = logsnr_max and lambda(1) = logsnr_min exactly; the
    schedule is truncated (not clipped), so d lambda / dt < 0 everywhere on [0, 1].
    `shift` is simple diffusion's 2 log(base / resolution); 0 is the plain cosine.
    """

    logsnr_max: float
    logsnr_min: float
    shift: float = 0.0

    def __post_init__(self):
        _check_order(self.logsnr_max, self.logsnr_min)

    @property
    def _u(self) -> tuple[float, float]:
        u0 = math.atan(math.exp(-(self.logsnr_max - self.shift) / 2))
        u1 = math.atan(math.exp(-(self.logsnr_min - self.shift) / 2))
        return u0, u1

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        return _out(self._logsnr(t.double()), t)

    def _logsnr(self, t: torch.Tensor) -> torch.Tensor:
        u0, u1 = self._u
        out = -2.0 * torch.log(torch.tan(u0 + t * (u1 - u0))) + self.shift
        # pin the endpoints exactly (tan/atan round-off would leave ~1e-15)
        out = torch.where(t == 0, torch.full_like(out, self.logsnr_max), out)
        out = torch.where(t == 1, torch.full_like(out, self.logsnr_min), out)
        return out

    def dlogsnr_dt(self, t: torch.Tensor) -> torch.Tensor:
        u0, u1 = self._u
        return _out(-4.0 * (u1 - u0) / torch.sin(2.0 * (u0 + t.double() * (u1 - u0))), t)

    def t_of_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        u0, u1 = self._u
        u = torch.atan(torch.exp(-(logsnr.double() - self.shift) / 2))
        return _out((u - u0) / (u1 - u0), logsnr)


@dataclass(frozen=True)
class LinearSchedule:
    """lambda(t) = logsnr_max + t (logsnr_min - logsnr_max): t ~ U[0, 1] is lambda ~ U[min, max]."""

    logsnr_max: float
    logsnr_min: float
    shift: float = 0.0  # unused; kept so that every schedule takes the same arguments

    def __post_init__(self):
        _check_order(self.logsnr_max, self.logsnr_min)

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        return _out(self.logsnr_max + t.double() * (self.logsnr_min - self.logsnr_max), t)

    def dlogsnr_dt(self, t: torch.Tensor) -> torch.Tensor:
        return _out(torch.full_like(t, self.logsnr_min - self.logsnr_max, dtype=torch.float64), t)

    def t_of_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        return _out((logsnr.double() - self.logsnr_max) / (self.logsnr_min - self.logsnr_max), logsnr)


@dataclass(frozen=True)
class SoftplusSchedule:
    """The logSNR density p(lambda) = sigmoid(lambda - shift) / Z on [logsnr_min, logsnr_max], as a schedule:
    t ~ U[0, 1] through it draws lambda from p, and -dlambda/dt = 1 / p(lambda), so every estimator written
    for a schedule is the importance-sampled one, 1/2 ||eps - eps_hat||^2 / p(lambda) (DESIGN.md §1).

    Why this density: for data x ~ N(0, s^2 I) the optimal denoiser's ELBO integrand per element is
    1/2 sigmoid(lambda + ln s^2), so p is the zero-variance proposal (in lambda) for unit-variance data
    at shift = 0, the scale the encoder initialises and keeps its latents near. The integrand of real
    latents has the same shape (~e^lambda at high noise, level near lambda_0): drawn from the cosine
    schedule, where -dlambda/dt is largest exactly where the integrand is (near lambda_0), the
    unweighted ELBO's estimate has a standard deviation of ~2x its mean, from this density ~0.4x.
    With CDF S(lambda) = softplus(lambda - shift): lambda(t) = shift + log(expm1(S_max - t (S_max - S_min))).
    """

    logsnr_max: float
    logsnr_min: float
    shift: float = 0.0

    def __post_init__(self):
        _check_order(self.logsnr_max, self.logsnr_min)

    @property
    def _s(self) -> tuple[float, float]:
        f = torch.nn.functional.softplus
        lo = f(torch.tensor(self.logsnr_min - self.shift, dtype=torch.float64)).item()
        hi = f(torch.tensor(self.logsnr_max - self.shift, dtype=torch.float64)).item()
        return lo, hi

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        lo, hi = self._s
        td = t.double()
        out = self.shift + torch.log(torch.expm1(hi - td * (hi - lo)))
        out = torch.where(td == 0, torch.full_like(out, self.logsnr_max), out)
        out = torch.where(td == 1, torch.full_like(out, self.logsnr_min), out)
        return _out(out, t)

    def dlogsnr_dt(self, t: torch.Tensor) -> torch.Tensor:
        lo, hi = self._s
        lam = self.logsnr(t.double())
        return _out(-(hi - lo) / torch.sigmoid(lam - self.shift), t)

    def t_of_logsnr(self, logsnr: torch.Tensor) -> torch.Tensor:
        lo, hi = self._s
        s = torch.nn.functional.softplus(logsnr.double() - self.shift)
        return _out((hi - s) / (hi - lo), logsnr)


Schedule = CosineSchedule | LinearSchedule | SoftplusSchedule


def make_schedule(kind: str, logsnr_max: float, logsnr_min: float, shift: float = 0.0) -> Schedule:
    if kind == "cosine":
        return CosineSchedule(logsnr_max, logsnr_min, shift)
    if kind == "linear":
        return LinearSchedule(logsnr_max, logsnr_min)
    if kind == "softplus":
        return SoftplusSchedule(logsnr_max, logsnr_min, shift)
    raise ValueError(f"unknown schedule '{kind}' (cosine, linear, softplus)")


def sample_times(
    batch: int,
    mode: str = "stratified",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """t in [0, 1), shape (batch,). Every mode is marginally U[0, 1), so estimators stay unbiased.

    uniform: i.i.d.; stratified: one draw in each of `batch` equal strata (shuffled);
    antithetic: pairs t, 1 - t (VDM's low-discrepancy sampler is the stratified one).
    """
    if mode == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    if mode == "stratified":
        u = torch.rand(batch, generator=generator, device=device)
        perm = torch.randperm(batch, generator=generator, device=device)
        return (perm.float() + u) / batch
    if mode == "antithetic":
        half = torch.rand((batch + 1) // 2, generator=generator, device=device)
        return torch.cat([half, 1.0 - half])[:batch].clamp(max=1.0 - 1e-7)
    raise ValueError(f"unknown time sampling '{mode}' (uniform, stratified, antithetic)")


# --------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------


def predict_x_eps(
    output: torch.Tensor, z: torch.Tensor, logsnr: torch.Tensor, kind: Prediction
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, eps_hat) from a network output of the given kind, at noisy input z."""
    a, s = (_bcast(v, z) for v in alpha_sigma(logsnr))
    output = output.float()
    z = z.float()
    if kind == "x":
        return output, (z - a * output) / s
    if kind == "eps":
        return (z - s * output) / a, output
    if kind == "v":
        return a * z - s * output, s * z + a * output
    raise ValueError(f"unknown prediction '{kind}' (x, eps, v)")


def convert(output: torch.Tensor, z: torch.Tensor, logsnr: torch.Tensor, src: Prediction, dst: Prediction) -> torch.Tensor:
    """Exact change of parametrisation between x-, eps- and v-predictions."""
    if src == dst:
        return output
    x, eps = predict_x_eps(output, z, logsnr, src)
    if dst == "x":
        return x
    if dst == "eps":
        return eps
    a, s = (_bcast(v, z) for v in alpha_sigma(logsnr))
    return a * eps - s * x


def target(x: torch.Tensor, eps: torch.Tensor, logsnr: torch.Tensor, kind: Prediction) -> torch.Tensor:
    if kind == "x":
        return x
    if kind == "eps":
        return eps
    a, s = (_bcast(v, x) for v in alpha_sigma(logsnr))
    return a * eps - s * x


def _sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1).sum(dim=1)


def eps_sq_error(
    output: torch.Tensor, x: torch.Tensor, eps: torch.Tensor, logsnr: torch.Tensor, kind: Prediction,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """||eps - eps_hat||^2 per sample, from the network's own output (no division by alpha or sigma):

        ||eps - eps_hat||^2 = e^lambda ||x - x_hat||^2 = sigmoid(lambda) ||v - v_hat||^2.

    `mask` (broadcastable to x, 1 = counted) excludes elements, e.g. given context frames.
    """
    sq = (output.float() - target(x.float(), eps.float(), logsnr, kind)) ** 2
    err = _sum_per_sample(sq if mask is None else sq * mask)
    logsnr = logsnr.float()
    if kind == "eps":
        return err
    if kind == "x":
        return torch.exp(logsnr) * err
    return torch.sigmoid(logsnr) * err


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def terminal_kl(x: torch.Tensor, logsnr_min: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(N(alpha_min x, sigma_min^2 I) || N(0, I)) per sample, in nats.

    = 1/2 sum(alpha^2 x^2 + sigma^2 - 1 - ln sigma^2); the last three terms are computed as
    -a - log1p(-a) with a = alpha^2 (float32 cancellation makes the naive form noisy).
    """
    a = torch.sigmoid(torch.tensor(float(logsnr_min), dtype=torch.float64))
    const = float(-a - torch.log1p(-a))  # sigma^2 - 1 - ln sigma^2, per element
    per_elem = 0.5 * (float(a) * x.float() ** 2 + const)
    return _sum_per_sample(per_elem if mask is None else per_elem * mask)


@dataclass
class ELBOTerms:
    diffusion: torch.Tensor  # (B,) nats: the Monte-Carlo estimate of 1/2 int ||eps - eps_hat||^2 dlambda
    terminal: torch.Tensor  # (B,) nats: terminal KL at logsnr_min
    logsnr: torch.Tensor  # (B,) the logSNR each sample was evaluated at

    @property
    def total(self) -> torch.Tensor:
        return self.diffusion + self.terminal


def elbo(
    denoise: Denoise,
    x: torch.Tensor,
    schedule: Schedule,
    kind: Prediction,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    time_sampling: str = "stratified",
    mask: torch.Tensor | None = None,
) -> ELBOTerms:
    """Unweighted diffusion ELBO of x (per sample, nats), DESIGN.md §1:

        L = 1/2 int_{lambda_min}^{lambda_max} ||eps - eps_hat(z_lambda, lambda)||^2 dlambda + KL_terminal.

    With t ~ U[0, 1] through the schedule, the integral's estimate is 1/2 (-dlambda/dt) ||eps - eps_hat||^2
    (for LinearSchedule this is (lambda_max - lambda_min)/2 ||eps - eps_hat||^2, i.e. lambda ~ U).
    The weight is exactly 1 in lambda: nothing is detached, so gradients reach x everywhere.
    `mask` (1 = counted) restricts both terms to some elements (a conditional ELBO of the rest).
    """
    b = x.shape[0]
    if t is None:
        t = sample_times(b, time_sampling, generator, x.device)
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    logsnr = schedule.logsnr(t)
    z = add_noise(x.float(), logsnr, eps)
    out = denoise(z.to(x.dtype), logsnr)
    diffusion = 0.5 * (-schedule.dlogsnr_dt(t)) * eps_sq_error(out, x, eps, logsnr, kind, mask)
    return ELBOTerms(diffusion, terminal_kl(x, schedule.logsnr_min, mask), logsnr)


def stratified_elbo_bits(
    denoise: Denoise,
    x: torch.Tensor,
    schedule: Schedule,
    kind: Prediction,
    num_times: int,
    seed: int = 0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Held-out ELBO per sample in BITS (B,): the mean of `elbo` over K = `num_times` times per
    sample, one in each stratum, t_i = (i + u_i) / K (u_i ~ U[0, 1) per sample), each with fresh eps,
    all drawn from one generator seeded `seed` (the same draws on every call, so two models compare
    on the same times and noise). Unbiased for E[L] like one uniform time, with a lower variance.
    """
    if num_times < 1:
        raise ValueError(f"num_times = {num_times} must be >= 1")
    g = torch.Generator(device=x.device).manual_seed(seed)
    total = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
    for i in range(num_times):
        t = (i + torch.rand(x.shape[0], generator=g, device=x.device)) / num_times
        total += elbo(denoise, x, schedule, kind, t=t, generator=g, mask=mask).total.double()
    return nats_to_bits(total / num_times).float()


def sigmoid_weight(logsnr: torch.Tensor, bias: float) -> torch.Tensor:
    """w(lambda) = sigmoid(b - lambda): 1/2 at lambda = b, -> 0 at low noise (large lambda)."""
    return torch.sigmoid(bias - logsnr.float())


def sigmoid_weighted_loss(
    denoise: Denoise,
    x: torch.Tensor,
    schedule: Schedule,
    kind: Prediction,
    bias: float,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    time_sampling: str = "stratified",
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample 1/2 (-dlambda/dt) sigmoid(b - lambda) ||eps - eps_hat||^2 (nats), and the logSNRs used."""
    b = x.shape[0]
    if t is None:
        t = sample_times(b, time_sampling, generator, x.device)
    if eps is None:
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    logsnr = schedule.logsnr(t)
    z = add_noise(x.float(), logsnr, eps)
    out = denoise(z.to(x.dtype), logsnr)
    w = 0.5 * (-schedule.dlogsnr_dt(t)) * sigmoid_weight(logsnr, bias)
    return w * eps_sq_error(out, x, eps, logsnr, kind, mask), logsnr


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sampling_logsnrs(schedule: Schedule, steps: int, logsnr_start: float | None = None, logsnr_end: float | None = None) -> torch.Tensor:
    """steps + 1 increasing logSNRs from `logsnr_start` (default logsnr_min) to `logsnr_end`
    (default logsnr_max), equally spaced in the schedule's time; endpoints exact."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    lo = schedule.logsnr_min if logsnr_start is None else logsnr_start
    hi = schedule.logsnr_max if logsnr_end is None else logsnr_end
    t_lo = schedule.t_of_logsnr(torch.tensor([lo]))[0].double()
    t_hi = schedule.t_of_logsnr(torch.tensor([hi]))[0].double()
    t = torch.linspace(float(t_lo), float(t_hi), steps + 1, dtype=torch.float64)
    out = schedule.logsnr(t).double()
    out[0], out[-1] = lo, hi
    return out.float()


Noise = Callable[[int, tuple[int, ...]], torch.Tensor]
"""`noise(step, shape) -> tensor`: the N(0, I) ancestral noise of sampler step `step` (0-based)."""


def generator_noise(generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Noise:
    """The default noise: fresh draws from `generator` in call order (the global RNG for None)."""
    return lambda step, shape: torch.randn(shape, generator=generator, device=device)


def _scalar_alpha_sigma(logsnr: float) -> tuple[float, float]:
    a, s = alpha_sigma(torch.tensor(float(logsnr), dtype=torch.float64))
    return float(a), float(s)


def clipped_prediction(
    output: torch.Tensor, z: torch.Tensor, logsnr: float, kind: Prediction, clip_x: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, eps_hat) at one logSNR shared by the batch; with `clip_x`, x_hat is clamped to
    [-clip_x, clip_x] and eps_hat recomputed from it so that z = alpha x_hat + sigma eps_hat still holds."""
    lam = torch.full((z.shape[0],), float(logsnr), device=z.device)
    x_hat, eps_hat = predict_x_eps(output, z, lam, kind)
    if clip_x is not None:
        x_hat = x_hat.clamp(-clip_x, clip_x)
        eps_hat = predict_x_eps(x_hat, z, lam, "x")[1]
    return x_hat, eps_hat


def ddpm_step(
    z_s: torch.Tensor, output: torch.Tensor, logsnr_s: float, logsnr_t: float, kind: Prediction,
    clip_x: float | None, noise: torch.Tensor,
) -> torch.Tensor:
    """Ancestral step s -> t (lambda_s < lambda_t): a draw from q(z_t | z_s, x = x_hat), r = exp(lambda_s - lambda_t),

        z_t = r (alpha_t / alpha_s) z_s + alpha_t (1 - r) x_hat + sigma_t sqrt(1 - r) noise.
    """
    x_hat, _ = clipped_prediction(output, z_s, logsnr_s, kind, clip_x)
    a_s, _ = _scalar_alpha_sigma(logsnr_s)
    a_t, s_t = _scalar_alpha_sigma(logsnr_t)
    one_minus_r = -math.expm1(float(logsnr_s) - float(logsnr_t))
    return ((1.0 - one_minus_r) * (a_t / a_s) * z_s.float() + a_t * one_minus_r * x_hat
            + s_t * math.sqrt(one_minus_r) * noise.float())


def ddim_step(
    z_s: torch.Tensor, output: torch.Tensor, logsnr_s: float, logsnr_t: float, kind: Prediction,
    clip_x: float | None,
) -> torch.Tensor:
    """Deterministic step s -> t: z_t = alpha_t x_hat + sigma_t eps_hat (DDIM with eta = 0)."""
    x_hat, eps_hat = clipped_prediction(output, z_s, logsnr_s, kind, clip_x)
    a_t, s_t = _scalar_alpha_sigma(logsnr_t)
    return a_t * x_hat + s_t * eps_hat


@dataclass
class SampleResult:
    z: torch.Tensor  # the sample at the last logSNR of the grid
    x_pred: torch.Tensor  # the final clean prediction (from the last network evaluation)


def sample(
    denoise: Denoise,
    z: torch.Tensor,
    logsnrs: torch.Tensor,
    kind: Prediction,
    method: Literal["ddpm", "ddim"] = "ddpm",
    generator: torch.Generator | None = None,
    clip_x: float | None = None,
    progress: Callable[[int], None] | None = None,
    known: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    noise: Noise | None = None,
) -> SampleResult:
    """Integrate from z at logsnrs[0] to logsnrs[-1] (increasing) with `ddpm_step` or `ddim_step`.

    The last step lands exactly on logsnrs[-1] (e.g. lambda_0 = 5 for the base model). DDPM's
    ancestral noise of step i is `noise(i, z.shape)`; the default draws it from `generator`.
    `known = (x_known, mask, eps_known)` keeps the masked elements (mask = 1) on their
    forward-noised values alpha_t x_known + sigma_t eps_known at every logSNR: context frames.
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler '{method}' (ddpm, ddim)")
    noise = generator_noise(generator, z.device) if noise is None else noise
    z = z.float()
    x_hat = z

    def impose(z: torch.Tensor, logsnr: float) -> torch.Tensor:
        if known is None:
            return z
        x_known, keep, eps_known = (v.float() for v in known)
        a, s = _scalar_alpha_sigma(logsnr)
        return z * (1 - keep) + keep * (a * x_known + s * eps_known)

    z = impose(z, float(logsnrs[0]))
    for i in range(len(logsnrs) - 1):
        ls, lt = float(logsnrs[i]), float(logsnrs[i + 1])
        out = denoise(z, torch.full((z.shape[0],), ls, device=z.device))
        if i == len(logsnrs) - 2:
            x_hat = clipped_prediction(out, z, ls, kind, clip_x)[0]
        if method == "ddim":
            z = ddim_step(z, out, ls, lt, kind, clip_x)
        else:
            z = ddpm_step(z, out, ls, lt, kind, clip_x, noise(i, tuple(z.shape)))
        z = impose(z, lt)
        if progress is not None:
            progress(i)
    return SampleResult(z, x_hat)


def guided(cond: Denoise, uncond: Denoise, scale: float) -> Denoise:
    """Classifier-free guidance: out = uncond + scale (cond - uncond); scale = 1 is `cond` itself."""
    if scale == 1.0:
        return cond

    def denoise(z: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
        c = cond(z, logsnr)
        u = uncond(z, logsnr)
        return u + scale * (c - u)

    return denoise

