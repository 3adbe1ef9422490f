"""The manifest: one Parquet part per committed shard, compacted into files of shard ranges.

    manifest/part-000123.parquet            the rows of shard 123, written once when it commits
    manifest/shards-000000-001023.parquet   the rows of shards 0..1023, once all of them committed

A part is written once, after its shard's arrays, under a deterministic name; a shard with neither
a part nor a range file covering it is uncommitted and safe to recompute. Range files are written
as whole groups of shards commit and at the end of a run, and are never rewritten: a later run
(--append, --retry-errors) adds parts and ranges of its own. Once a range file is there its parts
are removed; until then a reader ignores parts a range covers. Every file a reader trusts is written
to a temporary name and moved into place, so a reader, or a rerun after a kill, never sees half a file.
`manifest/*.parquet` is then one table of every committed row, as DuckDB or pandas read it.
"""

from __future__ import annotations

import bisect
import re
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store.schemas import MANIFEST_SCHEMA

PART_PATTERN = re.compile(r"part-(\d+)\.parquet$")
RANGE_PATTERN = re.compile(r"shards-(\d+)-(\d+)\.parquet$")
GROUP_SHARDS = 1024  # shards per range file written while a run goes (about 32k rows at 32 a shard)
LISTING_ATTEMPTS = 3  # a reader that lists while a range is compacted finds a part gone: it lists again


def manifest_dir(out: str) -> str:
    return out.rstrip("/") + "/manifest"


def part_uri(out: str, shard: int) -> str:
    return f"{manifest_dir(out)}/part-{shard:06d}.parquet"


def range_uri(out: str, first: int, last: int) -> str:
    return f"{manifest_dir(out)}/shards-{first:06d}-{last:06d}.parquet"


