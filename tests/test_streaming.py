"""Streaming in time and tiling in space equal the one-pass result.

References: the unchunked, untiled pass of the same network (`model.encode`, `model.decoder`,
`model.decode`), `diffusion.sample` with the per-frame noise as its noise hook for the sampler, and
for the tiles' halo a network whose receptive field is worked out by hand and the support of an
output's gradient. Controls show that the halo is needed, and that a network with statistics over
the frame is refused.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ulvideo import diffusion as D
from ulvideo import streaming as S
from ulvideo.attention import block_causal_mask, frame_causal_mask
from ulvideo.config import load_config
from ulvideo.nets.layers import CausalCache, CausalConv3d, ChannelRMSNorm, streaming
from ulvideo.nets.sizes import resolve_decoder
from ulvideo.nets import transformer
from ulvideo.ul import UnifiedLatents

TOL = dict(atol=2e-5, rtol=1e-5)


def perturb_zero_inits(module: nn.Module, std: float = 0.1, seed: int = 1) -> nn.Module:
    """Zero-initialised layers (output convs, adaLN gates) would make the decoder's output constant."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def make_model(*overrides):
    from ulvideo.baselines import build_stage1

    torch.manual_seed(0)
    m = build_stage1(load_config(None, ["--encoder.latent_channels=4", *overrides])).eval()
    perturb_zero_inits(m.decoder)
    return m


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model():
    return make_model()


