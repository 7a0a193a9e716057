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
        t_d = D.sample_times(3, u.time_sampling, g)
        eps_d = torch.randn(x.shape, generator=g)
        lam_d = model.decoder_schedule.logsnr(t_d)
        a, s = (v.view(-1, 1, 1, 1, 1) for v in D.alpha_sigma(lam_d))
        v_hat = model.decoder(a * x + s * eps_d, z0, lam_d)
        v = a * eps_d - s * x
        w = 0.5 * (-model.decoder_schedule.dlogsnr_dt(t_d)) * torch.sigmoid(u.sigmoid_bias - lam_d)
        dist = u.loss_factor * w * torch.sigmoid(lam_d) * ((v - v_hat) ** 2).sum((1, 2, 3, 4))
        torch.testing.assert_close(terms.distortion, dist, rtol=1e-4, atol=1e-3)


def test_startup_recon_term_by_hand():
    """The start-up term is scale * w / 2 * ||x - x_hat||^2, x_hat the decoder's x-prediction at its
    lowest logSNR from x_lmin = a x + s eps (drawn after the decoder's own draws); absent at scale 0."""
    torch.manual_seed(0)
    cfg = load_config(None, ["--data.num_frames=5", "--data.height=16", "--data.width=16",
                             "--encoder.latent_channels=4", "--ul.startup_recon_weight=50"])
    m = UnifiedLatents(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    x = clips()
    assert m.loss(x, torch.Generator().manual_seed(3), startup_scale=0.0).startup is None
    terms = m.loss(x, torch.Generator().manual_seed(3), rate_scale=0.5, startup_scale=0.5)
    g = torch.Generator().manual_seed(3)
    u = cfg.ul
    with torch.no_grad():
        z = m.encode(x)
        D.sample_times(3, u.time_sampling, g), torch.randn(z.shape, generator=g)  # the prior's draws
        z0 = m.alpha0 * z + m.sigma0 * torch.randn(z.shape, generator=g)
        D.sample_times(3, u.time_sampling, g), torch.randn(x.shape, generator=g)  # the decoder's draws
        lam = torch.full((3,), cfg.decoder.logsnr_min)
        a2 = torch.sigmoid(lam).view(-1, 1, 1, 1, 1)
        x_t = a2.sqrt() * x + (1 - a2).sqrt() * torch.randn(x.shape, generator=g)
        v_hat = m.decoder(x_t, z0, lam)
        x_hat = a2.sqrt() * x_t - (1 - a2).sqrt() * v_hat  # v-prediction -> x
        ref = 0.5 * 50 * 0.5 * ((x - x_hat) ** 2).sum((1, 2, 3, 4))
    torch.testing.assert_close(terms.startup, ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms.total, terms.rate + terms.distortion + ref, rtol=1e-5, atol=1e-2)


def _startup_model(*overrides):
    torch.manual_seed(0)
    cfg = load_config(None, ["--data.num_frames=5", "--data.height=16", "--data.width=16",
                             "--encoder.latent_channels=4", "--ul.startup_recon_weight=1", *overrides])
    m = UnifiedLatents(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return m


def _startup_pair(*overrides):
    """(the zero-input start-up model, the same weights with `overrides`), clips and their z0."""
    plain = _startup_model("--ul.startup_input=zeros")
    other = _startup_model("--ul.startup_input=zeros", *overrides)
    other.load_state_dict(plain.state_dict())
    return plain, other


def _z0(m, x):
    return m.noisy_latent(m.encode(x), torch.Generator().manual_seed(5))


def _grey_chroma_sq(e, k):
    """||P e||^2 + k^2 ||(I - P) e||^2 per clip, P the projection onto the grey axis (1, 1, 1)/sqrt(3)."""
    g = torch.full((3, 1), 3 ** -0.5)
    P = g @ g.T
    grey = torch.einsum("ij,bj...->bi...", P, e)
    chroma = torch.einsum("ij,bj...->bi...", torch.eye(3) - P, e)
    return (grey ** 2).sum((1, 2, 3, 4)) + k**2 * (chroma ** 2).sum((1, 2, 3, 4))


def test_startup_from_zeros_is_the_mse_decoders_error():
    """`ul.startup_input = zeros`: the term's x_hat is the MSE decoder's prediction (all-zero input)."""
    m = _startup_model("--ul.startup_input=zeros")
    x = clips(4)
    with torch.no_grad():
        z0 = m.noisy_latent(m.encode(x), torch.Generator().manual_seed(5))
        got = m.startup_recon_error(x, z0)
        ref = ((x - m._mse_decode(z0, x.shape[2])) ** 2).sum((1, 2, 3, 4))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3])