@dataclass
class ManifestFiles:
    """What the manifest folder holds: range files, and parts no range covers."""

    fs: fsspec.AbstractFileSystem
    ranges: list[tuple[int, int, str]]  # (first shard, last shard, path), by first shard
    parts: dict[int, str]  # shard -> path, parts not covered by a range
    leftovers: list[str] = field(default_factory=list)  # parts a range covers (a compaction killed before removing them)

    def covered(self, shard: int) -> bool:
        i = bisect.bisect_right([first for first, _, _ in self.ranges], shard) - 1
        return i >= 0 and shard <= self.ranges[i][1]

    def files(self) -> list[str]:
        """Every file of committed rows, each row in exactly one of them."""
        return [path for _, _, path in self.ranges] + [self.parts[s] for s in sorted(self.parts)]

    def committed(self, shards: int) -> np.ndarray:
        """Whether each of the plan's `shards` is committed, as a boolean array (a byte a shard)."""
        done = np.zeros(shards, bool)
        for first, last, _ in self.ranges:
            done[first : last + 1] = True
        parts = np.fromiter(self.parts, np.int64, len(self.parts))
        done[parts[parts < shards]] = True
        return done

    def count(self) -> int:
        return sum(last - first + 1 for first, last, _ in self.ranges) + len(self.parts)

    def tables(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """These columns (default all) of the committed rows, a file at a time."""
        for path in self.files():
            yield _read(self.fs, path, columns)


def _ranges(names: list[str]) -> list[tuple[int, int, str]]:
    return sorted((int(m.group(1)), int(m.group(2)), p) for p in names if (m := RANGE_PATTERN.search(p)))


def manifest_files(out: str, storage_options: dict[str, Any] | None = None) -> ManifestFiles:
    """A fresh listing of the manifest folder (object-store clients cache listings)."""
    fs, path = fsspec.core.url_to_fs(manifest_dir(out), **(storage_options or {}))
    fs.invalidate_cache(path)
    names = fs.ls(path, detail=False) if fs.exists(path) else []
    listed = ManifestFiles(fs, _ranges(names), {})
    for p in names:
        if m := PART_PATTERN.search(p):
            if listed.covered(shard := int(m.group(1))):
                listed.leftovers.append(p)
            else:
                listed.parts[shard] = p
    return listed


def is_committed(out: str, shard: int, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether the shard has its part, or a range file covers it. Only range files are listed
    (an object store lists them by prefix), not the folder's loose parts: this runs at every commit."""
    fs, path = fsspec.core.url_to_fs(part_uri(out, shard), **(storage_options or {}))
    folder = path.rsplit("/", 1)[0]
    fs.invalidate_cache(folder)
    return fs.exists(path) or ManifestFiles(fs, _ranges(fs.glob(f"{folder}/shards-*.parquet")), {}).covered(shard)


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

    The first commit wins: if the shard is committed already (a retried or duplicated unit
    finished first), nothing is written and False is returned.
    """
    if is_committed(out, shard, storage_options):
        return False
    put_atomically(part_uri(out, shard), parquet_bytes(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)), storage_options)
    return True


def _read(fs: fsspec.AbstractFileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, schema=MANIFEST_SCHEMA, columns=columns)


def uncommit(out: str, shards: set[int], storage_options: dict[str, Any] | None = None) -> None:
    """Make committed shards pending again (to recompute their error rows). A range file holding
    any of them gives its other shards back as parts first, then goes; then their parts go. A kill
    in between leaves each shard committed once or pending."""
    listed = manifest_files(out, storage_options)
    fs = listed.fs
    for first, last, path in listed.ranges:
        if not any(first <= s <= last for s in shards):
            continue
        table = _read(fs, path)
        for shard, rows in _by_shard(table).items():
            if shard not in shards:
                put_atomically(part_uri(out, shard), parquet_bytes(rows), storage_options)
        fs.rm_file(path)
    for shard in sorted(shards):
        path = fsspec.core.url_to_fs(part_uri(out, shard), **(storage_options or {}))[1]
        if fs.exists(path):
            fs.rm_file(path)


def _by_shard(table: pa.Table) -> dict[int, pa.Table]:
    shards = table.column("shard").to_numpy()
    return {int(s): table.filter(pa.array(shards == s)) for s in np.unique(shards)}


def read_manifest(out: str, storage_options: dict[str, Any] | None = None, columns: list[str] | None = None) -> pa.Table:
    """Every committed row (its `columns`, default all), ordered by plan row. A reader is a
    store's consumer: it holds every row; a driver never calls this (`error_counts`)."""
    for attempt in range(LISTING_ATTEMPTS):
        listed = manifest_files(out, storage_options)
        try:
            tables = list(listed.tables(columns))
            break
        except FileNotFoundError:  # a part compacted away since the listing
            if attempt == LISTING_ATTEMPTS - 1:
                raise
    if not tables:
        return MANIFEST_SCHEMA.empty_table() if columns is None else MANIFEST_SCHEMA.empty_table().select(columns)
    table = pa.concat_tables(tables)
    return table.sort_by("row") if "row" in table.column_names else table


def error_counts(listed: ManifestFiles, examples: int = 0) -> tuple[int, Counter, list[dict[str, Any]]]:
    """(rows, error rows by kind, the first `examples` error rows' uri, error_kind and error) of
    every committed row, one file at a time: what a driver reports of a store whatever its size.
    Only files holding the examples are read beyond their error_kind column."""
    rows, kinds, found = 0, Counter(), []
    for path in listed.files():
        table = _read(listed.fs, path, ["error_kind"])
        rows += table.num_rows
        errors = table.column(0).drop_null()
        kinds.update({entry["values"]: entry["counts"] for entry in pc.value_counts(errors).to_pylist()})
        if len(errors) and len(found) < examples:
            detail = _read(listed.fs, path, ["uri", "error_kind", "error"])
            found += detail.filter(pc.is_valid(detail.column("error_kind"))).slice(0, examples - len(found)).to_pylist()
    return rows, kinds, found


def shards_with_errors(listed: ManifestFiles, kinds: tuple[str, ...]) -> tuple[set[int], int]:
    """(shards, rows) of committed error rows of these kinds, one file at a time."""
    shards, count = set(), 0
    for table in listed.tables(["shard", "error_kind"]):
        wanted = table.filter(pc.is_in(table.column("error_kind"), pa.array(kinds)))
        shards.update(wanted.column("shard").to_pylist())
        count += wanted.num_rows
    return shards, count


def compact_range(out: str, first: int, last: int, storage_options: dict[str, Any] | None = None) -> None:
    """Shards first..last, each committed as a part, become one range file; then their parts go."""
    fs, _ = fsspec.core.url_to_fs(manifest_dir(out), **(storage_options or {}))
    paths = [fsspec.core.url_to_fs(part_uri(out, s), **(storage_options or {}))[1] for s in range(first, last + 1)]
    table = pa.concat_tables([_read(fs, path) for path in paths]).sort_by("row")
    put_atomically(range_uri(out, first, last), parquet_bytes(table), storage_options)
    fs.rm(paths)


def compact(out: str, storage_options: dict[str, Any] | None = None, first: int = 0, last: int | None = None) -> int:
    """Every run of consecutive shards committed as parts (among shards first..last) becomes range
    files of at most GROUP_SHARDS shards, cut at multiples of it; parts a range already covers go.
    Returns the files written."""
    listed = manifest_files(out, storage_options)
    if listed.leftovers:
        listed.fs.rm(listed.leftovers)
    shards = sorted(s for s in listed.parts if first <= s and (last is None or s <= last))
    written = 0
    for first, last in _runs(shards):
        for start in range(first, last + 1):
            if start == first or start % GROUP_SHARDS == 0:
                stop = min(last, (start // GROUP_SHARDS + 1) * GROUP_SHARDS - 1)
                compact_range(out, start, stop, storage_options)
                written += 1
    return written


def _runs(shards: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for shard in shards:
        if runs and runs[-1][1] == shard - 1:
            runs[-1] = (runs[-1][0], shard)
        else:
            runs.append((shard, shard))
    return runs
