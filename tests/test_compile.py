"""torch.compile applied from outside (ulvideo/train/apply.py): every network compiles as one graph
(fullgraph=True: a graph break is an error), and the compiled network agrees with the eager one,
forward and gradients, within float32 round-off.

Graph breaks are a property of dynamo's trace, not of the backend: the default suite traces every
network, forward and backward, with the "aot_eager" backend (seconds) and compiles the encoder with
CPU inductor; inductor on the other networks takes minutes of C++ compilation on a small machine
(the decoder ~4 min on 2 busy cores) and is marked slow.

Tolerance: inductor fuses and reorders float32 reductions (norm statistics, convolution and matmul
epilogues), so results differ from eager by round-off only. Per tensor (output, input gradients,
every parameter's gradient): max |compiled - eager| <= 1e-4 · max |eager| (float32 round-off summed
over the ~1e4 terms of a weight gradient; observed up to ~1e-5). Tiny shapes keep each network's
first compile short.
"""
from __future__ import annotations

import copy

import pytest
import torch

from ulvideo.config import BaseConfig, Config, DecoderConfig, EncoderConfig, PriorConfig
from ulvideo.nets import Decoder, Encoder, LatentTransformer
from ulvideo.train.apply import apply_activation_checkpointing, compile_networks

REL_TOL = 1e-4


