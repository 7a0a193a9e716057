"""I3D network and weight loading: key layout, TF SAME padding, determinism, clear errors."""
import hashlib
from pathlib import Path
import math

import pytest
import torch

from ulvideo.eval import fvd
from ulvideo.eval.i3d import MIN_FRAMES, InceptionI3d, _same_pad

# The public i3d_pretrained_400.pt layout (VideoGPT / TATS / cd-FVD `pytorch_i3d.py`), written out
# here from that layout: (name, in, out, kernel) of every convolution, blocks as
# (b0, b1a, b1b, b2a, b2b, b3b) output channels.
STEM = [("Conv3d_1a_7x7", 3, 64, 7), ("Conv3d_2b_1x1", 64, 64, 1), ("Conv3d_2c_3x3", 64, 192, 3)]
BLOCKS = [("Mixed_3b", [64, 96, 128, 16, 32, 32]), ("Mixed_3c", [128, 128, 192, 32, 96, 64]),
          ("Mixed_4b", [192, 96, 208, 16, 48, 64]), ("Mixed_4c", [160, 112, 224, 24, 64, 64]),
          ("Mixed_4d", [128, 128, 256, 24, 64, 64]), ("Mixed_4e", [112, 144, 288, 32, 64, 64]),
          ("Mixed_4f", [256, 160, 320, 32, 128, 128]), ("Mixed_5b", [256, 160, 320, 32, 128, 128]),
          ("Mixed_5c", [384, 192, 384, 48, 128, 128])]


def standard_layout() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the published state dict (without num_batches_tracked)."""
    shapes = {}

    def unit(name, cin, cout, k):
        shapes[f"{name}.conv3d.weight"] = (cout, cin, k, k, k)
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{s}"] = (cout,)

    for name, cin, cout, k in STEM:
        unit(name, cin, cout, k)
    cin = 192
    for name, ch in BLOCKS:
        unit(f"{name}.b0", cin, ch[0], 1)
        unit(f"{name}.b1a", cin, ch[1], 1)
        unit(f"{name}.b1b", ch[1], ch[2], 3)
        unit(f"{name}.b2a", cin, ch[3], 1)
        unit(f"{name}.b2b", ch[3], ch[4], 3)
        unit(f"{name}.b3b", cin, ch[5], 1)
        cin = ch[0] + ch[2] + ch[4] + ch[5]
    shapes["logits.conv3d.weight"] = (400, 1024, 1, 1, 1)
    shapes["logits.conv3d.bias"] = (400,)
    return shapes


def random_state(seed=0) -> dict[str, torch.Tensor]:
    """Random weights in the standard layout, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in standard_layout().items():
        if k.endswith("conv3d.weight"):
            fan_in = math.prod(shape[1:])
            out[k] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith("bn.weight"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g) * 0.1
    return out


@pytest.fixture(scope="module")
def net():
    m = InceptionI3d()
    fvd.load_state_dict_checked(m, random_state(), "random")
    return m.eval()


def test_state_dict_matches_published_layout():
    own = {k: tuple(v.shape) for k, v in InceptionI3d().state_dict().items() if not k.endswith("num_batches_tracked")}
    assert own == standard_layout()


