"""List a dataset through fsspec into a deterministic plan of work shards.

A dataset URI is a directory or glob (images, .tar shards and image-bytes .parquet files found
under it), a single .tar or .parquet, or a file list (.txt, .csv, or a .parquet of URIs).
Listing reads names and metadata only, never image bytes. The plan is written once into the
output, so workers and resumed runs read it instead of listing again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import posixpath
import stat
import tarfile
from dataclasses import asdict, dataclass
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.store.schemas import PLAN_SCHEMA
from pipeline.store.uris import normalize_uri, one_line

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



def uri_id(uri: str) -> str:
    """Stable image_id for items without a user key: a hash of the URI."""
    return hashlib.sha1(uri.encode()).hexdigest()[:16]



def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


# ---------------------------------------------------------------------------- listing


def check_dataset(dataset: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail in one line naming --dataset, before any cluster starts or anything is listed, when the
    dataset is not there, cannot be reached with these storage options (no credentials, an
    unreachable endpoint), or is a feature store, whose plan and manifest would be read as file lists."""
    try:
        fs, path = fsspec.core.url_to_fs(dataset, **(storage_options or {}))
        if any(c in path for c in GLOB_CHARS):
            return  # a pattern is matched at listing
        try:
            is_folder = fs.info(path)["type"] == "directory"
        except FileNotFoundError:
            if isinstance(fs, LocalFileSystem) and os.path.islink(path):
                return  # a dangling link is listed as an error row
            raise SourceError(f"--dataset {dataset}: no such file or directory") from None
        if is_folder and fs.exists(f"{path.rstrip('/')}/zarr.json"):
            raise SourceError(f"--dataset {dataset} is a feature store (it holds zarr.json): give the images' folder, file list or containers")
    except SourceError:
        raise
    except Exception as error:  # credentials, endpoints and protocols fail in many types
        raise SourceError(f"--dataset {dataset} cannot be read ({one_line(error)}); check the URI and --storage-options") from error


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