def assert_close(a: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    err = (a - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= REL_TOL * max(scale, 1e-6), f"{what}: max error {err:.3g} vs max |eager| {scale:.3g}"
C = 4


def _perturbed(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Zero-initialised layers (output convs, adaLN) would make outputs constant and most gradients 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def _inputs(kind: str):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 5, 16, 16, generator=g) * 2 - 1
    z = torch.randn(2, C, 2, 4, 4, generator=g)
    logsnr = torch.tensor([-3.0, 2.0])
    if kind == "encoder":
        return (x,), {}
    if kind == "prior":
        return (z, logsnr), {}
    if kind == "decoder":
        return (x, z, logsnr), {}
    text = torch.randn(2, 3, 8, generator=g)
    text_mask = torch.tensor([[True, True, False], [True, False, False]])
    context_mask = torch.tensor([[True, False], [False, False]])
    return (z, logsnr), {"text_emb": text, "text_mask": text_mask, "label": torch.tensor([1, -1]),
                         "context": z * 0.5, "context_mask": context_mask}


def _network(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    enc = EncoderConfig(latent_channels=C, spatial_downsample=4, channels=(8, 16, 16))
    if kind == "encoder":
        net = Encoder(enc)
    elif kind == "prior":
        net = LatentTransformer(PriorConfig(size="tiny", temporal_causal=True), C)
    elif kind == "decoder":
        net = Decoder(DecoderConfig(size="tiny", temporal_window=1), C, 4, 4)
    else:  # the base model with every condition: text cross-attention, labels, context frames
        net = LatentTransformer(BaseConfig(size="tiny", num_classes=3, context_frames=1), C, text_dim=8)
    return _perturbed(net)


def _forward_backward(net, args, kwargs):
    args = [a.clone().requires_grad_(a.is_floating_point() and a.ndim == 5) for a in args]
    out = net(*args, **kwargs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(g)
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    return out, [a.grad for a in args if a.grad is not None], grads


SLOW = pytest.mark.slow


@pytest.mark.parametrize("backend,kind", [
    ("aot_eager", "encoder"), ("aot_eager", "prior"), ("aot_eager", "decoder"), ("aot_eager", "base"),
    ("inductor", "encoder"), pytest.param("inductor", "prior", marks=SLOW),
    pytest.param("inductor", "decoder", marks=SLOW), pytest.param("inductor", "base", marks=SLOW)])
def test_network_compiles_as_one_graph_and_agrees_with_eager(backend, kind):
    torch._dynamo.reset()
    eager = _network(kind)
    net = copy.deepcopy(eager)
    assert compile_networks(net, fullgraph=True, backend=backend) == [type(net).__name__]
    args, kwargs = _inputs(kind)
    out, input_grads, grads = _forward_backward(net, args, kwargs)
    ref_out, ref_input_grads, ref_grads = _forward_backward(eager, args, kwargs)
    assert_close(out, ref_out, "output")
    assert len(input_grads) == len(ref_input_grads) > 0
    for i, (a, r) in enumerate(zip(input_grads, ref_input_grads)):
        assert_close(a, r, f"input {i} gradient")
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        assert_close(grads[name], ref_grads[name], name)


def test_compile_with_activation_checkpointing_agrees_with_eager():
    torch._dynamo.reset()
    eager = _network("prior")
    net = copy.deepcopy(eager)
    assert apply_activation_checkpointing(net) == len(net.blocks) > 0
    compile_networks(net, fullgraph=True, backend="aot_eager")  # each checkpointed block: a recomputed region
    args, kwargs = _inputs("prior")
    out, _, grads = _forward_backward(net, args, kwargs)
    ref_out, _, ref_grads = _forward_backward(eager, args, kwargs)
    assert_close(out, ref_out, "output")
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], name)


def test_compile_networks_finds_the_outermost_networks_only():
    from ulvideo.train.objectives import StageOne

    cfg = Config()
    cfg.encoder.size = cfg.prior.size = cfg.decoder.size = "tiny"
    cfg.ul.startup_recon_weight = 1.0
    objective = StageOne(cfg)
    names = compile_networks(objective)  # nothing runs: torch.compile is lazy
    assert names == ["model.encoder", "model.prior", "model.decoder", "startup.readout"]
    assert compile_networks(objective) == []  # applying twice changes nothing
    assert list(objective.state_dict()) == list(StageOne(cfg).state_dict())  # same keys: same checkpoints


def test_streamed_calls_of_a_compiled_decoder_run_eager():
    """A streamed pass keeps per-chunk state in its modules: the compiled network hands it to the
    eager forward (no graph is traced for it), and the chunks still equal the one-pass output."""
    from ulvideo.nets.layers import CausalCache, streaming

    torch._dynamo.reset()
    eager = _network("decoder")
    net = copy.deepcopy(eager)
    compile_networks(net, fullgraph=True, backend="aot_eager")
    x, z, logsnr = _inputs("decoder")[0]
    with torch.no_grad():
        frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        outs, cache = [], CausalCache()
        with streaming(net, cache):
            outs.append(net(x[:, :, :1], z[:, :, :1], logsnr))
            outs.append(net(x[:, :, 1:], z[:, :, 1:], logsnr))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_before
        assert_close(torch.cat(outs, dim=2), eager(x, z, logsnr), "streamed output")


def test_cli_takes_compile_and_a_streamed_decode_is_the_same_clip(tmp_path):
    """`--compile` exists on encode, decode and generate; `decode --compile --chunk` (streamed, so
    eager) writes the clip of `decode --chunk`."""
    from safetensors.torch import save_file

    from ulvideo.cli import build_parser, main as cli_main
    from ulvideo.config import load_config
    from ulvideo.exports import save_export
    from ulvideo.ul import UnifiedLatents
    from ulvideo.videoio import read_image

    parser = build_parser()
    for argv in (["encode", "--export", "e", "--input", "x.mp4", "--out", "z"],
                 ["generate", "--export", "e", "--base", "b", "--out", "o.mp4"],
                 ["decode", "--export", "e", "--input", "z", "--out", "o.png"]):
        assert parser.parse_args(argv + ["--compile"]).compile and not parser.parse_args(argv).compile
    cfg = load_config(None, ["--encoder.latent_channels=4", "--encoder.spatial_downsample=4", "--encoder.channels=[8,16,16]",
                             "--decoder.channels=[8,16]", "--decoder.width=32", "--data.height=16", "--data.width=16"])
    torch.manual_seed(0)
    model = _perturbed(UnifiedLatents(cfg))
    export = save_export(tmp_path / "e", model.state_dict(), cfg, {"stage": "ul"})
    save_file({"z_clean": torch.randn(4, 2, 4, 4).contiguous()}, str(tmp_path / "z.safetensors"))
    clips = []
    for extra in ([], ["--compile"]):
        out = tmp_path / f"clip{len(clips)}.png"
        assert cli_main(["decode", "--export", str(export), "--input", str(tmp_path / "z.safetensors"), "--out", str(out),
                         "--steps", "2", "--chunk", "4", *extra]) == 0
        clips.append(torch.from_numpy(read_image(str(out))[0]).int())
    assert torch.equal(clips[0], clips[1])


def test_frames_attention_compiles_as_one_graph():
    """SDPA per frame (the CPU path of long block-causal attention) inside a compiled network."""
    from ulvideo.kernels.frames import frames_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 8, generator=g) for _ in range(3))
    fn = torch.compile(lambda a, b, c: frames_attention(a, b, c, causal_block=4, window=2), fullgraph=True,
                       backend="aot_eager")
    results = []
    for f in (fn, lambda a, b, c: frames_attention(a, b, c, causal_block=4, window=2)):
        inp = [t.clone().requires_grad_() for t in (q, k, v)]
        out = f(*inp)
        out.backward(torch.ones_like(out))
        results.append([out, *(t.grad for t in inp)])
    for a, r in zip(*results):
        assert_close(a, r, "frames attention")


def test_compile_with_zero3_is_refused_before_any_process_group():
    from ulvideo.config import ConfigError, load_config
    from ulvideo.train.loop import check_config

    cfg = load_config(None, ["--train.compile=true", "--train.zero_stage=3"])
    with pytest.raises(ConfigError, match="train.compile needs train.zero_stage 0, 1 or 2"):
        check_config(cfg, 1)
    for stage in (0, 1, 2):
        check_config(load_config(None, ["--train.compile=true", f"--train.zero_stage={stage}"]), 1)
