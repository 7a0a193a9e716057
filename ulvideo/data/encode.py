"""`ulvideo encode`: the frozen stage-1 encoder over one file or over a dataset.

One file (`--input clip.mp4 --out z.safetensors`): every frame is kept. A video of F frames gives
T = 1 + 4k <= F frames (the causal layout; the 0-3 frames past the last whole group are dropped at
the end, and the command says how many), read and encoded chunk by chunk through the causal
encoder (`streaming.stream_encode`), so memory stays flat in the clip's length; `ulvideo decode`
gives the same T frames back, at the file's frame rate (both are stored in the latent file's
metadata). Frames are resized and centre-cropped like the training data.

A dataset (`--data DIR --out SHARDS`): every usable clip of DIR is read once (centred in time and
space, no flips: the data config of the export, with every file included), encoded to z_clean and
written to latent shards (see `ulvideo.data.latents`) with captions, labels, sources and frame
counts; text embeddings of the captions are cached beside them. `SHARDS/encoding.json` records what
made the shards (the stage-1 export's hash, lambda_0, lambda_min, the text encoder's fingerprint),
so stage 2 can refuse shards made by another export. It is written before the first shard, with
`"complete": false`. Shard s holds clips [s * shard_size, (s + 1) * shard_size) of the fixed clip
order, and is complete once its JSON exists (written last, atomically). So the run is resumable:
run the same command again after a crash or a `kill -9` and it keeps the complete shards, deletes
the rest, and continues with the first missing shard; the result equals one uninterrupted run
(encoder batches never cross a shard boundary, so they are the same batches).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ulvideo.exports import file_sha256
from ulvideo.ul import UnifiedLatents

FAULT_ENV = "ULVIDEO_FAULT_ENCODE_PAUSE"  # "shard:N:SECONDS": pause before shard N's JSON (crash tests)


# ---- one file ---------------------------------------------------------------------------------


def file_frames(path: str, num_frames: int | None, k: int) -> tuple[int, int, float]:
    """(frames to encode, frames in the file, fps) for a video: all of it rounded down to 1 + k*n."""
    from ulvideo.videoio import probe

    info = probe(path, exact=True)
    available = info.num_frames
    t = num_frames or 1 + k * ((available - 1) // k)
    if t < 1 or (t - 1) % k or t > available:
        raise ValueError(f"{path}: cannot take {t} frames (it has {available}; frames must be 1 + {k}n)")
    return t, available, info.fps


def input_chunks(path: str, cfg, num_frames: int, chunk: int | None):
    """Pixel chunks (1, 3, t, H, W) in [-1, 1] of the first `num_frames` frames, each read from the
    file when it is needed (an image is one 1-frame chunk)."""
    from ulvideo import streaming
    from ulvideo.data.loader import resize_crop
    from ulvideo.videoio import IMAGE_EXTENSIONS, probe, read_frames, read_image, to_float

    d, k = cfg.data, cfg.encoder.temporal_downsample
    if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        yield to_float(resize_crop(read_image(path), d.height, d.width, d.resolution, None, None, False))[None]
        return
    rotation = probe(path).rotation
    plan = streaming.chunk_plan(num_frames, chunk, None, k) if chunk else [num_frames]
    start = 0
    for size in plan:
        frames = read_frames(path, range(start, start + size), rotation=rotation)
        yield to_float(resize_crop(frames, d.height, d.width, d.resolution, None, None, False))[None]
        start += size


def encode_file(model: UnifiedLatents, args, tiling=None) -> int:
    from safetensors.torch import save_file

    from ulvideo import streaming
    from ulvideo.videoio import IMAGE_EXTENSIONS, VideoError, read_image

    k = model.cfg.encoder.temporal_downsample
    try:
        if Path(args.input).suffix.lower() in IMAGE_EXTENSIONS:
            read_image(args.input)  # a missing or unreadable image is refused before any compute
            t, available, fps = 1, 1, 0.0
        else:
            t, available, fps = file_frames(args.input, args.num_frames, k)
        chunk = args.chunk or 16  # streaming is exact (causal encoder): chunks only bound the memory
        streaming.chunk_plan(t, chunk, None, k)  # a bad --chunk is refused before any compute
    except (VideoError, ValueError) as e:
        named = str(e) if str(args.input) in str(e) else f"{args.input}: {e}"
        print(f"ulvideo encode: {named}", file=sys.stderr)
        return 2
    if t < available and not args.num_frames:
        print(f"{args.input}: {available} frames; encoding the first {t} (1 + {k}n), {available - t} dropped at the end")
    with torch.no_grad():
        parts = list(streaming.stream_encode(model, input_chunks(args.input, model.cfg, t, chunk), tiling))
    z = torch.cat(parts, dim=2)[0, : model.latent_channels]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # a replaced file (--overwrite) is never half-written
    save_file({"z_clean": z.contiguous()}, str(tmp), metadata={
        "source": str(args.input), "num_frames": str(t), "fps": f"{fps:g}", "source_frames": str(available)})
    os.replace(tmp, out)
    print(f"z_clean {tuple(z.shape)} ({t} frames) -> {args.out}")
    return 0


# ---- a dataset --------------------------------------------------------------------------------


def fault_pause(shard: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec.startswith("shard:"):
        _, n, seconds = spec.split(":")
        if int(n) == shard:
            print(f"encode: pausing {seconds} s before shard {shard}'s JSON ({FAULT_ENV})", flush=True)
            time.sleep(float(seconds))


def complete_shards(out: Path) -> int:
    """Shards 0 .. n-1 whose JSON exists; every other shard file (and temp file) is removed."""
    n = 0
    while (out / f"shard-{n:05d}.json").is_file():
        n += 1
    for p in out.iterdir():
        stem = p.name.lstrip(".").split(".")[0]
        if stem.startswith("shard-") and (not stem[6:].isdigit() or int(stem[6:]) >= n):
            p.unlink()
    return n


def encode_dataset(model: UnifiedLatents, args) -> int:
    from tqdm import tqdm

    from ulvideo.data import DataError, build_loader, check_usable, write_latent_shard
    from ulvideo.text import TextEncoderError, load_text_encoder

    cfg = model.cfg
    frames = args.num_frames or cfg.data.num_frames
    data_cfg = dataclasses.replace(cfg.data, path=args.data, kind="auto", manifest="", heldout_fraction=1.0,
                                   num_frames=frames, hflip=False, crop="center", temporal_offset="center")
    name = args.text_encoder or cfg.base.text_encoder
    size = args.shard_size
    # loader batches divide both the encoder batch and the shard: a batch never crosses a shard
    step = math.gcd(args.batch_size, size)
    try:
        if size < 1 or args.batch_size < 1:
            raise DataError(f"--shard-size {size} and --batch-size {args.batch_size} must be >= 1")
        k = cfg.encoder.temporal_downsample
        if frames < 1 or (frames - 1) % k:
            raise DataError(f"--num-frames {frames}: clips must have 1 + {k}k frames")
        check_usable(data_cfg)  # a folder of only broken files: one line, before the text encoder loads
        text = None if name == "none" else load_text_encoder(name, cfg.base.text_max_tokens)
        # every file "held out", split "heldout": one pass over all of them in a fixed order, centred crops
        loader = build_loader(data_cfg, micro_batch_size=step, seed=0, split="heldout")
    except (DataError, TextEncoderError) as e:
        print(f"ulvideo encode: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    info = {"stage1_export": str(Path(args.export).resolve()),
            "stage1_sha256": file_sha256(Path(args.export).with_suffix(".safetensors")),
            "latent_logsnr": cfg.ul.latent_logsnr, "prior_logsnr_min": cfg.ul.prior_logsnr_min,
            "text_encoder": text.fingerprint() if text is not None else "none",
            "text_max_tokens": text.max_tokens if text is not None else 0, "num_frames": frames,
            "data": str(Path(args.data).resolve()), "data_fingerprint": loader.fingerprint, "shard_size": size,
            "batch_size": args.batch_size}
    done = 0
    if (out / "encoding.json").is_file():
        old = json.loads((out / "encoding.json").read_text())
        differs = [k for k in info if old.get(k) != info[k]]
        if differs:
            print(f"ulvideo encode: {out} holds shards made with other settings ({', '.join(differs)}); "
                  "write to an empty folder", file=sys.stderr)
            return 2
        done = complete_shards(out)
        if old.get("complete"):
            print(json.dumps({"out": str(out), "clips": old["clips"], "shards": old["shards"], "already": True}))
            return 0
        print(f"resuming: {done} complete shard(s) kept in {out}")
    elif out.exists() and any(p.name.startswith("shard-") for p in out.iterdir()):
        print(f"ulvideo encode: {out} holds shards without encoding.json; write to an empty folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "encoding.json", {**info, "complete": False})
    total = loader.num_entries  # None for WebDataset shards without index.json
    skip = 0
    if done and loader.kind == "webdataset":
        skip = done * size // step  # a shard stream is read past what is done (decoded, not encoded)
    elif done:
        loader.load_state_dict({**loader.state_dict(), "epoch": 0, "batch": done * size // step})
    shard, count = done, done * size
    buf: dict[str, list] = {k: [] for k in ("z", "captions", "labels", "sources", "frames", "emb", "mask")}
    pending: list[dict] = []  # loader batches of the encoder batch being gathered
    cut = [0]  # captions longer than the text encoder's max_tokens (cut there), in this run

    def encode_pending():
        x = torch.cat([b["video"] for b in pending])
        buf["z"].append(model.encode(x))
        captions = [c for b in pending for c in b["caption"]]
        buf["captions"] += captions
        buf["labels"] += [int(v) for b in pending for v in b["label"]]
        buf["sources"] += [s for b in pending for s in b["source"]]
        buf["frames"] += [x.shape[2]] * x.shape[0]
        if text is not None:
            cut[0] += sum(n > text.max_tokens for n in text.token_counts(captions))
            emb, mask = text.encode(captions)
            buf["emb"].append(emb)
            buf["mask"].append(mask)
        pending.clear()

    def flush():
        nonlocal shard
        txt = {"emb": torch.cat(buf["emb"]), "mask": torch.cat(buf["mask"])} if text is not None else None
        prefix = out / f"shard-{shard:05d}"
        write_latent_shard(prefix, torch.cat(buf["z"]), buf["captions"], buf["labels"], buf["sources"], buf["frames"],
                           txt, before_json=lambda: fault_pause(shard))
        shard += 1
        for v in buf.values():
            v.clear()

    bar = tqdm(total=total, initial=count, desc="encode", unit="clip")
    with torch.no_grad():
        for batch in loader:
            if skip:
                skip -= 1
                continue
            pending.append(batch)
            n = len(batch["caption"])
            count += n
            bar.update(n)
            gathered = sum(len(b["caption"]) for b in pending)
            if gathered >= args.batch_size or count % size == 0 or count == total:
                encode_pending()
            if count % size == 0 or count == total:
                flush()
        if pending:
            encode_pending()
        if buf["captions"]:  # the last, partial shard (when the clip count was not known up front)
            flush()
    bar.close()
    _write_json(out / "encoding.json", {**info, "clips": count, "shards": shard, "skipped": loader.skip_counts(),
                                        "complete": True})
    if cut[0]:
        print(f"ulvideo encode: warning: {cut[0]} captions are longer than {text.max_tokens} tokens; their text "
              "embeddings keep the first max_tokens (base.text_max_tokens)", file=sys.stderr)
    print(json.dumps({"out": str(out), "clips": count, "shards": shard}))
    return 0


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
