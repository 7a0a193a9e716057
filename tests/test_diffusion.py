"""Diffusion math against closed forms: Gaussian data, where the optimal denoiser is exact.

For x ~ N(mu, s^2 I), z = alpha x + sigma eps: E[x | z] = mu + alpha s^2 (z - alpha mu) / (alpha^2 s^2 + sigma^2),
and the unweighted ELBO's expectation is d/2 ln(1 + s^2 e^lambda_max) + d KL(N(0, v_min) || N(0, 1))
(I-MMSE; DESIGN.md §1 "Exact checks without a GPU").
"""
import math

import pytest
import scipy.stats
import torch

from ulvideo import diffusion as D


def optimal_x(z, logsnr, s, mu=0.0):
    a, sg = D.alpha_sigma(logsnr)
    a, sg = a.view(-1, *[1] * (z.ndim - 1)), sg.view(-1, *[1] * (z.ndim - 1))
    return mu + a * s**2 * (z - a * mu) / (a**2 * s**2 + sg**2)


def optimal(kind, s, mu=0.0):
    def denoise(z, logsnr):
        x_hat = optimal_x(z.double(), logsnr.double(), s, mu)
        return D.convert(x_hat, z.double(), logsnr.double(), "x", kind)

    return denoise


def analytic_nats(d, s, logsnr_max, logsnr_min):
    a2 = 1 / (1 + math.exp(-logsnr_min))
    v_min = a2 * s**2 + (1 - a2)
    return d / 2 * math.log1p(s**2 * math.exp(logsnr_max)) + d * 0.5 * (v_min - 1 - math.log(v_min))


@pytest.mark.parametrize("schedule_kind", ["cosine", "linear", "softplus"])
@pytest.mark.parametrize("kind", ["x", "eps", "v"])
@pytest.mark.parametrize("s,logsnr_min", [(0.5, -10.0), (1.0, -10.0), (2.0, -10.0), (2.0, -2.0), (0.5, 0.0)])
def test_elbo_expectation_is_the_true_rate(schedule_kind, kind, s, logsnr_min):
    torch.manual_seed(0)
    d, n = 16, 8192
    sched = D.make_schedule(schedule_kind, 5.0, logsnr_min, shift=0.7 if schedule_kind == "cosine" else 0.0)
    x = s * torch.randn(n, d, dtype=torch.float64)
    terms = D.elbo(optimal(kind, s), x, sched, kind, generator=torch.Generator().manual_seed(1))
    est = terms.total.double()
    mean, se = est.mean().item(), est.std().item() / math.sqrt(n)
    truth = analytic_nats(d, s, 5.0, logsnr_min)
    assert abs(mean - truth) < 4 * se + 1e-3 * truth, (mean, truth, se)


