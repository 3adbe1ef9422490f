"""Driver-side orchestration shared by every runner, and the in-process runner.

`preflight` checks what needs no cluster (flags, --dataset, --out, weights) in seconds; `plan_job`
then does the rest before the first image: check an existing output, start listing the dataset
into a saved plan (or extend it, --append), create the store as soon as a first shard is planned,
find the shards left to do. The listing goes on while shards are computed (`Job.extend` adds
what it planned since), so the first result never waits for a billion URIs to be listed; a run
stopped meanwhile leaves an index marked in progress, and a rerun lists on from where it stopped.
The driver holds the plan's index (a row per input) and a few bytes per shard, never a row per
image. `run_local` then runs the shards in this process; the Ray runner distributes the same shards.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from pipeline.engine.models import ViT
from pipeline.extraction.config import ExtractConfig, ResolvedConfig, resolve
from pipeline.extraction.flags import ConfigError
from pipeline.extraction.listing import check_dataset
from pipeline.extraction.appending import Appended, new_inputs
from pipeline.extraction.planning import Listing, Mapper, list_inputs, local_mapper, remaining_inputs, start_listing
from pipeline.extraction.progress import JobProgress
from pipeline.extraction.reading import prefetch
from pipeline.extraction.shards import ShardStats
from pipeline.extraction.summary import RunSummary, finish
from pipeline.extraction.weights import fetch_pretrained_weights
from pipeline.extraction.worker import ShardWorker
from pipeline.store.layout import (
    NotWritableError,
    StoreMismatchError,
    check_existing,
    check_writable,
    create_store,
    grow_store,
    open_group,
    remove_output,
    stored_provenance,
)
from pipeline.store.manifest import (
    GROUP_SHARDS,
    compact,
    manifest_files,
    shards_with_errors,
    uncommit,
)
from pipeline.store.plan import PlanIndex, PlanReader, read_index, write_index
from pipeline.store.uris import one_line

log = logging.getLogger("srt")

PCA_SAMPLE_SHARDS = 2  # --pca-dims: the basis is fitted on the dense maps of the run's first shards
LISTING_WAIT_SECONDS = 1.0  # a runner out of planned shards waits this long at a time for the listing

# Shards written at once, so a shard's write (compression and file I/O, mostly outside the GIL)
# overlaps the next shards' compute; 8 were no faster than 4 on a 16-vCPU GPU host (bench/RESULTS.md).
WRITERS = 4


@dataclass
class Job:
    resolved: ResolvedConfig
    index: PlanIndex
    pending: np.ndarray  # planned shards without a manifest part, in order
    resumed: bool
    appended: Appended | None = None  # what --append added and found gone
    listing: Listing | None = None  # the dataset's listing while it goes on (`extend`)
    unplanned: list[dict[str, Any]] = field(default_factory=list)  # parts listed, not yet in the index

    @property
    def shards(self) -> int:
        return self.index.shards

    def extend(self, wait: float) -> np.ndarray:
        """The shards the listing planned since the last call (waiting up to `wait` seconds for a
        part), each whole: the index written again (in progress, or complete once the listing is
        done: then `listing` is None), the arrays grown to it. Runners call it when they have
        nothing else to hand out."""
        config = self.resolved.config
        self.started()  # nothing else to do: the listing must go on
        self.unplanned += self.listing.take(wait)
        if not self.listing.done and self.listing.next_row // config.shard_size == self.index.ready:
            return np.empty(0, np.int64)  # no new whole shard yet
        repeated = self.listing.finish().repeated_keys if self.listing.done else None
        index = self.index.extended(self.unplanned, repeated, complete=self.listing.done)
        grow_store(open_group(config.out, "r+", config.storage_options, use_consolidated=False), index.size)
        write_index(config.out, index, config.storage_options)  # the arrays first: an index never names rows past them
        newly = np.arange(self.index.ready, index.ready)
        self.index, self.unplanned = index, []
        if self.listing.done:
            self.listing = None
        return newly

    def started(self) -> None:
        """The run's first shard is done (or it needs more): the listing, held since the first
        shard was planned so that start-up had the machine, goes on beside the work."""
        if self.listing is not None:
            self.listing.release()

    def stop_listing(self) -> None:
        """A run that ends early (failed, interrupted) stops listing; what is planned stays, and a rerun lists on."""
        if self.listing is not None:
            self.listing.cancel()

    def images_in(self, shards: np.ndarray | list[int]) -> int:
        return self.index.images_in(shards)

    def reader(self) -> PlanReader:
        """What reads a shard's plan rows (in this process, or in an actor it is sent to)."""
        config = self.resolved.config
        return PlanReader(config.out, self.index, config.storage_options)


