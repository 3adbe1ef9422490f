"""What a run did and what its store holds: the summary printed at the end, and summary.json.

`RunSummary` adds up the committed shards' stats as a runner records them; `finish` ends every
run the same way (the manifest compacted, Zarr metadata consolidated, summary.json written).
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zarr
from zarr.errors import ZarrUserWarning

from pipeline.extraction.shards import ShardStats
from pipeline.store.layout import grow_store, open_group
from pipeline.store.manifest import compact, error_counts, manifest_files, put_atomically
from pipeline.store.uris import read_uri

if TYPE_CHECKING:
    from pipeline.extraction.runner import Job

ERROR_EXAMPLES = 3  # failed images the summary names (the manifest lists them all)


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
    appended: dict[str, Any] | None = None  # --append: what was added, what is gone (planning.Appended)
    repeated_keys: dict[str, Any] | None = None  # image_ids more than one input gives (repeated_keys)
    error_examples: list[dict[str, Any]] = field(default_factory=list)  # the store's first error rows (uri, kind, error)
    out: str = ""

    @classmethod
    def of(cls, job: Job) -> RunSummary:
        """A run's summary before any work: what earlier runs did, what --append found, keys repeated across inputs."""
        appended = job.appended.as_dict() if job.appended else None
        return cls(shards_skipped=job.index.ready - len(job.pending), appended=appended, repeated_keys=job.index.repeated_keys, out=job.resolved.config.out)

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
            **({"appended": self.appended} if self.appended else {}),
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
        for i, e in enumerate(self.error_examples):  # the store's first failed images, by name (the manifest's ids are hashes)
            lines.append(f"{'failed' if i == 0 else '':12}{e['uri']}  {e['error_kind']}: {str(e['error']).splitlines()[0][:100]}")
        if self.error_examples:
            lines.append(f"{'':12}all of them: duckdb -c \"SELECT uri, error_kind, error FROM '{self.out}/manifest/*.parquet' WHERE status = 'error'\"")
        if self.appended:
            a = self.appended
            lines.append(f"appended    {a['items']} items in {a['inputs']} inputs from row {a['first_row']}" + (f"; {a['removed']} inputs gone since (kept)" if a["removed"] else ""))
        if self.repeated_keys:
            r = self.repeated_keys
            lines.append(f"repeated    {r['keys']} image_ids given by more than one input (e.g. {r['examples'][0]['image_id']}); see summary.json 'plan'")
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
    summary.repeated_keys = job.index.repeated_keys  # known once the listing is done, maybe after the run started
    compact(out, options)
    group = open_group(out, "r+", options, use_consolidated=False)
    grow_store(group, job.index.size)  # an array a worker made while the plan was smaller (a size bucket) grows too
    with warnings.catch_warnings():  # zarr notes our Parquet files and that consolidation is not yet in the v3 spec
        warnings.simplefilter("ignore", ZarrUserWarning)
        zarr.consolidate_metadata(group.store)
    stored = store_counts(out, options, job.shards)
    summary.error_examples = stored["error_examples"]
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
    plan = {"items": job.index.items, "inputs": len(job.index.table), "repeated_keys": job.index.repeated_keys}
    document = {"config": job.resolved.provenance(), "flags": job.resolved.flags(), "store": stored, "plan": plan, "run": run}
    put_atomically(uri, json.dumps(document, indent=2, default=str).encode(), options)


def store_counts(out: str, storage_options: dict[str, Any], shards: int) -> dict[str, Any]:
    """What a store holds, from its manifest read one file at a time: images, ok, errors by kind,
    shards committed of all."""
    listed = manifest_files(out, storage_options)  # one listing for the rows and the shards
    rows, kinds, examples = error_counts(listed, ERROR_EXAMPLES)
    return {
        "images": rows,
        "ok": rows - sum(kinds.values()),
        "errors": sum(kinds.values()),
        "error_kinds": dict(kinds.most_common()),
        "error_examples": examples,
        "shards_committed": listed.count(),
        "shards": shards,
    }