@pytest.mark.parametrize("logsnr_min", [-10.0, -2.0, 0.0])
def test_wrong_denoiser_gives_a_larger_bound(logsnr_min):
    torch.manual_seed(0)
    d, n, s = 16, 8192, 1.0
    sched = D.CosineSchedule(5.0, logsnr_min)
    x = s * torch.randn(n, d, dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    t = D.sample_times(n, "stratified", g)
    eps = torch.randn(n, d, generator=g, dtype=torch.float64)
    right = D.elbo(optimal("x", s), x, sched, "x", t=t, eps=eps).total
    wrong = D.elbo(optimal("x", 1.6 * s), x, sched, "x", t=t, eps=eps).total
    diff = (wrong - right).double()
    assert diff.mean() > 4 * diff.std() / math.sqrt(n)


def test_terminal_kl_matches_closed_form():
    x = torch.randn(5, 7, dtype=torch.float64)
    for lmin in (-10.0, -2.0, 0.0, 3.0):
        a2 = 1 / (1 + math.exp(-lmin))
        m, v = math.sqrt(a2) * x, 1 - a2
        # KL(N(m, v) || N(0, 1)) = 1/2 (v + m^2 - 1 - ln v), float64 reference
        ref = (0.5 * (v + m**2 - 1 - math.log(v))).sum(dim=1)
        torch.testing.assert_close(D.terminal_kl(x, lmin).double(), ref, rtol=1e-5, atol=1e-6)


def test_terminal_kl_constant_is_not_cancelled_at_low_logsnr():
    # sigma^2 - 1 - ln sigma^2 ~ a^2/2 for a = sigmoid(lambda) -> 0; naive float32 gives 0 or noise
    lmin = -12.0
    a = 1 / (1 + math.exp(-lmin))
    kl = D.terminal_kl(torch.zeros(1, 1000), lmin)[0].item()
    assert kl == pytest.approx(1000 * 0.5 * (a * a / 2 + a**3 / 3), rel=1e-3)


@pytest.mark.parametrize("shift", [0.0, 1.3, -2.0])
def test_cosine_schedule_endpoints_and_derivative(shift):
    sched = D.CosineSchedule(5.0, -10.0, shift)
    ends = sched.logsnr(torch.tensor([0.0, 1.0]))
    assert ends[0].item() == 5.0 and ends[1].item() == -10.0
    t = torch.linspace(0.01, 0.99, 41, dtype=torch.float64)
    h = 1e-6
    fd = (sched.logsnr(t + h).double() - sched.logsnr(t - h).double()) / (2 * h)
    torch.testing.assert_close(sched.dlogsnr_dt(t).double(), fd, rtol=2e-3, atol=2e-3)
    assert (sched.dlogsnr_dt(torch.linspace(0, 1, 101)) < 0).all()
    lam = sched.logsnr(t)
    torch.testing.assert_close(sched.t_of_logsnr(lam).double(), t, rtol=1e-4, atol=1e-5)


def test_shifted_cosine_is_plain_cosine_plus_shift():
    # lambda_shift(t) = lambda_plain(t) + shift when the plain one runs between the shifted endpoints
    shift = 1.5
    sh = D.CosineSchedule(5.0, -10.0, shift)
    plain = D.CosineSchedule(5.0 - shift, -10.0 - shift)
    t = torch.linspace(0, 1, 17)
    torch.testing.assert_close(sh.logsnr(t), plain.logsnr(t) + shift, rtol=1e-5, atol=1e-4)


def test_linear_schedule_is_uniform_logsnr():
    sched = D.LinearSchedule(5.0, -10.0)
    t = torch.rand(1000)
    assert (sched.dlogsnr_dt(t) == -15.0).all()
    lam = sched.logsnr(t)
    assert scipy.stats.kstest(lam.numpy(), scipy.stats.uniform(loc=-10, scale=15).cdf).pvalue > 1e-3


@pytest.mark.parametrize("shift", [0.0, 2.0, -3.0])
def test_softplus_schedule_draws_the_sigmoid_density(shift):
    sched = D.SoftplusSchedule(5.0, -10.0, shift)
    ends = sched.logsnr(torch.tensor([0.0, 1.0]))
    assert ends[0].item() == 5.0 and ends[1].item() == -10.0
    t = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
    h = 1e-7
    fd = (sched.logsnr(t + h) - sched.logsnr(t - h)) / (2 * h)
    torch.testing.assert_close(sched.dlogsnr_dt(t), fd, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sched.t_of_logsnr(sched.logsnr(t)), t, rtol=1e-9, atol=1e-12)
    # t ~ U through the schedule is lambda ~ p(lambda) = sigmoid(lambda - shift) / Z on [-10, 5] (scipy's quadrature for Z)
    import numpy as np
    import scipy.integrate

    z = scipy.integrate.quad(lambda v: 1 / (1 + math.exp(shift - v)), -10.0, 5.0)[0]
    grid = np.linspace(-10.0, 5.0, 20001)
    cum = scipy.integrate.cumulative_trapezoid(1 / (1 + np.exp(shift - grid)), grid, initial=0.0) / z
    lam = sched.logsnr(torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert scipy.stats.kstest(lam.numpy(), lambda v: np.interp(v, grid, cum)).pvalue > 1e-3
    # and -dlambda/dt is 1 / p(lambda): the importance weight of DESIGN.md §1
    mid = sched.logsnr(t)
    torch.testing.assert_close(-sched.dlogsnr_dt(t), z * (1 + torch.exp(shift - mid)), rtol=1e-6, atol=0)


def test_softplus_schedule_lowers_the_variance_of_the_unweighted_elbo():
    # for unit-variance Gaussian data the estimate's variance from the sigmoid density is far below the
    # cosine schedule's at the same mean (the true rate): the prior's training signal
    d, n = 64, 8192
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = {}
    for name, sched in (("cosine", D.CosineSchedule(5.0, -10.0)), ("softplus", D.SoftplusSchedule(5.0, -10.0))):
        est = D.elbo(optimal("v", 1.0), x, sched, "v", generator=torch.Generator().manual_seed(1),
                     time_sampling="uniform").total.double()
        out[name] = (est.mean().item(), est.var().item())
    truth = analytic_nats(d, 1.0, 5.0, -10.0)
    for mean, var in out.values():
        assert abs(mean - truth) < 4 * math.sqrt(var / n)
    assert out["softplus"][1] < 0.1 * out["cosine"][1], out


@pytest.mark.parametrize("mode", ["uniform", "stratified", "antithetic"])
def test_time_sampling_is_marginally_uniform(mode):
    g = torch.Generator().manual_seed(0)
    t = torch.cat([D.sample_times(64, mode, g) for _ in range(100)])
    assert t.min() >= 0 and t.max() < 1
    assert scipy.stats.kstest(t.numpy(), "uniform").pvalue > 1e-3


def test_conversions_round_trip_and_error_identities():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    eps = torch.randn_like(x)
    lam = torch.linspace(-8, 8, 6, dtype=torch.float64)
    z = D.add_noise(x, lam, eps)
    out = {k: D.target(x, eps, lam, k) for k in ("x", "eps", "v")}
    for src in out:
        for dst in out:
            torch.testing.assert_close(D.convert(out[src], z, lam, src, dst).double(), out[dst], rtol=1e-4, atol=1e-4)
    # the same wrong prediction in three parametrisations has the same eps error
    x_hat = x + 0.3 * torch.randn_like(x)
    errs = [D.eps_sq_error(D.convert(x_hat, z, lam, "x", k).double(), x, eps, lam, k) for k in ("x", "eps", "v")]
    direct = ((eps - (z - D.alpha_sigma(lam)[0].view(-1, 1, 1).double() * x_hat) / D.alpha_sigma(lam)[1].view(-1, 1, 1).double()) ** 2).sum((1, 2))
    for e in errs:
        torch.testing.assert_close(e.double(), direct, rtol=1e-4, atol=1e-4)


def test_alpha_sigma_identities():
    lam = torch.linspace(-20, 20, 41)
    a, s = D.alpha_sigma(lam)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a))
    torch.testing.assert_close(D.logsnr_from_alpha_sigma(a.double(), s.double()).float(), lam, atol=1e-3, rtol=1e-4)
    a0, s0 = D.alpha_sigma(torch.tensor(5.0))
    assert a0.item() == pytest.approx(0.996648, abs=1e-6) and s0.item() == pytest.approx(0.081810, abs=1e-6)


