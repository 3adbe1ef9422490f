"""Driver-side orchestration shared by every runner, and the in-process runner.

`preflight` checks what needs no cluster (flags, --dataset, --out, weights) in seconds; `plan_job`
then does the rest before the first image: check an existing output, list the dataset once into
a saved plan, create the store, find the shards left to do.
`run_local` then runs the shards in this process; the Ray runner distributes the same shards.
"""

from __future__ import annotations

import collections
import json
import logging
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import zarr
from zarr.errors import ZarrUserWarning

from pipeline.engine.models import ViT
from pipeline.extraction.config import ExtractConfig, ResolvedConfig, resolve
from pipeline.extraction.flags import ConfigError
from pipeline.extraction.listing import Item, SourceError, check_dataset, list_items, make_plan, shard_rows
from pipeline.extraction.progress import JobProgress
from pipeline.extraction.reading import prefetch
from pipeline.extraction.weights import fetch_pretrained_weights
from pipeline.extraction.worker import ShardStats, ShardWorker
from pipeline.store.layout import (
    NotWritableError,
    check_existing,
    check_writable,
    create_store,
    open_group,
    plan_uri,
    read_plan,
    remove_output,
    stored_provenance,
)
from pipeline.store.manifest import committed_shards, compact, parquet_bytes, put_atomically, read_manifest, uncommit
from pipeline.store.uris import one_line, read_uri

log = logging.getLogger("srt")

PCA_SAMPLE_SHARDS = 2  # --pca-dims: the basis is fitted on the dense maps of the run's first shards

# Shards written at once, so a shard's write (compression and file I/O, mostly outside the GIL)
# overlaps the next shards' compute; 8 were no faster than 4 on a 16-vCPU GPU host (bench/RESULTS.md).
WRITERS = 4


@dataclass
class Job:
    resolved: ResolvedConfig
    plan: pa.Table
    pending: list[int]  # shards without a manifest part, in order
    resumed: bool

    @property
    def shards(self) -> int:
        return int(pc.max(self.plan.column("shard")).as_py()) + 1

    def images_in(self, shards: Iterable[int]) -> int:
        size, total = self.resolved.config.shard_size, len(self.plan)
        return sum(min(size, total - s * size) for s in shards)


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
    if config.pretrained:
        try:
            fetch_pretrained_weights(config.model)
        except OSError as error:
            raise ConfigError("--pretrained", str(error)) from error
    return resolved


def plan_job(resolved: ResolvedConfig) -> Job:
    """Everything else before the first image, on a config `preflight` checked: list the dataset
    once into a saved plan (or read the plan of the run being resumed), create the store, find the
    shards left to do. Raises StoreMismatchError or SourceError."""
    config = resolved.config
    options = config.storage_options
    log.info("config %s", json.dumps(resolved.flags(), default=str))
    if not (config.pretrained or config.weights):
        log.warning("neither --pretrained nor --weights: using random-init weights (seed %d); features are for testing only", config.seed)
    resumed = check_existing(config.out, options, resolved.fingerprint(), overwrite=config.overwrite)
    if resumed:
        plan = read_plan(config.out, options)
        log.info(
            "resuming the plan of %d items listed by the first run into %s: files added to --dataset since are not "
            "extracted; extract them into another --out, or pass --overwrite to list the dataset again", len(plan), config.out
        )
    else:  # the old output (--overwrite) goes, and the new one is written, only once listing succeeded
        plan = make_plan(usable_items(config.dataset, options), config.shard_size)
        if config.overwrite:
            remove_output(config.out, options)
        put_atomically(plan_uri(config.out), parquet_bytes(plan), options)
        create_store(resolved.store_spec(), len(plan))
    if resumed and config.retry_errors:
        retry_error_rows(config.out, config.retry_errors, options)
    done = committed_shards(config.out, options)
    job = Job(resolved=resolved, plan=plan, pending=[], resumed=resumed)
    job.pending = [s for s in range(job.shards) if s not in done]
    return job


def retry_error_rows(out: str, kinds: tuple[str, ...], storage_options: dict[str, Any]) -> None:
    """--retry-errors: the committed shards holding error rows of `kinds` become pending again, so
    this run recomputes them whole and commits each once more (exactly once, as any shard)."""
    manifest = read_manifest(out, storage_options)
    wanted = manifest.filter(pc.is_in(manifest.column("error_kind"), pa.array(kinds)))
    shards = set(wanted.column("shard").to_pylist())
    if shards:
        log.info("--retry-errors %s: recomputing %d shards holding %d such rows", ",".join(kinds), len(shards), wanted.num_rows)
        uncommit(out, shards, storage_options)


