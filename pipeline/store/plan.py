"""The work plan beside a store: one Parquet part per listed input, and an index of the parts.

    plan/index.parquet                    one row per part: its input, first row and count (PLAN_INDEX_SCHEMA)
    plan/{listing}/part-000000.parquet    the part's items in order (PLAN_PART_SCHEMA)

A part's rows are `first_row`, `first_row + 1`, ... (the index in every store array), and a row's
shard is row // shard_size. Parts are written by whoever lists their input (anywhere on a
cluster); the index is written after them and atomically, so a plan exists once its index does,
and an index only ever names parts that are whole. While the dataset is still being listed (its
first shards are computed meanwhile) the index says so (`complete` False) and is rewritten as the
plan grows; a reader asked for rows past it reads it again. A driver holds the index (a row per
input), never a row per image: `PlanReader` reads a shard's rows from the one or two parts it spans.
"""

from __future__ import annotations

import bisect
import collections
import json
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.store.layout import StoreMismatchError
from pipeline.store.manifest import parquet_bytes, put_atomically
from pipeline.store.schemas import PLAN_INDEX_SCHEMA, PLAN_PART_SCHEMA, PLAN_SCHEMA, PLAN_SCHEMA_VERSION

PART_ROW_GROUP = 8192  # rows per Parquet row group of a part: what a shard's read fetches at least
OPEN_PARTS = 4  # parts a reader keeps open (a shard spans at most two; readers go forward)
REPEATED_KEYS = "repeated_keys"  # the index's Parquet metadata: keys more than one input gives (JSON)
LISTING = "listing"  # the index's Parquet metadata: "in progress" while the dataset is being listed (absent: complete)


def plan_dir(out: str) -> str:
    return out.rstrip("/") + "/plan"


def index_uri(out: str) -> str:
    return plan_dir(out) + "/index.parquet"


def legacy_plan_uri(out: str) -> str:
    """Store format 1 kept the whole plan in one file."""
    return out.rstrip("/") + "/plan.parquet"


def part_path(listing: str, number: int) -> str:
    """A part's file under plan/: parts of one listing share a folder, so a listing that fails or
    is replaced (--overwrite) never touches the files an existing index names."""
    return f"{listing}/part-{number:06d}.parquet"


def save_part(out: str, path: str, items: pa.Table, storage_options: dict[str, Any] | None = None) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(items.cast(PLAN_PART_SCHEMA), sink, row_group_size=PART_ROW_GROUP)
    put_atomically(f"{plan_dir(out)}/{path}", sink.getvalue().to_pybytes(), storage_options)


