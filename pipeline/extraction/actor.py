"""The extraction actor: one model (on its GPU, or on CPU threads) that reads, computes and writes
work units for the Ray runner (`pipeline.extraction.distributed`), straight to the store.

Up to UNITS_PER_ACTOR units run in it at once: one reading and decoding, one computing (the model
is taken by one unit at a time), the others writing.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
import torch

from pipeline.engine.aggregation import PartialSum, combine
from pipeline.engine.shifts import Shift
from pipeline.extraction.config import ResolvedConfig
from pipeline.extraction.progress import report_to
from pipeline.extraction.runner import WRITERS
from pipeline.extraction.shards import LoadedShard, ShardStats
from pipeline.extraction.worker import ShardWorker
from pipeline.store.plan import PlanIndex, PlanReader

UNITS_PER_ACTOR = 2 + WRITERS  # one reading and decoding, one computing, the others writing


@ray.remote(max_restarts=-1, max_concurrency=UNITS_PER_ACTOR)
class ExtractActor:
    """Owns one model (on its GPU, or on CPU with a thread budget) and writes straight to the store."""

    def __init__(self, resolved: ResolvedConfig, index: PlanIndex, threads: int) -> None:
        torch.set_num_threads(threads)
        self.worker = ShardWorker(resolved, PlanReader(resolved.config.out, index, resolved.config.storage_options))
        self.model_lock = threading.Lock()  # reads and decodes overlap; forward passes do not

    def ready(self) -> bool:
        """Returns once the model is loaded: lets the driver time actor start-up."""
        return True

    def process(self, shard: int, counter: Any) -> ShardStats:
        """Data-parallel unit: the whole shard, committed here. Its time counts from when it
        gets the model, so time spent reading while another unit computes is not counted twice."""
        loaded = self.worker.load(shard)
        with self.model_lock:
            started = time.perf_counter()
            arrays = self.worker.assemble(loaded, self.worker.compute(loaded, progress=report_to(counter, shard)))
        return self.worker.commit(loaded, arrays, started)

    @ray.method(num_returns=2)
    def compute(self, shard: int, shifts: tuple[Shift, ...], counter: Any) -> tuple[int, tuple[LoadedShard, list[PartialSum]]]:
        """Split-mode unit: partial sums over one shift batch. Returns (a small ack, the payload)."""
        loaded = self.worker.load(shard)
        with self.model_lock:
            partials = [partial.to("cpu") for partial in self.worker.compute(loaded, shifts, progress=report_to(counter, shard))]
        return shard, (loaded.without_pixels(), partials)

    def fit_pca(self, shards: list[int], counter: Any) -> list[ShardStats]:
        """--pca-dims: fit and store the basis on these shards and commit them, before any other unit.
        Their progress is reported under the first shard's number."""
        with self.model_lock:
            return self.worker.fit_pca([self.worker.load(shard) for shard in shards], progress=report_to(counter, shards[0]))

    def commit(self, shard: int, *payloads: tuple[LoadedShard, list[PartialSum]]) -> ShardStats:
        """Split-mode commit: add every batch's partial sums in batch order, then write."""
        started = time.perf_counter()
        loaded = payloads[0][0]
        groups = zip(*(partials for _, partials in payloads))
        return self.worker.commit(loaded, self.worker.assemble(loaded, [combine(list(parts)) for parts in groups]), started)
