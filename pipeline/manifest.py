"""Manifest parts: one Parquet file per committed shard under `<out>/manifest/`.

A part is written once, after its shard's arrays, under a deterministic name; a shard without
its part is uncommitted and safe to recompute. Parts are written to a temporary name and moved
into place, so a reader never sees half a part.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from schemas import MANIFEST_SCHEMA

PART_PATTERN = re.compile(r"part-(\d+)\.parquet$")


def manifest_dir(out: str) -> str:
    return out.rstrip("/") + "/manifest"


def part_uri(out: str, shard: int) -> str:
    return f"{manifest_dir(out)}/part-{shard:06d}.parquet"


def is_committed(out: str, shard: int, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = fsspec.core.url_to_fs(part_uri(out, shard), **(storage_options or {}))
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    return fs.exists(path)


def write_part(out: str, shard: int, rows: list[dict[str, Any]], storage_options: dict[str, Any] | None = None) -> bool:
    """Commit a shard: its manifest rows become visible at once, under their final name.

    The first commit wins: if the part already exists (a retried or duplicated unit finished
    first), nothing is written and False is returned.
    """
    if is_committed(out, shard, storage_options):
        return False
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    fs, path = fsspec.core.url_to_fs(part_uri(out, shard), **(storage_options or {}))
    folder, name = path.rsplit("/", 1)
    fs.makedirs(folder, exist_ok=True)
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    with fs.open(temporary, "wb") as handle:
        pq.write_table(table, handle)
    fs.mv(temporary, path)
    return True


def _manifest_fs(out: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The manifest folder with a fresh listing (object-store clients cache listings)."""
    fs, path = fsspec.core.url_to_fs(manifest_dir(out), **(storage_options or {}))
    fs.invalidate_cache(path)
    return fs, path


def committed_shards(out: str, storage_options: dict[str, Any] | None = None) -> set[int]:
    fs, path = _manifest_fs(out, storage_options)
    if not fs.exists(path):
        return set()
    return {int(m.group(1)) for p in fs.ls(path, detail=False) if (m := PART_PATTERN.search(p))}


def compacted_uri(out: str) -> str:
    return out.rstrip("/") + "/manifest.parquet"


def read_manifest(out: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Every committed row, ordered by plan row.

    One file when the compacted table (written at the end of a run) covers exactly the committed
    parts; otherwise (a run still going, or one that died before compacting) the parts themselves.
    """
    fs, path = _manifest_fs(out, storage_options)
    if not fs.exists(path):
        return MANIFEST_SCHEMA.empty_table()
    files = sorted(p for p in fs.ls(path, detail=False) if PART_PATTERN.search(p))
    if not files:
        return MANIFEST_SCHEMA.empty_table()
    shards = {int(PART_PATTERN.search(p).group(1)) for p in files}
    compacted = fsspec.core.url_to_fs(compacted_uri(out), **(storage_options or {}))[1]
    if fs.exists(compacted):
        with fs.open(compacted, "rb") as handle:
            table = pq.read_table(handle, schema=MANIFEST_SCHEMA)
        if set(pc.unique(table.column("shard")).to_pylist()) == shards:
            return table
    return pads.dataset(files, schema=MANIFEST_SCHEMA, format="parquet", filesystem=fs).to_table().sort_by("row")
