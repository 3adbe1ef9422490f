"""The Ray runner: a pool of extraction actors (`actor.ExtractActor`) fed work units by a scheduler over `ray.wait`.

A work unit is (shard, shift batch). In data-parallel mode a unit is a whole shard with every
shift: the actor reads, decodes, computes, writes the arrays and commits the manifest part. In
split mode a shard's shifts are cut into G batches computed on different actors; each returns
its partial sums (fp32, through the object store, never through the driver), and one commit unit
adds them in batch order and writes. Only manifest stats travel to the driver.

Failures: an actor that dies is restarted by Ray (`max_restarts`); its units are retried with
exponential backoff, up to --max-retries, on the other actors: the restarted one gets work again
once it answers. A unit running past the straggler timeout is started
again elsewhere; whichever commits first wins and the other is discarded (manifest parts are
written only if absent), so every image lands in the manifest exactly once.
"""

from __future__ import annotations

import collections
import heapq
import logging
import statistics
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayActorError, RayError

from pipeline.engine.shifts import Shift
from pipeline.extraction.actor import UNITS_PER_ACTOR, ExtractActor
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.placement import START_REPORT_SECONDS, actor_plan, cluster_nodes, joins_a_cluster, local_nodes, shift_batches, wait_until_started
from pipeline.extraction.planning import Mapper, ray_map
from pipeline.extraction.progress import JobProgress, progress_counter
from pipeline.extraction.runner import (
    Compactor,
    Job,
    finished_already,
    pca_sample,
    plan_job,
    planned,
    preflight,
    progress,
    run_resolved,
)
from pipeline.extraction.shards import ShardStats
from pipeline.extraction.summary import RunSummary, finish
from pipeline.extraction.units import Running, Unit, UnitFlags, grown
from pipeline.store.uris import one_line

log = logging.getLogger("srt")

ACTOR_PREFIX = "srt-extract"
BACKOFF_SECONDS = 0.5
MIN_STRAGGLER_SECONDS = 60.0
PROGRESS_SECONDS = 0.5
COUNTER_TIMEOUT_SECONDS = 10.0  # a counter that does not answer in this long is given up
DURATION_WINDOW = 256  # the usual unit time (stragglers) is the median of this many latest units