def usable_items(dataset: str, storage_options: dict[str, Any]) -> list[Item]:
    """The dataset's items; raises SourceError naming --dataset when none can be extracted."""
    try:
        items = list_items(dataset, storage_options)
    except SourceError:
        raise
    except Exception as error:  # the dataset's root could be read, but listing it failed as a whole
        raise SourceError(f"--dataset {dataset} cannot be listed ({one_line(error)}); check the URI and --storage-options") from error
    if not items:
        raise SourceError(f"--dataset {dataset}: no images found (looked for image files, .tar shards, .parquet files and file lists)")
    broken = [item for item in items if item.error_kind]
    if len(broken) == len(items):
        reasons = "; ".join(f"{item.uri}: {item.error}" for item in broken[:3]) + (f"; and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise SourceError(f"--dataset {dataset}: nothing usable, every input failed at listing: {reasons}")
    return items


def interrupted_note(config: ExtractConfig) -> str:
    """What a stopped run leaves (Ctrl-C): committed shards stay, and the same command resumes."""
    if stored_provenance(config.out, config.storage_options) is None:
        return f"nothing was written to {config.out} yet"
    total = -(-int(open_group(config.out, "r", config.storage_options).attrs["plan_size"]) // config.shard_size)
    done = len(committed_shards(config.out, config.storage_options))
    return f"{done} of {total} shards of {config.out} are committed; rerun the same command to resume"


@dataclass
class RunSummary:
    images: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    views: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    startup_seconds: float = 0.0  # planning, actor start and model load, before the first shard
    shards_done: int = 0
    shards_skipped: int = 0  # already committed by an earlier run
    discarded: int = 0  # duplicate attempts (retries, stragglers) that found their shard committed
    retries: int = 0  # units re-run after an actor died or a task failed
    duplicates: int = 0  # second copies started for stragglers
    shift_batches: int = 1  # > 1: each shard's shifts were split across actors
    failed_shards: list[int] = field(default_factory=list)  # gave up after --max-retries; a rerun resumes them
    per_worker: dict[str, dict[str, float]] = field(default_factory=dict)

    def add(self, stats: ShardStats, worker: str = "local") -> None:
        if not stats.committed:
            self.discarded += 1
            return
        self.ok += stats.ok
        self.errors.update(stats.errors)
        self.images += stats.ok + sum(stats.errors.values())
        self.views += stats.views
        self.bytes_written += stats.bytes_written
        self.shards_done += 1
        mine = self.per_worker.setdefault(worker, {"images": 0, "seconds": 0.0})
        mine["images"] += stats.ok + sum(stats.errors.values())
        mine["seconds"] += stats.seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "ok": self.ok,
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors.most_common()),
            "views": self.views,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "startup_seconds": round(self.startup_seconds, 3),
            "images_per_second": round(self.images / self.seconds, 3) if self.seconds else None,
            "shards_done": self.shards_done,
            "shards_skipped": self.shards_skipped,
            "discarded": self.discarded,
            "retries": self.retries,
            "duplicates": self.duplicates,
            "shift_batches": self.shift_batches,
            "failed_shards": self.failed_shards,
            "per_worker": {
                name: {**v, "images_per_second": round(v["images"] / v["seconds"], 3) if v["seconds"] else None}
                for name, v in self.per_worker.items()
            },
        }

    def render(self) -> str:
        d = self.as_dict()
        lines = [
            f"images      {d['images']} ({d['ok']} ok, {d['errors']} errors)" + (f"; {d['shards_skipped']} shards already done" if self.shards_skipped else ""),
            f"time        {d['seconds']:.1f} s ({self.startup_seconds:.1f} s start-up), {d['images_per_second'] or 0:.2f} images/s, {self.views / self.seconds if self.seconds else 0:.1f} views/s",
            f"stored      {self.bytes_written / 1e6:.1f} MB of features (before compression)",
        ]
        if self.errors:
            lines.append("errors      " + ", ".join(f"{kind}: {n}" for kind, n in self.errors.most_common(5)))
        if self.failed_shards:
            lines.append(f"FAILED      shards {self.failed_shards} after retries; rerun the same command to resume them")
        for name, v in d["per_worker"].items():
            lines.append(f"worker      {name}: {v['images']} images, {v['images_per_second'] or 0:.2f} images/s busy")
        return "\n".join(lines)