def video(t, h=16, w=16, seed=0, b=1):
    """Smooth random clips (upsampled noise), closer to real frames than white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, t, max(1, h // 8), max(1, w // 8), generator=g)
    return F.interpolate(coarse, size=(t, h, w), mode="trilinear") * 2 - 1


def latents(t, h=2, w=2, seed=0):
    return torch.randn(1, 4, t, h, w, generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ---- plans and noise ------------------------------------------------------------------------------


def test_chunk_plans():
    assert S.chunk_plan(17, 4) == [5, 4, 4, 4]
    assert S.chunk_plan(17, 8, first=1) == [1, 8, 8]
    assert S.chunk_plan(13, 8) == [9, 4]
    assert S.chunk_plan(5, 16) == [5]
    assert S.latent_plan([1, 8, 8]) == [1, 2, 2]
    for bad in [dict(num_frames=16, chunk=4), dict(num_frames=17, chunk=6), dict(num_frames=17, chunk=4, first=4)]:
        with pytest.raises(ValueError):
            S.chunk_plan(**bad)
    with pytest.raises(ValueError):
        S.latent_plan([5, 6])


def test_frame_noise_is_a_function_of_the_frame():
    shape = (2, 3, 7, 4, 4)
    full = S.clip_noise(3, S.NOISE_STEP, 5, 0, shape)
    torch.testing.assert_close(S.clip_noise(3, S.NOISE_STEP, 5, 4, (2, 3, 3, 4, 4)), full[:, :, 4:], atol=0, rtol=0)
    torch.testing.assert_close(S.frame_noise(3, S.NOISE_STEP, 5, 2, (2, 3, 4, 4)), full[:, :, 2], atol=0, rtol=0)
    for other in [S.clip_noise(4, S.NOISE_STEP, 5, 0, shape), S.clip_noise(3, S.NOISE_INIT, 5, 0, shape),
                  S.clip_noise(3, S.NOISE_STEP, 6, 0, shape)]:
        assert (other - full).abs().max() > 0.1
    big = S.clip_noise(0, S.NOISE_INIT, 0, 0, (4, 3, 16, 32, 32)).double()  # 196608 N(0, 1) draws
    assert abs(float(big.mean())) < 0.02 and abs(float(big.std()) - 1) < 0.02  # 5+ standard errors
    neighbours = torch.stack([big[:, :, :-1].flatten(), big[:, :, 1:].flatten()])  # frame t vs frame t + 1
    assert abs(float(torch.corrcoef(neighbours)[0, 1])) < 0.02


# ---- the streaming context ------------------------------------------------------------------------


def test_streaming_context_leaves_nothing_behind(model):
    convs = [m for m in model.encoder.modules() if isinstance(m, CausalConv3d)]
    with streaming(model.encoder, CausalCache()) as cache:
        assert all(m.stream is cache for m in convs) and model.encoder.stream is cache
        with pytest.raises(RuntimeError, match="already streaming"):
            with streaming(model.encoder, CausalCache()):
                pass
    assert all(m.stream is None for m in convs) and model.encoder.stream is None
    with pytest.raises(ValueError):
        with streaming(model.encoder, CausalCache()):
            model.encoder(video(5))
            model.encoder(video(3))  # a later chunk must be a multiple of 4 frames
    assert all(m.stream is None for m in convs)


# ---- encoder --------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk,first", [(4, 1), (4, 5), (8, 5), (12, 1), (8, 9)])
def test_streamed_encode_equals_one_pass(model, chunk, first):
    x = video(13, seed=1)
    torch.testing.assert_close(S.encode(model, x, chunk, first=first), model.encode(x), **TOL)


def test_encoder_cache_carries_information_across_chunks(model):
    # the comparison above can fail: a chunk's latents depend on frames of the previous chunk
    x = video(13, seed=1)
    y = x.clone()
    y[:, :, 3:5] = video(2, seed=7)  # inside the first chunk of [5, 4, 4]
    diff = (S.encode(model, y, 4) - S.encode(model, x, 4)).abs().amax(dim=(0, 1, 3, 4))
    assert diff[2] > 1e-3  # latent frame 2 = frames 5..8, the second chunk


def test_encoder_cache_does_not_grow_with_frames(model):
    sizes = []
    cache = CausalCache()
    with streaming(model.encoder, cache):
        for i, part in enumerate(S.split_time(video(21), S.chunk_plan(21, 4))):
            model.encoder(part)
            sizes.append(cache.nbytes())
    assert sizes[1] > 0 and len(set(sizes)) == 1  # every chunk leaves the same conv state


# ---- decoder network ------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_streamed_decoder_network_equals_one_pass(attention):
    dec = make_model(f"--decoder.attention={attention}").decoder
    x_t, z0, lam = video(13, seed=2), latents(4, seed=3), torch.tensor([0.5])
    full = dec(x_t, z0, lam)
    for plan in ([1, 4, 4, 4], [5, 8], [9, 4]):
        outs, cache = [], CausalCache()
        with streaming(dec, cache):
            for x_c, z_c in zip(S.split_time(x_t, plan), S.split_time(z0, S.latent_plan(plan))):
                outs.append(dec(x_c, z_c, lam))
        torch.testing.assert_close(torch.cat(outs, dim=2), full, **TOL)


def test_streamed_attention_mask_is_the_tail_of_the_block_causal_mask():
    full = block_causal_mask(5, 3)  # 5 frames of 3 tokens
    for frames in (1, 2, 5):
        assert torch.equal(frame_causal_mask(3 * frames, 15, 3), full[-3 * frames:])


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_decoder_state_grows_only_by_middle_tokens(attention):
    # conv state is constant; every middle block keeps a key and a value (width values each) per
    # token of every frame seen
    m = make_model(f"--decoder.attention={attention}")
    size = resolve_decoder(m.cfg.decoder)
    grid = (16 // (size.patch_size * 2 ** len(size.channels))) ** 2  # tokens per 16x16 frame
    cache, sizes = CausalCache(), []
    with streaming(m.decoder, cache):
        for x_c, z_c in zip(S.split_time(video(13), [5, 4, 4]), S.split_time(latents(4), [2, 1, 1])):
            m.decoder(x_c, z_c, torch.tensor([0.0]))
            sizes.append(cache.nbytes())
    per_frame = 2 * size.depth * grid * size.width * 4  # float32
    assert sizes[2] - sizes[1] == sizes[1] - sizes[0] == 4 * per_frame


# ---- temporal window ------------------------------------------------------------------------------


def brute_force_band(q_frames, k_frames, window):
    """allowed[i, j] for query frame q_frames[i] and key frame k_frames[j]: g <= f and f - g < W."""
    return torch.tensor([[g <= f and (window is None or f - g < window) for g in k_frames] for f in q_frames])


@pytest.mark.parametrize("window", [None, 1, 2, 3, 6])
def test_banded_mask_is_the_brute_force_rule(window):
    for frames, tokens in [(1, 1), (5, 3), (7, 2), (9, 1)]:
        frame_of = [i // tokens for i in range(frames * tokens)]
        ref = brute_force_band(frame_of, frame_of, window)
        assert torch.equal(block_causal_mask(frames, tokens, window=window), ref)
        # streamed: the queries are the last frames of the keys, which may start later in the clip
        for past in range(frames):
            keys = frame_of[:(past + 1) * tokens]
            for new in range(1, past + 2):
                queries = keys[-new * tokens:]
                ref = brute_force_band(queries, keys, window)
                assert torch.equal(frame_causal_mask(len(queries), len(keys), tokens, window=window), ref)
    if window is not None:  # a window reaching past the clip's start excludes nothing
        assert torch.equal(block_causal_mask(4, 3, window=window + 3), block_causal_mask(4, 3))


def test_bad_windows_are_clear_errors():
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="window"):
            block_causal_mask(3, 2, window=bad)
    for flag in ("--decoder.temporal_window=2.5", "--decoder.temporal_window=abc"):
        with pytest.raises(ValueError, match="temporal_window"):  # ConfigError, from the config's types
            load_config(None, [flag])
    for value in (0, -1):
        with pytest.raises(ValueError, match="temporal_window"):
            make_model(f"--decoder.temporal_window={value}")
    assert load_config(None, ["--decoder.temporal_window=null"]).decoder.temporal_window is None
    assert load_config(None, []).decoder.temporal_window is None


@pytest.mark.parametrize("attention", ["full", "factorized"])
@pytest.mark.parametrize("window", [1, 3, 6])
def test_streamed_windowed_decoder_equals_one_pass(attention, window, monkeypatch):
    dec = make_model(f"--decoder.attention={attention}", f"--decoder.temporal_window={window}").decoder
    x_t, z0, lam = video(13, seed=2), latents(4, seed=3), torch.tensor([0.5])
    full = dec(x_t, z0, lam)  # 13 x 4 tokens: the band's queries in one block
    with monkeypatch.context() as mp:  # the band's queries in blocks of W frames, as long clips run
        mp.setattr(transformer, "BAND_QUERY_TOKENS", 1)
        torch.testing.assert_close(dec(x_t, z0, lam), full, **TOL)
    # control: the window changes the one-pass network (13 frames reach past every W tested)
    unlimited = make_model(f"--decoder.attention={attention}").decoder
    assert rel_err(unlimited(x_t, z0, lam), full) > 1e-4  # 10x the tolerance of the comparisons below
    for plan in ([1, 4, 4, 4], [5, 8], [9, 4], [1, 12]):
        outs, cache = [], CausalCache()
        with streaming(dec, cache):
            for x_c, z_c in zip(S.split_time(x_t, plan), S.split_time(z0, S.latent_plan(plan))):
                outs.append(dec(x_c, z_c, lam))
        torch.testing.assert_close(torch.cat(outs, dim=2), full, **TOL)


def conv_state_bytes(dec, x_t, z0, lam):
    """What the causal convs keep per stream: kt - stride_t input frames of every conv with a temporal
    kernel, from the input shapes a one-pass forward hands them (forward hooks), float32."""
    total, hooks = [0], []

    def record(m, args):
        b, c, _, h, w = args[0].shape
        total[0] += (m.conv.kernel_size[0] - m.conv.stride[0]) * b * c * h * w * 4

    for m in dec.modules():
        if isinstance(m, CausalConv3d) and m.conv.kernel_size[0] > 1:
            hooks.append(m.register_forward_pre_hook(record))
    try:
        dec(x_t, z0, lam)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


@pytest.mark.parametrize("attention", ["full", "factorized"])
@pytest.mark.parametrize("window", [1, 3, 6])
def test_windowed_decoder_state_stops_growing(attention, window):
    m = make_model(f"--decoder.attention={attention}", f"--decoder.temporal_window={window}")
    size = resolve_decoder(m.cfg.decoder)
    tokens = (16 // (size.patch_size * 2 ** len(size.channels))) ** 2  # tokens per 16x16 frame
    lam = torch.tensor([0.0])
    conv = conv_state_bytes(m.decoder, video(1), latents(1), lam)
    assert conv > 0
    plan = [1, 4, 4, 4, 4]  # 17 frames
    cache, sizes, seen = CausalCache(), [], 0
    with streaming(m.decoder, cache):
        for x_c, z_c in zip(S.split_time(video(17), plan), S.split_time(latents(5), S.latent_plan(plan))):
            m.decoder(x_c, z_c, lam)
            seen += x_c.shape[2]
            # each middle block: a key and a value (width values each) per token of the last W - 1 frames
            kept = min(seen, window - 1)
            assert cache.nbytes() == conv + 2 * size.depth * kept * tokens * size.width * 4
            sizes.append(cache.nbytes())
    assert sizes[2:] == [sizes[2]] * 3  # from 9 frames on (>= W - 1 for every W here) the state is flat


def test_tiled_windowed_decode_equals_one_pass(tmodel):
    m = tiling_model("--decoder.temporal_window=2")
    z0 = latents(3, 12, 10, seed=10)
    full = m.decode(z0, 1, seed=4)
    assert rel_err(tmodel.decode(z0, 1, seed=4), full) > 1e-3  # control: the window matters
    assert_equal_at_fp32(S.decode(m, z0, 4, steps=1, seed=4, tiling=S.Tiling(24)), full)


# ---- decoding (sampler) ---------------------------------------------------------------------------


def reference_decode(model, z0, steps, sampler, seed, end=None):
    """`diffusion.sample` with the model's one-pass denoiser and the per-frame noise as its noise hook,
    from the per-frame initial noise up to the stop logSNR, then the clean prediction there."""
    shape = (z0.shape[0], 3, 1 + 4 * (z0.shape[2] - 1), 8 * z0.shape[3], 8 * z0.shape[4])
    x_init = S.clip_noise(seed, S.NOISE_INIT, 0, 0, shape)
    stop = model.decoder_schedule.logsnr_max if end is None else end
    res = D.sample(model.decoder_denoise(z0), x_init, D.sampling_logsnrs(model.decoder_schedule, steps, logsnr_end=stop),
                   model.cfg.decoder.prediction, sampler, clip_x=1.0,
                   noise=lambda step, shape: S.clip_noise(seed, S.NOISE_STEP, step, 0, shape))
    last = torch.full((z0.shape[0],), stop)
    return D.predict_x_eps(model.decoder(res.z, z0, last), res.z, last, model.cfg.decoder.prediction)[0].clamp(-1, 1)


@pytest.mark.parametrize("sampler,end", [("ddpm", None), ("ddim", None), ("ddpm", 0.0)])
def test_decode_is_diffusion_sample_with_per_frame_noise(model, sampler, end):
    z0, steps = latents(2, seed=4), 3
    ref = reference_decode(model, z0, steps, sampler, 2, end)
    torch.testing.assert_close(model.decode(z0, steps, sampler, seed=2, logsnr_end=end), ref, **TOL)
    torch.testing.assert_close(S.decode(model, z0, 4, first=1, steps=steps, sampler=sampler, seed=2, logsnr_end=end),
                               ref, **TOL)
    assert ref.std() > 0.05


def test_decode_stopping_early_streams_like_one_pass(model):
    z0 = latents(4, seed=5)
    full = model.decode(z0, 2, "ddpm", seed=1, logsnr_end=-2.0)
    torch.testing.assert_close(S.decode(model, z0, 4, first=1, steps=2, sampler="ddpm", seed=1, logsnr_end=-2.0),
                               full, **TOL)
    assert (model.decode(z0, 2, "ddpm", seed=1) - full).abs().max() > 1e-3  # control: the end matters
    for bad in (model.cfg.decoder.logsnr_min, model.cfg.decoder.logsnr_max + 1):
        with pytest.raises(ValueError, match="logsnr_end"):
            model.decode(z0, 2, seed=1, logsnr_end=bad)


@pytest.mark.parametrize("sampler,order", [("ddpm", "chunk"), ("ddpm", "step"), ("ddim", "chunk")])
def test_streamed_decode_equals_one_pass(model, sampler, order):
    z0 = latents(4, seed=5)
    full = model.decode(z0, 2, sampler, seed=1)
    for chunk, first in [(4, 1), (8, 5)]:
        out = S.decode(model, z0, chunk, first=first, steps=2, sampler=sampler, seed=1, order=order)
        torch.testing.assert_close(out, full, **TOL)
    # control: the ancestral noise matters, so equal noise per frame is what makes them agree
    if sampler == "ddpm":
        assert (model.decode(z0, 2, sampler, seed=2) - full).abs().max() > 1e-3


def test_stream_reconstruct_equals_one_pass(model):
    x = video(13, seed=6)
    ref = model.reconstruct(x, 2, seed=3)
    parts = list(S.stream_reconstruct(model, S.split_time(x, [5, 4, 4]), steps=2, seed=3))
    assert [p.shape[2] for p in parts] == [5, 4, 4]
    torch.testing.assert_close(torch.cat(parts, dim=2), ref, **TOL)
    mean = list(S.stream_reconstruct(model, S.split_time(x, [5, 8]), steps=2, seed=3, latent_noise="mean"))
    torch.testing.assert_close(torch.cat(mean, dim=2), model.reconstruct(x, 2, latent_noise="mean", seed=3), **TOL)
    assert (model.reconstruct(x, 2, seed=4) - ref).abs().max() > 1e-3


def test_latent_noise_is_per_frame():
    # a seed draws eps_z per latent frame: the frames of a chunk starting at latent frame j are the
    # frames j.. of the whole clip's z0, and eps_z is N(0, I)
    m = make_model()
    z = torch.randn(2, 4, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    z0 = m.noisy_latent(z, 7)
    torch.testing.assert_close(m.noisy_latent(z[:, :, 2:], 7, start=2), z0[:, :, 2:])
    eps = (m.noisy_latent(torch.zeros(64, 4, 6, 8, 8), 7) / m.sigma0).flatten()
    assert abs(eps.mean().item()) < 0.02 and abs(eps.std().item() - 1) < 0.02
    assert not torch.equal(m.noisy_latent(z, 8), z0)


def test_mse_decoder_streams_like_its_one_prediction():
    # the MSE baseline decodes with one network evaluation from zeros at logsnr_min: chunked and tiled
    # it equals the loss's deterministic decode, whatever the steps and seed
    m = make_model("--ul.model=mse_decoder")
    z0 = latents(3, seed=8)
    ref = m.predict(z0).clamp(-1, 1)
    assert_equal_at_fp32(m.decode(z0, 7, seed=3), ref)
    assert_equal_at_fp32(S.decode(m, z0, 4, steps=2, seed=1), ref)
    assert_equal_at_fp32(S.decode(m, z0, 4, steps=2, seed=1, tiling=S.Tiling(8)), ref)


def test_cli_decode_is_one_clip_chunked_tiled_or_not(model, tmp_path, capsys):
    """`ulvideo decode` with and without --chunk, and tiled, writes the library's clip for the seed."""
    from safetensors.torch import save_file

    from ulvideo.cli import main as cli_main
    from ulvideo.exports import save_export
    from ulvideo.videoio import read_image, to_uint8

    export = save_export(tmp_path / "e", model.state_dict(), model.cfg, {"stage": "ul"})
    z = latents(3, seed=11)[0]
    save_file({"z_clean": z.contiguous()}, str(tmp_path / "z.safetensors"))

    def cli(*extra, seed=5):
        out = tmp_path / f"clip{len(list(tmp_path.iterdir()))}.png"
        assert cli_main(["decode", "--export", str(export), "--input", str(tmp_path / "z.safetensors"), "--out", str(out),
                         "--steps", "2", "--seed", str(seed), *map(str, extra)]) == 0
        return torch.from_numpy(read_image(str(out))[0]).int()

    lib = to_uint8(model.decode(model.noisy_latent(z[None], 5), 2, "ddpm", seed=5))[0]
    lib = torch.from_numpy(np.concatenate(list(lib), axis=1)).int()  # frames side by side, as the .png
    for extra in ((), ("--chunk", 4), ("--chunk", 4, "--tile", 8), ("--tile", 8)):
        got = cli(*extra)
        assert got.shape == lib.shape and (got - lib).abs().max() <= 1 and (got != lib).float().mean() < 1e-3
    assert (cli(seed=6) - lib).abs().max() > 10  # control: another seed, another clip
    assert cli_main(["decode", "--export", str(export), "--input", str(tmp_path / "z.safetensors"),
                     "--out", str(tmp_path / "bad.png"), "--logsnr-end", "99"]) == 2
    assert "logsnr_end = 99" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()
    assert cli_main(["decode", "--export", str(export), "--input", str(tmp_path / "z.safetensors"),
                     "--out", str(tmp_path / "bad.png"), "--chunk", "3"]) == 2
    assert "chunks of" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()


