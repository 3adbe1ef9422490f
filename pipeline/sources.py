"""Dataset sources through fsspec: list items into a deterministic plan, then read their bytes.

A dataset URI is a directory or glob (images, .tar shards and image-bytes .parquet files found
under it), a single .tar or .parquet, or a file list (.txt, .csv, or a .parquet of URIs).
Listing reads names and metadata only, never image bytes. The plan is written once into the
output, so workers and resumed runs read it instead of listing again.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import io
import itertools
import posixpath
import queue
import tarfile
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from schemas import PLAN_SCHEMA

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".csv")
URI_COLUMNS = ("uri", "url", "path", "filepath", "file")
ID_COLUMNS = ("image_id", "id", "key")
BYTES_COLUMNS = ("image", "jpg", "png", "bytes", "img", "image_bytes")
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Item:
    """One image of the dataset and how to fetch it."""

    image_id: str
    uri: str
    source: str = "file"  # "file", "tar" or "parquet"
    container: str | None = None
    member: str | None = None
    column: str | None = None
    duplicate_of: str | None = None


class SourceError(ValueError):
    """The dataset URI cannot be listed (missing, empty, or of an unknown kind)."""


def uri_id(uri: str) -> str:
    """Stable image_id for items without a user key: a hash of the URI."""
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def read_uri(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """The whole content of one object (a checkpoint, a sidecar) on any fsspec filesystem."""
    with fsspec.open(uri, "rb", **(storage_options or {})) as handle:
        return handle.read()


def uri_path(uri: str) -> PurePosixPath:
    """The path part of a URI (no protocol), for its folder and file names."""
    return PurePosixPath(uri.split("://", 1)[-1])


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


# ---------------------------------------------------------------------------- listing


def list_items(dataset: str, storage_options: dict[str, Any] | None = None) -> list[Item]:
    """Every image of the dataset in a stable order, with unique image_ids (duplicates marked)."""
    fs, path = fsspec.core.url_to_fs(dataset, **(storage_options or {}))
    if path.lower().endswith(LIST_EXTENSIONS):
        items = _list_file_list(fs, path)
    else:
        items = []
        for file in _expand(fs, path, dataset):
            lower = file.lower()
            if lower.endswith(IMAGE_EXTENSIONS):
                uri = _full_uri(fs, file)
                items.append(Item(image_id=uri_id(uri), uri=uri))
            elif lower.endswith(".tar"):
                items.extend(_list_tar(fs, file))
            elif lower.endswith(".parquet"):
                items.extend(_list_parquet(fs, file))
    return _mark_duplicates(items)


def _expand(fs: fsspec.AbstractFileSystem, path: str, dataset: str) -> list[str]:
    if any(c in path for c in GLOB_CHARS):
        return sorted(p for p in fs.glob(path) if not fs.isdir(p))
    if fs.isdir(path):
        return sorted(fs.find(path))
    if fs.exists(path):
        return [path]
    raise SourceError(f"--dataset {dataset}: no such file or directory")


def _list_file_list(fs: fsspec.AbstractFileSystem, path: str) -> list[Item]:
    """A .txt (one URI a line) or .csv (a URI column, optional id column); relative URIs resolve
    against the list's own folder."""
    text = fs.cat_file(path).decode()
    if path.lower().endswith(".txt"):
        rows = [{"uri": line.strip()} for line in text.splitlines() if line.strip() and not line.startswith("#")]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    return _items_from_rows(rows, base=_full_uri(fs, posixpath.dirname(path)), where=path)


def _items_from_rows(rows: list[dict[str, Any]], *, base: str, where: str) -> list[Item]:
    if not rows:
        return []
    columns = {c.lower(): c for c in rows[0]}
    uri_column = next((columns[c] for c in URI_COLUMNS if c in columns), None)
    if uri_column is None:
        raise SourceError(f"{where}: no URI column; expected one of {URI_COLUMNS}, found {list(rows[0])}")
    id_column = next((columns[c] for c in ID_COLUMNS if c in columns), None)
    items = []
    for row in rows:
        uri = str(row[uri_column]).strip()
        if "://" not in uri and not uri.startswith("/"):
            uri = posixpath.join(base, uri)
        key = str(row[id_column]).strip() if id_column and row[id_column] not in (None, "") else uri_id(uri)
        items.append(Item(image_id=key, uri=uri))
    return items


def _list_tar(fs: fsspec.AbstractFileSystem, path: str) -> list[Item]:
    """WebDataset convention: members sharing a key (path up to the first dot of the basename)
    form one sample; its image is the first member with an image extension."""
    container = _full_uri(fs, path)
    samples: dict[str, str] = {}
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
        for member in archive:  # headers only: tarfile seeks over member data
            if not member.isfile() or not member.name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            folder, base = posixpath.split(member.name)
            key = posixpath.join(folder, base.split(".", 1)[0])
            samples.setdefault(key, member.name)
    return [
        Item(image_id=key, uri=f"{container}#{name}", source="tar", container=container, member=name)
        for key, name in samples.items()
    ]


def _list_parquet(fs: fsspec.AbstractFileSystem, path: str) -> list[Item]:
    """Parquet of image bytes (a binary column, or a struct with a `bytes` field as Hugging Face
    writes it), or of URIs. Only the schema and the id/URI column are read."""
    container = _full_uri(fs, path)
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        names = {n.lower(): n for n in schema.names}
        image_column = next(
            (names[c] for c in BYTES_COLUMNS if c in names and _holds_bytes(schema.field(names[c]).type)), None
        )
        if image_column is None:
            rows = parquet.read().to_pylist()
            return _items_from_rows(rows, base=_full_uri(fs, posixpath.dirname(path)), where=path)
        id_column = next((names[c] for c in ID_COLUMNS if c in names), None)
        count = parquet.metadata.num_rows
        keys = parquet.read(columns=[id_column]).column(0).to_pylist() if id_column else [None] * count
    items = []
    for row, key in enumerate(keys):
        uri = f"{container}#{row}"
        items.append(
            Item(
                image_id=str(key) if key is not None else uri_id(uri),
                uri=uri,
                source="parquet",
                container=container,
                member=str(row),
                column=image_column,
            )
        )
    return items


