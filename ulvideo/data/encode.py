"""`ulvideo encode --export E --data DIR --out SHARDS`: the frozen stage-1 encoder over a dataset.

Every usable clip of DIR is read once (centred in time and space, no flips: the data config of the
export, with every file included), encoded to z_clean and written to latent shards (see
`ulvideo.data.latents`) with captions, labels, sources and frame counts; text embeddings of the
captions are cached beside them. `SHARDS/encoding.json` records what made the shards (the stage-1
export's hash, lambda_0, lambda_min, the text encoder's fingerprint), so stage 2 can refuse
shards made by another export.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from ulvideo.exports import file_sha256
from ulvideo.ul import UnifiedLatents


def encode_dataset(model: UnifiedLatents, args) -> int:
    from tqdm import tqdm

    from ulvideo.data import DataError, build_loader, write_latent_shard
    from ulvideo.text import TextEncoderError, load_text_encoder

    cfg = model.cfg
    frames = args.num_frames or cfg.data.num_frames
    data_cfg = dataclasses.replace(cfg.data, path=args.data, kind="auto", manifest="", heldout_fraction=1.0,
                                   num_frames=frames, hflip=False, crop="center", temporal_offset="center")
    name = args.text_encoder or cfg.base.text_encoder
    try:
        text = None if name == "none" else load_text_encoder(name, cfg.base.text_max_tokens)
        # heldout_fraction = 1 with split "heldout": one pass over every file, deterministic crops
        loader = build_loader(data_cfg, micro_batch_size=args.batch_size, seed=0, split="heldout")
    except (DataError, TextEncoderError) as e:
        print(f"ulvideo encode: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    buf: dict[str, list] = {k: [] for k in ("z", "captions", "labels", "sources", "frames", "emb", "mask")}
    shard = 0

    def flush(final: bool = False):
        """Write full shards of `shard_size` clips (and the remainder when `final`)."""
        nonlocal shard
        z = torch.cat(buf["z"]) if buf["z"] else None
        emb = torch.cat(buf["emb"]) if buf["emb"] else None
        mask = torch.cat(buf["mask"]) if buf["mask"] else None
        n, size = len(buf["captions"]), args.shard_size
        start = 0
        while n - start >= size or (final and n - start > 0):
            end = min(start + size, n)
            txt = {"emb": emb[start:end], "mask": mask[start:end]} if text is not None else None
            write_latent_shard(out / f"shard-{shard:05d}", z[start:end], buf["captions"][start:end], buf["labels"][start:end],
                               buf["sources"][start:end], buf["frames"][start:end], txt)
            shard, start = shard + 1, end
        for key, full in (("z", z), ("emb", emb), ("mask", mask)):
            buf[key] = [full[start:]] if full is not None and start < n else []
        for key in ("captions", "labels", "sources", "frames"):
            buf[key] = buf[key][start:]

    bar = tqdm(total=loader.num_entries, desc="encode", unit="clip")
    count = 0
    with torch.no_grad():
        for batch in loader:
            x = batch["video"]
            buf["z"].append(model.encode(x))
            buf["captions"] += list(batch["caption"])
            buf["labels"] += [int(v) for v in batch["label"]]
            buf["sources"] += list(batch["source"])
            buf["frames"] += [x.shape[2]] * x.shape[0]
            if text is not None:
                emb, mask = text.encode(list(batch["caption"]))
                buf["emb"].append(emb)
                buf["mask"].append(mask)
            count += x.shape[0]
            bar.update(x.shape[0])
            if len(buf["captions"]) >= args.shard_size:
                flush()
    flush(final=True)
    bar.close()
    info = {"stage1_export": str(Path(args.export).resolve()), "stage1_sha256": file_sha256(Path(args.export).with_suffix(".safetensors")),
            "latent_logsnr": cfg.ul.latent_logsnr, "prior_logsnr_min": cfg.ul.prior_logsnr_min,
            "text_encoder": text.fingerprint() if text is not None else "none",
            "text_max_tokens": text.max_tokens if text is not None else 0, "num_frames": frames,
            "clips": count, "shards": shard, "skipped": loader.skip_counts()}
    (out / "encoding.json").write_text(json.dumps(info, indent=2))
    print(json.dumps({"out": str(out), "clips": count, "shards": shard}))
    return 0
