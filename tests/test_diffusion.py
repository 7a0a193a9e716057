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


@pytest.mark.parametrize("schedule_kind", ["cosine", "linear"])
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