class ActorPoolScheduler:
    """Hands units to actors with at most UNITS_PER_ACTOR in flight each; retries and duplicates.

    Driver work and memory per event do not grow with the number of pending units: units are made
    from the pending shards as actors have room for them, retries and split commits wait in a
    deque, retries waiting out their backoff in a heap, and submission stops at the first unit no
    actor has room for.
    """

    def __init__(
        self, job: Job, actors: list[tuple[str, Any]], batches: list[tuple[Shift, ...]], summary: RunSummary, counter: Any, compactor: Compactor
    ) -> None:
        config = job.resolved.config
        self.job, self.actors, self.batches, self.summary = job, actors, batches, summary
        self.max_retries = config.max_retries
        self.straggler_timeout = config.straggler_timeout
        self.queue: collections.deque[Unit] = collections.deque()  # due retries and commits, before fresh units
        self.delayed: list[tuple[float, int, Unit]] = []  # (not_before, tiebreak, unit): a heap of backed-off retries
        self.running: dict[Any, Running] = {}
        self.load = {name: 0 for name, _ in actors}
        self.done = UnitFlags(job.shards, len(batches))  # units finished (first result wins)
        self.payloads: dict[int, dict[int, Any]] = collections.defaultdict(dict)  # shard -> batch -> ref
        self.durations: collections.deque[float] = collections.deque(maxlen=DURATION_WINDOW)  # the latest units' times
        self.straggler_limit: tuple[float, float] | None = None  # (seconds, when to compute it again)
        self.duplicated: set[tuple[int, Any]] = set()
        # Actors that died, and when to ask next whether Ray has restarted them: nothing is sent to
        # one until its ready() answers, since units sent meanwhile fail at once ("restarting").
        self.unavailable: dict[str, float] = {}
        self.pings: dict[Any, str] = {}  # ready() ref -> actor name
        self.next_warning: dict[str, float] = {}  # actor name -> when to say again that it is not back
        self.counter = counter  # a ProgressCounter the actors report image groups to; None once lost
        self.shown: collections.Counter[int] = collections.Counter()  # images of uncommitted shards already on the bar
        self.limits: dict[int, int] = {}  # images a counter key may show, where not its shard's (the PCA sample)
        self.committed = np.zeros(job.shards, bool)  # shards whose images are all on the bar: later reports are ignored
        self.next_progress = 0.0
        self.compactor = compactor
        self.sample = pca_sample(job)
        self.fresh = self._fresh_units(job.pending[len(self.sample) :])
        self.exhausted = False  # every fresh unit was handed out, and the listing is done
        self.bar: JobProgress | None = None

    def _fresh_units(self, shards: Any) -> Iterator[Unit]:
        for shard in shards:
            for batch in [None] if len(self.batches) == 1 else range(len(self.batches)):
                yield Unit(int(shard), batch)

    def _next_unit(self) -> Unit | None:
        if self.queue:
            return self.queue.popleft()
        unit = next(self.fresh, None)
        if unit is None and self.job.listing is not None:  # what the listing planned since, if anything
            self._planned(self.job.extend(wait=0.0))
            unit = next(self.fresh, None)
        self.exhausted = unit is None and self.job.listing is None
        return unit

    def _planned(self, shards: np.ndarray) -> None:
        """Shards the listing planned while the run went on: fresh units, room in the bookkeeping."""
        self.done.grow(self.job.shards)
        self.committed = grown(self.committed, self.job.shards)
        planned(self.job, shards, self.bar, self.compactor)
        self.fresh = self._fresh_units(shards)

    def run(self, bar: JobProgress) -> None:
        self.bar = bar
        if self.sample:
            self._fit_pca(bar)
        while self.queue or not self.exhausted or self.delayed or self.running:
            self._ping_unavailable()
            self._submit_ready()
            refs = [*self.running, *self.pings]
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0) if refs else ([], [])
            for ref in ready:
                if ref in self.pings:
                    self._pinged(ref)
                else:
                    self._finish(self.running.pop(ref), bar)
            self._duplicate_stragglers()
            self._show_progress(bar)
            if not refs and (self.queue or not self.exhausted or self.delayed):
                wakes = [*self.unavailable.values(), *([self.delayed[0][0]] if self.delayed else [])]
                time.sleep(min(1.0, max(0.0, min(wakes, default=time.monotonic() + 1.0) - time.monotonic())))

    def _show_progress(self, bar: JobProgress) -> None:
        """Move the bar by the image groups computed since last time (never past a shard's size).
        Progress never fails the job: a counter that cannot be reached is dropped with a warning,
        and the bar then moves as shards commit."""
        if self.counter is None or time.monotonic() < self.next_progress:
            return
        self.next_progress = time.monotonic() + PROGRESS_SECONDS
        try:
            counts = ray.get(self.counter.take.remote(), timeout=COUNTER_TIMEOUT_SECONDS)
        except RayError as error:  # GetTimeoutError included
            log.warning("the progress counter is lost (%s): the bar now moves as shards commit; the job goes on", one_line(error))
            self.counter = None
            return
        for shard, (images, views) in counts.items():
            step = 0.0
            if not self.committed[shard]:  # a committed shard's images are on the bar already; its views are not
                step = min(images, self.limits.get(shard, self.job.images_in([shard])) - self.shown[shard])
                self.shown[shard] += step
            bar.computed(step, int(views))

    def _fit_pca(self, bar: JobProgress) -> None:
        """--pca-dims: every unit needs the basis, so one actor fits it on the sample shards first."""
        name, actor = self.actors[0]
        self.limits[self.sample[0]] = self.job.images_in(self.sample)
        ref = actor.fit_pca.remote(self.sample, self.counter)
        while not ray.wait([ref], timeout=PROGRESS_SECONDS)[0]:
            self._show_progress(bar)
        for stats in ray.get(ref):
            self.summary.add(stats, name)
            if stats.committed:
                self.compactor.committed(stats.shard)
        self.committed[self.sample] = True
        bar.count_errors(sum(self.summary.errors.values()))
        bar.advance(self.job.images_in(self.sample) - self.shown.pop(self.sample[0], 0))

    def _available(self) -> list[tuple[str, Any]]:
        return [a for a in self.actors if a[0] not in self.unavailable]

    def _ping_unavailable(self) -> None:
        now = time.monotonic()
        asked = set(self.pings.values())
        for name, actor in self.actors:
            if name in self.unavailable and name not in asked and self.unavailable[name] <= now:
                self.pings[actor.ready.remote()] = name

    def _pinged(self, ref: Any) -> None:
        name = self.pings.pop(ref)
        try:
            ray.get(ref)
        except RayError as error:  # still restarting: ask again a little later, and say so now and then
            now = time.monotonic()
            self.unavailable[name] = now + BACKOFF_SECONDS
            if now >= self.next_warning.get(name, 0.0):
                self.next_warning[name] = now + START_REPORT_SECONDS
                others = "its units go to the other actors" if self._available() else "no actor can take units until one is back"
                log.warning("actor %s is not back yet (%s); %s", name, one_line(error), others)
            return
        log.info("actor %s is back", name)
        del self.unavailable[name]

    def _submit_ready(self) -> None:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            self.queue.append(heapq.heappop(self.delayed)[2])
        available = self._available()
        while available:
            name, actor = min(available, key=lambda a: self.load[a[0]])
            if self.load[name] >= UNITS_PER_ACTOR:
                return
            unit = self._next_unit()
            if unit is None:
                return
            if unit.key not in self.done:
                self._start(unit, name, actor)

    def _delay(self, unit: Unit) -> None:
        """Queue a retry once its backoff has passed."""
        heapq.heappush(self.delayed, (unit.not_before, id(unit), unit))

    def _start(self, unit: Unit, name: str, actor: Any) -> None:
        payload = None
        if unit.batch is None:
            ref = actor.process.remote(unit.shard, self.counter)
        elif unit.batch == "commit":
            ref = actor.commit.remote(unit.shard, *unit.payloads)
        else:
            ref, payload = actor.compute.remote(unit.shard, self.batches[unit.batch], self.counter)
        self.load[name] += 1
        self.running[ref] = Running(unit, (name, actor), ref, payload)

    def _finish(self, running: Running, bar) -> None:
        unit, (name, _) = running.unit, running.actor
        self.load[name] -= 1
        self.job.started()
        try:
            result = ray.get(running.ref)
        except RayError as error:
            if isinstance(error, RayActorError):
                self.unavailable.setdefault(name, time.monotonic())
            self._retry(unit, error)
            return
        if isinstance(result, ShardStats):
            self._record_stats(unit, name, result, running.started, bar)
            return
        if unit.key in self.done:
            self.summary.discarded += 1  # a duplicate batch finished second
            return
        self.done.add(unit.key)
        self.durations.append(time.monotonic() - running.started)
        batches = self.payloads[unit.shard]
        batches[unit.batch] = running.payload
        if len(batches) == len(self.batches):  # the commit unit holds the refs now: none stays behind it
            del self.payloads[unit.shard]
            payloads = [batches[b] for b in range(len(self.batches))]
            self.queue.appendleft(Unit(unit.shard, "commit", attempt=unit.attempt, payloads=payloads))

    def _record_stats(self, unit: Unit, name: str, stats: ShardStats, started: float, bar) -> None:
        """Count the copy that committed; a copy that found the shard committed is discarded, and
        only closes the unit when no other copy is still running (the committer's report may be lost)."""
        copies_running = any(r.unit.key == unit.key for r in self.running.values())
        if unit.key in self.done or not stats.committed:
            self.summary.discarded += 1
            if not copies_running:
                self.done.add(unit.key)
            return
        self.done.add(unit.key)
        self.durations.append(time.monotonic() - started)
        self.summary.add(stats, worker=name)
        self.compactor.committed(unit.shard)
        self.committed[unit.shard] = True
        bar.count_errors(sum(self.summary.errors.values()))
        bar.advance(self.job.images_in([unit.shard]) - self.shown.pop(unit.shard, 0))

    def _retry(self, unit: Unit, error: Exception) -> None:
        if unit.key in self.done or any(r.unit.key == unit.key for r in self.running.values()):
            return  # finished, or another copy (a straggler duplicate) is still on it
        if unit.attempt >= self.max_retries:
            log.error("shard %d failed after %d attempts: %s", unit.shard, unit.attempt + 1, error)
            self.done.add(unit.key)
            self.summary.failed_shards.append(unit.shard)
            return
        self.summary.retries += 1
        kind = "actor died" if isinstance(error, RayActorError) else "task failed"
        log.warning("shard %d (%s) %s, retrying: %s", unit.shard, unit.batch, kind, one_line(error))
        if unit.batch == "commit":  # the batches' payloads may be gone with the actor: recompute them
            self.payloads.pop(unit.shard, None)
            for b in range(len(self.batches)):
                self.done.discard((unit.shard, b))
                self._delay(Unit(unit.shard, b, unit.attempt + 1, time.monotonic() + BACKOFF_SECONDS * 2**unit.attempt))
            return
        unit.attempt += 1
        unit.not_before = time.monotonic() + BACKOFF_SECONDS * 2 ** (unit.attempt - 1)
        self._delay(unit)

    def _duplicate_stragglers(self) -> None:
        """Start a second copy of a unit that has run far longer than usual, on the least-busy actor."""
        if self.straggler_timeout == 0 or len(self.actors) < 2:
            return
        now = time.monotonic()
        if self.straggler_timeout is None:
            if len(self.durations) < 3:
                return
            if self.straggler_limit is None or now >= self.straggler_limit[1]:  # once a second, not per event
                self.straggler_limit = (max(MIN_STRAGGLER_SECONDS, 4 * statistics.median(self.durations)), now + 1.0)
            limit = self.straggler_limit[0]
        else:
            limit = self.straggler_timeout
        for running in list(self.running.values()):
            unit = running.unit
            if unit.key in self.duplicated or now - running.started < limit or unit.batch == "commit":
                continue
            others = [a for a in self._available() if a[0] != running.actor[0] and self.load[a[0]] < UNITS_PER_ACTOR]
            if others:
                log.warning("shard %d running %.0f s: starting a second copy", unit.shard, now - running.started)
                self.duplicated.add(unit.key)
                self.summary.duplicates += 1
                name, actor = min(others, key=lambda a: self.load[a[0]])
                self._start(Unit(unit.shard, unit.batch, unit.attempt), name, actor)


RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def start_ray(joins: bool) -> None:
    """Start or join Ray, saying in one plain line which and where its dashboard is: Ray's own
    start-up lines (the dashboard's in colour codes, the token-auth notice) only with --verbose."""
    verbose = log.isEnabledFor(logging.DEBUG)
    if not verbose:
        logging.getLogger(RAY_AUTH_LOGGER).setLevel(logging.ERROR)  # "token authentication is enabled": it is, by design
    context = ray.init(log_to_driver=True, logging_level=logging.INFO if verbose else logging.WARNING)
    where = f"joined the Ray cluster at {context.address_info['gcs_address']}" if joins else "started a local Ray instance"
    log.info("%s (dashboard: %s)", where, f"http://{context.dashboard_url}" if context.dashboard_url else "none")


def run_ray(config: ExtractConfig, *, mapper: Mapper | None = None) -> RunSummary:
    """Extract on a Ray cluster (the one `ray job submit` or RAY_ADDRESS names, else a local one).
    `mapper`: what lists the dataset's inputs (default: Ray tasks over the cluster, `ray_map`)."""
    started = time.perf_counter()
    resolved = preflight(config)  # bad flags fail before Ray starts
    config = resolved.config
    if finished_already(resolved):  # a rerun with nothing to compute starts no cluster
        log.info("every shard of %s is committed: nothing to compute, no Ray cluster started", config.out)
        return run_resolved(resolved, started)
    joins = joins_a_cluster()
    if not joins:  # a local instance of this machine's shape: actors that cannot fit fail before it starts
        actor_plan(config, local_nodes(), None)
    if not ray.is_initialized():
        start_ray(joins)
    count, resources, threads = actor_plan(config, *cluster_nodes())
    job = plan_job(resolved, mapper=mapper or ray_map)
    try:
        summary = _run_actors(job, started, count, resources, threads)
    finally:
        job.stop_listing()
    summary.seconds = time.perf_counter() - started
    finish(job, summary)
    return summary