def test_sigmoid_weight_and_x_form():
    assert D.sigmoid_weight(torch.tensor([1.7]), 1.7).item() == 0.5
    torch.manual_seed(0)
    b, sched = 1.2, D.CosineSchedule(15.0, -15.0)
    x = torch.randn(32, 10, dtype=torch.float64)
    x_hat = x + 0.1 * torch.randn_like(x)
    t = torch.rand(32)
    eps = torch.randn_like(x)
    loss, lam = D.sigmoid_weighted_loss(lambda z, l: x_hat, x, sched, "x", b, t=t, eps=eps)
    # on the x-error the weight is e^b sigmoid(lambda - b) (DESIGN.md §1)
    ref = 0.5 * (-sched.dlogsnr_dt(t)).double() * math.exp(b) * torch.sigmoid(lam.double() - b) * ((x - x_hat) ** 2).sum(1)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
@pytest.mark.parametrize("kind", ["x", "v"])
def test_samplers_reproduce_data_mean_and_variance(method, kind):
    mu, s, n = 0.3, 0.5, 20000
    sched = D.CosineSchedule(10.0, -10.0)
    # ancestral steps plug in E[x | z] and drop Var(x | z): their variance deficit is O(1/steps)
    lams = D.sampling_logsnrs(sched, 400 if method == "ddpm" else 100)
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    res = D.sample(optimal(kind, s, mu), z, lams, kind, method, generator=torch.Generator().manual_seed(1))
    x = res.x_pred.double()
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.var().item() == pytest.approx(s**2, rel=0.05)


