"""The start-up term (ulvideo/startup.py): its schedule, its value against an explicit grey-axis
projection, where its gradient goes, the readout's layout, and that the objective owns it (trained
with it, never exported). Resuming its weights and optimizer state: tests/test_resume.py."""
import math

import pytest
import torch

from ulvideo import diffusion as D
from ulvideo.config import ConfigError, load_config
from ulvideo.nets import LatentReadout
from ulvideo.train.objectives import StageOne

SMALL = ["--data.num_frames=5", "--data.height=16", "--data.width=16", "--encoder.latent_channels=4"]
PIXELS = 5 * 16 * 16


def objective(*overrides) -> StageOne:
    """Rate held for 10 steps and ramped over 20; zero-initialised layers perturbed so z0 matters."""
    torch.manual_seed(0)
    obj = StageOne(load_config(None, [*SMALL, "--ul.rate_hold_steps=10", "--ul.rate_ramp_steps=20",
                                      "--ul.startup_recon_weight=20", *overrides]))
    with torch.no_grad():
        for p in obj.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.3)
    return obj


def clips(b=3):
    return torch.rand(b, 3, 5, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_schedule_is_on_during_the_hold_and_fades_over_the_ramp():
    obj = objective()
    scales = [obj.startup.scale(s) for s in range(40)]
    # 1 for the 10 held steps, then 1 - (k + 1) / 20 at ramp step k, 0 from the ramp's last step on
    assert scales == pytest.approx([1.0] * 10 + [1 - (k + 1) / 20 for k in range(20)] + [0.0] * 10)
    assert [obj.log_constants(s)["startup_recon_scale"] for s in range(40)] == scales
    # the scale the loss uses is the one logged; once it is 0 the term is not computed at all
    seen = []
    obj.startup.register_forward_hook(lambda mod, args, out: seen.append(args[2]))
    x = clips(2)
    for step in (3, 15, 29, 35):
        loss, logs = obj({"video": x}, torch.Generator().manual_seed(0), step)
    assert seen == [scales[3], scales[15]]
    # after the ramp the objective is exactly the model's loss: UL, nothing added
    terms = obj.model.loss(x, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(loss, terms.total.mean() / PIXELS) and "startup_recon_bits_per_pixel" not in logs


def _grey_chroma_sq(e, k):
    """||P e||^2 + k^2 ||(I - P) e||^2 per clip, P the projection onto the grey axis (1, 1, 1)/sqrt(3)."""
    g = torch.full((3, 1), 3 ** -0.5)
    P = g @ g.T
    grey = torch.einsum("ij,bj...->bi...", P, e)
    chroma = torch.einsum("ij,bj...->bi...", torch.eye(3) - P, e)
    return (grey ** 2).sum((1, 2, 3, 4)) + k**2 * (chroma ** 2).sum((1, 2, 3, 4))


@pytest.mark.parametrize("k", [0.5, 1.0, 3.0])
def test_term_is_the_chroma_weighted_error_of_an_explicit_grey_axis_projection(k):
    """At step 12 (scale 1 - 3/20): S = 0.85 * w/2 * (||P e||^2 + k^2 ||(I - P) e||^2), e = x - R(z0),
    z0 rebuilt by hand from the loss's draws (prior's times and noise, then eps_z)."""
    obj = objective(f"--ul.startup_chroma_weight={k}")
    x = clips()
    loss, logs = obj({"video": x}, torch.Generator().manual_seed(3), 12)
    m, g = obj.model, torch.Generator().manual_seed(3)
    with torch.no_grad():
        z = m.encode(x)
        D.sample_times(3, m.cfg.ul.time_sampling, g), torch.randn(z.shape, generator=g)  # the prior's draws
        z0 = m.alpha0 * z + m.sigma0 * torch.randn(z.shape, generator=g)
        ref = 0.85 * 20 * 0.5 * _grey_chroma_sq(x - obj.startup.readout(z0), k)
        terms = m.loss(x, torch.Generator().manual_seed(3), rate_scale=0.15)
    torch.testing.assert_close(logs["startup_recon_bits_per_pixel"], ref / math.log(2) / PIXELS, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, (terms.total + ref).mean() / PIXELS, rtol=1e-5, atol=1e-5)
    if k != 1.0:  # the weight matters: the plain squared error is another number
        assert not torch.allclose(ref, 0.85 * 20 * 0.5 * _grey_chroma_sq(x - obj.startup.readout(z0), 1.0), rtol=1e-3)


def test_gradient_reaches_encoder_and_readout_only():
    obj = objective()
    x = clips(2)
    terms = obj.model.loss(x, torch.Generator().manual_seed(0), 0.0)
    s = obj.startup(x, terms.z0, 1.0).sum()
    parts = {"encoder": obj.model.encoder, "readout": obj.startup.readout, "decoder": obj.model.decoder,
             "prior": obj.model.prior}
    params = {k: list(v.parameters()) for k, v in parts.items()}
    grads = torch.autograd.grad(s, [p for ps in params.values() for p in ps], allow_unused=True)
    norms, i = {}, 0
    for k, ps in params.items():
        norms[k] = sum(0.0 if gr is None else gr.abs().sum().item() for gr in grads[i:i + len(ps)])
        i += len(ps)
    assert norms["encoder"] > 0 and norms["readout"] > 0
    assert norms["decoder"] == 0 and norms["prior"] == 0


def test_objective_owns_the_term_and_exports_leave_it_out(tmp_path):
    from ulvideo.exports import load_stage1, save_export

    obj = objective()
    assert any(k.startswith("startup.readout.") for k in obj.state_dict())  # DeepSpeed saves and resumes it
    exported = obj.trained.state_dict()  # what the EMA follows and exports hold
    assert exported and not any("startup" in k or "readout" in k for k in exported)
    path = save_export(tmp_path / "e", exported, obj.cfg, {"stage": "ul"})
    assert sorted(load_stage1(path).state_dict()) == sorted(exported)  # loaded strictly
    plain = StageOne(load_config(None, SMALL))  # no weight: no term, no readout
    assert plain.startup is None and "startup_recon_scale" not in plain.log_constants(0)


def test_options_are_validated():
    with pytest.raises(ConfigError, match="startup_recon_weight"):
        load_config(None, ["--ul.startup_recon_weight=-1"])
    with pytest.raises(ConfigError, match="rate_hold_steps"):  # on while the rate is held: never, here
        load_config(None, ["--ul.startup_recon_weight=1"])
    with pytest.raises(ConfigError, match="startup_chroma_weight"):
        load_config(None, ["--ul.startup_chroma_weight=0"])


def test_latent_readout_layout_and_causality():
    """`LatentReadout`: T' latent frames -> 1 + 4 (T' - 1) frames at 8x; changing latent frame j
    changes exactly the pixel frames it covers (frame 0 for j = 0, frames 4j - 3 .. 4j after)."""
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