def _run_actors(job: Job, started: float, count: int, resources: dict[str, float], threads: int) -> RunSummary:
    """Start the actors and hand them every unit: the planned shards, and those the listing plans meanwhile."""
    summary = RunSummary.of(job)
    if len(job.pending) or job.listing is not None:
        batches = shift_batches(job, count)
        summary.shift_batches = len(batches)
        run_id = uuid.uuid4().hex[:8]
        actors = [
            (f"{ACTOR_PREFIX}-{run_id}-{i}", ExtractActor.options(name=f"{ACTOR_PREFIX}-{run_id}-{i}", **resources).remote(job.resolved, job.index, threads))
            for i in range(count)
        ]
        wait_until_started(actors, resources)
        summary.startup_seconds = time.perf_counter() - started
        mode = f"split shifts into {len(batches)} batches" if len(batches) > 1 else "data parallel"
        log.info("%d actors (%s each, %d threads), %s, %d shards to do", count, resources, threads, mode, len(job.pending))
        counter = progress_counter(run_id)
        compactor = Compactor(job)
        try:
            with progress(job) as bar:
                ActorPoolScheduler(job, actors, batches, summary, counter, compactor).run(bar)
                bar.finished(summary.views)
        finally:
            compactor.close()
            for actor in [counter, *(actor for _, actor in actors)]:
                ray.kill(actor, no_restart=True)
    return summary
