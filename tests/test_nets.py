"""Contract tests for ulvideo.nets: shapes, causality in time, conditioning, init scale, gradients.

Zero-initialised layers (adaLN-Zero gates, output projections, residual convs of the decoder) make
a fresh network's output constant; tests that need a non-trivial function perturb exactly those
parameters first (`perturb_zero_inits`).
"""
import math

import pytest
import torch

from ulvideo.config import BaseConfig, DecoderConfig, EncoderConfig, PriorConfig
from ulvideo.kernels.reference import naive_attention
from ulvideo.nets import SIZES, Decoder, Encoder, LatentTransformer, expand_latent_time
from ulvideo.nets.layers import ChannelRMSNorm, ResBlock
from ulvideo.nets.transformer import TransformerBlock, banded_attention

C = 16  # latent channels (EncoderConfig default)
TEXT_DIM = 12


def perturb_zero_inits(module: torch.nn.Module, std: float = 0.1, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def video(b, t, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g) * 2 - 1


def latent(b, t, h, w, seed=0):
    return torch.randn(b, C, t, h, w, generator=torch.Generator().manual_seed(seed))


def make_base(**cfg):
    torch.manual_seed(0)
    cfg = BaseConfig(num_classes=5, context_frames=2, **cfg)
    return perturb_zero_inits(LatentTransformer(cfg, C, text_dim=TEXT_DIM))


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return Encoder(EncoderConfig()).eval()


@pytest.fixture(scope="module")
def decoder():
    torch.manual_seed(0)
    return perturb_zero_inits(Decoder(DecoderConfig(), C)).eval()


# ---- shapes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_shapes_images_and_videos(encoder, decoder, frames):
    x = video(2, frames, 16, 24)
    z = encoder(x)
    assert z.shape == (2, C, 1 + (frames - 1) // 4, 2, 3)
    logsnr = torch.tensor([-3.0, 4.0])
    assert decoder(x, z, logsnr).shape == x.shape
    prior = LatentTransformer(PriorConfig(), C)
    assert prior(z, logsnr).shape == z.shape
    base = make_base()
    zb = latent(2, z.shape[2], 2, 4)  # the 2-level base model merges 2x2 tokens
    assert base(zb, logsnr).shape == zb.shape


def test_image_is_frame_zero_of_a_video(encoder):
    x = video(2, 9, 16, 16)
    torch.testing.assert_close(encoder(x[:, :, :1]), encoder(x)[:, :, :1], atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_clear_errors(encoder, decoder):
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        encoder(video(1, 8, 16, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        encoder(video(1, 5, 12, 16))
    with pytest.raises(ValueError, match="does not match z0"):
        decoder(video(1, 5, 16, 16), latent(1, 3, 2, 2), torch.zeros(1))


def test_config_overrides_registry():
    enc = Encoder(EncoderConfig(latent_channels=8, channels=[8, 8, 8, 8], num_res_blocks=0))
    assert enc(video(1, 5, 16, 16)).shape == (1, 8, 2, 2, 2)
    assert enc.size.channels == (8, 8, 8, 8) and enc.size.num_mid_blocks == SIZES["tiny"].encoder.num_mid_blocks
    patched = Encoder(EncoderConfig(patch_size=2, channels=[8, 16, 32]))  # 2x2 patch + two 2x levels = 8x
    assert patched(video(1, 9, 16, 32)).shape == (1, C, 3, 2, 4) and len(patched.downs) == 2
    prior = LatentTransformer(PriorConfig(widths=[32], depths=[3]), C)
    assert len(prior.blocks) == 3 and prior.proj_in.out_features == 32
    with pytest.raises(ValueError, match="unknown network size"):
        Encoder(EncoderConfig(size="XXL"))


def test_latent_time_alignment():
    z = torch.arange(4.0).view(1, 1, 4, 1, 1)  # latent frame j holds the value j
    expanded = expand_latent_time(z, 4).flatten().tolist()
    assert expanded == [math.ceil(f / 4) for f in range(13)]


# ---- causality in time ---------------------------------------------------------------------------


def test_encoder_is_causal_for_every_prefix(encoder):
    x = video(2, 13, 16, 16)
    full = encoder(x)
    for j in range(4):
        torch.testing.assert_close(encoder(x[:, :, : 1 + 4 * j]), full[:, :, : 1 + j], atol=1e-5, rtol=1e-5)
    # and the future does reach later latent frames (the comparison above can fail)
    later = x.clone()
    later[:, :, 5:] = video(2, 8, 16, 16, seed=3)
    moved = (encoder(later) - full).abs().amax(dim=(0, 1, 3, 4))
    assert moved[:2].max() == 0 and moved[2:].min() > 1e-3


def test_decoder_is_causal_for_every_prefix(decoder):
    x_t, z0 = video(2, 13, 16, 16), latent(2, 4, 2, 2)
    logsnr = torch.tensor([-2.0, 6.0])
    full = decoder(x_t, z0, logsnr)
    assert full.abs().max() > 1e-3  # not the zero-init constant
    for j in range(4):
        out = decoder(x_t[:, :, : 1 + 4 * j], z0[:, :, : 1 + j], logsnr)
        torch.testing.assert_close(out, full[:, :, : 1 + 4 * j], atol=1e-5, rtol=1e-5)
    # latent frame 2 reaches pixel frames 5..8 and not 0..4
    z_moved = z0.clone()
    z_moved[:, :, 2] += 1.0
    diff = (decoder(x_t, z_moved, logsnr) - full).abs().amax(dim=(0, 1, 3, 4))
    assert diff[:5].max() == 0 and diff[5:9].min() > 1e-4
    torch.manual_seed(0)
    factorized = perturb_zero_inits(Decoder(DecoderConfig(attention="factorized"), C))
    torch.testing.assert_close(factorized(x_t[:, :, :5], z0[:, :, :2], logsnr), factorized(x_t, z0, logsnr)[:, :, :5],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_transformer_temporal_causality(attention):
    z, logsnr = latent(2, 4, 2, 4), torch.tensor([0.5, -4.0])
    torch.manual_seed(0)
    causal = perturb_zero_inits(LatentTransformer(PriorConfig(attention=attention, temporal_causal=True), C))
    full = causal(z, logsnr)
    for j in range(4):
        torch.testing.assert_close(causal(z[:, :, : 1 + j], logsnr), full[:, :, : 1 + j], atol=1e-5, rtol=1e-5)
    base = make_base(attention=attention, temporal_causal=True)
    full = base(z, logsnr)
    torch.testing.assert_close(base(z[:, :, :2], logsnr), full[:, :, :2], atol=1e-5, rtol=1e-5)
    # control: without the causal flag the first frame does see the future
    torch.manual_seed(0)
    acausal = perturb_zero_inits(LatentTransformer(PriorConfig(attention=attention), C))
    assert (acausal(z[:, :, :1], logsnr) - acausal(z, logsnr)[:, :, :1]).abs().max() > 1e-4


@pytest.mark.parametrize("attention", ["full", "factorized"])
@pytest.mark.parametrize("window", [1, 3])
def test_windowed_block_sees_only_its_window(attention, window):
    # one decoder-style block (block-causal in time, banded by the window) on a (T, H, W) = (7, 2, 3)
    # token grid; the block has no position embedding, so its output at frame f is a function of
    # the frames it attends to only
    T, grid = 7, (7, 2, 3)
    torch.manual_seed(0)
    block = perturb_zero_inits(TransformerBlock(32, 8, 8, factorized=attention == "factorized",
                                                temporal_causal=True, temporal_window=window))
    torch.manual_seed(0)
    unbanded = perturb_zero_inits(TransformerBlock(32, 8, 8, factorized=attention == "factorized",
                                                   temporal_causal=True))
    g = torch.Generator().manual_seed(4)
    x, cond = torch.randn(2, T * 6, 32, generator=g), torch.randn(2, 8, generator=g)
    out = block(x, cond, grid)

    def frames(t):
        return t.reshape(2, -1, 6, 32)

    # reference: frame f of the banded block = the last frame of the causal block on frames f - W + 1 .. f
    for f in range(T):
        f0 = max(0, f - window + 1)
        crop = frames(x)[:, f0:f + 1].reshape(2, -1, 32)
        ref = frames(unbanded(crop, cond, (f + 1 - f0, 2, 3)))[:, -1]
        torch.testing.assert_close(frames(out)[:, f], ref, atol=1e-5, rtol=1e-5)
    # perturbing frame 2 moves exactly the output frames 2 .. 2 + W - 1
    y = frames(x.clone())
    y[:, 2] += torch.randn(y[:, 2].shape, generator=g)
    diff = (frames(block(y.reshape(2, -1, 32), cond, grid)) - frames(out)).abs().amax(dim=(0, 2, 3))
    reach = [2 <= f < 2 + window for f in range(T)]
    assert all(d > 1e-3 if r else d < 1e-6 for d, r in zip(diff.tolist(), reach)), diff


@pytest.mark.parametrize("tokens,window", [(3, 1), (3, 2), (1, 3), (2, 4)])
def test_banded_attention_in_query_blocks_is_masked_attention(tokens, window):
    # reference: float64 softmax attention under the band mask built entry by entry
    frames = 9
    n = frames * tokens
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for _ in range(3))
    frame = [i // tokens for i in range(n)]
    mask = torch.tensor([[frame[j] <= frame[i] and frame[i] - frame[j] < window for j in range(n)] for i in range(n)])
    ref = naive_attention(q, k, v, mask, compute_dtype=torch.float64)
    for query_frames in (1, 2, 4, 9, None):
        out = banded_attention(q, k, v, tokens, window, query_frames)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_decoder_window_is_validated():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="temporal_window"):
            Decoder(DecoderConfig(temporal_window=bad), C)
    with pytest.raises(ValueError, match="temporal_window"):
        TransformerBlock(32, 8, 8, temporal_window=2)  # a window needs causal attention in time
    assert Decoder(DecoderConfig(), C).temporal_window is None


# ---- conditioning ---------------------------------------------------------------------------------


def test_logsnr_conditioning_matters(decoder):
    torch.manual_seed(0)
    prior = perturb_zero_inits(LatentTransformer(PriorConfig(), C))
    z = latent(2, 2, 2, 2)
    a, b = torch.tensor([-5.0, -5.0]), torch.tensor([3.0, 3.0])
    assert (prior(z, a) - prior(z, b)).abs().max() > 1e-3
    x = video(2, 5, 16, 16)
    assert (decoder(x, z, a) - decoder(x, z, b)).abs().max() > 1e-3
    # and the decoder reads z0
    assert (decoder(x, z, a) - decoder(x, latent(2, 2, 2, 2, seed=5), a)).abs().max() > 1e-3


def test_conditioning_changes_base_model_output():
    base = make_base()
    z, logsnr = latent(2, 3, 2, 2), torch.tensor([1.0, -1.0])
    ref = base(z, logsnr)
    text = torch.randn(2, 4, TEXT_DIM)
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    with_text = base(z, logsnr, text_emb=text, text_mask=mask)
    assert (with_text - ref).abs().max() > 1e-3
    # padded tokens are ignored; a fully masked prompt is the null prompt
    text2 = text.clone()
    text2[0, 2:], text2[1, 3:] = 100.0, -100.0
    torch.testing.assert_close(base(z, logsnr, text_emb=text2, text_mask=mask), with_text)
    torch.testing.assert_close(base(z, logsnr, text_emb=text, text_mask=torch.zeros_like(mask)), ref)
    # labels: -1 is the null class
    torch.testing.assert_close(base(z, logsnr, label=torch.tensor([-1, -1])), ref)
    assert (base(z, logsnr, label=torch.tensor([0, 3])) - ref).abs().max() > 1e-3
    # context frames: masked-out frames carry nothing; given frames change the output
    ctx = latent(2, 3, 2, 2, seed=9)
    none = torch.zeros(2, 3, dtype=torch.bool)
    torch.testing.assert_close(base(z, logsnr, context=ctx, context_mask=none), ref)
    first = torch.tensor([[True, False, False]] * 2)
    assert (base(z, logsnr, context=ctx, context_mask=first) - ref).abs().max() > 1e-3
    with pytest.raises(ValueError):
        LatentTransformer(PriorConfig(), C)(z, logsnr, label=torch.tensor([0, 1]))


# ---- initialisation and gradients ----------------------------------------------------------------


def test_z_clean_starts_well_above_the_noise_floor(encoder):
    t = torch.linspace(0, 1, 9).view(1, 1, 9, 1, 1)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    smooth = torch.sin(3 * xx + 2 * yy + 4 * t + torch.arange(3.0).view(1, 3, 1, 1, 1)).expand(2, 3, 9, 32, 32)
    for x in (video(2, 9, 32, 32), smooth, smooth[:, :, :1]):
        with torch.no_grad():
            rms = encoder(x).pow(2).mean().sqrt().item()
        # sigma0 = sqrt(sigmoid(-5)) ~ 0.082 (DESIGN.md §1); the head is built for RMS ~ 1
        assert 0.5 < rms < 2.0, rms


def frame_group_norm(h: torch.Tensor, groups: int) -> torch.Tensor:
    """GroupNorm over (C/G, H, W) of each frame of (B, C, T, H, W), no affine: statistics over space."""
    return torch.stack([torch.nn.functional.group_norm(h[:, :, t], groups, eps=1e-6) for t in range(h.shape[2])], dim=2)


@pytest.mark.parametrize("head", ["per position", "per frame, groups of 4"])
def test_encoder_head_keeps_colour(head):
    """One object on a flat background: a group of the trunk's channels carries the object's colour
    in its contrast against the background. The encoder's head norm (per position, over channels)
    keeps it: scaling that contrast moves z well above the latent noise sigma0 ~ 0.08. The control,
    a norm with statistics over the frame per group of 4 channels, divides it out: z stays exactly
    as it was."""
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig()).eval()
    c = encoder.norm_out.weight.numel()
    per_group = 4
    norm = encoder.norm_out if head == "per position" else (lambda h: frame_group_norm(h, c // per_group))
    mask = torch.zeros(1, 1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1.0
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, c, 1, 1, 1, generator=g) + torch.randn(1, c, 1, 1, 1, generator=g) * mask
    with torch.no_grad():
        z = encoder.conv_out(norm(h))
        for k in range(0, c, per_group):
            scaled = h.clone()
            group = scaled[:, k:k + per_group]
            scaled[:, k:k + per_group] = group.mean() + 3.0 * (group - group.mean())
            moved = (encoder.conv_out(norm(scaled)) - z).pow(2).mean().sqrt().item()
            if head == "per position":
                assert moved > 0.1, (k, moved)
            else:
                assert moved < 1e-4, (k, moved)


def test_blocks_are_listed_for_checkpointing(encoder, decoder):
    for net in (encoder, decoder, make_base()):
        listed = {id(b) for b in net.blocks}
        found = [m for m in net.modules() if isinstance(m, (ResBlock, TransformerBlock))]
        assert found and all(id(m) in listed for m in found)


def _assert_all_grads(net, loss):
    net.zero_grad(set_to_none=True)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not missing, missing


def test_gradients_reach_every_parameter(decoder):
    torch.manual_seed(0)
    enc = perturb_zero_inits(Encoder(EncoderConfig()))
    _assert_all_grads(enc, enc(video(2, 5, 16, 16)).square().sum())
    z, logsnr = latent(2, 2, 2, 2), torch.tensor([0.0, 2.0])
    dec = decoder.train()
    _assert_all_grads(dec, dec(video(2, 5, 16, 16), z, logsnr).square().sum())
    decoder.eval()
    prior = perturb_zero_inits(LatentTransformer(PriorConfig(attention="factorized"), C))
    _assert_all_grads(prior, prior(z, logsnr).square().sum())
    base = make_base()
    out = base(z, logsnr, text_emb=torch.randn(2, 3, TEXT_DIM), text_mask=torch.ones(2, 3, dtype=torch.bool),
               label=torch.tensor([1, -1]), context=latent(2, 2, 2, 2, seed=4),
               context_mask=torch.tensor([[True, False], [False, False]]))
    _assert_all_grads(base, out.square().sum())


def test_bf16_autocast_runs(encoder, decoder):
    x = video(1, 5, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = encoder(x)
        out = decoder(x, z, torch.zeros(1))
        prior = LatentTransformer(PriorConfig(), C)(z, torch.zeros(1))
    assert out.shape == x.shape and prior.shape == z.shape
    assert torch.isfinite(out.float()).all() and torch.isfinite(z.float()).all()


def test_decoder_output_starts_at_zero():
    """The output conv starts at zero: the first prediction is exactly 0 for any input (ADM)."""
    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(), 4)
    x_t, z0 = torch.randn(2, 3, 5, 16, 16), torch.randn(2, 4, 2, 2, 2)
    with torch.no_grad():
        assert (dec(x_t, z0, torch.zeros(2)) == 0).all()


@pytest.mark.parametrize("channels", [1, 12, 64])
def test_channel_rms_norm_is_rms_norm_of_each_position(channels):
    """Each position normalised over its channels alone (torch's rms_norm over the channel axis, in
    float64, as reference), scale per channel; values and gradients, with positions of very different
    scales. A change at one position moves that position's output only, in space and in time."""
    torch.manual_seed(0)
    norm = ChannelRMSNorm(channels)
    with torch.no_grad():
        norm.weight.normal_()
    scale = torch.tensor([0.01, 1.0, 30.0, 2.0, 0.5]).view(1, 1, 5, 1, 1)
    x = (torch.randn(2, channels, 5, 6, 7) * scale + 0.5).requires_grad_()
    w = torch.randn(2, channels, 5, 6, 7)
    y = norm(x)
    xd = x.detach().double().requires_grad_()
    wd = norm.weight.detach().double().requires_grad_()
    ref = torch.nn.functional.rms_norm(xd.movedim(1, -1), (channels,), wd, eps=norm.eps).movedim(-1, 1)
    torch.testing.assert_close(y, ref.float(), rtol=1e-4, atol=1e-4)
    gx, gw = torch.autograd.grad((y * w).sum(), (x, norm.weight))
    rx, rw = torch.autograd.grad((ref * w.double()).sum(), (xd, wd))
    torch.testing.assert_close(gx, rx.float(), rtol=1e-3, atol=1e-3 * rx.abs().max().item())
    torch.testing.assert_close(gw, rw.float(), rtol=1e-4, atol=1e-3)
    x2 = x.detach().clone()
    x2[:, :, 3, 2, 4] = torch.randn(2, channels) * 100
    moved = (norm(x2) - y.detach()).abs().amax(dim=1) > 0
    assert moved[:, 3, 2, 4].all() and moved.sum() == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = norm(x.detach().bfloat16())
    assert yb.dtype == torch.bfloat16 and (yb.float() - y.detach()).abs().max() < 0.05 * y.abs().max()
