"""Plan a dataset into a store, input by input, and extend the plan with what is new (--append).

Each input (a tar, a Parquet file, a range of a file list, a batch of image files) is listed by
`list_part` into a plan part of its own, wherever the mapper runs it: threads in this process
(`local_mapper`), or Ray tasks over a cluster (`ray_map`). The driver only numbers the parts' rows
as their counts come back (a row per input), so its memory and its work per item do not grow
with the dataset.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import os
import queue
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow.compute as pc
import ray
from fsspec.implementations.local import LocalFileSystem
from ray.exceptions import RayTaskError

from pipeline.extraction.listing import (
    Input,
    SourceError,
    dataset_inputs,
    list_input,
    list_tail,
)
from pipeline.extraction.progress import progress_bar
from pipeline.extraction.repeated_keys import RepeatedKeys, key_hashes
from pipeline.extraction.repeated_keys import describe as describe_repeated
from pipeline.store.plan import PlanIndex, part_path, plan_dir, save_part
from pipeline.store.uris import one_line

log = logging.getLogger("srt")

LISTING_THREADS = 8  # inputs of a remote dataset listed at once in this process (listing waits on storage)
LISTING_TASKS_PER_CPU = 2  # Ray tasks listing at once per cluster CPU (they wait on storage too)
REASONS_KEPT = 3  # listing errors quoted when nothing in the dataset is usable

Mapper = Callable[[Callable[[Any], Any], Iterable[Any]], Iterator[Any]]


@dataclass(frozen=True)
class PartFacts:
    """What the driver keeps of a listed input: its index row, and a few of its listing errors."""

    row: dict[str, Any]  # PLAN_INDEX_SCHEMA, first_row left to the driver
    reasons: tuple[str, ...] = ()
    key_hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # the part's keys, for RepeatedKeys


def list_part(out: str, listing: str, storage_options: dict[str, Any], numbered: tuple[int, Input]) -> PartFacts:
    """List one input and write its part; runs wherever the mapper sends it."""
    number, unit = numbered
    items = list_input(unit, storage_options)
    path = part_path(listing, number)
    save_part(out, path, items, storage_options)
    broken = items.filter(pc.is_valid(items.column("error_kind")))
    last_range = unit.kind == "list" and unit.stop == unit.size  # --append checks only where a list ended
    tail = list_tail(unit.uri, unit.stop, storage_options) if last_range else None
    row = {
        "path": path, "input": unit.uri, "kind": unit.kind, "first_row": 0, "count": items.num_rows, "errors": broken.num_rows,
        "start": unit.start, "stop": unit.stop, "tail": tail,
    }  # fmt: skip
    return PartFacts(row, tuple(f"{r['uri']}: {r['error']}" for r in broken.slice(0, REASONS_KEPT).to_pylist()), key_hashes(items))


def thread_map(threads: int) -> Mapper:
    """An in-process mapper: `function` over its arguments on `threads` threads, results in order.
    A failure (or a consumer that stops) cancels what has not started."""

    def mapped(function: Callable[[Any], Any], arguments: Iterable[Any]) -> Iterator[Any]:
        pool = ThreadPoolExecutor(threads, thread_name_prefix="listing")
        try:
            yield from pool.map(function, arguments)
        finally:
            pool.shutdown(cancel_futures=True)

    return mapped


def local_mapper(dataset: str, storage_options: dict[str, Any]) -> Mapper:
    """How this process lists a dataset: on one thread where listing is CPU-bound (local files:
    tar headers are parsed in Python, and threads only contend for the interpreter lock: 200 tars
    took 10.6 s on one thread, 23.8 s on eight), on LISTING_THREADS where it waits on a remote store."""
    fs, _ = fsspec.core.url_to_fs(dataset, **storage_options)
    return thread_map(1 if isinstance(fs, LocalFileSystem) else LISTING_THREADS)


# No CPU reserved: the listing goes on while the actors compute, and tasks that reserved CPUs would
# keep an actor that asks for a node's CPUs from starting until the listing ends (bench_scale's
# first commit at 4M URIs on Ray: 36 s, against 18 s). They mostly wait on storage, at most
# LISTING_TASKS_PER_CPU per cluster CPU at once, spread over the nodes.
@ray.remote(num_cpus=0, max_retries=3, scheduling_strategy="SPREAD")
def _call(function: Callable[[Any], Any], argument: Any) -> Any:
    return function(argument)


def ray_map(function: Callable[[Any], Any], arguments: Iterable[Any]) -> Iterator[Any]:
    """`function` over `arguments` as Ray tasks anywhere on the cluster (listing a dataset's inputs),
    results in order; at most LISTING_TASKS_PER_CPU per cluster CPU in flight, so the driver holds
    a bounded number of arguments and results whatever the dataset's size."""
    in_flight = max(4, int(ray.cluster_resources().get("CPU", 1) * LISTING_TASKS_PER_CPU))
    running: collections.deque[Any] = collections.deque()
    try:
        for argument in arguments:
            running.append(_call.remote(function, argument))
            if len(running) >= in_flight:
                yield _result(running.popleft())
        while running:
            yield _result(running.popleft())
    finally:  # a failure (or a consumer that stops) leaves no task writing behind it
        for ref in running:
            ray.cancel(ref)


def _result(ref: Any) -> Any:
    """A task's result, or the error it raised as itself (a SourceError names --dataset in one
    line), not wrapped in Ray's remote traceback."""
    try:
        return ray.get(ref)
    except RayTaskError as error:
        if isinstance(error.cause, Exception):
            raise error.cause from None
        raise


@dataclass
class Listed:
    """A listing's parts as index rows, and what the driver says about them."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    items: int = 0
    errors: int = 0
    reasons: list[str] = field(default_factory=list)
    repeated_keys: dict[str, Any] | None = None  # keys more than one input gives (repeated_keys.RepeatedKeys)


class Listing:
    """Inputs listed into parts of a new folder under plan/, rows numbered from `first_row`: one at
    a time in the caller's thread (`list_here`: a run's first shard, with no worker process to
    start), then the rest by `mapper` on a thread of its own (`start`), while the caller computes
    the shards of the parts listed so far (`take`). Raises, from `take`, what listing raised.
    Started `held`, it lists nothing more until `release` (a run's start-up: model loads and the
    first shard have the machine to themselves)."""

    def __init__(self, out: str, first_row: int, storage_options: dict[str, Any], mapper: Mapper) -> None:
        self.out, self.storage_options, self.mapper = out, storage_options, mapper
        self.name = uuid.uuid4().hex[:12]
        self.listed = Listed()
        self.keys = RepeatedKeys()
        self.next_row = first_row
        self.listed_here = 0  # inputs listed by `list_here`: the background listing numbers its parts after them
        self.done = False
        self._results: queue.Queue[Any] = queue.Queue(maxsize=LISTED_AHEAD)
        self._stop = threading.Event()
        self._go = threading.Event()

    def list_here(self, unit: Input) -> dict[str, Any]:
        """List one input in this thread, before `start`; its index row."""
        facts = list_part(self.out, self.name, self.storage_options, (self.listed_here, unit))
        self.listed_here += 1
        return self._counted(facts)

    def start(self, units: Iterable[Input], *, held: bool = False) -> Listing:
        """List `units` in the background (`take` gives their rows); `held`: not before `release`."""
        if not held:
            self._go.set()
        work = functools.partial(list_part, self.out, self.name, self.storage_options)
        threading.Thread(target=self._list, args=(work, units), name="listing", daemon=True).start()
        return self

    def release(self) -> None:
        self._go.set()

    def _gated(self, units: Iterable[Input]) -> Iterator[Input]:
        for unit in units:
            self._go.wait()
            if self._stop.is_set():
                return
            yield unit

    def _list(self, work: Callable[[Any], PartFacts], units: Iterable[Input]) -> None:
        try:
            for facts in self.mapper(work, enumerate(self._gated(units), start=self.listed_here)):
                self._results.put(facts)
                if self._stop.is_set():
                    return
            self._results.put(_DONE)
        except BaseException as error:  # handed to the caller, which raises it
            self._results.put(error)

    def take(self, wait: float | None) -> list[dict[str, Any]]:
        """Index rows of the parts listed since the last call (first_row set), after waiting up to
        `wait` seconds for one (None: until one comes or the listing ends)."""
        rows: list[dict[str, Any]] = []
        block, timeout = True, wait
        while not self.done:
            try:
                result = self._results.get(block=block, timeout=timeout)
            except queue.Empty:
                break
            block = False  # then whatever else is there already
            if result is _DONE:
                self.done = True
            elif isinstance(result, BaseException):
                raise result
            else:
                rows.append(self._counted(result))
        return rows

    def _counted(self, facts: PartFacts) -> dict[str, Any]:
        row = {**facts.row, "first_row": self.next_row}
        self.next_row += facts.row["count"]
        self.listed.rows.append(row)
        self.listed.items += facts.row["count"]
        self.listed.errors += facts.row["errors"]
        self.listed.reasons.extend(facts.reasons[: REASONS_KEPT - len(self.listed.reasons)])
        self.keys.add(facts.key_hashes)
        return row

    def finish(self) -> Listed:
        """Once `done`: what the listing found, with the keys more than one input gives, confirmed."""
        self.listed.repeated_keys = self.keys.confirm(self.out, [r["path"] for r in self.listed.rows], self.storage_options, self.mapper)
        if self.listed.repeated_keys:
            log.warning("%s", describe_repeated(self.listed.repeated_keys))
        return self.listed

    def cancel(self) -> None:
        """Stops listing (a failed or interrupted run); the parts written stay until removed."""
        self._stop.set()
        self._go.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._results.get_nowait()  # lets a mapper blocked on a full queue see the stop


_DONE = object()
LISTED_AHEAD = 4096  # parts listed but not yet taken: bounds what a slow driver holds


def list_inputs(out: str, units: Iterable[Input], first_row: int, storage_options: dict[str, Any], mapper: Mapper) -> tuple[str, Listed]:
    """List `units` into parts of a new listing folder, rows numbered from `first_row`, waiting for
    the whole listing. Returns the folder's name (under plan/) and the index rows. A failure removes the folder."""
    listing = Listing(out, first_row, storage_options, mapper).start(units)
    try:
        with progress_bar(desc="listing", unit="input") as bar:
            while not listing.done:
                bar.update(len(listing.take(None)))
                bar.set_postfix(items=listing.listed.items, refresh=False)
        return listing.name, listing.finish()
    except BaseException:
        listing.cancel()
        remove_listing(out, listing.name, storage_options)
        raise