def preflight(config: ExtractConfig) -> ResolvedConfig:
    """Every check that needs no cluster, before one starts, so a bad flag costs seconds: the
    flags resolved, --out writable, --dataset there and no store, --pretrained weights reachable."""
    resolved = resolve(config)
    config = resolved.config  # local paths absolute, preset applied
    options = config.storage_options
    try:
        check_writable(config.out, options)
    except NotWritableError as error:
        raise ConfigError("--out", str(error)) from error
    check_dataset(config.dataset, options)
    check_existing(config.out, options, resolved.fingerprint(), overwrite=config.overwrite)  # a resume refused here, not after a cluster start
    if config.pretrained:
        try:
            fetch_pretrained_weights(config.model)
        except OSError as error:
            raise ConfigError("--pretrained", str(error)) from error
    return resolved


def plan_job(resolved: ResolvedConfig, mapper: Mapper | None = None) -> Job:
    """Everything else before the first image, on a config `preflight` checked: list the dataset
    once into a saved plan (or read the plan of the run being resumed, extended with what is new
    under --append), create the store, find the shards left to do. `mapper` runs the listing of
    inputs (Ray tasks on a cluster; by default this process's threads, `local_mapper`). Raises
    StoreMismatchError or SourceError."""
    config = resolved.config
    options = config.storage_options
    mapper = mapper or local_mapper(config.dataset, options)
    log.info("%s", resolved.describe())
    log.debug("config %s", json.dumps(resolved.flags(), default=str))  # --verbose; summary.json keeps it too
    if not (config.pretrained or config.weights):
        log.warning("neither --pretrained nor --weights: using random-init weights (seed %d); features are for testing only", config.seed)
    resumed = check_existing(config.out, options, resolved.fingerprint(), overwrite=config.overwrite)
    appended, listing = None, None
    if resumed:
        index = read_index(config.out, config.shard_size, options)
        if index is None:
            raise StoreMismatchError(f"--out {config.out} has no plan index (plan/index.parquet): extract again into another --out, or pass --overwrite")
        if not index.complete:
            if config.append:
                raise StoreMismatchError(f"--append: the first run's listing of --dataset into {config.out} is unfinished; rerun without --append to finish it first")
            log.info("resuming the listing of --dataset after its first %d inputs (%d items planned)", len(index.table), index.items)
            listing = Listing(config.out, index.size, options, mapper).start(remaining_inputs(config.dataset, index, options), held=True)
        elif config.append:
            index, appended = append_to_plan(config, index, mapper)
        else:
            log.info("%s", resume_note(config, index))
    else:  # the old output (--overwrite) goes, and the new one is written, only once a first shard is planned
        # the first shard listed here, the rest in the background once that shard is done (`Job.started`)
        listing, rows = start_listing(config.dataset, config.out, config.shard_size, options, mapper)
        folder = f"plan/{listing.name}"
        index = PlanIndex.of(rows, config.shard_size, listing.finish().repeated_keys if listing.done else None, complete=listing.done)
        listing = None if listing.done else listing
        if config.overwrite:
            remove_output(config.out, options, keep=folder)
        write_index(config.out, index, options)
        create_store(resolved.store_spec(), index.size)
    if resumed and config.retry_errors:
        retry_error_rows(config.out, config.retry_errors, options)
    committed = manifest_files(config.out, options).committed(index.shards)[: index.ready]
    return Job(resolved=resolved, index=index, pending=np.flatnonzero(~committed), resumed=resumed, appended=appended, listing=listing)


RELISTED_PARTS = 100  # a rerun lists a local dataset of at most this many plan parts again, to say what is new


def resume_note(config: ExtractConfig, index: PlanIndex) -> str:
    """What a rerun without --append says of the dataset: how many inputs were added since the
    first run (listing a small local dataset again costs little), or that a rerun does not look."""
    planned = f"resuming the plan of {index.items} items listed by the first run into {config.out}"
    fs, _ = fsspec.core.url_to_fs(config.dataset, **config.storage_options)
    if not isinstance(fs, LocalFileSystem) or len(index.table) > RELISTED_PARTS:
        return f"{planned}: inputs added to --dataset since are not extracted; pass --append to extract them too"
    units, _ = new_inputs(config.dataset, config.out, index, config.storage_options)
    added = sum(len(unit.files) if unit.kind == "files" else 1 for unit in units)
    if not added:
        return f"{planned}; --dataset holds nothing new since"
    return f"{planned}; --dataset has {added} new input(s) since (image files, containers or file-list ranges), not extracted: pass --append to extract them"