# ---- tiling ---------------------------------------------------------------------------------------


def tiling_model(*overrides):
    """Tiny networks with every path non-trivial: zero-initialised layers random, norm gains random
    around 1. The encoder downsamples 4x (halo 20 px instead of 40 px), so that on 64 px
    frames most tiles' halos end inside the frame (the decoder's halo is 40 px: some do)."""
    m = make_model("--encoder.spatial_downsample=4", "--encoder.channels=[8,16,32]", *overrides)
    perturb_zero_inits(m.encoder, seed=2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in m.modules():
            if isinstance(norm, ChannelRMSNorm) and norm.weight is not None:
                norm.weight.copy_(1 + 0.3 * torch.randn(norm.weight.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def tmodel():
    return tiling_model()


def assert_equal_at_fp32(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_tile_layout_partitions_the_frame():
    for h, w, tile, halo in [(64, 56, 24, 16), (40, 40, 16, 8), (32, 48, 64, 8), (96, 72, 32, 0)]:
        cover = torch.zeros(h, w, dtype=torch.long)
        for t in S.tile_layout(h, w, tile, halo, 8):
            cover[t.cy0:t.cy1, t.cx0:t.cx1] += 1
            assert (t.cy1 - t.cy0, t.cx1 - t.cx0) == (min(tile, h - t.cy0), min(tile, w - t.cx0))
            assert (t.y0, t.y1, t.x0, t.x1) == (max(0, t.cy0 - halo), min(h, t.cy1 + halo),
                                                max(0, t.cx0 - halo), min(w, t.cx1 + halo))
            assert t.cy0 % tile == 0 and t.cx0 % tile == 0 and t.y0 % 8 == 0 and t.x0 % 8 == 0
        assert (cover == 1).all()
    for bad in [(64, 64, 12, 8), (64, 64, 16, 4), (60, 64, 16, 8), (64, 64, 0, 8)]:
        with pytest.raises(ValueError):
            S.tile_layout(*bad, 8)


def test_tiling_is_exact_for_a_finite_receptive_field():
    # three 3x3 convs, the middle one strided: an output cell (2x2 px) depends on input pixels within
    # 1 + 1 + 2 = 4 px of it (radius 1 at 1 px, 1 at 1 px, 1 cell of 2 px)
    torch.manual_seed(0)
    net = nn.Sequential(CausalConv3d(3, 8, 3), ChannelRMSNorm(8), nn.SiLU(), CausalConv3d(8, 8, 3, stride=(1, 2, 2)),
                        nn.SiLU(), CausalConv3d(8, 4, 3)).eval()
    x = video(3, 80, 96, seed=8)
    full = net(x)
    assert S.conv_reach(net, lambda: net(x[..., :8, :8]), (8, 8)) == 4
    for tile in (16, 22, 48):
        out = S._tiled(lambda t, xt: net(xt), x, S.tile_layout(80, 96, tile, 4, 2), 2)
        torch.testing.assert_close(out, full, **TOL)
    short = S._tiled(lambda t, xt: net(xt), x, S.tile_layout(80, 96, 22, 2, 2), 2)
    assert (short - full).abs().max() > 1e-3  # a halo short of the reach: zero padding at tile edges leaks in


class FrameMeanRemoved(nn.Module):
    """x minus its mean over each frame's positions: a statistic over space, as a frame norm has."""

    def forward(self, x):
        return x - x.mean(dim=(-2, -1), keepdim=True)


@pytest.mark.parametrize("stat", [nn.GroupNorm(4, 8), FrameMeanRemoved()])
def test_statistics_over_space_are_refused(stat):
    """A tile cannot know a statistic over the whole frame from its halo: such a network has no finite
    reach, and the trace says so instead of returning one (the same network without it traces)."""
    torch.manual_seed(0)
    net = nn.Sequential(CausalConv3d(3, 8, 3), stat, nn.SiLU(), CausalConv3d(8, 4, 3)).eval()
    x = video(3, 8, 8, seed=8)
    with pytest.raises(ValueError, match="statistics over space"):
        S.conv_reach(net, lambda: net(x), (8, 8))
    local = nn.Sequential(net[0], ChannelRMSNorm(8), net[2], net[3])
    assert S.conv_reach(local, lambda: local(x), (8, 8)) == 2


def gradient_reach(out, inputs, cells, y, cell=1):
    """How far beyond the output cell (y, y) (rows y * cell ... (y + 1) * cell - 1) the input rows it
    depends on lie, in pixels; `cells`: pixels per row of each input (a row counts with all its pixels)."""
    grads = torch.autograd.grad(out[..., y, y].sum(), inputs, retain_graph=True)
    reach = 0
    for g, d in zip(grads, cells):
        rows = g.abs().sum(dim=(0, 1, 2, 4)).nonzero().flatten()
        reach = max(reach, y * cell - d * int(rows.min()), d * int(rows.max()) + d - (y + 1) * cell)
    return reach


def test_traced_reach_is_the_receptive_field():
    # reference: the support of the gradient of one output pixel (the norms are per position); by hand
    # from the configs (radius 1 of every 3x3 conv times its input's cell size; an upsampling from
    # cells of d to d' pixels adds d - d'):
    #   encoder (4x): conv_in 1 + block 2 + down 1 + block 4 + down 2 + block 8 = 18
    #   decoder (patch 2, stages at 2 and 4 px, latent at 4 px): skip_0 = max(conv_in 2, injection 4
    #   + depth-to-space 2) + block 4 = 10; skip_1 = 10 + down 2 + block 8 = 20; the middle input
    #   (8 px cells) 20 + down 4 = 24; up: block 8 on 20, upsampling 2, block 4, conv_out 2,
    #   unpatchify 1 = 37
    m, n = tiling_model(), 112
    enc, dec = m.encoder, m.decoder
    x = torch.randn(1, 3, 1, n, n, requires_grad=True)
    z0 = torch.randn(1, 4, 1, n // 4, n // 4, requires_grad=True)

    def down_up(x, z0):
        emb = dec.embed(torch.zeros(1), x)
        h, skips = dec.down(x, z0, emb)
        return h, dec.up(torch.zeros(h.shape), skips, emb)  # the middle is given, not tiled

    assert S.conv_reach(enc, lambda: enc(x[..., :4, :4]), (4, 4)) == 18
    assert S.conv_reach(dec, lambda: down_up(x[..., :8, :8], z0[..., :2, :2])[0], (8, 8)) == 24
    assert S.conv_reach(dec, lambda: down_up(x[..., :8, :8], z0[..., :2, :2])[1], (8, 8)) == 37
    with torch.enable_grad():
        z, (h, out) = enc(x), down_up(x, z0)
        # the largest reach is met at some positions within an 8 px block, not all
        assert max(gradient_reach(z, [x], [1], y, 4) for y in (14, 15)) == 18
        assert gradient_reach(h, [x, z0], [1, 4], 7, 8) == 24
        assert max(gradient_reach(out, [x, z0], [1, 4], y) for y in range(56, 64)) == 37
    # rounded up to 4 and 8 px
    assert S.encoder_halo(enc) == 20 and S.decoder_halos(dec) == (24, 40)
    # the default tiny networks (8x encoder): 1 + 2 + 1 + 4 + 2 + 8 + 4 + 16 = 38 -> 40
    assert S.encoder_halo(make_model().encoder) == 40


@pytest.mark.parametrize("tile", [16, 24, 40])
def test_tiled_encode_equals_one_pass(tmodel, tile):
    x = video(5, 64, 56, seed=13)  # 24 and 40 px tiles do not divide 64 x 56
    ref = tmodel.encode(x)
    assert_equal_at_fp32(S.encode(tmodel, x, None, tiling=S.Tiling(tile)), ref)
    if tile == 24:  # control: a halo 4 px short of the reach
        enc = tmodel.encoder
        short = S._tiled(lambda t, xt: enc(xt), x, S.tile_layout(64, 56, tile, 16, 4), 4)
        assert (short - ref).abs().max() > 1e-3 * ref.abs().max()


@pytest.mark.parametrize("tile,attention", [(16, "full"), (24, "full"), (40, "factorized")])
def test_tiled_decoder_network_equals_one_pass(tile, attention):
    m = tiling_model(f"--decoder.attention={attention}")
    x_t = torch.randn(1, 3, 5, 64, 56, generator=torch.Generator().manual_seed(14))
    z0, lam = latents(2, 16, 14, seed=15), torch.tensor([0.7])
    ref = m.decoder(x_t, z0, lam)
    assert_equal_at_fp32(S.tiled_denoise(m, z0, S.Tiling(tile))(x_t, lam), ref)
    if tile == 24:  # controls: either halo one alignment step (8 px) short of its reach (24 and 37 px)
        for halos in ((16, 40), (24, 32)):
            short = S._decoder_call(m.decoder, x_t, z0, lam, None, 0, S.decoder_layout(m.decoder, 64, 56, S.Tiling(24), halos))
            assert (short - ref).abs().max() > 1e-4 * ref.abs().max()


def test_tiled_streaming_equals_one_pass(tmodel):
    # every tile streams through its own state (per step for the decoder), the middle through one
    x = video(9, 48, 40, seed=9)
    assert_equal_at_fp32(S.encode(tmodel, x, 4, tiling=S.Tiling(24)), tmodel.encode(x))
    z0 = latents(3, 12, 10, seed=10)
    full = tmodel.decode(z0, 1, seed=4)
    assert_equal_at_fp32(S.decode(tmodel, z0, 4, steps=1, seed=4, tiling=S.Tiling(24)), full)
    assert_equal_at_fp32(S.decode(tmodel, z0, 4, steps=1, seed=4, tiling=S.Tiling(16), order="step"), full)


def test_tiling_the_real_networks_is_exact(model):
    """The default tiny networks (8x encoder, 40 px halos) on 64x64 clips, with a tile smaller than the
    halo and one larger."""
    x = video(5, 64, 64, seed=11)
    z = model.encode(x)
    z0, lam = model.noisy_latent(z, 1), torch.tensor([0.0])
    x_t = torch.randn(1, 3, 5, 64, 64, generator=torch.Generator().manual_seed(12))
    full = model.decoder(x_t, z0, lam)
    for tile in (32, 48):
        assert rel_err(S.encode(model, x, None, tiling=S.Tiling(tile)), z) < 1e-5
        assert rel_err(S.tiled_denoise(model, z0, S.Tiling(tile))(x_t, lam), full) < 1e-5
