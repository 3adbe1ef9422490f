"""Read the planned items' bytes through fsspec: files, tar members by byte range, Parquet rows.

Neighbouring byte ranges of one object are fetched in one request; transient errors of the
object stores are retried with backoff up to a deadline; `prefetch` overlaps reading with work.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import posixpath
import queue
import tarfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import fsspec
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.extraction.listing import SourceError, not_regular
from pipeline.store.uris import one_line

log = logging.getLogger("srt")


class TarMemberError(OSError):
    """A tar member's planned bytes are not there any more (truncated or rewritten container)."""


class MissingCell(LookupError):
    """A Parquet row whose image cell is empty (img2dataset keeps its failed downloads so): no
    read will ever find bytes there, so it is its own error kind, `missing`, never retried."""


RANGE_MERGE_GAP = 64 << 10  # ranges of one object closer than this are fetched together
RANGE_MERGE_BLOCK = 256 << 20  # but no single request larger than this
DEFAULT_READ_RETRIES = 5
READ_BACKOFF_SECONDS = 0.5  # then 1, 2, 4, 8: about 15 s of outage ridden out by default
READ_DEADLINE_SECONDS = 120.0  # per call (one shard): retries stop once they would pass it
PERMANENT_READ_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, TarMemberError, MissingCell, SourceError)
# Transient errors of the clients fsspec uses, by name, so none of them must be imported here.
TRANSIENT_ERROR_NAMES = frozenset(
    {
        "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
        "ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
        "ServerTimeoutError", "FSTimeoutError", "IncompleteRead", "ProtocolError",
    }
)  # fmt: skip
TRANSIENT_ERROR_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "ServiceUnavailable", "InternalError", "RequestTimeout")



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
        log.warning("%d reads failed transiently (%s); retry %d of %d in %.1f s", len(again), one_line(results[again[0]]), attempt + 1, retries, wait)
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
    values: list[bytes | Exception] = []
    for row, planned in zip(wanted, rows):
        group = group_of[row]
        cell = cells[offset_in_read[group] + row - starts[group]].as_py()
        data = cell["bytes"] if isinstance(cell, dict) else cell
        values.append(MissingCell(f"row {row} of {posixpath.basename(container)} has an empty {planned['column']!r} cell") if data is None else data)
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
