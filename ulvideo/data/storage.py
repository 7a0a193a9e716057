"""Where data lives: local paths and object storage (`s3://`, `gs://`, `https://`, ... through
fsspec) for manifests, shard lists and video files.

Credentials never come from a config file: each fsspec backend reads its own environment
(`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_PROFILE` for s3fs, `GOOGLE_APPLICATION_CREDENTIALS`
for gcsfs, ...), and a URL that carries a user or password is refused. A local path never goes
through fsspec, so reading a local dataset needs nothing beyond the standard library.
"""
from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class StorageError(RuntimeError):
    """A location that cannot be used (credentials in a URL, no fsspec backend for its protocol)."""


def is_url(path: str) -> bool:
    """True for `proto://...` except `file://` (which is a local path)."""
    return bool(_URL.match(str(path))) and not str(path).startswith("file://")


def local(path: str) -> str:
    """`file://x` -> `x`; anything else unchanged."""
    return str(path)[len("file://"):] if str(path).startswith("file://") else str(path)


def check_url(url: str) -> None:
    if not is_url(url):
        return
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise StorageError(f"'{url.split('@')[-1]}': a URL with a user or password; credentials come from the "
                           "environment (e.g. AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS), never from a config")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL."""
    check_url(url)
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs installed
        raise StorageError(f"'{url}': {e}") from None


def open_binary(path: str):
    """A readable, seekable binary file object for a local path or a URL."""
    if not is_url(path):
        return open(local(path), "rb")
    fs, p = filesystem(path)
    return fs.open(p, "rb")


def read_bytes(path: str) -> bytes:
    with open_binary(path) as f:
        return f.read()


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(local(path))
    fs, p = filesystem(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(local(path))
    fs, p = filesystem(path)
    return fs.isdir(p)


def parent(path: str) -> str:
    """The folder of a file, as a URL for a URL."""
    if not is_url(path):
        return os.path.dirname(os.path.abspath(local(path)))
    return path.rstrip("/").rsplit("/", 1)[0]


def join(base: str, rel: str) -> str:
    """`rel` relative to the folder `base` (absolute paths and URLs are kept as they are)."""
    if is_url(rel) or os.path.isabs(rel) or str(rel).startswith("file://"):
        return local(rel)
    if is_url(base):
        return base.rstrip("/") + "/" + rel
    return os.path.join(base, rel)


def list_files(folder: str, suffix: str) -> list[str]:
    """Files directly or recursively under `folder` ending in `suffix`, sorted, hidden ones left
    out (the temporary files of atomic writes are hidden)."""
    if not is_url(folder):
        out = []
        for dirpath, dirnames, filenames in os.walk(local(folder)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out += [os.path.join(dirpath, n) for n in filenames if n.endswith(suffix) and not n.startswith(".")]
        return sorted(out)
    fs, p = filesystem(folder)
    return sorted(fs.unstrip_protocol(f) for f in fs.find(p)
                  if f.endswith(suffix) and not f.rsplit("/", 1)[-1].startswith("."))


def expand(spec: str) -> list[str]:
    """A shard specification -> shard locations: a folder (its *.tar files), a text file of one
    location per line (relative ones relative to it), a brace pattern (`shard-{000000..000099}.tar`,
    as WebDataset writes them), or several of these separated by `::`."""
    from braceexpand import braceexpand

    out: list[str] = []
    for part in filter(None, str(spec).split("::")):
        if "{" in part:
            out += list(braceexpand(part))
        elif part.endswith((".txt", ".shards")):
            with open_binary(part) as f:
                lines = f.read().decode("utf-8").splitlines()
            base = parent(part)
            out += [join(base, s.strip()) for s in lines if s.strip() and not s.lstrip().startswith("#")]
        elif isdir(part):
            out += list_files(part, ".tar")
        else:
            out.append(local(part))
    for u in out:
        check_url(u)
    return out