def test_sampler_stops_exactly_at_the_latent_logsnr():
    # the base model's sampler ends at lambda_0 = 5: z ~ N(alpha0 mu, alpha0^2 s^2 + sigma0^2)
    mu, s, n = -0.4, 0.7, 20000
    sched = D.CosineSchedule(5.0, -10.0)
    lams = D.sampling_logsnrs(sched, 400)
    assert lams[-1].item() == 5.0 and lams[0].item() == -10.0
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    res = D.sample(optimal("v", s, mu), z, lams, "v", "ddpm", generator=torch.Generator().manual_seed(1))
    a0, s0 = (v.item() for v in D.alpha_sigma(torch.tensor(5.0)))
    assert res.z.mean().item() == pytest.approx(a0 * mu, abs=0.02)
    assert res.z.var().item() == pytest.approx(a0**2 * s**2 + s0**2, rel=0.05)


def test_guidance():
    cond = lambda z, l: z + 1.0
    uncond = lambda z, l: z * 2.0
    z, l = torch.randn(3, 4), torch.zeros(3)
    assert D.guided(cond, uncond, 1.0) is cond
    torch.testing.assert_close(D.guided(cond, uncond, 0.0)(z, l), uncond(z, l))
    torch.testing.assert_close(D.guided(cond, uncond, 3.0)(z, l), uncond(z, l) + 3.0 * (cond(z, l) - uncond(z, l)))


# ---- sampler steps against the Gaussian closed forms ----------------------------------------------


def gaussian_moments(logsnr_s, logsnr_t, s, mu, z_s):
    """E[z_t | z_s] and Var(z_t | z_s) for x ~ N(mu, s^2) from the joint Gaussian of (z_s, z_t):
    the forward process is Markov from high to low logSNR, z_s = (alpha_s / alpha_t) z_t + noise, so
    Cov(z_s, z_t) = (alpha_s / alpha_t) Var(z_t); and Var(x | z_s) for the law of total variance."""
    a_s, sg_s = (float(v) for v in D.alpha_sigma(torch.tensor(logsnr_s, dtype=torch.float64)))
    a_t, sg_t = (float(v) for v in D.alpha_sigma(torch.tensor(logsnr_t, dtype=torch.float64)))
    var_s, var_t = a_s**2 * s**2 + sg_s**2, a_t**2 * s**2 + sg_t**2
    cov = a_s / a_t * var_t
    mean = a_t * mu + cov / var_s * (z_s - a_s * mu)
    return mean, var_t - cov**2 / var_s, s**2 * sg_s**2 / var_s


@pytest.mark.parametrize("kind", ["x", "eps", "v"])
@pytest.mark.parametrize("logsnr_s,logsnr_t", [(-8.0, -3.0), (-1.0, 1.5), (2.0, 9.0)])
def test_ddpm_step_is_the_posterior_of_gaussian_data(kind, logsnr_s, logsnr_t):
    # with the exact E[x | z_s] the DDPM mean is E[z_t | z_s]; its variance is Var(z_t | z_s) less the
    # a_t^2 (1 - r)^2 Var(x | z_s) that plugging in x_hat drops (law of total variance)
    mu, s = 0.3, 0.7
    z_s = torch.linspace(-3, 3, 13, dtype=torch.float64).view(13, 1)
    out = optimal(kind, s, mu)(z_s, torch.full((13,), logsnr_s, dtype=torch.float64))
    zero = D.ddpm_step(z_s, out, logsnr_s, logsnr_t, kind, None, torch.zeros_like(z_s)).double()
    one = D.ddpm_step(z_s, out, logsnr_s, logsnr_t, kind, None, torch.ones_like(z_s)).double()
    mean, var, var_x = gaussian_moments(logsnr_s, logsnr_t, s, mu, z_s)
    torch.testing.assert_close(zero, mean, rtol=1e-5, atol=1e-5)
    a_t = float(D.alpha_sigma(torch.tensor(logsnr_t, dtype=torch.float64))[0])
    dropped = (a_t * -math.expm1(logsnr_s - logsnr_t)) ** 2 * var_x
    torch.testing.assert_close((one - zero) ** 2, torch.full_like(zero, var - dropped), rtol=1e-4, atol=1e-7)