def _holds_bytes(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        return any(kind.field(i).name == "bytes" for i in range(kind.num_fields))
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _mark_duplicates(items: list[Item]) -> list[Item]:
    """A repeated URI or key keeps one image_id for its first occurrence; later ones get a
    derived unique id and `duplicate_of`, so they become error rows instead of vanishing."""
    first_by_uri: dict[str, str] = {}
    seen_ids: set[str] = set()
    marked = []
    for item in items:
        original = first_by_uri.get(item.uri)
        image_id = item.image_id
        if original is not None or image_id in seen_ids:
            n = 1
            while f"{image_id}~{n}" in seen_ids:
                n += 1
            image_id = f"{image_id}~{n}"
            item = Item(**{**asdict(item), "image_id": image_id, "duplicate_of": original or item.image_id})
        first_by_uri.setdefault(item.uri, image_id)
        seen_ids.add(image_id)
        marked.append(item)
    return marked


# ---------------------------------------------------------------------------- plan


def make_plan(items: list[Item], shard_size: int) -> pa.Table:
    """Items in order, each with its shard and its row (= index in every store array)."""
    columns = {name: [getattr(item, name) for item in items] for name in ("image_id", "uri", "source", "container", "member", "column", "duplicate_of")}
    columns["row"] = list(range(len(items)))
    columns["shard"] = [row // shard_size for row in columns["row"]]
    return pa.Table.from_pydict(columns, schema=PLAN_SCHEMA)


def shard_rows(plan: pa.Table, shard: int, shard_size: int) -> list[dict[str, Any]]:
    """The plan rows of one shard, as dicts (what a worker receives): a contiguous slice."""
    return plan.slice(shard * shard_size, shard_size).to_pylist()


# ---------------------------------------------------------------------------- reading


def read_bytes(rows: list[dict[str, Any]], storage_options: dict[str, Any] | None = None) -> list[bytes | Exception]:
    """Bytes of each planned row, in order; a failed read is returned as its exception.

    Files on one filesystem are fetched together (concurrently on s3/gcs/http); a tar or parquet
    container is opened once for all its members in the shard.
    """
    options = storage_options or {}
    results: list[bytes | Exception | None] = [None] * len(rows)
    files: dict[int, tuple[fsspec.AbstractFileSystem, str]] = {}
    containers: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if row["source"] == "file":
            files[index] = fsspec.core.url_to_fs(row["uri"], **options)
        else:
            containers[row["container"]].append(index)
    by_fs: dict[int, list[int]] = defaultdict(list)
    for index, (fs, _) in files.items():
        by_fs[id(fs)].append(index)
    for indices in by_fs.values():
        fs = files[indices[0]][0]
        paths = [files[i][1] for i in indices]
        fetched = fs.cat(paths, on_error="return") if paths else {}
        for i, path in zip(indices, paths):
            results[i] = fetched.get(path, FileNotFoundError(path))
    for container, indices in containers.items():
        reader = _read_tar_members if rows[indices[0]]["source"] == "tar" else _read_parquet_rows
        try:
            for i, value in zip(indices, reader(container, [rows[i] for i in indices], options)):
                results[i] = value
        except Exception as error:  # the container itself is unreadable: every member fails
            for i in indices:
                results[i] = error
    return [r if r is not None else FileNotFoundError(rows[i]["uri"]) for i, r in enumerate(results)]


def _read_tar_members(container: str, rows: list[dict[str, Any]], options: dict[str, Any]) -> list[bytes | Exception]:
    wanted = {row["member"] for row in rows}
    found: dict[str, bytes] = {}
    with fsspec.open(container, "rb", **options) as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
        for member in archive:
            if member.name in wanted:
                found[member.name] = archive.extractfile(member).read()
                if len(found) == len(wanted):
                    break
    return [found.get(row["member"], FileNotFoundError(row["uri"])) for row in rows]


def _read_parquet_rows(container: str, rows: list[dict[str, Any]], options: dict[str, Any]) -> list[bytes | Exception]:
    """Read only the row groups that hold the wanted rows, and only the image column."""
    wanted = [int(row["member"]) for row in rows]
    with fsspec.open(container, "rb", **options) as handle:
        parquet = pq.ParquetFile(handle)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        starts = list(itertools.accumulate(sizes, initial=0))
        group_of = {row: bisect.bisect_right(starts, row) - 1 for row in wanted}
        groups = sorted(set(group_of.values()))
        cells = parquet.read_row_groups(groups, columns=[rows[0]["column"]]).column(0)
    offset_in_read = dict(zip(groups, itertools.accumulate((sizes[g] for g in groups), initial=0)))
    values = []
    for row in wanted:
        group = group_of[row]
        cell = cells[offset_in_read[group] + row - starts[group]].as_py()
        values.append(cell["bytes"] if isinstance(cell, dict) else cell)
    return values


T = TypeVar("T")


def prefetch(iterable: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Run `iterable` in a background thread, at most `depth` items ahead, so reads and decodes
    overlap the caller's compute while memory stays bounded. Exceptions surface in order."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for value in iterable:
                buffer.put((value, None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            buffer.put((None, error))
        buffer.put((done, None))

    threading.Thread(target=produce, daemon=True).start()
    while True:
        value, error = buffer.get()
        if error is not None:
            raise error
        if value is done:
            return
        yield value