def test_startup_on_k_clips_is_rescaled_and_unbiased(k):
    """`ul.startup_clips = k`: clips k.. carry 0, the first k carry B / k times their own error
    (the all-clip term's values for them: deterministic with the zero input), so the batch mean
    is unchanged in expectation over which clips come first."""
    full, part = _startup_pair(f"--ul.startup_clips={k}")
    x = clips(4)
    with torch.no_grad():
        z0 = _z0(full, x)
        ref = full.startup_recon_error(x, z0)
        got = part.startup_recon_error(x, z0)
    torch.testing.assert_close(got[:k], ref[:k] * 4 / k, rtol=1e-5, atol=1e-4)
    assert (got[k:] == 0).all()
    # averaged over the 4 rotations of the batch (each clip among the first k equally often),
    # the batch mean is the all-clip mean
    with torch.no_grad():
        avg = torch.stack([part.startup_recon_error(x.roll(r, 0), z0.roll(r, 0)).mean() for r in range(4)]).mean()
    torch.testing.assert_close(avg, ref.mean(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k", [0.5, 3.0])
def test_startup_chroma_weight_scales_the_error_off_the_grey_axis(k):
    """`ul.startup_chroma_weight = k`: with P the projection onto the grey axis (1, 1, 1)/sqrt(3),
    the term is ||P e||^2 + k^2 ||(I - P) e||^2 per clip, e = x - x_hat (all-zero input: deterministic)."""
    plain, weighted = _startup_pair(f"--ul.startup_chroma_weight={k}")
    x = clips(3)
    with torch.no_grad():
        z0 = _z0(plain, x)
        ref = _grey_chroma_sq(x - plain._mse_decode(z0, x.shape[2]), k)
        got = weighted.startup_recon_error(x, z0)
        assert not torch.allclose(got, plain.startup_recon_error(x, z0))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("k,b", [(0, 4), (1, 3)])
def test_shared_startup_pass_equals_two_separate_passes(k, b):
    """`ul.startup_pass = shared`: one decoder call over the batch; the first k clips (0 -> B // 2)
    carry B / k times their start-up error (x at the lowest logSNR, v -> x by hand), the rest
    B / (B - k) times their sigmoid-weighted v-loss; each part 0 on the other's clips. The
    reference calls the decoder separately on the two parts with the same draws."""
    m = _startup_model("--ul.startup_pass=shared", f"--ul.startup_clips={k}", "--ul.startup_recon_weight=20",
                       "--ul.startup_chroma_weight=2", "--ul.sigmoid_bias=1")
    cfg, u = m.cfg, m.cfg.ul
    x = clips(b)
    calls = []
    hook = m.decoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        terms = m.loss(x, torch.Generator().manual_seed(3), rate_scale=0.25, startup_scale=0.75)
    hook.remove()
    assert len(calls) == 1
    ks = k or b // 2
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        z = m.encode(x)
        D.sample_times(b, u.time_sampling, g), torch.randn(z.shape, generator=g)  # the prior's draws
        z0 = m.alpha0 * z + m.sigma0 * torch.randn(z.shape, generator=g)
        t_d = D.sample_times(b - ks, u.time_sampling, g)
        eps_d = torch.randn(x[ks:].shape, generator=g)
        lam_d = m.decoder_schedule.logsnr(t_d)
        a, s = (v.view(-1, 1, 1, 1, 1) for v in D.alpha_sigma(lam_d))
        v_hat = m.decoder(a * x[ks:] + s * eps_d, z0[ks:], lam_d)
        w = 0.5 * (-m.decoder_schedule.dlogsnr_dt(t_d)) * torch.sigmoid(u.sigmoid_bias - lam_d)
        dist = u.loss_factor * w * torch.sigmoid(lam_d) * ((a * eps_d - s * x[ks:] - v_hat) ** 2).sum((1, 2, 3, 4))
        lam = torch.full((ks,), cfg.decoder.logsnr_min)
        a2 = torch.sigmoid(lam).view(-1, 1, 1, 1, 1)
        x_t = a2.sqrt() * x[:ks] + (1 - a2).sqrt() * torch.randn(x[:ks].shape, generator=g)
        x_hat = a2.sqrt() * x_t - (1 - a2).sqrt() * m.decoder(x_t, z0[:ks], lam)
        err = _grey_chroma_sq(x[:ks] - x_hat, 2)
    torch.testing.assert_close(terms.distortion[ks:], dist * b / (b - ks), rtol=1e-4, atol=1e-3)
    assert (terms.distortion[:ks] == 0).all() and (terms.startup[ks:] == 0).all()
    torch.testing.assert_close(terms.startup[:ks], 0.75 * 20 * 0.5 * err * b / ks, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms.decoder_logsnr, torch.cat([lam, lam_d]))
    # a separate start-up pass is a second decoder call
    sep = _startup_model("--ul.startup_pass=separate")
    hook = sep.decoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        sep.loss(x, torch.Generator().manual_seed(3), startup_scale=1.0)
    hook.remove()
    assert len(calls) == 3


def test_startup_options_are_validated():
    from ulvideo.config import ConfigError
    with pytest.raises(ConfigError, match="startup_clips"):
        load_config(None, ["--ul.startup_clips=-1"])
    with pytest.raises(ConfigError, match="output_init_std"):
        load_config(None, ["--decoder.output_init_std=-0.1"])
    with pytest.raises(ConfigError):
        load_config(None, ["--ul.startup_input=ones"])
    with pytest.raises(ConfigError, match="startup_pass"):
        load_config(None, ["--ul.startup_pass=both"])
    with pytest.raises(ConfigError, match="startup_chroma_weight"):
        load_config(None, ["--ul.startup_chroma_weight=0"])
    with pytest.raises(ConfigError, match="startup_fade_steps"):
        load_config(None, ["--ul.startup_fade_steps=-1"])


def test_startup_scale_fades_as_the_rate_ramps_in():
    from ulvideo.train.objectives import StageOne

    cfg = load_config(None, ["--ul.rate_hold_steps=10", "--ul.rate_ramp_steps=20", "--ul.startup_recon_weight=1"])
    obj = StageOne(cfg)
    rows = [obj.log_constants(s) for s in range(40)]
    assert all(r["startup_recon_scale"] == 1.0 for r in rows[:10])  # the whole hold
    assert all(r["startup_recon_scale"] == 0.0 for r in rows[30:])  # exact UL after the ramp
    assert all(r["startup_recon_scale"] == pytest.approx(1.0 - r["rate_grad_scale"]) for r in rows)
    mid = [r["startup_recon_scale"] for r in rows[10:30]]
    assert all(a > b for a, b in zip(mid, mid[1:]))  # strictly fading during the ramp


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


def test_kl_vae_baseline_terms():
    torch.manual_seed(0)
    cfg = load_config(None, ["--data.num_frames=5", "--data.height=16", "--data.width=16", "--encoder.latent_channels=4",
                             "--ul.regularizer=kl_vae", "--ul.kl_weight=0.5"])
    m = UnifiedLatents(cfg)
    x = clips()
    mean, logvar = m.posterior(x)
    assert mean.shape == (3, 4, 2, 2, 2) and torch.equal(m.encode(x), mean)
    terms = m.loss(x, torch.Generator().manual_seed(0))
    # KL(N(m, s^2) || N(0, 1)) against torch.distributions
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    ref = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    torch.testing.assert_close(terms.vae_kl, ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(terms.total, terms.rate + terms.distortion + 0.5 * terms.vae_kl)
    # the prior measures the latents but sends no gradient into the encoder
    assert grad_norms(m, terms.rate.sum())["encoder"] == 0
    assert grad_norms(m, terms.vae_kl.sum())["encoder"] > 0


def test_mse_decoder_baseline():
    torch.manual_seed(0)
    cfg = load_config(None, ["--data.num_frames=5", "--data.height=16", "--data.width=16", "--encoder.latent_channels=4",
                             "--decoder.loss=mse", "--decoder.mse_sigma=0.5", "--ul.loss_factor=2.0"])
    m = UnifiedLatents(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.abs().sum() == 0:  # the latent injections get a larger weight, so z0 matters clearly
                p.normal_(0, 0.3 if ".inject." in name else 0.02)
    x = clips()
    terms = m.loss(x, torch.Generator().manual_seed(0))
    z0 = m.noisy_latent(m.encode(x), torch.Generator().manual_seed(0))
    with torch.no_grad():
        x_hat = m.decode(z0)  # deterministic: no sampler steps
    assert torch.equal(x_hat, m.decode(z0, steps=7))
    g = torch.Generator().manual_seed(0)
    D.sample_times(3, "stratified", g)  # the prior's draws come first in loss()
    torch.randn((3, 4, 2, 2, 2), generator=g)
    z0_loss = m.noisy_latent(m.encode(x), g)
    with torch.no_grad():
        ref = 2.0 * ((x - m._mse_decode(z0_loss)) ** 2).sum((1, 2, 3, 4)) / (2 * 0.25)
    torch.testing.assert_close(terms.distortion, ref, rtol=1e-4, atol=1e-3)


def test_startup_term_keeps_its_own_schedule(monkeypatch):
    """`ul.startup_hold_steps` / `startup_fade_steps`: scale 1, a linear fade, then 0, whatever the
    rate does; the scale the loss receives is the one logged."""
    from ulvideo.train.objectives import StageOne

    cfg = load_config(None, ["--ul.rate_hold_steps=10", "--ul.rate_ramp_steps=20", "--ul.startup_recon_weight=1",
                             "--ul.startup_hold_steps=4", "--ul.startup_fade_steps=4"])
    obj = StageOne(cfg)
    scales = [obj.log_constants(s)["startup_recon_scale"] for s in range(40)]
    assert scales == pytest.approx([1.0] * 4 + [0.75, 0.5, 0.25] + [0.0] * 33)
    assert [obj.log_constants(s)["rate_grad_scale"] for s in range(11)] == [0.0] * 10 + [pytest.approx(0.05)]
    seen = []
    real = obj.model.loss
    monkeypatch.setattr(obj.model, "loss", lambda x, g, r, startup_scale: seen.append((r, startup_scale)) or real(x, g, r, startup_scale))
    batch = {"video": clips(b=2, t=5)}
    for step in (3, 5, 12):
        obj(batch, torch.Generator().manual_seed(0), step)
    assert seen == [(0.0, 1.0), (0.0, pytest.approx(0.5)), (pytest.approx(0.15), 0.0)]


def test_latent_readout_layout_and_causality():
    """`LatentReadout`: T' latent frames -> 1 + 4 (T' - 1) frames at 8x; changing latent frame j
    changes exactly the pixel frames it covers (frame 0 for j = 0, frames 4j - 3 .. 4j after)."""
    from ulvideo.nets import LatentReadout

    torch.manual_seed(0)
    r = LatentReadout(4, 16)
    z = torch.randn(2, 4, 3, 2, 2)
    with torch.no_grad():
        out = r(z)
        assert out.shape == (2, 3, 9, 16, 16)
        assert r(z[:, :, :1]).shape == (2, 3, 1, 16, 16)
        torch.testing.assert_close(r(z[:, :, :1]), out[:, :, :1])  # an image is frame 0 of its video
        for j, frames in [(0, {0}), (1, {1, 2, 3, 4}), (2, {5, 6, 7, 8})]:
            z2 = z.clone()
            z2[:, :, j] += 1.0
            changed = {f for f in range(9) if not torch.equal(r(z2)[:, :, f], out[:, :, f])}
            assert changed == frames
        # sub-pixel layout: latent position (y, x) writes the 8x8 block at (8y, 8x); its two 3x3
        # convs reach positions within 2 latent steps, and nothing further
        z3 = torch.randn(1, 4, 2, 4, 4)
        z4 = z3.clone()
        z4[:, :, 1, 0, 0] += 3.0
        blocks = (r(z3) - r(z4)).abs().sum((0, 1))[1:5].reshape(4, 4, 8, 4, 8).sum((0, 2, 4))
        near = torch.tensor([[max(i, j) <= 2 for j in range(4)] for i in range(4)])
        assert (blocks[~near] == 0).all() and blocks[0, 0] > 0
        assert (blocks[near] > 0).sum() >= 4

def test_startup_readout_term_by_hand_and_gradient_paths():
    """`ul.startup_head = readout`: the term is w/2 * chroma-scaled ||x - readout(z0)||^2 per clip,
    no decoder pass is added, and its gradient reaches encoder and readout but not the decoder."""
    m = _startup_model("--ul.startup_head=readout", "--ul.startup_readout_width=8", "--ul.startup_recon_weight=20",
                       "--ul.startup_chroma_weight=2")
    x = clips(3)
    calls = []
    hook = m.decoder.register_forward_hook(lambda *a: calls.append(1))
    terms = m.loss(x, torch.Generator().manual_seed(3), rate_scale=0.0, startup_scale=0.5)
    hook.remove()
    assert len(calls) == 1  # the diffusion loss's pass only
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        z = m.encode(x)
        D.sample_times(3, m.cfg.ul.time_sampling, g), torch.randn(z.shape, generator=g)  # the prior's draws
        z0 = m.alpha0 * z + m.sigma0 * torch.randn(z.shape, generator=g)
        ref = 0.5 * 20 * 0.5 * _grey_chroma_sq(x - m.readout(z0), 2)
    torch.testing.assert_close(terms.startup, ref, rtol=1e-4, atol=1e-3)
    m.zero_grad()
    terms.startup.sum().backward()
    norm = {name: sum(p.grad.abs().sum().item() for p in getattr(m, name).parameters() if p.grad is not None)
            for name in ("encoder", "readout", "decoder", "prior")}
    assert norm["encoder"] > 0 and norm["readout"] > 0
    assert norm["decoder"] == 0 and norm["prior"] == 0
    # without the option there is no readout module (exports stay as they were)
    assert not hasattr(_startup_model(), "readout")


def test_startup_readout_options_are_validated():
    from ulvideo.config import ConfigError
    with pytest.raises(ConfigError, match="startup_head"):
        load_config(None, ["--ul.startup_head=readout", "--ul.startup_pass=shared"])
    with pytest.raises(ConfigError, match="startup_readout_width"):
        load_config(None, ["--ul.startup_head=readout", "--ul.startup_readout_width=0"])
    with pytest.raises(ConfigError):
        load_config(None, ["--ul.startup_head=probe"])
