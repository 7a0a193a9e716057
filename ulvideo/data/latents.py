"""Latent shards: the stage-2 training data written by `ulvideo encode --data`.

A shard is three files sharing a prefix:
  <prefix>.safetensors       {"z_clean": float (N, C, T', H', W')}
  <prefix>.text.safetensors  {"emb": float (N, L, D), "mask": bool (N, L)}   (optional)
  <prefix>.json              {"format": "ulvideo-latents", "version": 1, "count": N,
                              "shape": [C, T', H', W'], "captions": [...], "labels": [...],
                              "sources": [...], "num_frames": [...], "text": bool}
The JSON is written last, so a shard without it is incomplete and is skipped. Only safetensors and
JSON are read: nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ulvideo.data.sources import DataError, SkipLog

FORMAT, VERSION = "ulvideo-latents", 1


def _atomic_save(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path)


def write_latent_shard(path_prefix, z_clean: torch.Tensor, captions: list[str], labels: list[int],
                       sources: list[str], num_frames: list[int], text: dict | None = None,
                       before_json=None) -> Path:
    """Write one shard of N latents (see the module docstring); returns the JSON path. Every file
    is written to a hidden temporary name and renamed; the JSON, which completes the shard, last
    (`before_json()` runs just before it: a crash-test hook)."""
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    n = z_clean.shape[0]
    if z_clean.ndim != 5 or not z_clean.is_floating_point():
        raise ValueError(f"z_clean must be a float (N, C, T', H', W') tensor, got {z_clean.dtype} "
                         f"{tuple(z_clean.shape)}")
    for name, values in (("captions", captions), ("labels", labels), ("sources", sources), ("num_frames", num_frames)):
        if len(values) != n:
            raise ValueError(f"write_latent_shard: {len(values)} {name} for {n} latents")
    if text is not None:
        emb, mask = text["emb"], text["mask"]
        if emb.ndim != 3 or emb.shape[0] != n or mask.shape != emb.shape[:2]:
            raise ValueError(f"text: emb (N, L, D) and mask (N, L) expected, got {tuple(emb.shape)}, "
                             f"{tuple(mask.shape)}")
        _atomic_save({"emb": emb, "mask": mask.bool()}, Path(f"{prefix}.text.safetensors"))
    _atomic_save({"z_clean": z_clean}, Path(f"{prefix}.safetensors"))
    meta = {"format": FORMAT, "version": VERSION, "count": n, "shape": list(z_clean.shape[1:]),
            "captions": [str(c) for c in captions], "labels": [int(v) for v in labels],
            "sources": [str(s) for s in sources], "num_frames": [int(v) for v in num_frames],
            "text": text is not None}
    if before_json is not None:
        before_json()
    out = Path(f"{prefix}.json")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, out)
    return out


@dataclass(frozen=True)
class LatentEntry:
    shard: str  # prefix
    index: int
    shape: tuple[int, ...]
    caption: str
    label: int
    source: str
    num_frames: int
    text: bool

    @property
    def rel(self) -> str:  # what the held-out split hashes: the clip, not the shard it landed in
        return self.source


def find_shards(root: str, skips: SkipLog) -> list[LatentEntry]:
    """Every sample of every complete shard under `root`, in sorted shard order. A shard whose JSON
    or tensor header cannot be read, or does not match, is skipped and counted ("unreadable shard")."""
    return [e for shard in iter_shards(root, skips) for e in shard]


def iter_shards(root: str, skips: SkipLog):
    """The samples of each readable shard under `root` (a list per shard), in sorted shard order."""
    from safetensors import SafetensorError

    if not os.path.isdir(root):
        raise DataError(f"latent folder '{root}' does not exist")
    for meta_path in sorted(Path(root).rglob("*.json")):
        if meta_path.name.startswith(".") or meta_path.name.endswith(".text.json"):
            continue
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
            skips.add(str(meta_path), "unreadable shard", str(e))
            continue
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            continue  # another JSON file (a scan report, a config): not a shard
        prefix = str(meta_path)[: -len(".json")]
        try:
            if meta.get("version") != VERSION:
                raise ValueError(f"version {meta.get('version')} (this reader knows {VERSION})")
            n, shape = int(meta["count"]), tuple(int(s) for s in meta["shape"])
            lists = [meta[k] for k in ("captions", "labels", "sources", "num_frames")]
            if any(len(v) != n for v in lists):
                raise ValueError("list lengths differ from count")
            _check_tensor(f"{prefix}.safetensors", "z_clean", (n, *shape))
            if meta.get("text"):
                _check_tensor(f"{prefix}.text.safetensors", "emb", None, n)
            shard = [LatentEntry(prefix, i, shape, str(meta["captions"][i]), int(meta["labels"][i]),
                                 str(meta["sources"][i]), int(meta["num_frames"][i]), bool(meta.get("text")))
                     for i in range(n)]
        except (KeyError, ValueError, TypeError, OSError, SafetensorError) as e:
            skips.add(prefix, "unreadable shard", f"{type(e).__name__}: {e}")
            continue
        yield shard


def _check_tensor(path: str, key: str, shape, count: int | None = None) -> None:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        got = tuple(f.get_slice(key).get_shape())
    if (shape is not None and got != tuple(shape)) or (count is not None and got[0] != count):
        raise ValueError(f"{path}: '{key}' has shape {got}, expected {shape or (count, '...')}")


class ShardReader:
    """Opened shard files, cached per process (safetensors maps them; reads copy one sample)."""

    def __init__(self):
        self._open: dict = {}

    def _get(self, path: str):
        key = (os.getpid(), path)
        if key not in self._open:
            from safetensors import safe_open

            if len(self._open) > 64:
                self._open.clear()
            self._open[key] = safe_open(path, "pt")
        return self._open[key]

    def load(self, e: LatentEntry) -> dict:
        out = {"z_clean": self._get(f"{e.shard}.safetensors").get_slice("z_clean")[e.index].float(),
               "caption": e.caption, "label": e.label, "source": e.source, "num_frames": e.num_frames}
        if e.text:
            t = self._get(f"{e.shard}.text.safetensors")
            out["text_emb"] = t.get_slice("emb")[e.index].float()
            out["text_mask"] = t.get_slice("mask")[e.index]
        return out

    def __getstate__(self):  # open handles do not cross into worker processes
        return {"_open": {}}