def remove_listing(out: str, listing: str, storage_options: dict[str, Any]) -> None:
    """A failed listing's parts go, and the local folders it left empty (a refused run writes nothing)."""
    fs, path = fsspec.core.url_to_fs(f"{plan_dir(out)}/{listing}", **storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    if isinstance(fs, LocalFileSystem):
        for folder in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
            with contextlib.suppress(OSError):  # not empty: something else lives there
                os.rmdir(folder)


def first_rows(listing: Listing, units: Iterator[Input], dataset: str, shard_size: int) -> list[dict[str, Any]]:
    """The index rows a new plan starts from, listed in this thread from `units` until a whole
    first shard is planned and an item of it or before is usable (the rest of `units` is left for
    the background), or `units` ends. Raises SourceError naming --dataset when nothing can be
    extracted, or when listing fails as a whole."""
    rows: list[dict[str, Any]] = []
    listed = listing.listed
    try:
        while not (listed.items > listed.errors and listing.next_row >= shard_size):
            unit = next(units, None)
            if unit is None:
                break
            rows.append(listing.list_here(unit))
    except SourceError:
        raise
    except Exception as error:  # the dataset's root could be read, but listing it failed as a whole
        raise SourceError(f"--dataset {dataset} cannot be listed ({one_line(error)}); check the URI and --storage-options") from error
    if not listed.items:
        raise SourceError(f"--dataset {dataset}: no images found (looked for image files, .tar shards, .parquet files and file lists)")
    if listed.errors == listed.items:
        more = f"; and {listed.errors - len(listed.reasons)} more" if listed.errors > len(listed.reasons) else ""
        raise SourceError(f"--dataset {dataset}: nothing usable, every input failed at listing: " + "; ".join(listed.reasons) + more)
    return rows


def start_listing(dataset: str, out: str, shard_size: int, storage_options: dict[str, Any], mapper: Mapper) -> tuple[Listing, list[dict[str, Any]]]:
    """A new plan's listing: the index rows of its first whole shard (`first_rows`, in this thread),
    and the dataset's other inputs started held in the background (`release` lets them go; `done`
    at once when there are none). A failure removes what was listed."""
    listing = Listing(out, 0, storage_options, mapper)
    units = iter(dataset_inputs(dataset, storage_options))
    try:
        rows = first_rows(listing, units, dataset, shard_size)
        following = next(units, None)
    except BaseException:
        remove_listing(out, listing.name, storage_options)
        raise
    if following is None:
        listing.done = True
    else:
        listing.start(itertools.chain([following], units), held=True)
    return listing, rows


def plan_dataset(dataset: str, out: str, shard_size: int, storage_options: dict[str, Any], mapper: Mapper) -> tuple[str, PlanIndex]:
    """A new plan of the whole dataset, listed before it returns: (its listing folder, its index).
    Raises SourceError naming --dataset when nothing can be extracted."""
    listing, rows = start_listing(dataset, out, shard_size, storage_options, mapper)
    listing.release()
    try:
        while not listing.done:
            rows += listing.take(None)
    except BaseException:
        listing.cancel()
        remove_listing(out, listing.name, storage_options)
        raise
    return listing.name, PlanIndex.of(rows, shard_size, listing.finish().repeated_keys)


def remaining_inputs(dataset: str, index: PlanIndex, storage_options: dict[str, Any]) -> Iterator[Input]:
    """The inputs of a listing a stopped run left unfinished, after the index's: the dataset's
    inputs come in a stable order, so the first ones are those the index lists (checked: a dataset
    changed meanwhile is refused, since rows would no longer follow its order)."""
    listed = index.table.to_pylist()
    inputs = dataset_inputs(dataset, storage_options)
    for row, unit in zip(listed, inputs):
        if (unit.kind, unit.uri, unit.start) != (row["kind"], row["input"], row["start"]):  # zip takes `listed` first: no input is lost
            raise SourceError(
                f"--dataset {dataset} changed while its first listing was unfinished (found {unit.uri} where {row['input']} was listed): "
                "extract it again with --overwrite"
            )
    yield from inputs
