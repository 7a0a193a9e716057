"""Stage-1 objective: per-sample terms, where gradients go, decode/reconstruct contracts."""
import math

import pytest
import torch

from ulvideo import diffusion as D
from ulvideo.config import load_config
from ulvideo.ul import UnifiedLatents, rate_gradient_scale, scale_gradient


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_config(None, ["--data.num_frames=5", "--data.height=16", "--data.width=16", "--encoder.latent_channels=4"])
    m = UnifiedLatents(cfg)
    # the zero-initialised output layers would hide gradient paths at step 0: perturb them
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.abs().sum() == 0:  # the latent injections get a larger weight, so z0 matters clearly
                p.normal_(0, 0.3 if ".inject." in name else 0.02)
    return m


def clips(b=3, t=5):
    return torch.rand(b, 3, t, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def grad_norms(model, loss):
    model.zero_grad()
    loss.backward(retain_graph=True)
    parts = {name: sum(p.grad.abs().sum().item() for p in getattr(model, name).parameters() if p.grad is not None)
             for name in ("encoder", "prior", "decoder")}
    model.zero_grad()
    return parts


def test_terms_are_finite_and_per_sample(model):
    x = clips()
    terms = model.loss(x, torch.Generator().manual_seed(0))
    for v in (terms.rate, terms.rate_diffusion, terms.rate_terminal, terms.distortion, terms.total):
        assert v.shape == (3,) and torch.isfinite(v).all()
    torch.testing.assert_close(terms.rate, terms.rate_diffusion + terms.rate_terminal)
    # sample 0's terms do not depend on the other clips of the batch (same randomness)
    x2 = x.clone()
    x2[1:] = -x2[1:]
    terms2 = model.loss(x2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(terms2.rate[0], terms.rate[0])
    torch.testing.assert_close(terms2.distortion[0], terms.distortion[0])
    assert not torch.allclose(terms2.distortion[1:], terms.distortion[1:])


def test_prior_and_decoder_times_are_independent(model):
    terms = model.loss(clips(b=16), torch.Generator().manual_seed(3))
    # the prior runs on [lambda_min, lambda_0], the decoder on its own range, with separate draws
    assert (terms.prior_logsnr <= model.cfg.ul.latent_logsnr + 1e-5).all()
    assert not torch.allclose(model.prior_schedule.t_of_logsnr(terms.prior_logsnr),
                              model.decoder_schedule.t_of_logsnr(terms.decoder_logsnr))


def test_gradients_reach_the_right_networks(model):
    terms = model.loss(clips(), torch.Generator().manual_seed(0))
    rate = grad_norms(model, terms.rate.sum())
    assert rate["encoder"] > 0 and rate["prior"] > 0 and rate["decoder"] == 0
    dist = grad_norms(model, terms.distortion.sum())
    assert dist["encoder"] > 0 and dist["decoder"] > 0 and dist["prior"] == 0
    held = model.loss(clips(), torch.Generator().manual_seed(0), rate_scale=0.0)
    hold = grad_norms(model, held.rate.sum())
    assert hold["encoder"] == 0 and hold["prior"] > 0


def test_gradient_scale_is_exact():
    x = torch.randn(4, requires_grad=True)
    y = scale_gradient(x, 0.25)
    torch.testing.assert_close(y, x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 0.25))
    assert rate_gradient_scale(0, 10, 10) == 0.0 and rate_gradient_scale(14, 10, 10) == 0.5
    assert rate_gradient_scale(100, 10, 10) == 1.0 and rate_gradient_scale(0, 0, 0) == 1.0


def test_loss_matches_design_formula(model):
    """Recompute both terms by hand from the same draws (DESIGN.md §1)."""
    x = clips()
    g = torch.Generator().manual_seed(7)
    terms = model.loss(x, g)
    g = torch.Generator().manual_seed(7)
    u = model.cfg.ul
    with torch.no_grad():
        z = model.encode(x)
        t_p = D.sample_times(3, u.time_sampling, g)
        eps_p = torch.randn(z.shape, generator=g)
        lam = model.prior_schedule.logsnr(t_p)
        a, s = (v.view(-1, 1, 1, 1, 1) for v in D.alpha_sigma(lam))
        x_hat = model.prior(a * z + s * eps_p, lam)  # x-prediction
        integral = 0.5 * (-model.prior_schedule.dlogsnr_dt(t_p)) * torch.exp(lam) * ((z - x_hat) ** 2).sum((1, 2, 3, 4))
        a_min2 = 1 / (1 + math.exp(10.0))
        kl = 0.5 * (a_min2 * z**2 + (1 - a_min2) - 1 - math.log(1 - a_min2)).sum((1, 2, 3, 4))
        torch.testing.assert_close(terms.rate, integral + kl, rtol=1e-4, atol=1e-3)
        eps_z = torch.randn(z.shape, generator=g)
        z0 = model.alpha0 * z + model.sigma0 * eps_z
        torch.testing.assert_close(terms.z0, z0)  # the latent the decoder saw, for the start-up term
        t_d = D.sample_times(3, u.time_sampling, g)
        eps_d = torch.randn(x.shape, generator=g)
        lam_d = model.decoder_schedule.logsnr(t_d)
        a, s = (v.view(-1, 1, 1, 1, 1) for v in D.alpha_sigma(lam_d))
        v_hat = model.decoder(a * x + s * eps_d, z0, lam_d)
        v = a * eps_d - s * x
        w = 0.5 * (-model.decoder_schedule.dlogsnr_dt(t_d)) * torch.sigmoid(u.sigmoid_bias - lam_d)
        dist = u.loss_factor * w * torch.sigmoid(lam_d) * ((v - v_hat) ** 2).sum((1, 2, 3, 4))
        torch.testing.assert_close(terms.distortion, dist, rtol=1e-4, atol=1e-3)


def test_loss_reads_no_training_aid_or_baseline_setting(model):
    """`UnifiedLatents.loss` is the design formula whatever the start-up term's and the baselines'
    settings say: the same weights give bitwise the same terms."""
    other = UnifiedLatents(load_config(None, [
        "--data.num_frames=5", "--data.height=16", "--data.width=16", "--encoder.latent_channels=4",
        "--ul.startup_recon_weight=300", "--ul.startup_chroma_weight=3", "--ul.rate_hold_steps=5",
        "--ul.kl_weight=0.01", "--ul.mse_sigma=0.5"]))
    other.load_state_dict(model.state_dict())
    x = clips()
    a = model.loss(x, torch.Generator().manual_seed(4), rate_scale=0.5)
    b = other.loss(x, torch.Generator().manual_seed(4), rate_scale=0.5)
    for name in ("rate", "distortion", "z0", "total"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.extra() == {}


@pytest.mark.parametrize("t", [1, 5])
def test_decode_shapes_range_and_seed(model, t):
    x = clips(b=2, t=t)
    z = model.encode(x)
    assert z.shape == (2, 4, 1 + (t - 1) // 4, 2, 2)
    z0 = model.noisy_latent(z, torch.Generator().manual_seed(0))
    a = model.decode(z0, steps=3, seed=5)
    b = model.decode(z0, steps=3, seed=5)
    c = model.decode(z0, steps=3, seed=6)
    assert a.shape == x.shape and a.abs().max() <= 1.0
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_noisy_latent_statistics(model):
    z = torch.randn(4000, 4, 1, 2, 2)
    z0 = model.noisy_latent(z, torch.Generator().manual_seed(0))
    resid = (z0 - model.alpha0 * z) / model.sigma0
    assert resid.mean().abs() < 0.02 and abs(resid.std().item() - 1) < 0.02
    torch.testing.assert_close(model.noisy_latent(z, mode="mean"), model.alpha0 * z)


def test_decoder_gain_matches_rolled_latent_difference(model):
    x = clips(b=3)
    gain = model.decoder_gain(x, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    u = model.cfg.ul
    with torch.no_grad():
        z0 = model.noisy_latent(model.encode(x), g)
        t = D.sample_times(3, u.time_sampling, g)
        eps = torch.randn(x.shape, generator=g)
        lam = model.decoder_schedule.logsnr(t)
        a, s = (v.view(-1, 1, 1, 1, 1) for v in D.alpha_sigma(lam))
        x_t = a * x + s * eps
        w = 0.5 * (-model.decoder_schedule.dlogsnr_dt(t)) * torch.sigmoid(u.sigmoid_bias - lam) * torch.sigmoid(lam)
        v = a * eps - s * x

        def err(latents):
            return w * ((v - model.decoder(x_t, latents, lam)) ** 2).sum((1, 2, 3, 4))

        right = err(z0)
        ref = u.loss_factor * (err(z0[[2, 0, 1]]) - right) / math.log(2)
    # a difference of two fp32 sums: the round-off scales with the terms, not with their difference
    scale = (u.loss_factor * right / math.log(2)).abs().max().item()
    torch.testing.assert_close(gain, ref, rtol=1e-4, atol=1e-5 * scale)
    assert ref.abs().max() > 100 * 1e-5 * scale  # the latents make a measurable difference


def test_activation_checkpointing_keeps_values_and_gradients():
    from ulvideo.train.apply import apply_activation_checkpointing

    torch.manual_seed(0)
    cfg = load_config(None, ["--data.num_frames=5", "--data.height=16", "--data.width=16", "--encoder.latent_channels=4"])
    plain, ckpt = UnifiedLatents(cfg), UnifiedLatents(cfg)
    ckpt.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(ckpt) > 5
    x = clips()
    a = plain.loss(x, torch.Generator().manual_seed(0)).total.sum()
    b = ckpt.loss(x, torch.Generator().manual_seed(0)).total.sum()
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
