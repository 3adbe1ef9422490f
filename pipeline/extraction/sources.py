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
import logging
import os
import posixpath
import queue
import stat
import tarfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import IO, Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from schemas import PLAN_SCHEMA

log = logging.getLogger("srt")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".csv")
URI_COLUMNS = ("uri", "url", "path", "filepath", "file")
ID_COLUMNS = ("image_id", "id", "key")
BYTES_COLUMNS = ("image", "jpg", "png", "bytes", "img", "image_bytes")
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Item:
    """One input of the dataset and how to fetch it; an input the listing already found broken
    carries `error_kind` and `error` and becomes an error row without being read."""

    image_id: str
    uri: str
    source: str = "file"  # "file", "tar" or "parquet"
    container: str | None = None
    member: str | None = None
    column: str | None = None
    duplicate_of: str | None = None
    offset: int | None = None  # tar member: where its data starts in the container
    size: int | None = None  # tar member: how many bytes it has
    error_kind: str | None = None
    error: str | None = None


class SourceError(ValueError):
    """The dataset URI cannot be listed (missing, empty, or of an unknown kind)."""


class TarMemberError(OSError):
    """A tar member's planned bytes are not there any more (truncated or rewritten container)."""


RANGE_MERGE_GAP = 64 << 10  # ranges of one object closer than this are fetched together
RANGE_MERGE_BLOCK = 256 << 20  # but no single request larger than this
DEFAULT_READ_RETRIES = 5
READ_BACKOFF_SECONDS = 0.5  # then 1, 2, 4, 8: about 15 s of outage ridden out by default
READ_DEADLINE_SECONDS = 120.0  # per call (one shard): retries stop once they would pass it
PERMANENT_READ_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TarMemberError, SourceError)
# Transient errors of the clients fsspec uses, by name, so none of them must be imported here.
TRANSIENT_ERROR_NAMES = frozenset(
    {
        "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
        "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
        "ServerTimeoutError", "FSTimeoutError", "IncompleteRead", "ProtocolError",
    }
)  # fmt: skip
TRANSIENT_ERROR_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable", "InternalError", "RequestTimeout")


def uri_id(uri: str) -> str:
    """Stable image_id for items without a user key: a hash of the URI."""
    return hashlib.sha1(uri.encode()).hexdigest()[:16]


def normalize_uri(uri: str) -> str:
    """One spelling per location, for fingerprints and duplicate detection: a local path made
    absolute and normalized (`file://` dropped, `.` and `..` resolved, no trailing slash); a remote
    URI keeps its key as written (an object key may hold `./`), minus a trailing slash."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


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
    """Every input of the dataset in a stable order, with unique image_ids (duplicates marked).

    Each container and special file is an input that can fail on its own: one that cannot be
    listed, or that is no regular file, becomes an error item; the rest of the dataset goes on.
    """
    fs, path = fsspec.core.url_to_fs(dataset, **(storage_options or {}))
    if path.lower().endswith(LIST_EXTENSIONS):
        return _mark_duplicates(_list_file_list(fs, path))
    items = []
    for file in _expand(fs, path, dataset):
        lower = file.lower()
        lister = _list_tar if lower.endswith(".tar") else _list_parquet if lower.endswith(".parquet") else None
        if lister is None and not lower.endswith(IMAGE_EXTENSIONS):
            continue
        uri = _full_uri(fs, file)
        if isinstance(fs, LocalFileSystem) and (problem := not_regular(file)):
            items.append(failed_item(uri, "special_file", problem))
        elif lister is None:
            items.append(Item(image_id=uri_id(uri), uri=uri))
        else:
            try:
                items.extend(lister(fs, file))
            except Exception as error:  # unreadable container: one error row, the dataset goes on
                items.append(failed_item(uri, "container", f"cannot list {posixpath.basename(file)}: {type(error).__name__}: {error}"))
    return _mark_duplicates(items)


def failed_item(uri: str, kind: str, reason: str) -> Item:
    """An input the listing found broken: planned as an error row, never read."""
    return Item(image_id=uri_id(uri), uri=uri, error_kind=kind, error=reason)


def not_regular(path: str) -> str | None:
    """Why a local path is no regular file, or None. Opening a FIFO blocks until a writer comes,
    so special files and dangling links must be found by their metadata, never by reading."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a regular file is fine
    except OSError as error:
        link = " (symbolic link)" if os.path.islink(path) else ""
        return f"cannot stat{link}: {error.strerror}"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))
    return "not a regular file: " + next((name for test, name in kinds if test(mode)), f"file mode {mode:o}")


