"""Manifest parts: one Parquet file per committed shard under `<out>/manifest/`.

A part is written once, after its shard's arrays, under a deterministic name; a shard without
its part is uncommitted and safe to recompute. Every file a reader trusts (parts, the compacted
manifest, the plan, the run summary) is written to a temporary name and moved into place, so a
reader, or a rerun after a kill, never sees half a file.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline.store.schemas import MANIFEST_SCHEMA

log = logging.getLogger("srt")

PART_PATTERN = re.compile(r"part-(\d+)\.parquet$")


def manifest_dir(out: str) -> str:
    return out.rstrip("/") + "/manifest"


def part_uri(out: str, shard: int) -> str:
    return f"{manifest_dir(out)}/part-{shard:06d}.parquet"


def is_committed(out: str, shard: int, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = fsspec.core.url_to_fs(part_uri(out, shard), **(storage_options or {}))
    fs.invalidate_cache(path.rsplit("/", 1)[0])
    return fs.exists(path)


def put_atomically(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write `data` under a temporary name, then move it into place: a reader (or a rerun after a
    kill) sees the old content or the new, never a truncated file. On object stores the move is a
    server-side copy, which also lands whole."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    folder, name = path.rsplit("/", 1)
    fs.makedirs(folder, exist_ok=True)
    temporary = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
    fs.pipe_file(temporary, data)
    fs.mv(temporary, path)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_part(out: str, shard: int, rows: list[dict[str, Any]], storage_options: dict[str, Any] | None = None) -> bool:
    """Commit a shard: its manifest rows become visible at once, under their final name.

    The first commit wins: if the part already exists (a retried or duplicated unit finished
    first), nothing is written and False is returned.
    """
    if is_committed(out, shard, storage_options):
        return False
    put_atomically(part_uri(out, shard), parquet_bytes(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)), storage_options)
    return True


def uncommit(out: str, shards: set[int], storage_options: dict[str, Any] | None = None) -> None:
    """Make committed shards pending again (to recompute their error rows): the compacted manifest
    goes first, then their parts. A kill in between leaves each shard committed once or pending."""
    fs, path = fsspec.core.url_to_fs(compacted_uri(out), **(storage_options or {}))
    if fs.exists(path):
        fs.rm_file(path)
    for shard in sorted(shards):
        fs.rm_file(fsspec.core.url_to_fs(part_uri(out, shard), **(storage_options or {}))[1])


def _manifest_fs(out: str, storage_options: dict[str, Any] | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The manifest folder with a fresh listing (object-store clients cache listings)."""
    fs, path = fsspec.core.url_to_fs(manifest_dir(out), **(storage_options or {}))
    fs.invalidate_cache(path)
    return fs, path


def committed_shards(out: str, storage_options: dict[str, Any] | None = None) -> set[int]:
    return _shards_of(_part_files(*_manifest_fs(out, storage_options)))


def compacted_uri(out: str) -> str:
    return out.rstrip("/") + "/manifest.parquet"


def read_manifest(out: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """Every committed row, ordered by plan row.

    One file when the compacted table (written at the end of a run) is readable and covers exactly
    the committed parts; otherwise (a run still going, one that died before or while compacting)
    the parts themselves, which are the truth.
    """
    fs, path = _manifest_fs(out, storage_options)
    files = _part_files(fs, path)
    if not files:
        return MANIFEST_SCHEMA.empty_table()
    compacted = _compacted(out, storage_options, _shards_of(files))
    if compacted is not None:
        return compacted
    return pads.dataset(files, schema=MANIFEST_SCHEMA, format="parquet", filesystem=fs).to_table().sort_by("row")


def compact(out: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Write the compacted manifest unless the one there already covers every part (a rerun that
    found everything done rewrites nothing). Returns whether it wrote."""
    fs, path = _manifest_fs(out, storage_options)
    files = _part_files(fs, path)
    if _compacted(out, storage_options, _shards_of(files), columns=["shard"]) is not None:
        return False
    put_atomically(compacted_uri(out), parquet_bytes(read_manifest(out, storage_options)), storage_options)
    return True


def _part_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    if not fs.exists(path):
        return []
    return sorted(p for p in fs.ls(path, detail=False) if PART_PATTERN.search(p))


def _shards_of(files: list[str]) -> set[int]:
    return {int(PART_PATTERN.search(p).group(1)) for p in files}


def _compacted(out: str, storage_options: dict[str, Any] | None, shards: set[int], columns: list[str] | None = None) -> pa.Table | None:
    """The compacted table (its `columns`, default all) if it is there, readable, and holds exactly
    the committed shards."""
    fs, path = fsspec.core.url_to_fs(compacted_uri(out), **(storage_options or {}))
    try:
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, schema=MANIFEST_SCHEMA, columns=columns)
    except (OSError, pa.ArrowException) as error:
        if not isinstance(error, FileNotFoundError):
            log.warning("ignoring unreadable %s (%s); reading the manifest parts", compacted_uri(out), error)
        return None
    return table if set(pc.unique(table.column("shard")).to_pylist()) == shards else None
