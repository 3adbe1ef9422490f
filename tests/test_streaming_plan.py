"""The first result does not wait for the whole plan: shards of the inputs listed so far are
computed while later inputs are listed; a run stopped meanwhile leaves a plan marked in progress,
and a rerun lists on from where it stopped, to the store an uninterrupted run makes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.extraction.listing import SourceError
from pipeline.extraction.runner import run_local
from pipeline.store.layout import StoreMismatchError
from pipeline.store.plan import read_index
from pipeline.store.reader import FeatureStore
from tests.images_factory import encode, gradient, tar_bytes
from tests.test_extract_local import config

TARS = 5


def write_tars(folder: Path, count: int = TARS, first: int = 0) -> None:
    """`count` tars of 3 photos each: an input each, so the listing has several steps."""
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(first, first + count):
        (folder / f"{t:03d}.tar").write_bytes(tar_bytes({f"t{t}-{i}.jpg": encode(gradient(30 + i, 40, seed=10 * t + i), "JPEG") for i in range(3)}))


def committed(out: Path) -> bool:
    return any((out / "manifest").glob("*.parquet"))


class Gate:
    """A mapper (in this process) that lists the first `first` inputs it is given, then holds the
    rest until `until()` holds (or `timeout` passes), then lists them, or raises `stop` instead.
    (A run lists its first input itself: the mapper gets the inputs after it.)"""

    def __init__(self, first: int, until: Callable[[], bool], *, stop: type[BaseException] | None = None, timeout: float = 60.0) -> None:
        self.first, self.until, self.stop, self.timeout = first, until, stop, timeout
        self.held_until: bool | None = None  # whether `until()` held before the rest was listed

    def __call__(self, function: Callable[[Any], Any], arguments: Iterable[Any]) -> Iterator[Any]:
        for i, argument in enumerate(arguments):
            if i == self.first:
                deadline = time.monotonic() + self.timeout
                while not self.until() and time.monotonic() < deadline:
                    time.sleep(0.02)
                self.held_until = self.until()
                if self.stop is not None:
                    raise self.stop()
            yield function(argument)


def rows_of(out: Path) -> list[tuple]:
    manifest = FeatureStore.open(str(out)).manifest.sort_by("row")
    return list(zip(*(manifest.column(name).to_pylist() for name in ("row", "image_id", "uri", "status"))))


def test_the_first_shards_are_computed_while_later_inputs_are_listed(tmp_path):
    write_tars(tmp_path / "tars")
    out = tmp_path / "out.zarr"
    gate = Gate(2, lambda: committed(out))
    summary = run_local(config(str(tmp_path / "tars"), str(out), shard_size=2), mapper=gate)
    assert gate.held_until is True  # a shard was committed while 2 of the 5 tars were still unlisted
    assert summary.ok == 3 * TARS and summary.shards_done == 8
    index = read_index(str(out), 2)
    assert index.complete and index.items == 3 * TARS
    store = FeatureStore.open(str(out))
    assert store.group["pooled/L11"].shape[0] == 3 * TARS and len(set(r[1] for r in rows_of(out))) == 3 * TARS

    whole = tmp_path / "whole.zarr"  # listed before anything is computed: the same store
    run_local(config(str(tmp_path / "tars"), str(whole), shard_size=2), mapper=Gate(TARS, lambda: True))
    assert rows_of(out) == rows_of(whole)


def test_a_run_stopped_while_listing_resumes_the_listing_where_it_stopped(tmp_path):
    write_tars(tmp_path / "tars")
    out = tmp_path / "out.zarr"
    with pytest.raises(KeyboardInterrupt):
        run_local(config(str(tmp_path / "tars"), str(out), shard_size=2), mapper=Gate(2, lambda: committed(out), stop=KeyboardInterrupt))
    index = read_index(str(out), 2)
    assert not index.complete and len(index.table) == 3 and index.items == 9  # three tars planned, the index says more will come
    with pytest.raises(StoreMismatchError, match="listing of --dataset .* is unfinished; rerun without --append"):
        run_local(config(str(tmp_path / "tars"), str(out), shard_size=2, append=True))

    summary = run_local(config(str(tmp_path / "tars"), str(out), shard_size=2))
    assert summary.ok + 2 * summary.shards_skipped >= 3 * TARS - 1  # only what was left is computed
    assert read_index(str(out), 2).complete
    whole = tmp_path / "whole.zarr"
    run_local(config(str(tmp_path / "tars"), str(whole), shard_size=2))
    assert rows_of(out) == rows_of(whole)
    assert FeatureStore.open(str(out)).group["pooled/L11"].shape[0] == 3 * TARS


def test_a_dataset_changed_while_its_listing_was_unfinished_is_refused(tmp_path):
    write_tars(tmp_path / "tars", first=1)
    out = tmp_path / "out.zarr"
    with pytest.raises(KeyboardInterrupt):
        run_local(config(str(tmp_path / "tars"), str(out), shard_size=2), mapper=Gate(2, lambda: committed(out), stop=KeyboardInterrupt))
    write_tars(tmp_path / "tars", count=1, first=0)  # sorts first: the inputs listed before no longer come first
    with pytest.raises(SourceError, match="changed while its first listing was unfinished"):
        run_local(config(str(tmp_path / "tars"), str(out), shard_size=2))


def test_a_dataset_whose_first_inputs_are_unusable_starts_once_one_is_usable(tmp_path):
    folder = tmp_path / "tars"
    folder.mkdir()
    (folder / "000.tar").write_bytes(b"not a tar at all" * 40)  # one container error row
    write_tars(folder, count=2, first=1)
    out = tmp_path / "out.zarr"
    summary = run_local(config(str(folder), str(out), shard_size=2))
    assert summary.ok == 6 and dict(summary.errors) == {"container": 1}