def _expand(fs: fsspec.AbstractFileSystem, path: str, dataset: str) -> list[str]:
    if any(c in path for c in GLOB_CHARS):
        return sorted(p for p in fs.glob(path) if not fs.isdir(p))
    if fs.isdir(path):
        return sorted(fs.find(path))
    if fs.exists(path) or (isinstance(fs, LocalFileSystem) and os.path.islink(path)):
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
        uri = normalize_uri(uri)
        key = str(row[id_column]).strip() if id_column and row[id_column] not in (None, "") else uri_id(uri)
        items.append(Item(image_id=key, uri=uri))
    return items


def _list_tar(fs: fsspec.AbstractFileSystem, path: str) -> list[Item]:
    """WebDataset convention: members sharing a key (path up to the first dot of the basename)
    form one sample; its image is the first member with an image extension.

    Headers only are read (tarfile seeks over member data), and each image's data offset and size
    are planned, so readers fetch exactly those bytes. Members listed before a corrupt header or
    a truncation are kept, and the damage becomes an error item for the container.
    """
    container = _full_uri(fs, path)
    samples: dict[str, tarfile.TarInfo] = {}
    damage = None
    with fs.open(path, "rb") as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r:") as archive:
                for member in archive:
                    if member.isfile() and member.name.lower().endswith(IMAGE_EXTENSIONS):
                        folder, base = posixpath.split(member.name)
                        samples.setdefault(posixpath.join(folder, base.split(".", 1)[0]), member)
                damage = _unlisted_rest(handle, archive.offset)
        except tarfile.TarError as error:
            damage = str(error)
    items = [
        Item(image_id=key, uri=f"{container}#{m.name}", source="tar", container=container, member=m.name, offset=m.offset_data, size=m.size)
        for key, m in samples.items()
    ]
    if damage:
        listed = f"the {len(items)} image members before it are kept, any after it are not listed" if items else "no member could be listed"
        items.append(failed_item(container, "container", f"{posixpath.basename(path)} is damaged ({damage}): {listed}"))
    return items