def append_to_plan(config: ExtractConfig, index: PlanIndex, mapper: Mapper) -> tuple[PlanIndex, Appended]:
    """--append: the dataset's new inputs listed into parts after the existing rows, from the next
    shard boundary, so no committed shard (arrays or manifest) is written again. The arrays grow
    before the index names the new rows: a kill in between leaves the old plan, and longer arrays."""
    options = config.storage_options
    units, appended = new_inputs(config.dataset, config.out, index, options)
    appended.first_row = index.shards * config.shard_size
    if units:
        _, listed = list_inputs(config.out, units, appended.first_row, options, mapper)
        appended.items, appended.inputs = listed.items, len(listed.rows)
        index = index.extended(listed.rows, listed.repeated_keys)
        grow_store(open_group(config.out, "r+", options, use_consolidated=False), index.size)
        write_index(config.out, index, options)
    log.info("%s", appended.describe())
    return index, appended


def retry_error_rows(out: str, kinds: tuple[str, ...], storage_options: dict[str, Any]) -> None:
    """--retry-errors: the committed shards holding error rows of `kinds` become pending again, so
    this run recomputes them whole and commits each once more (exactly once, as any shard)."""
    shards, rows = shards_with_errors(manifest_files(out, storage_options), kinds)
    if shards:
        log.info("--retry-errors %s: recomputing %d shards holding %d such rows", ",".join(kinds), len(shards), rows)
        uncommit(out, shards, storage_options)