def finish(job: Job, summary: RunSummary) -> None:
    """End of a run: the manifest parts compacted into one table, Zarr metadata consolidated
    (one read opens the store), and summary.json, all inside the output.

    summary.json holds what the store holds (images, errors by kind, shards: from the manifest)
    and the figures of the last run that did work. A rerun that finds everything done rewrites it
    only when it is missing or its store counts are stale (a killed driver's actors may still
    commit their last shards), keeping the earlier run's figures where there are any.
    """
    config = job.resolved.config
    out, options = config.out.rstrip("/"), config.storage_options
    compact(out, options)
    with warnings.catch_warnings():  # zarr notes our Parquet files and that consolidation is not yet in the v3 spec
        warnings.simplefilter("ignore", ZarrUserWarning)
        zarr.consolidate_metadata(open_group(out, "r+", options, use_consolidated=False).store)
    stored = store_counts(read_manifest(out, options), job.shards)
    uri = f"{out}/summary.json"
    if summary.shards_done or not job.resumed:
        run = summary.as_dict()
    else:
        try:
            previous = json.loads(read_uri(uri, options))
        except FileNotFoundError:
            previous = {}
        if previous.get("store") == stored:
            return
        run = previous.get("run")  # None: the run that did the work was killed before writing it
    document = {"config": job.resolved.provenance(), "flags": job.resolved.flags(), "store": stored, "run": run}
    put_atomically(uri, json.dumps(document, indent=2, default=str).encode(), options)


def store_counts(manifest: pa.Table, shards: int) -> dict[str, Any]:
    """What a store holds, from its manifest: images, ok, errors by kind, shards committed of all."""
    kinds = Counter(kind for kind in manifest.column("error_kind").to_pylist() if kind)
    return {
        "images": manifest.num_rows,
        "ok": manifest.num_rows - sum(kinds.values()),
        "errors": sum(kinds.values()),
        "error_kinds": dict(kinds.most_common()),
        "shards_committed": len(set(manifest.column("shard").to_pylist())),
        "shards": shards,
    }


def pca_sample(job: Job) -> list[int]:
    """--pca-dims: the pending shards to fit the PCA basis on first (`ShardWorker.fit_pca`), or none
    when the store holds every tap's basis already (a resumed run keeps the basis it started with)."""
    config = job.resolved.config
    fitted = open_group(config.out, "r", config.storage_options, use_consolidated=False).attrs.get("pca", {})
    if not config.pca_dims or all(tap.name in fitted for tap in job.resolved.taps):
        return []
    return job.pending[:PCA_SAMPLE_SHARDS]


def progress(job: Job) -> JobProgress:
    """The bar of a run: every pending image, the PCA fitting sample's included."""
    return JobProgress(job.images_in(job.pending))


def run_local(config: ExtractConfig, *, device: str | None = None, vit: ViT | None = None) -> RunSummary:
    """Extract in this process, in three overlapping stages: the next shard is read and decoded
    (and copied to the GPU) while this one is computed and up to WRITERS earlier ones are written.
    `vit`: an already loaded model of the config's weights (the data-plane bench passes a stand-in)."""
    started = time.perf_counter()
    job = plan_job(preflight(config))
    summary = RunSummary(shards_skipped=job.shards - len(job.pending))
    if job.pending:
        worker = ShardWorker(job.resolved, vit=vit, device=device)
        summary.startup_seconds = time.perf_counter() - started
        with progress(job) as bar, ThreadPoolExecutor(WRITERS, thread_name_prefix="commit") as writers:

            def record(stats: ShardStats) -> None:
                summary.add(stats)
                bar.count_errors(sum(summary.errors.values()))

            if sample := pca_sample(job):
                fitted = [worker.load(s, shard_rows(job.plan, s, config.shard_size)) for s in sample]
                for loaded, stats in zip(fitted, worker.fit_pca(fitted, progress=bar.computed)):
                    record(stats)
                    bar.advance(len(loaded.rows) - loaded.decoded)  # error rows, done without the model
                job.pending = job.pending[len(sample) :]
            loads = prefetch((worker.load(s, shard_rows(job.plan, s, config.shard_size)) for s in job.pending), depth=2)
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
    summary.seconds = time.perf_counter() - started
    finish(job, summary)
    return summary