def _unlisted_rest(handle: IO[bytes], offset: int) -> str | None:
    """tarfile ends its listing silently at an invalid header past the first: the block where it
    stopped must be the end-of-archive marker (zeros) or the end of the file."""
    handle.seek(offset)
    block = handle.read(tarfile.BLOCKSIZE)
    return None if block.count(0) == len(block) else f"invalid header at byte {offset}"


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
    columns = {name: [getattr(item, name) for item in items] for name in PLAN_SCHEMA.names if name not in ("row", "shard")}
    columns["row"] = list(range(len(items)))
    columns["shard"] = [row // shard_size for row in columns["row"]]
    return pa.Table.from_pydict(columns, schema=PLAN_SCHEMA)


def shard_rows(plan: pa.Table, shard: int, shard_size: int) -> list[dict[str, Any]]:
    """The plan rows of one shard, as dicts (what a worker receives): a contiguous slice."""
    return plan.slice(shard * shard_size, shard_size).to_pylist()


# ---------------------------------------------------------------------------- reading


def read_bytes(
    rows: list[dict[str, Any]], storage_options: dict[str, Any] | None = None, *, retries: int = DEFAULT_READ_RETRIES, deadline: float = READ_DEADLINE_SECONDS
) -> list[bytes | Exception]:
    """Bytes of each planned row, in order; a failed read is returned as its exception.

    Reads that failed transiently (`is_transient`) are tried again, up to `retries` times with
    exponential backoff, while the whole call stays within `deadline` seconds; permanent failures
    (not found, permission denied, a damaged container) are returned at once.
    """
    started = time.monotonic()
    results = _read_once(rows, storage_options or {})
    for attempt in range(retries):
        again = [i for i, result in enumerate(results) if isinstance(result, Exception) and is_transient(result)]
        wait = READ_BACKOFF_SECONDS * 2**attempt
        if not again or time.monotonic() + wait - started > deadline:
            break
        log.warning("%d reads failed transiently (%s); retry %d of %d in %.1f s", len(again), _first_line(results[again[0]]), attempt + 1, retries, wait)
        time.sleep(wait)
        for i, value in zip(again, _read_once([rows[i] for i in again], storage_options or {})):
            results[i] = value
    return results


def is_transient(error: BaseException) -> bool:
    """Whether a read may succeed if tried again: connection refused or reset, timeouts, throttling,
    server errors. The exception and its causes are examined (s3fs wraps aiohttp wraps OSError)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, PERMANENT_READ_ERRORS):
            return False
        if isinstance(current, (ConnectionError, TimeoutError)) or type(current).__name__ in TRANSIENT_ERROR_NAMES:
            return True
        status = getattr(current, "status", None) or getattr(current, "status_code", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        if any(code in str(current) for code in TRANSIENT_ERROR_CODES):
            return True
        current = current.__cause__ or current.__context__
    return False


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def _read_once(rows: list[dict[str, Any]], options: dict[str, Any]) -> list[bytes | Exception]:
    """One attempt at every row: files on one filesystem fetched together (concurrently on
    s3/gcs/http), tar members by the byte ranges planned for them, a parquet container opened once
    for its rows. Rows the listing already failed are not read."""
    results: list[bytes | Exception | None] = [None] * len(rows)
    by_fs: dict[int, tuple[fsspec.AbstractFileSystem, list[int], list[str]]] = {}
    parquets: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if row["error_kind"] is not None:
            results[index] = SourceError(row["error"])
        elif row["source"] == "parquet":
            parquets[row["container"]].append(index)
        else:
            fs, path = fsspec.core.url_to_fs(row["container"] or row["uri"], **options)
            entry = by_fs.setdefault(id(fs), (fs, [], []))
            entry[1].append(index)
            entry[2].append(path)
    for fs, indices, paths in by_fs.values():
        for i, value in zip(indices, _fetch(fs, paths, [rows[i] for i in indices])):
            results[i] = value
    for container, indices in parquets.items():
        try:
            for i, value in zip(indices, _read_parquet_rows(container, [rows[i] for i in indices], options)):
                results[i] = value
        except Exception as error:  # the container itself is unreadable or changed: every member fails
            for i in indices:
                results[i] = error
    return [r if r is not None else FileNotFoundError(rows[i]["uri"]) for i, r in enumerate(results)]


def _fetch(fs: fsspec.AbstractFileSystem, paths: list[str], rows: list[dict[str, Any]]) -> list[bytes | Exception]:
    """Whole files, and tar members by their planned ranges (with the header block before the
    data, which proves the container still holds that member), in one batch per filesystem."""
    starts = [None if row["offset"] is None else row["offset"] - tarfile.BLOCKSIZE for row in rows]
    ends = [None if row["offset"] is None else row["offset"] + row["size"] for row in rows]
    if isinstance(fs, LocalFileSystem):  # never open a special file: a FIFO would block the worker
        blobs = [_read_local(path, start, end) for path, start, end in zip(paths, starts, ends)]
    else:
        blobs = _cat_merged(fs, paths, starts, ends)
    return [blob if isinstance(blob, Exception) or row["offset"] is None else _tar_member_data(blob, row) for blob, row in zip(blobs, rows)]


def _cat_merged(fs: fsspec.AbstractFileSystem, paths: list[str], starts: list[int | None], ends: list[int | None]) -> list[bytes | Exception]:
    """`cat_ranges` with neighbouring ranges of one object fetched as one request: a shard's tar
    members lie back to back, so a shard costs a request per container, not per member."""
    ranged = [i for i, start in enumerate(starts) if start is not None]
    whole = [i for i, start in enumerate(starts) if start is None]
    results: list[bytes | Exception | None] = [None] * len(paths)
    if whole:
        for i, blob in zip(whole, fs.cat_ranges([paths[i] for i in whole], None, None, on_error="return")):
            results[i] = blob
    if ranged:
        merged = fsspec.utils.merge_offset_ranges([paths[i] for i in ranged], [starts[i] for i in ranged], [ends[i] for i in ranged], max_gap=RANGE_MERGE_GAP, max_block=RANGE_MERGE_BLOCK)
        blocks = fs.cat_ranges(*merged, on_error="return")
        for i in ranged:
            block, (start, end) = next((b, (s, e)) for b, p, s, e in zip(blocks, *merged) if p == paths[i] and s <= starts[i] and ends[i] <= e)
            results[i] = block if isinstance(block, Exception) else block[starts[i] - start : ends[i] - start]
    return results


def _read_local(path: str, start: int | None, end: int | None) -> bytes | Exception:
    try:
        if problem := not_regular(path):
            raise OSError(f"{path}: {problem}")
        with open(path, "rb") as handle:
            handle.seek(start or 0)
            return handle.read() if end is None else handle.read(end - (start or 0))
    except OSError as error:
        return error


def _tar_member_data(blob: bytes, row: dict[str, Any]) -> bytes | Exception:
    """The member's data, after checking that the bytes before it are still its header."""
    expected = tarfile.BLOCKSIZE + row["size"]
    if len(blob) != expected:
        return TarMemberError(f"{row['uri']}: container truncated: {len(blob)} of {expected} bytes at byte {row['offset'] - tarfile.BLOCKSIZE}")
    try:
        header = tarfile.TarInfo.frombuf(blob[: tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
    except tarfile.HeaderError as error:
        return TarMemberError(f"{row['uri']}: no member header before the planned data ({error}); the container changed since listing")
    if header.size != row["size"]:
        return TarMemberError(f"{row['uri']}: the header there says {header.size} bytes, {row['size']} were listed; the container changed since listing")
    return blob[tarfile.BLOCKSIZE :]


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
