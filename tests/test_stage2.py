"""Stage 2: latent shards, base-model training through `ulvideo train`, generation contracts."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ulvideo import diffusion as D
from conftest import run_ulvideo
from ulvideo.exports import ExportError, save_export
from ulvideo.config import load_config
from ulvideo.exports import load_stage1
from ulvideo.generate import load_pipeline
from ulvideo.ul import Condition, UnifiedLatents

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--data.num_frames=5", "--data.resolution=16", "--data.height=16", "--data.width=16",
         "--data.heldout_fraction=0.0", "--encoder.latent_channels=4"]
TRAIN = ["--train.global_batch_size=4", "--train.micro_batch_size=4", "--train.log_every=1", "--eval.every=0",
         "--train.ckpt_every=100", "--train.warmup_steps=2", "--ul.eval_logsnr_samples=2"]


OUTPUT = {}  # the stage-2 training run's output, from the `pair` fixture


def ulvideo(*args, check=True):
    return run_ulvideo(*args, check=check)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """An (untrained) stage-1 export, shards made with it, and a base model trained 3 steps on them."""
    tmp = tmp_path_factory.mktemp("stage2")
    torch.manual_seed(0)
    cfg1 = load_config(ROOT / "configs/ul/tiny.yaml", SMALL)
    stage1 = UnifiedLatents(cfg1)
    export1 = save_export(tmp / "stage1", stage1.state_dict(), cfg1, {"stage": "ul", "step": 0, "latent_logsnr": 5.0,
                                                                        "prior_logsnr_min": -10.0})
    data = tmp / "shapes"
    ulvideo("data", "synth", "--out", data, "--num", 12, "--frames", 5, "--size", 16, "--seed", 1)
    shards = tmp / "latents"
    ulvideo("encode", "--export", export1, "--data", data, "--out", shards, "--shard-size", 5)
    run = tmp / "base"
    OUTPUT["train"] = ulvideo("train", "configs/base/tiny.yaml", "--run-dir", run, f"--base.stage1_export={export1}",
                              f"--data.path={shards}", "--train.steps=3", "--base.context_frames=1", *SMALL, *TRAIN,
                              "--eval.every=3", "--eval.num_clips=4")
    return export1, shards, run / "exports" / "latest.safetensors", data


def test_stage2_evaluation_and_final_message(pair):
    """The evaluation row (tightness) is printed, and the final message names what the run wrote:
    no reconstructions (stage 2 writes none), and the generate command that uses its export."""
    export1, _, base, _ = pair
    run, out = base.parent.parent, OUTPUT["train"].stdout
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    [e] = [r for r in rows if "eval/null_over_prior" in r]
    assert e["step"] == 3 and e["eval/null_over_prior"] == pytest.approx(
        e["eval/base_elbo_null_bits_per_clip"] / e["eval/stage1_prior_bits_per_clip"], rel=1e-4)
    assert (f"eval step 3: stage-1 prior {e['eval/stage1_prior_bits_per_clip']:.1f} bits/clip vs base ELBO "
            f"{e['eval/base_elbo_null_bits_per_clip']:.1f} (null condition") in out
    final = out[out.index("done: step 3"):]
    assert str(base) in final and str(run / "checkpoints" / "step_00000003") in final
    assert "samples" not in final and "reconstructions" not in final and not (run / "samples").exists()
    assert f"ulvideo generate --export {export1} --base {base} --context VIDEO" in final


def test_encode_writes_shards_with_text(pair):
    export1, shards, _, data = pair
    info = json.loads((shards / "encoding.json").read_text())
    assert info["clips"] == 12 and info["shards"] == 3 and info["text_encoder"].startswith("minilm")
    meta = json.loads((shards / "shard-00000.json").read_text())
    enc = load_config(ROOT / "configs/ul/tiny.yaml", SMALL).encoder  # 5 frames at 16x16
    latent = [enc.latent_channels, 1 + 4 // enc.temporal_downsample, 16 // enc.spatial_downsample, 16 // enc.spatial_downsample]
    assert meta["count"] == 5 and meta["shape"] == latent and meta["text"]
    # the shard's latents are the encoder's output on the same (centred) clip
    from safetensors.torch import load_file

    from ulvideo.generate import read_input

    stage1 = load_stage1(export1)
    src = meta["sources"][0]
    x = read_input(str(data / src) if not Path(src).is_absolute() else src, 5, stage1.cfg)
    with torch.no_grad():
        torch.testing.assert_close(load_file(str(shards / "shard-00000.safetensors"))["z_clean"][0], stage1.encode(x)[0],
                                   rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def pipe(pair):
    return load_pipeline(pair[0], pair[2])


def test_generate_shapes_and_determinism(pipe):
    kw = dict(num_frames=5, steps=3, decoder_steps=2)
    a = pipe(["a small red circle moving left", "a large blue square moving up"], seed=1, **kw)
    b = pipe(["a small red circle moving left", "a large blue square moving up"], seed=1, **kw)
    c = pipe(["a small red circle moving left", "a large blue square moving up"], seed=2, **kw)
    assert a.shape == (2, 5, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    nine = pipe(["a small red circle moving left"], seed=1, num_frames=9, steps=2, decoder_steps=2)
    assert nine.shape == (1, 9, 16, 16, 3)


def test_generation_defaults_are_the_documented_ones(pipe, monkeypatch):
    """By default guidance 4, a DDPM base sampler and a DDIM decoder: the same as running the two by
    hand; the CLI's defaults are the pipeline's."""
    import inspect

    from ulvideo.cli import build_parser
    from ulvideo.videoio import to_uint8

    prompts = ["a small red circle moving left"]
    shape = (1, pipe.stage1.latent_channels, *pipe.stage1.encoder.latent_shape(5, 16, 16))
    cond, null = pipe.condition(prompts, None, None, shape)
    z0 = pipe.base.sample(shape, cond, null, 4.0, 3, "ddpm", torch.Generator().manual_seed(4)).z
    ref = to_uint8(pipe.stage1.decode(z0, 3, "ddim", seed=4))
    calls = []
    for model, name in ((pipe.base, "sample"), (pipe.stage1, "decode")):
        def spy(*a, _f=getattr(model, name), _n=name, **k):
            calls.append((_n, a[3:6] if _n == "sample" else a[1:]))
            return _f(*a, **k)
        monkeypatch.setattr(model, name, spy)
    got = pipe(prompts, seed=4, num_frames=5, steps=3, decoder_steps=3)
    assert calls == [("sample", (4.0, 3, "ddpm")), ("decode", (3, "ddim", 4, pipe.stage1.decoder_logsnr_end()))]
    assert np.array_equal(got, ref)
    assert not np.array_equal(got, pipe(prompts, seed=4, num_frames=5, steps=3, decoder_steps=3, decoder_sampler="ddpm"))
    args = build_parser().parse_args(["generate", "--export", "a", "--base", "b", "--out", "o.mp4"])
    sig = inspect.signature(type(pipe).__call__).parameters
    for cli_name, name in (("guidance", "guidance"), ("sampler", "sampler"), ("decoder_sampler", "decoder_sampler"),
                           ("steps", "steps"), ("decoder_steps", "decoder_steps"), ("decode_from", "decode_from"),
                           ("decoder_logsnr_end", "decoder_logsnr_end")):
        assert getattr(args, cli_name) == sig[name].default, name
    assert (args.guidance, args.sampler, args.decoder_sampler) == (4.0, "ddpm", "ddim")


def test_decoder_stop_is_an_argument(pair, pipe):
    """The stop logSNR reaches the decoder from `__call__` or `load_pipeline`, never from the model."""
    from ulvideo.videoio import to_uint8

    kw = dict(seed=2, num_frames=5, steps=2, decoder_steps=2)
    early = pipe(["a red circle"], decoder_logsnr_end=0.0, **kw)
    assert not np.array_equal(early, pipe(["a red circle"], **kw))
    assert np.array_equal(early, load_pipeline(pair[0], pair[2], decoder_logsnr_end=0.0)(["a red circle"], **kw))
    shape = (1, pipe.stage1.latent_channels, *pipe.stage1.encoder.latent_shape(5, 16, 16))
    cond, null = pipe.condition(["a red circle"], None, None, shape)
    z0 = pipe.base.sample(shape, cond, null, 4.0, 2, "ddpm", torch.Generator().manual_seed(2)).z
    assert np.array_equal(early, to_uint8(pipe.stage1.decode(z0, 2, "ddim", seed=2, logsnr_end=0.0)))
    with pytest.raises(ValueError, match="logsnr_end"):
        pipe(["a red circle"], decoder_logsnr_end=99.0, **kw)
    with pytest.raises(ValueError, match="logsnr_end"):
        load_pipeline(pair[0], pair[2], decoder_logsnr_end=-99.0)


def test_guidance_one_is_the_conditional_prediction(pipe):
    shape = (2, pipe.stage1.latent_channels, *pipe.stage1.encoder.latent_shape(5, 16, 16))
    cond, null = pipe.condition(["a red circle", "a blue square"], None, None, shape)
    res = pipe.base.sample(shape, cond, null, guidance=1.0, steps=3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=g)
    ref = D.sample(pipe.base.denoise(cond), z, D.sampling_logsnrs(pipe.base.schedule, 3), "v", "ddpm", generator=g)
    assert torch.equal(res.z, ref.z)
    guided = pipe.base.sample(shape, cond, null, guidance=3.0, steps=3, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(guided.z, res.z)


def test_frame_prediction_keeps_the_context(pair, pipe):
    data = pair[3]
    from ulvideo.generate import read_input

    ctx = read_input(str(data / "shape_00003.mp4"), 5, pipe.stage1.cfg)
    shape = (1, pipe.stage1.latent_channels, *pipe.stage1.encoder.latent_shape(5, 16, 16))
    cond, null = pipe.condition([""], None, ctx, shape)
    assert cond.context_mask.tolist() == [[True, False]]
    res = pipe.base.sample(shape, cond, null, steps=4, generator=torch.Generator().manual_seed(0))
    z_ctx = pipe.stage1.encode(ctx)[:, :, :1]
    a0, s0 = pipe.stage1.alpha0, pipe.stage1.sigma0
    # the given latent frame comes back as its forward-noised self at lambda_0: within a few sigma_0
    assert (res.z[:, :, :1] - a0 * z_ctx).abs().max() < 5 * s0
    free = pipe.base.sample(shape, null, null, steps=4, generator=torch.Generator().manual_seed(0))
    assert (free.z[:, :, :1] - a0 * z_ctx).abs().max() > 5 * s0
    video = pipe([""], seed=0, num_frames=5, steps=2, decoder_steps=2, context=ctx)
    assert video.shape == (1, 5, 16, 16, 3)


def test_base_elbo_with_context_counts_only_generated_frames(pipe):
    z = torch.randn(3, 4, 2, 2, 2)
    mask = torch.tensor([[True, False]] * 3)
    cond = Condition(context=z * mask.view(3, 1, 2, 1, 1), context_mask=mask)
    m = pipe.base.target_mask(z, cond)
    assert m.shape == (3, 1, 2, 1, 1) and m[:, :, 0].sum() == 0 and m[:, :, 1].sum() == 3


def test_errors_are_clear(pair, tmp_path):
    export1, _, base, _ = pair
    cfg_other = load_config(ROOT / "configs/ul/tiny.yaml", SMALL + ["--ul.latent_logsnr=4.0"])
    other = save_export(tmp_path / "other", UnifiedLatents(cfg_other).state_dict(), cfg_other,
                        {"stage": "ul", "latent_logsnr": 4.0, "prior_logsnr_min": -10.0})
    with pytest.raises(ExportError, match="do not belong together"):
        load_pipeline(other, base)
    with pytest.raises(ExportError, match="not found"):
        load_pipeline(tmp_path / "missing.safetensors", base)
    r = ulvideo("train", "configs/base/tiny.yaml", "--run-dir", tmp_path / "r", f"--base.stage1_export={export1}",
                f"--data.path={pair[1]}", f"--base.text_encoder={tmp_path / 'no_such_t5'}", *SMALL, check=False)
    assert r.returncode != 0 and "no_such_t5" in r.stdout + r.stderr
    r = ulvideo("generate", "--export", export1, "--base", tmp_path / "nope.safetensors", "--prompt", "x",
                "--out", tmp_path / "o.mp4", check=False)
    assert r.returncode == 2 and "not found" in r.stderr
    r = ulvideo("generate", "--export", export1, "--base", base, "--prompt", "x", "--decoder-logsnr-end", 99,
                "--out", tmp_path / "o.mp4", check=False)
    assert r.returncode == 2 and "logsnr_end = 99" in r.stderr and not (tmp_path / "o.mp4").exists()