@dataclass(frozen=True)
class PlanIndex:
    """The parts of a plan in row order: the only plan a driver holds."""

    table: pa.Table  # PLAN_INDEX_SCHEMA, ordered by first_row
    shard_size: int
    repeated_keys: dict[str, Any] | None = None  # image_ids more than one input gives (extraction.repeated_keys)
    complete: bool = True  # False while the dataset's listing goes on: more parts will follow

    @cached_property
    def first_rows(self) -> np.ndarray:
        return self.table.column("first_row").to_numpy()

    @cached_property
    def counts(self) -> np.ndarray:
        return self.table.column("count").to_numpy()

    @property
    def size(self) -> int:
        """Rows the plan spans (the store arrays' length): past the last part's last row."""
        return int((self.first_rows + self.counts).max()) if len(self.table) else 0

    @property
    def items(self) -> int:
        return int(self.counts.sum())

    @property
    def errors(self) -> int:
        return int(pc.sum(self.table.column("errors")).as_py() or 0)

    @property
    def shards(self) -> int:
        return -(-self.size // self.shard_size)

    @property
    def ready(self) -> int:
        """Shards whose rows are all planned: every one when the listing is complete, else the full ones."""
        return self.shards if self.complete else self.size // self.shard_size

    @cached_property
    def shard_counts(self) -> np.ndarray:
        """Items in each shard, from the parts' row ranges (O(parts + shards), no row is visited)."""
        starts, stops = self.first_rows, self.first_rows + self.counts
        used = self.counts > 0
        starts, stops = starts[used], stops[used]
        difference = np.zeros(self.shards + 1, np.int64)
        np.add.at(difference, starts // self.shard_size, self.shard_size)
        np.add.at(difference, (stops - 1) // self.shard_size + 1, -self.shard_size)
        counts = np.cumsum(difference[:-1])
        np.add.at(counts, starts // self.shard_size, -(starts % self.shard_size))
        np.add.at(counts, (stops - 1) // self.shard_size, -((-stops) % self.shard_size))
        return counts

    def images_in(self, shards: np.ndarray | list[int]) -> int:
        return int(self.shard_counts[np.asarray(shards, dtype=np.int64)].sum()) if len(shards) else 0

    def spans(self, shard: int) -> list[tuple[int, int, int]]:
        """(index row, first position, stop position) of each part holding rows of `shard`."""
        begin, end = shard * self.shard_size, (shard + 1) * self.shard_size
        spans = []
        i = max(0, bisect.bisect_right(self.first_rows, begin) - 1)
        while i < len(self.first_rows) and self.first_rows[i] < end:
            first = int(self.first_rows[i])
            start, stop = max(begin, first) - first, min(end, first + int(self.counts[i])) - first
            if start < stop:
                spans.append((i, start, stop))
            i += 1
        return spans

    def extended(self, rows: list[dict[str, Any]], repeated_keys: dict[str, Any] | None = None, complete: bool = True) -> PlanIndex:
        """The plan with more parts after its rows (--append, a listing that goes on), what their listing reported."""
        table = pa.concat_tables([self.table, pa.Table.from_pylist(rows, schema=PLAN_INDEX_SCHEMA)])
        return PlanIndex(table, self.shard_size, _merged(self.repeated_keys, repeated_keys), complete)

    @classmethod
    def of(cls, rows: list[dict[str, Any]], shard_size: int, repeated_keys: dict[str, Any] | None = None, complete: bool = True) -> PlanIndex:
        return cls(pa.Table.from_pylist(rows, schema=PLAN_INDEX_SCHEMA), shard_size, repeated_keys, complete)


def _merged(old: dict[str, Any] | None, new: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two listings' reports of repeated keys as one (counts added, the first examples kept)."""
    if old is None or new is None:
        return old or new
    return {"keys": old["keys"] + new["keys"], "rows": old["rows"] + new["rows"], "lower_bound": old["lower_bound"] or new["lower_bound"],
            "examples": (old["examples"] + new["examples"])[: len(old["examples"]) or len(new["examples"])]}  # fmt: skip


def write_index(out: str, index: PlanIndex, storage_options: dict[str, Any] | None = None) -> None:
    table = index.table
    metadata = {**(table.schema.metadata or {})}
    if index.repeated_keys is not None:
        metadata[REPEATED_KEYS.encode()] = json.dumps(index.repeated_keys).encode()
    if not index.complete:
        metadata[LISTING.encode()] = b"in progress"
    put_atomically(index_uri(out), parquet_bytes(table.replace_schema_metadata(metadata)), storage_options)


def read_index(out: str, shard_size: int, storage_options: dict[str, Any] | None = None) -> PlanIndex | None:
    """The plan's index, or None when there is none (no plan, or one of store format 1)."""
    try:
        with fsspec.open(index_uri(out), "rb", **(storage_options or {})) as handle:
            table = pq.read_table(handle)
    except FileNotFoundError:
        return None
    _check_version(table.schema, index_uri(out))
    metadata = table.schema.metadata or {}
    repeated = metadata.get(REPEATED_KEYS.encode())
    complete = metadata.get(LISTING.encode()) != b"in progress"
    return PlanIndex(table.cast(PLAN_INDEX_SCHEMA), shard_size, json.loads(repeated) if repeated else None, complete)


def _check_version(schema: pa.Schema, where: str) -> None:
    version = int((schema.metadata or {}).get(b"schema_version", b"1"))
    if version != PLAN_SCHEMA_VERSION:
        raise StoreMismatchError(
            f"{where} has plan schema {version}, this version reads {PLAN_SCHEMA_VERSION}: extract again into another --out, or pass --overwrite"
        )


def with_rows(items: pa.Table, first_row: int, shard_size: int) -> pa.Table:
    """A part's items (or a slice of them starting at `first_row`) as plan rows."""
    rows = np.arange(first_row, first_row + items.num_rows, dtype=np.int64)
    return items.append_column("shard", pa.array(rows // shard_size, pa.int32())).append_column("row", pa.array(rows))


def read_plan(out: str, shard_size: int, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The whole plan as rows (PLAN_SCHEMA), for readers of a store that want every item's
    location; a driver never calls this. Reads the single file of store format 1 too."""
    index = read_index(out, shard_size, storage_options)
    if index is None:
        with fsspec.open(legacy_plan_uri(out), "rb", **(storage_options or {})) as handle:
            return pq.read_table(handle)
    fs, root = fsspec.core.url_to_fs(plan_dir(out), **(storage_options or {}))
    tables = []
    for path, first in zip(index.table.column("path").to_pylist(), index.first_rows):
        with fs.open(f"{root}/{path}", "rb") as handle:
            tables.append(with_rows(pq.read_table(handle, schema=PLAN_PART_SCHEMA), int(first), shard_size))
    return pa.concat_tables(tables) if tables else PLAN_SCHEMA.empty_table()


@dataclass
class PlanReader:
    """A shard's plan rows, read from the parts it spans: a part's footer is read once, and the
    row groups last read are kept, since a reader's shards come in order. Thread-safe."""

    out: str
    index: PlanIndex
    storage_options: dict[str, Any] = field(default_factory=dict)
    _open: collections.OrderedDict = field(default_factory=collections.OrderedDict, repr=False)
    _groups: collections.OrderedDict = field(default_factory=collections.OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def rows(self, shard: int) -> list[dict[str, Any]]:
        with self._lock:
            if not self.index.complete and shard >= self.index.ready:  # planned since this reader's index was read
                self._reread()
            tables = [
                with_rows(self._slice(i, start, stop), int(self.index.first_rows[i]) + start, self.index.shard_size)
                for i, start, stop in self.index.spans(shard)
            ]
        return pa.concat_tables(tables).to_pylist() if tables else []

    def _reread(self) -> None:
        index = read_index(self.out, self.index.shard_size, self.storage_options)
        if index is not None:
            self.index = index

    def _slice(self, part: int, start: int, stop: int) -> pa.Table:
        groups = range(start // PART_ROW_GROUP, (stop - 1) // PART_ROW_GROUP + 1)
        table = pa.concat_tables([self._group(part, g) for g in groups])
        return table.slice(start - groups[0] * PART_ROW_GROUP, stop - start)

    def _group(self, part: int, group: int) -> pa.Table:
        key = (part, group)
        if key not in self._groups:
            self._groups[key] = self._file(part).read_row_group(group)
            while len(self._groups) > OPEN_PARTS:
                self._groups.popitem(last=False)
        return self._groups[key]

    def _file(self, part: int) -> pq.ParquetFile:
        if part not in self._open:
            path = f"{plan_dir(self.out)}/{self.index.table.column('path')[part].as_py()}"
            self._open[part] = pq.ParquetFile(fsspec.open(path, "rb", **self.storage_options).open())
            while len(self._open) > OPEN_PARTS:
                self._open.popitem(last=False)[1].close()
        return self._open[part]