def interrupted_note(config: ExtractConfig) -> str:
    """What a stopped run leaves (Ctrl-C): committed shards stay, and the same command resumes."""
    if stored_provenance(config.out, config.storage_options) is None:
        return f"nothing was written to {config.out} yet"
    total = -(-int(open_group(config.out, "r", config.storage_options).attrs["plan_size"]) // config.shard_size)
    done = manifest_files(config.out, config.storage_options).count()
    return f"{done} of {total} shards of {config.out} are committed; rerun the same command to resume"


class Compactor:
    """Compacts the manifest parts of each group of GROUP_SHARDS shards into a range file as soon
    as the group's last pending shard commits, on a thread of the driver, so the end of a run (and
    a resume) reads few files whatever the store's size. A group the listing has not planned whole
    waits. What is left (groups with failed shards, the last one) is compacted by `finish`."""

    def __init__(self, job: Job) -> None:
        config = job.resolved.config
        self.out, self.options, self.index = config.out, config.storage_options, job.index
        self.remaining = np.bincount(job.pending // GROUP_SHARDS, minlength=-(-job.shards // GROUP_SHARDS))
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="compact")
        self.writing: list[Future[int]] = []

    def planned(self, shards: np.ndarray, index: PlanIndex) -> None:
        """More pending shards, of the plan `index` (the listing went on)."""
        counts = np.bincount(shards // GROUP_SHARDS, minlength=-(-index.shards // GROUP_SHARDS))
        counts[: len(self.remaining)] += self.remaining
        self.remaining, self.index = counts, index

    def committed(self, shard: int) -> None:
        group = shard // GROUP_SHARDS
        self.remaining[group] -= 1
        last = min(self.index.shards, (group + 1) * GROUP_SHARDS) - 1
        if self.remaining[group] == 0 and (self.index.complete or last < self.index.ready):
            self.writing.append(self.pool.submit(compact, self.out, self.options, group * GROUP_SHARDS, last))

    def close(self) -> None:
        """Waits for the range files being written; one that failed leaves its parts, which are the truth."""
        for future in self.writing:
            if error := future.exception():
                log.warning("compacting manifest parts failed (%s); the parts stay and the run's end compacts them", one_line(error))
        self.pool.shutdown()


def pca_sample(job: Job) -> list[int]:
    """--pca-dims: the pending shards to fit the PCA basis on first (`ShardWorker.fit_pca`), or none
    when the store holds every tap's basis already (a resumed run keeps the basis it started with)."""
    config = job.resolved.config
    if not config.pca_dims:
        return []
    fitted = open_group(config.out, "r", config.storage_options, use_consolidated=False).attrs.get("pca", {})
    if all(tap.name in fitted for tap in job.resolved.taps):
        return []
    return [int(s) for s in job.pending[:PCA_SAMPLE_SHARDS]]


def progress(job: Job) -> JobProgress:
    """The bar of a run: every pending image, the PCA fitting sample's included; while the dataset
    is listed, the images planned so far (`planned` adds the rest)."""
    return JobProgress(job.images_in(job.pending), listing=job.listing is not None)


def planned(job: Job, shards: np.ndarray, bar: JobProgress, compactor: Compactor) -> None:
    """Shards the listing planned since: on the bar and for the compactor."""
    bar.planned(job.images_in(shards), listing=job.listing is not None)
    compactor.planned(shards, job.index)


def pending_shards(job: Job, bar: JobProgress, compactor: Compactor) -> Iterator[int]:
    """The job's pending shards in order, then those its listing plans while they are computed
    (waiting for each, since this runner has nothing else to do)."""
    yield from (int(shard) for shard in job.pending)
    while job.listing is not None:
        newly = job.extend(wait=LISTING_WAIT_SECONDS)
        planned(job, newly, bar, compactor)
        yield from (int(shard) for shard in newly)


def finished_already(resolved: ResolvedConfig) -> bool:
    """Whether a rerun has nothing to compute, decided from the store alone (no cluster needed): its
    plan is complete, every shard is committed, and no flag asks for more (--append, --retry-errors,
    --overwrite)."""
    c = resolved.config
    if c.append or c.retry_errors or c.overwrite or stored_provenance(c.out, c.storage_options) is None:
        return False
    index = read_index(c.out, c.shard_size, c.storage_options)
    return index is not None and index.complete and bool(manifest_files(c.out, c.storage_options).committed(index.shards).all())


def run_local(config: ExtractConfig, *, device: str | None = None, vit: ViT | None = None, mapper: Mapper | None = None) -> RunSummary:
    """Extract in this process, in three overlapping stages: the next shard is read and decoded
    (and copied to the GPU) while this one is computed and up to WRITERS earlier ones are written.
    `vit`: an already loaded model of the config's weights (the data-plane bench passes a stand-in);
    `mapper`: what lists the dataset's inputs (default: `local_mapper`)."""
    started = time.perf_counter()
    return run_resolved(preflight(config), started, device=device, vit=vit, mapper=mapper)


def run_resolved(resolved: ResolvedConfig, started: float, *, device: str | None = None, vit: ViT | None = None, mapper: Mapper | None = None) -> RunSummary:
    """`run_local` on a config `preflight` checked; the Ray runner's too when nothing is left to compute."""
    job = plan_job(resolved, mapper)
    try:
        summary = _run_local(job, started, device, vit)
    finally:
        job.stop_listing()
    summary.seconds = time.perf_counter() - started
    finish(job, summary)
    return summary


def _run_local(job: Job, started: float, device: str | None, vit: ViT | None) -> RunSummary:
    summary = RunSummary.of(job)
    if len(job.pending) or job.listing is not None:
        worker = ShardWorker(job.resolved, job.reader(), vit=vit, device=device)
        summary.startup_seconds = time.perf_counter() - started
        compactor = Compactor(job)
        with progress(job) as bar, ThreadPoolExecutor(WRITERS, thread_name_prefix="commit") as writers:

            def record(stats: ShardStats) -> None:
                job.started()
                summary.add(stats)
                if stats.committed:
                    compactor.committed(stats.shard)
                bar.count_errors(sum(summary.errors.values()))

            if sample := pca_sample(job):
                fitted = [worker.load(s) for s in sample]
                for loaded, stats in zip(fitted, worker.fit_pca(fitted, progress=bar.computed)):
                    record(stats)
                    bar.advance(len(loaded.rows) - loaded.decoded)  # error rows, done without the model
                job.pending = job.pending[len(sample) :]
            loads = prefetch((worker.load(shard) for shard in pending_shards(job, bar, compactor)), depth=2)
            writing: collections.deque[Future[ShardStats]] = collections.deque()
            for loaded in loads:
                computed = time.perf_counter()
                arrays = worker.assemble(loaded, worker.compute(loaded, progress=bar.computed))
                while len(writing) >= WRITERS:  # bounds the computed shards held in memory
                    record(writing.popleft().result())
                writing.append(writers.submit(worker.commit, loaded, arrays, computed))
                bar.advance(len(loaded.rows) - loaded.decoded)
            for done in writing:
                record(done.result())
            bar.finished(summary.views)
        compactor.close()
    return summary