@pytest.mark.parametrize("n", range(1, 30))
@pytest.mark.parametrize("k,s", [(1, 1), (3, 1), (3, 2), (7, 2), (2, 2), (1, 2)])
def test_same_padding_is_tensorflows(n, k, s):
    # TF: out = ceil(n / s), pad_total = max((out - 1) * s + k - n, 0), the extra pixel at the end.
    out = math.ceil(n / s)
    total = max((out - 1) * s + k - n, 0)
    x = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1, 1) + 1
    y = _same_pad(x, (k, 1, 1), (s, 1, 1))
    assert y.shape[2] == n + total
    assert (y[0, 0, : total // 2] == 0).all() and torch.equal(y[0, 0, total // 2: total // 2 + n], x[0, 0])
    assert (y.shape[2] - k) // s + 1 == out


@pytest.mark.parametrize("shape", [(1, 3, 9, 33, 47), (2, 3, 12, 17, 16)])
def test_forward_deterministic_any_size(net, shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        a, b = net(x), net(x.clone())
    assert a.shape == (shape[0], 400) and torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_batch_members_independent(net):
    x = torch.rand(2, 3, MIN_FRAMES, 24, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        both = net(x)
        each = torch.cat([net(x[:1]), net(x[1:])])
    torch.testing.assert_close(both, each, rtol=1e-5, atol=1e-5)


def test_too_few_frames_rejected(net):
    with pytest.raises(ValueError, match="at least 9 frames"):
        net(torch.zeros(1, 3, MIN_FRAMES - 1, 32, 32))


def test_logits_are_the_linear_layer_on_the_pooled_map():
    """For inputs up to 224x224 the final map is at most 7x7, so the (2, 7, 7) window (capped at the
    map) covers it: the logits equal the 1x1x1 layer applied to the mean of the Mixed_5c map over
    space and over consecutive frame pairs, computed here by hand from a forward hook."""
    m = InceptionI3d()
    fvd.load_state_dict_checked(m, random_state(3), "random")
    feats = {}
    m.Mixed_5c.register_forward_hook(lambda mod, i, o: feats.setdefault("x", o))
    x = torch.rand(1, 3, 17, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        y = m(x)
    f = feats["x"]  # (1, 1024, 3, 2, 2)
    assert f.shape[2:] == (3, 2, 2)
    pairs = 0.5 * (f[:, :, :-1] + f[:, :, 1:])  # stride-1 windows of 2 frames
    pooled = pairs.mean(dim=(2, 3, 4))
    w, b = m.logits.conv3d.weight.flatten(1), m.logits.conv3d.bias
    torch.testing.assert_close(y, pooled @ w.T + b, rtol=1e-4, atol=1e-4)


# ---- loading --------------------------------------------------------------------------------


def test_load_standard_state_dict(tmp_path):
    state = random_state(5)
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save(state, path)  # an old-style file: no num_batches_tracked entries
    loaded, record = fvd.load_weights("i3d_pretrained_400", path)
    own = loaded.state_dict()
    for k, v in state.items():
        assert torch.equal(own[k], v), k
    assert record["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest() and len(record["sha256"]) == 64


def test_load_state_dict_by_env_folder(tmp_path, monkeypatch):
    torch.save(random_state(6), tmp_path / "i3d_pretrained_400.pt")
    monkeypatch.setenv("ULVIDEO_I3D", str(tmp_path))
    _, record = fvd.load_weights("i3d_pretrained_400")
    assert record["file"] == str(tmp_path / "i3d_pretrained_400.pt")


def test_missing_weights_say_what_and_where(tmp_path, monkeypatch):
    monkeypatch.delenv("ULVIDEO_I3D", raising=False)
    monkeypatch.setenv("ULVIDEO_CACHE", str(tmp_path / "cache"))
    for kind, url in (("i3d_pretrained_400", "TATS"), ("i3d_torchscript", "dropbox.com")):
        with pytest.raises(fvd.WeightsError) as e:
            fvd.load_weights(kind)
        msg = str(e.value)
        assert fvd.WEIGHTS[kind].filename in msg and url in msg and str(tmp_path / "cache") in msg
    with pytest.raises(fvd.WeightsError, match="does_not_exist.pt"):
        fvd.load_weights("i3d_pretrained_400", tmp_path / "does_not_exist.pt")


def test_wrong_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(fvd.WeightsError, match="weights_only=True"):
        fvd.load_weights("i3d_pretrained_400", junk)
    state = random_state(7)
    del state["Mixed_4d.b1b.conv3d.weight"]
    state["Mixed_3b.b0.bn.weight"] = torch.ones(65)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(fvd.WeightsError, match="Mixed_4d.b1b.conv3d.weight") as e:
        fvd.load_weights("i3d_pretrained_400", bad)
    assert "Mixed_3b.b0.bn.weight" in str(e.value)
    good = tmp_path / "good.pt"
    torch.save(random_state(8), good)
    with pytest.raises(fvd.WeightsError, match="sha256 is"):
        fvd.load_weights("i3d_pretrained_400", good, sha256="0" * 64)


class FakeDetector(torch.nn.Module):
    """Same calling convention as StyleGAN-V's i3d_torchscript.pt; returns the flags and the input mean."""

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        b = x.shape[0]
        flags = torch.tensor([float(rescale), float(resize), float(return_features)])
        return torch.cat([flags.expand(b, 3), x.float().flatten(1).mean(1, keepdim=True)], 1)


def test_torchscript_loads_only_with_a_confirmed_hash(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(FakeDetector()).save(str(path))
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    with pytest.raises(fvd.WeightsError, match=digest):
        fvd.load_weights("i3d_torchscript", path)
    with pytest.raises(fvd.WeightsError, match="sha256 is"):
        fvd.load_weights("i3d_torchscript", path, sha256="f" * 64)
    net, record = fvd.load_weights("i3d_torchscript", path, sha256=digest)
    assert record["sha256_vouched_by"] == "user"
    out = net(torch.zeros(2, 3, 9, 8, 8), rescale=True, resize=False, return_features=True)
    assert out[:, :3].tolist() == [[1.0, 0.0, 1.0]] * 2


def test_weights_of_the_other_kind_are_named(tmp_path):
    """A TorchScript file where the state dict belongs (and the reverse) is named for what it is,
    read from the archive without unpickling or running it."""
    from ulvideo.eval.i3d import file_kind

    script = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(FakeDetector()).save(str(script))
    state = tmp_path / "i3d_pretrained_400.pt"
    torch.save(random_state(9), state)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    assert [file_kind(p) for p in (script, state, text)] == ["torchscript", "state_dict", "other"]
    with pytest.raises(fvd.WeightsError, match="is a TorchScript file; .* needs the state dict"):
        fvd.load_weights("i3d_pretrained_400", script)
    with pytest.raises(fvd.WeightsError, match="is a PyTorch state dict"):
        fvd.load_weights("i3d_torchscript", state, sha256="0" * 64)
    with pytest.raises(fvd.WeightsError, match="not a TorchScript file"):
        fvd.load_weights("i3d_torchscript", text)