def test_clipping_clamps_the_clean_prediction():
    # clip_x acts on x_hat whatever the parametrisation: a v-prediction clipped equals the x-prediction
    # clamped by hand, for both steps
    g = torch.Generator().manual_seed(0)
    z, out, noise = (torch.randn(4, 3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    lam = torch.full((4,), -0.5, dtype=torch.float64)
    x_clamped = D.convert(out, z, lam, "v", "x").clamp(-0.4, 0.4)
    torch.testing.assert_close(D.ddim_step(z, out, -0.5, 2.0, "v", 0.4),
                               D.ddim_step(z, x_clamped, -0.5, 2.0, "x", None), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D.ddpm_step(z, out, -0.5, 2.0, "v", 0.4, noise),
                               D.ddpm_step(z, x_clamped, -0.5, 2.0, "x", None, noise), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(D.ddim_step(z, out, -0.5, 2.0, "v", None), D.ddim_step(z, out, -0.5, 2.0, "v", 0.4))


@pytest.mark.parametrize("kind", ["x", "v"])
def test_ddim_follows_the_probability_flow_of_gaussian_data(kind):
    # the probability-flow ODE maps z_s to a_t mu + sqrt(V_t / V_s) (z_s - a_s mu), V = a^2 s^2 + sigma^2;
    # DDIM is its first-order discretisation (error O(1/steps)), and exact for a point mass (s = 0)
    mu, s, lo, hi = -0.2, 0.6, -6.0, 4.0
    z_s = torch.linspace(-3, 3, 9, dtype=torch.float64).view(9, 1)

    def ode_map(s):
        (a_lo, sg_lo), (a_hi, sg_hi) = ((float(v) for v in D.alpha_sigma(torch.tensor(l, dtype=torch.float64))) for l in (lo, hi))
        return a_hi * mu + math.sqrt((a_hi**2 * s**2 + sg_hi**2) / (a_lo**2 * s**2 + sg_lo**2)) * (z_s - a_lo * mu)

    lams = D.sampling_logsnrs(D.CosineSchedule(hi, lo), 400).double()
    many = D.sample(optimal(kind, s, mu), z_s, lams, kind, "ddim").z.double()
    torch.testing.assert_close(many, ode_map(s), rtol=0, atol=5e-3)
    one = D.ddim_step(z_s, optimal(kind, 0.0, mu)(z_s, torch.full((9,), lo, dtype=torch.float64)), lo, hi, kind, None)
    torch.testing.assert_close(one.double(), ode_map(0.0), rtol=1e-5, atol=1e-5)


def test_noise_hook_supplies_the_ancestral_noise():
    # a point mass at mu: x_hat = mu exactly, so with zero noise every DDPM step contracts z - alpha mu by
    # r alpha_t / alpha_s, and the chain by exp(lambda_first - lambda_last) alpha_last / alpha_first
    mu, calls = 0.25, []

    def zeros(step, shape):
        calls.append((step, shape))
        return torch.zeros(shape)

    lams = D.sampling_logsnrs(D.CosineSchedule(5.0, -10.0), 6)
    z = torch.linspace(-2, 2, 5).view(5, 1)
    res = D.sample(optimal("v", 0.0, mu), z, lams, "v", "ddpm", noise=zeros)
    assert calls == [(i, (5, 1)) for i in range(6)]
    a = [float(D.alpha_sigma(torch.tensor(float(l), dtype=torch.float64))[0]) for l in (lams[0], lams[-1])]
    ref = a[1] * mu + math.exp(float(lams[0] - lams[-1])) * a[1] / a[0] * (z.double() - a[0] * mu)
    torch.testing.assert_close(res.z.double(), ref, rtol=1e-5, atol=1e-6)
    calls.clear()
    D.sample(optimal("v", 0.0, mu), z, lams, "v", "ddim", noise=zeros)
    assert calls == []  # DDIM draws nothing


# ---- the stratified ELBO estimator ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["eps", "v"])
@pytest.mark.parametrize("s,logsnr_min", [(1.0, -10.0), (2.0, -2.0), (0.5, 0.0)])
def test_stratified_elbo_bits_is_the_gaussian_rate(kind, s, logsnr_min):
    # DESIGN.md §1 "Exact checks": the expectation is d/2 ln(1 + s^2 e^lambda_max) + d KL_terminal, in bits
    d, n = 16, 2048
    sched = D.CosineSchedule(5.0, logsnr_min)
    x = s * torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bits = D.stratified_elbo_bits(optimal(kind, s), x, sched, kind, num_times=8, seed=3).double()
    truth = analytic_nats(d, s, 5.0, logsnr_min) / math.log(2)
    se = bits.std().item() / math.sqrt(n)
    assert abs(bits.mean().item() - truth) < 4 * se + 1e-3 * truth, (bits.mean().item(), truth, se)


def test_stratified_elbo_bits_is_the_plain_monte_carlo_average():
    # per clip: the estimate for a fixed x equals E_{t ~ U, eps}[L(x)] / ln 2 estimated by many plain
    # draws, for a denoiser that is not the optimal one; and stratifying lowers the variance of K times
    d, k, reps, plain = 8, 8, 1024, 32768
    sched = D.CosineSchedule(5.0, -10.0)
    x = 1.5 * torch.randn(3, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    wrong = optimal("x", 0.8, 0.1)
    strat = D.stratified_elbo_bits(wrong, x.repeat(reps, 1), sched, "x", k, seed=5).double().view(reps, 3)
    g = torch.Generator().manual_seed(6)
    x_mc = x.repeat(plain, 1)
    mc = D.elbo(wrong, x_mc, sched, "x", t=torch.rand(x_mc.shape[0], generator=g, dtype=torch.float64),
                generator=g).total.double().view(plain, 3) / math.log(2)
    for i in range(3):
        se = math.sqrt(strat[:, i].var().item() / reps + mc[:, i].var().item() / plain)
        assert abs(strat[:, i].mean().item() - mc[:, i].mean().item()) < 4 * se
        plain_k = mc[:, i].view(-1, k).mean(1)  # the average of K uniform times: same cost
        assert strat[:, i].var() < 0.5 * plain_k.var()


def test_stratified_elbo_bits_mask_and_seed():
    d, n, s = 16, 2048, 1.3
    sched = D.CosineSchedule(5.0, -2.0)
    x = s * torch.randn(n, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = (torch.arange(d) < 6).double()  # 6 of 16 elements counted: the rate of 6 dimensions
    bits = D.stratified_elbo_bits(optimal("v", s), x, sched, "v", 4, seed=1, mask=mask).double()
    truth = analytic_nats(6, s, 5.0, -2.0) / math.log(2)
    assert abs(bits.mean().item() - truth) < 4 * bits.std().item() / math.sqrt(n) + 1e-3 * truth
    # the same draws for the same seed, so two models compare on the same times and noise
    again = D.stratified_elbo_bits(optimal("v", s), x[:4], sched, "v", 4, seed=1)
    assert torch.equal(again, D.stratified_elbo_bits(optimal("v", s), x[:4], sched, "v", 4, seed=1))
    assert not torch.equal(again, D.stratified_elbo_bits(optimal("v", s), x[:4], sched, "v", 4, seed=2))
