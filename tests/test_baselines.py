"""The paper's Table-5 baselines (ulvideo/baselines.py): each loss against a computation by hand from
the same draws (and the KL against torch.distributions), where the gradients go, decoding, the
registry `ul.model` selects through, and exports that load back into the right class."""
import math

import pytest
import torch

from ulvideo import diffusion as D
from ulvideo.baselines import KLVAE, MSEDecoder, build_stage1
from ulvideo.config import load_config
from ulvideo.ul import UnifiedLatents

SMALL = ["--data.num_frames=5", "--data.height=16", "--data.width=16", "--encoder.latent_channels=4"]


def build(model: str, *overrides) -> UnifiedLatents:
    torch.manual_seed(0)
    m = build_stage1(load_config(None, [*SMALL, f"--ul.model={model}", *overrides]))
    with torch.no_grad():  # zero-initialised layers would hide z0 and gradient paths
        for name, p in m.named_parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3 if ".inject." in name else 0.02)
    return m


def clips(b=3):
    return torch.rand(b, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def grad_sums(m, loss) -> dict[str, float]:
    m.zero_grad()
    loss.backward(retain_graph=True)
    out = {name: sum(p.grad.abs().sum().item() for p in getattr(m, name).parameters() if p.grad is not None)
           for name in ("encoder", "prior", "decoder")}
    m.zero_grad()
    return out


def prior_by_hand(m, z, t, eps):
    """L_prior of z (DESIGN.md §1) for an x-predicting prior, from the given time and noise."""
    lam = m.prior_schedule.logsnr(t)
    a, s = (v.view(-1, 1, 1, 1, 1) for v in D.alpha_sigma(lam))
    x_hat = m.prior(a * z + s * eps, lam)
    integral = 0.5 * (-m.prior_schedule.dlogsnr_dt(t)) * torch.exp(lam) * ((z - x_hat) ** 2).sum((1, 2, 3, 4))
    a_min2 = 1 / (1 + math.exp(10.0))
    return integral + 0.5 * (a_min2 * z**2 + (1 - a_min2) - 1 - math.log(1 - a_min2)).sum((1, 2, 3, 4))


def test_registry_builds_the_model_the_config_names():
    assert type(build("unified")) is UnifiedLatents
    assert type(build("kl_vae")) is KLVAE and type(build("mse_decoder")) is MSEDecoder


def test_kl_vae_terms_by_hand():
    """Draw order: posterior noise, prior (times, noise), eps_z, decoder (times, noise). The prior
    measures the detached sample; the encoder pays beta * KL; total = rate + distortion + beta KL."""
    m = build("kl_vae", "--ul.kl_weight=0.5")
    x = clips()
    terms = m.loss(x, torch.Generator().manual_seed(0))
    mean, logvar = m.posterior(x)
    assert mean.shape == (3, 4, 2, 2, 2) and torch.equal(m.encode(x), mean)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(terms.vae_kl, kl, rtol=1e-4, atol=1e-3)
    g, u = torch.Generator().manual_seed(0), m.cfg.ul
    with torch.no_grad():
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        t_p = D.sample_times(3, u.time_sampling, g)
        rate = prior_by_hand(m, z, t_p, torch.randn(z.shape, generator=g))
        z0 = m.alpha0 * z + m.sigma0 * torch.randn(z.shape, generator=g)
        t_d = D.sample_times(3, u.time_sampling, g)
        eps = torch.randn(x.shape, generator=g)
        lam = m.decoder_schedule.logsnr(t_d)
        a, s = (v.view(-1, 1, 1, 1, 1) for v in D.alpha_sigma(lam))
        w = 0.5 * (-m.decoder_schedule.dlogsnr_dt(t_d)) * torch.sigmoid(u.sigmoid_bias - lam) * torch.sigmoid(lam)
        dist = u.loss_factor * w * ((a * eps - s * x - m.decoder(a * x + s * eps, z0, lam)) ** 2).sum((1, 2, 3, 4))
    torch.testing.assert_close(terms.rate, rate, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms.distortion, dist, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms.total, rate + dist + 0.5 * kl, rtol=1e-4, atol=1e-2)
    assert set(terms.extra()) == {"vae_kl"}
    rate_g, kl_g = grad_sums(m, terms.rate.sum()), grad_sums(m, terms.vae_kl.sum())
    assert rate_g["encoder"] == 0 and rate_g["prior"] > 0  # measured, not paid for by the encoder
    assert kl_g["encoder"] > 0 and kl_g["decoder"] == 0
    assert grad_sums(m, terms.distortion.sum())["encoder"] > 0


def test_mse_decoder_by_hand():
    """x_hat(z0) is the decoder's x-prediction from x_t = 0 at logSNR -15: for v-prediction
    x = alpha x_t - sigma v, so x_hat = -sigma v_hat. Loss c_lf ||x - x_hat||^2 / (2 sigma_mse^2);
    decoding is that one prediction, clipped, whatever the number of steps."""
    m = build("mse_decoder", "--ul.mse_sigma=0.5", "--ul.loss_factor=2.0")
    x = clips()
    terms = m.loss(x, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = m.encode(x)
        t_p = D.sample_times(3, m.cfg.ul.time_sampling, g)
        rate = prior_by_hand(m, z, t_p, torch.randn(z.shape, generator=g))
        z0 = m.alpha0 * z + m.sigma0 * torch.randn(z.shape, generator=g)
        lam = torch.full((3,), -15.0)
        sigma = torch.sigmoid(-lam).sqrt().view(-1, 1, 1, 1, 1)
        x_hat = -sigma * m.decoder(torch.zeros_like(x), z0, lam)
        ref = 2.0 * ((x - x_hat) ** 2).sum((1, 2, 3, 4)) / (2 * 0.5**2)
        decoded = m.decode(z0, steps=32)
        assert torch.equal(decoded, m.decode(z0, steps=3, sampler="ddim"))
    torch.testing.assert_close(terms.rate, rate, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms.distortion, ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(decoded, x_hat.clamp(-1, 1))
    assert (x_hat.abs() > 0).any() and terms.extra() == {}
    dist = grad_sums(m, terms.distortion.sum())
    assert dist["encoder"] > 0 and dist["decoder"] > 0 and dist["prior"] == 0
    # the decoder gain is the same loss with another clip's latent minus with the right one
    g = torch.Generator().manual_seed(5)
    gain = m.decoder_gain(x, g)
    with torch.no_grad():
        z0 = m.noisy_latent(m.encode(x), torch.Generator().manual_seed(5))
        err = lambda lat: ((x + sigma * m.decoder(torch.zeros_like(x), lat, lam)) ** 2).sum((1, 2, 3, 4))  # noqa: E731
        ref_gain = 2.0 * (err(z0.roll(1, 0)) - err(z0)) / (2 * 0.5**2) / math.log(2)
    torch.testing.assert_close(gain, ref_gain, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("model", ["kl_vae", "mse_decoder"])
def test_exports_load_into_the_baseline_they_hold(model, tmp_path):
    from ulvideo.exports import load_stage1, save_export

    m = build(model)
    path = save_export(tmp_path / model, m.state_dict(), m.cfg, {"stage": "ul"})
    loaded = load_stage1(path)
    x = clips(2)
    assert type(loaded) is type(m)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), m.encode(x))


def test_objective_trains_the_kl_vae_and_logs_its_kl():
    from ulvideo.train.objectives import StageOne

    torch.manual_seed(0)
    obj = StageOne(load_config(None, [*SMALL, "--ul.model=kl_vae", "--ul.kl_weight=0.1"]))
    x = clips(2)
    loss, logs = obj({"video": x}, torch.Generator().manual_seed(0), 0)
    terms = obj.model.loss(x, torch.Generator().manual_seed(0))
    pixels = 5 * 16 * 16
    assert torch.equal(loss, terms.total.mean() / pixels)
    torch.testing.assert_close(logs["vae_kl_bits_per_pixel"], terms.vae_kl / math.log(2) / pixels)
