"""List a dataset through fsspec, one input at a time.

A dataset URI is a directory or glob (images, .tar shards and image-bytes .parquet files found
under it), a single .tar or .parquet, or a file list (.txt, .csv, or a .parquet of URIs).

Parquet files are read by where they are (img2dataset's layouts): one beside a tar or a folder of
the same stem (`00000.tar` or `00000/` + `00000.parquet`) without image bytes is its metadata
and lists no item; any other found in a folder or glob must hold image bytes (img2dataset's
parquet output), and one that does not is refused naming it; a Parquet of URIs is a file list
only when it is `--dataset` itself.

`dataset_inputs` finds its inputs (names and sizes only): each tar, each Parquet file, each range
of lines of a file list, each batch of image files. `list_input` lists one of them into its items
(anywhere on a cluster), reading names and metadata only, never image bytes; the planning step
(pipeline.extraction.planning) writes each input's items as one plan part.

Repeated URIs and image_ids are marked within an input (a tar, a Parquet file, a range of a file
list, a batch of image files): the first keeps its id, later ones become `duplicate` error rows.
Across inputs keys are the user's: WebDataset keys and id columns are taken as given.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from pipeline.store.schemas import PLAN_PART_SCHEMA
from pipeline.store.uris import normalize_uri, one_line

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


@dataclass(frozen=True)
class Input:
    """One unit of listing: a container, a range of a file list, or a batch of image files."""

    kind: str  # "files", "tar", "parquet" or "list"
    uri: str  # the container or file list (files: the dataset)
    files: tuple[str, ...] = ()  # files: the image files' URIs
    size: int | None = None  # the object's size, when the folder listing gave it (saves a request)
    role: str = "images"  # parquet without image bytes: "images" refused, "list" a file list (--dataset itself), "sidecar" metadata
    start: int | None = None  # list: the byte range of lines it holds (lines starting in [start, stop))
    stop: int | None = None


FILES_PER_INPUT = 10_000  # image files listed as one input (one plan part)
LIST_BYTES_PER_INPUT = 1 << 20  # a text file list is listed in ranges of this many bytes (about 20k URIs)
CONTAINER_BLOCK = 64 << 20  # tars are listed by reading ahead this much per request (headers sit between members)
TAIL_BYTES = 64  # a file list's last listed bytes, hashed, tell --append whether it only grew


def dataset_inputs(dataset: str, storage_options: dict[str, Any] | None = None) -> Iterator[Input]:
    """The dataset's inputs in a stable order (sorted paths; a file list's ranges in order)."""
    fs, path = fsspec.core.url_to_fs(dataset, **(storage_options or {}))
    if path.lower().endswith(LIST_EXTENSIONS):
        yield from list_ranges(_full_uri(fs, path), fs.size(path))
        return
    batch: list[str] = []
    files = _expand(fs, path, dataset)
    given_itself = len(files) == 1 and files[0][0] == path  # --dataset names one file, not a folder or glob
    # img2dataset writes each tar's or folder's metadata beside it: 00000.tar or 00000/ with 00000.parquet
    described = {file[: -len(".tar")] for file, _ in files if file.lower().endswith(".tar")} | {posixpath.dirname(file) for file, _ in files}
    for file, size in files:
        lower = file.lower()
        uri = _full_uri(fs, file)
        kind = "tar" if lower.endswith(".tar") else "parquet" if lower.endswith(".parquet") else None
        if kind is None and lower.endswith(IMAGE_EXTENSIONS):
            batch.append(uri)
            if len(batch) == FILES_PER_INPUT:
                yield Input("files", dataset, tuple(batch))
                batch = []
        elif kind is not None:
            if batch:
                yield Input("files", dataset, tuple(batch))
                batch = []
            role = "list" if given_itself else "sidecar" if kind == "parquet" and file[: -len(".parquet")] in described else "images"
            yield Input(kind, uri, size=size, role=role)
    if batch:
        yield Input("files", dataset, tuple(batch))


def list_ranges(uri: str, size: int, start: int = 0) -> Iterator[Input]:
    """A text file list's bytes [start, size) as inputs of LIST_BYTES_PER_INPUT each."""
    for begin in range(start, size, LIST_BYTES_PER_INPUT):
        yield Input("list", uri, size=size, start=begin, stop=min(size, begin + LIST_BYTES_PER_INPUT))


