"""Manifests: a table with one row per clip (CSV, JSONL or Parquet; local or object storage).

Columns (Open-Sora's names are accepted; only `path` is required):

    path        video or image file, relative to the manifest's folder, absolute, or a URL
    text        caption (or `caption`)
    num_frames  frames in the file          \\  a row with num_frames and fps is never probed at
    fps         average frame rate          /   start-up: a bad file is found when it is read
    height, width   as displayed (after rotation)
    rotation    degrees the stored frames are turned for display (0 when absent)
    start, end  seconds: the row uses the frames whose start time lies in [start, end)
    label       class index (-1 or empty: none)

`read_table` returns the rows as a pyarrow Table with these canonical names; `write_manifest`
writes one (the format follows the suffix). Entries are then held as columns (`sources.Clips`),
never as one Python object per clip.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa

from ulvideo.data import storage

ALIASES = {"path": ("path", "video_path", "file", "filepath"), "text": ("text", "caption"),
           "num_frames": ("num_frames", "frames"), "fps": ("fps",), "height": ("height",), "width": ("width",),
           "rotation": ("rotation",), "start": ("start",), "end": ("end",), "label": ("label",)}
NUMERIC = {"num_frames": pa.int64(), "fps": pa.float64(), "height": pa.int64(), "width": pa.int64(),
           "rotation": pa.int64(), "start": pa.float64(), "end": pa.float64(), "label": pa.int64()}
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


def manifest_format(path: str) -> str:
    suffix = os.path.splitext(str(path).lower())[1]
    if suffix not in FORMATS:
        raise ValueError(f"manifest '{path}': unknown format (use .parquet, .csv or .jsonl)")
    return FORMATS[suffix]


def _read_jsonl(data: bytes) -> tuple[pa.Table, int]:
    import pyarrow.json as pj

    try:
        return pj.read_json(io.BytesIO(data)), 0
    except pa.ArrowInvalid:  # a malformed line: parse line by line, skipping and counting bad ones
        rows, bad = [], 0
        for line in data.decode("utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(r, dict):
                rows.append(r)
            else:
                bad += 1
        names = sorted({k for r in rows for k in r if any(k in a for a in ALIASES.values())})
        return pa.table({k: _mixed([r.get(k) for r in rows]) for k in names}) if rows else pa.table({}), bad


def _mixed(values: list) -> pa.Array:
    """A JSON column, as strings where its values mix types (`_as_type` then converts or rejects them)."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def read_table(path: str) -> tuple[pa.Table, int]:
    """(rows with canonical column names and types, number of malformed rows left out). A value
    that is not a number where one is expected becomes null and the row is counted by `clean`."""
    fmt = manifest_format(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"manifest '{path}' does not exist")
    wanted = [a for names in ALIASES.values() for a in names]
    bad = 0
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with storage.open_binary(path) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in pf.schema_arrow.names if c in wanted]
            table = pf.read(columns=cols)
    elif fmt == "csv":
        import pyarrow.csv as pcsv

        counted = []
        parse = pcsv.ParseOptions(invalid_row_handler=lambda row: counted.append(1) or "skip")
        convert = pcsv.ConvertOptions(include_columns=wanted, include_missing_columns=True, strings_can_be_null=True,
                                      column_types={"path": pa.string(), "text": pa.string(), "caption": pa.string()})
        with storage.open_binary(path) as f:
            table = pcsv.read_csv(f, parse_options=parse, convert_options=convert)
        bad = len(counted)
    else:
        table, bad = _read_jsonl(storage.read_bytes(path))
    out, invalid = {}, np.zeros(len(table), dtype=bool)
    for name, aliases in ALIASES.items():
        for a in aliases:
            if a in table.column_names and table[a].null_count < len(table):
                out[name], wrong = _as_type(table[a], NUMERIC.get(name, pa.string()))
                invalid |= wrong
                break
    if "path" not in out:
        raise ValueError(f"manifest '{path}': no 'path' column (columns: {', '.join(table.column_names)})")
    table = pa.table(out)
    if invalid.any():  # a value that should be a number and is not: the row is malformed
        table, bad = table.filter(pa.array(~invalid)), bad + int(invalid.sum())
    return table, bad


def _as_type(col, typ: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """(the column as `typ`, rows whose value could not be converted)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    ok = np.zeros(len(col), dtype=bool)
    if col.type == typ:
        return col, ok
    if pa.types.is_null(col.type):
        return pa.nulls(len(col), typ), ok
    try:
        return col.cast(typ), ok
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    if typ == pa.string():
        return pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string()), ok
    values, wrong = [], ok.copy()  # slow path, only for a column with a non-number in it
    for i, v in enumerate(col.to_pylist()):
        try:
            f = None if v in (None, "") else float(v)
            if f is not None and pa.types.is_integer(typ):
                if f != int(f):
                    raise ValueError(v)
                f = int(f)
            values.append(f)
        except (TypeError, ValueError, OverflowError):
            values.append(None)
            wrong[i] = True
    return pa.array(values, typ), wrong


def write_manifest(table: pa.Table, out: str) -> str:
    """Write rows (canonical columns) atomically; the format follows the suffix of `out`."""
    fmt = manifest_format(out)
    out = storage.local(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.{os.getpid()}.tmp")
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, tmp, row_group_size=64 * 1024)
        elif fmt == "csv":
            import pyarrow.csv as pcsv

            pcsv.write_csv(table, tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in table.to_pylist():
                    f.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
