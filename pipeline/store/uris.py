"""URIs through fsspec: one spelling per location, whole-object reads, path parts.

Every package reads and writes through these (checkpoints, sidecars, config files, ground truth),
so they sit at the bottom of the I/O stack, beside the store.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import Any

import fsspec


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


def one_line(error: BaseException, limit: int = 200) -> str:
    """An error as its type and first line: what a log line or a flag error quotes of it (S3 and
    network errors run to many lines)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:limit]}" if text else type(error).__name__


def uri_path(uri: str) -> PurePosixPath:
    """The path part of a URI (no protocol), for its folder and file names."""
    return PurePosixPath(uri.split("://", 1)[-1])