def list_input(unit: Input, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The items of one input (PLAN_PART_SCHEMA), duplicates marked. A container that cannot be
    listed, or an image file that is no regular file, becomes an error item; a file list that
    cannot be read raises."""
    fs, path = fsspec.core.url_to_fs(unit.uri, **(storage_options or {}))
    if unit.kind == "list":
        return _marked(_list_file_list(fs, path, unit.start or 0, unit.stop, unit.size))
    if unit.kind == "files":
        local = isinstance(fs, LocalFileSystem)
        return _marked(items_table(
            [failed_item(uri, "special_file", problem) if local and (problem := not_regular(uri)) else Item(image_id=uri_id(uri), uri=uri) for uri in unit.files]
        ))  # fmt: skip
    if isinstance(fs, LocalFileSystem) and (problem := not_regular(path)):
        return items_table([failed_item(unit.uri, "special_file", problem)])
    try:
        return _marked(_list_tar(fs, path, unit.size) if unit.kind == "tar" else _list_parquet(fs, path, unit.size, unit.role))
    except SourceError:
        raise
    except Exception as error:  # unreadable container: one error row, the dataset goes on
        return items_table([failed_item(unit.uri, "container", f"cannot list {posixpath.basename(path)}: {type(error).__name__}: {error}")])


def list_tail(uri: str, stop: int, storage_options: dict[str, Any] | None = None) -> str:
    """sha1 of a file list's TAIL_BYTES before `stop`: unchanged when the list only grew since."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    begin = max(0, stop - TAIL_BYTES)
    return hashlib.sha1(fs.cat_file(path, start=begin, end=stop)).hexdigest()


def items_table(items: list[Item]) -> pa.Table:
    return pa.Table.from_pydict({name: [getattr(item, name) for item in items] for name in PLAN_PART_SCHEMA.names}, schema=PLAN_PART_SCHEMA)


def columns_table(count: int, **columns: list[Any]) -> pa.Table:
    """A part's items from whole columns (the rest null): file lists' millions of rows are never
    made into an object each."""
    return pa.table({f.name: pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(count, f.type) for f in PLAN_PART_SCHEMA}, schema=PLAN_PART_SCHEMA)


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


def _expand(fs: fsspec.AbstractFileSystem, path: str, dataset: str) -> list[tuple[str, int | None]]:
    """(path, size) of each file the dataset names, sorted; sizes from the listing itself, so no
    input is asked for its size again (one request fewer per container on an object store)."""
    if any(c in path for c in GLOB_CHARS):
        found = fs.glob(path, detail=True)
    else:
        try:
            info = fs.info(path)
        except FileNotFoundError:
            if isinstance(fs, LocalFileSystem) and os.path.islink(path):
                return [(path, None)]  # a dangling link: an error row
            raise SourceError(f"--dataset {dataset}: no such file or directory") from None
        if info["type"] != "directory":
            return [(path, info.get("size"))]
        found = fs.find(path, detail=True)
    return sorted((name, info.get("size")) for name, info in found.items() if info.get("type") != "directory")


def _list_file_list(fs: fsspec.AbstractFileSystem, path: str, start: int, stop: int | None, size: int | None) -> pa.Table:
    """The lines of a .txt (one URI a line) or .csv (a URI column, optional id column) that start
    in [start, stop) (the whole list when stop is None); relative URIs resolve against the list's
    own folder. A CSV's header is its first line, whichever range is listed."""
    with fs.open(path, "rb", block_size=LIST_BYTES_PER_INPUT + (1 << 20), size=size) as handle:
        header = b""
        if path.lower().endswith(".csv") and start > 0:
            header = handle.readline()
        if start > 0:
            handle.seek(start - 1)
            if handle.read(1) != b"\n":
                handle.readline()  # the line in progress belongs to the range before
        data = handle.read() if stop is None else handle.read(max(0, stop - handle.tell()))
        if data and not data.endswith(b"\n"):
            data += handle.readline()  # the last line started in the range: it belongs to it
    text = (header + data).decode()
    base = _full_uri(fs, posixpath.dirname(path))
    if path.lower().endswith(".txt"):
        uris = [stripped for line in text.splitlines() if (stripped := line.strip()) and not stripped.startswith("#")]
        return _file_items(uris, None, base)
    return _items_from_rows(list(csv.DictReader(io.StringIO(text))), base=base, where=path)


def _items_from_rows(rows: list[dict[str, Any]], *, base: str, where: str) -> pa.Table:
    """File items of the rows of a file list: their URIs (relative ones resolved against `base`),
    and their ids (an id column, else a hash of the URI)."""
    if not rows:
        return PLAN_PART_SCHEMA.empty_table()
    columns = {c.lower(): c for c in rows[0]}
    uri_column = next((columns[c] for c in URI_COLUMNS if c in columns), None)
    if uri_column is None:
        raise SourceError(f"{where}: no URI column; expected one of {URI_COLUMNS}, found {list(rows[0])}")
    id_column = next((columns[c] for c in ID_COLUMNS if c in columns), None)
    keys = [str(row[id_column]).strip() if row[id_column] not in (None, "") else None for row in rows] if id_column else None
    return _file_items([str(row[uri_column]).strip() for row in rows], keys, base)


def _file_items(written: list[str], keys: list[str | None] | None, base: str) -> pa.Table:
    """File items of URIs as a list writes them (relative ones resolved against `base`), with the
    user's keys where given, else a hash of the URI."""
    uris = [normalize_uri(uri if "://" in uri or uri.startswith("/") else posixpath.join(base, uri)) for uri in written]
    ids = [key or uri_id(uri) for key, uri in zip(keys or [None] * len(uris), uris)]
    return columns_table(len(uris), image_id=ids, uri=uris, source=["file"] * len(uris))


def _list_tar(fs: fsspec.AbstractFileSystem, path: str, size: int | None) -> pa.Table:
    """WebDataset convention: members sharing a key (path up to the first dot of the basename)
    form one sample; its image is the first member with an image extension.

    Headers only are parsed (tarfile seeks over member data), read ahead in large blocks, so a
    tar is listed in a request per CONTAINER_BLOCK rather than one per member; each image's data
    offset and size are planned, so readers fetch exactly those bytes. Members listed before a corrupt header or
    a truncation are kept, and the damage becomes an error item for the container.
    """
    container = _full_uri(fs, path)
    samples: dict[str, tarfile.TarInfo] = {}
    damage = None
    with fs.open(path, "rb", block_size=CONTAINER_BLOCK, cache_type="readahead", size=size) as handle:
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
    return items_table(items)


def _unlisted_rest(handle: IO[bytes], offset: int) -> str | None:
    """tarfile ends its listing silently at an invalid header past the first: the block where it
    stopped must be the end-of-archive marker (zeros) or the end of the file."""
    handle.seek(offset)
    block = handle.read(tarfile.BLOCKSIZE)
    return None if block.count(0) == len(block) else f"invalid header at byte {offset}"


def _list_parquet(fs: fsspec.AbstractFileSystem, path: str, size: int | None, role: str) -> pa.Table:
    """Parquet of image bytes (a binary column, or a struct with a `bytes` field as Hugging Face
    writes it); without them, by its `role` (`Input.role`): a file list of URIs, a sidecar's
    metadata (no items), or refused. Only the schema and the id/URI column are read."""
    container = _full_uri(fs, path)
    with fs.open(path, "rb", size=size) as handle:
        parquet = pq.ParquetFile(handle)
        schema = parquet.schema_arrow
        names = {n.lower(): n for n in schema.names}
        image_column = next(
            (names[c] for c in BYTES_COLUMNS if c in names and _holds_bytes(schema.field(names[c]).type)), None
        )
        if image_column is None and role == "sidecar":  # img2dataset's metadata of the tar or folder beside it
            return PLAN_PART_SCHEMA.empty_table()
        if image_column is None:
            if role != "list":
                raise SourceError(
                    f"{_full_uri(fs, path)} holds no image bytes (a binary column named one of {', '.join(BYTES_COLUMNS)}); "
                    "a folder's Parquet files must be image-bytes tables, a Parquet of URIs is a file list only when given as --dataset itself"
                )
            rows = parquet.read().to_pylist()
            return _items_from_rows(rows, base=_full_uri(fs, posixpath.dirname(path)), where=path)
        id_column = next((names[c] for c in ID_COLUMNS if c in names), None)
        count = parquet.metadata.num_rows
        keys = parquet.read(columns=[id_column]).column(0).to_pylist() if id_column else [None] * count
    uris = [f"{container}#{row}" for row in range(count)]
    return columns_table(
        count, image_id=[str(key) if key is not None else uri_id(uri) for key, uri in zip(keys, uris)], uri=uris, source=["parquet"] * count,
        container=[container] * count, member=[str(row) for row in range(count)], column=[image_column] * count,
    )  # fmt: skip


def _holds_bytes(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        return any(kind.field(i).name == "bytes" for i in range(kind.num_fields))
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _marked(items: pa.Table) -> pa.Table:
    """A repeated URI or key keeps one image_id for its first occurrence; later ones get a
    derived unique id and `duplicate_of`, so they become error rows instead of vanishing."""
    ids, uris = items.column("image_id").to_pylist(), items.column("uri").to_pylist()
    duplicate_of: list[str | None] = [None] * len(ids)
    first_by_uri: dict[str, str] = {}
    seen_ids: set[str] = set()
    for i, (image_id, uri) in enumerate(zip(ids, uris)):
        original = first_by_uri.get(uri)
        if original is not None or image_id in seen_ids:
            n = 1
            while f"{image_id}~{n}" in seen_ids:
                n += 1
            duplicate_of[i] = original or image_id
            image_id = ids[i] = f"{image_id}~{n}"
        first_by_uri.setdefault(uri, image_id)
        seen_ids.add(image_id)
    if not any(duplicate_of):
        return items
    items = items.set_column(items.schema.get_field_index("image_id"), PLAN_PART_SCHEMA.field("image_id"), pa.array(ids, pa.string()))
    return items.set_column(items.schema.get_field_index("duplicate_of"), PLAN_PART_SCHEMA.field("duplicate_of"), pa.array(duplicate_of, pa.string()))
