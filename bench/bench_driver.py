"""The driver's own work per unit as the queue grows: the Ray scheduler run over 1k, 10k and 30k
pending shards with actors that answer at once, so what is timed is the driver (submitting,
waiting, bookkeeping, Ray's per-call overhead), not extraction.

    python -m bench.bench_driver [--sizes 1000,10000,30000]

A GPU actor finishing a 32-image shard every 30 ms asks the driver for about 30 units a second
per GPU; the driver's CPU per unit must stay flat however many shards wait.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import ray

from bench.results import table, write_section
from pipeline.extraction.config import ExtractConfig, resolve
from pipeline.extraction.distributed import ActorPoolScheduler
from pipeline.extraction.progress import JobProgress, ProgressCounter
from pipeline.extraction.runner import Compactor, Job
from pipeline.extraction.summary import RunSummary
from pipeline.extraction.shards import ShardStats
from pipeline.store.plan import PlanIndex


@ray.remote(num_cpus=0)
class InstantActor:
    """Answers every unit at once, as if extraction took no time."""

    def process(self, shard: int, counter) -> ShardStats:
        return ShardStats(shard=shard, ok=1)


def job_of(shards: int) -> Job:
    resolved = resolve(ExtractConfig(dataset="driver-bench", out="driver-bench", model="vit_tiny_patch16_224", shard_size=1))
    index = PlanIndex.of([{"path": "bench/part-000000.parquet", "input": "driver-bench", "kind": "files", "first_row": 0, "count": shards, "errors": 0}], 1)
    return Job(resolved=resolved, index=index, pending=np.arange(shards), resumed=False)


def driver_cpu_per_unit(job: Job, actors: list) -> tuple[float, float]:
    """(driver CPU µs per unit, wall µs per unit) over a whole run of the job's pending units."""
    shards = len(job.pending)
    counter = ProgressCounter.remote()
    summary = RunSummary()
    cpu, wall = time.process_time(), time.perf_counter()
    compactor = Compactor(job)  # finds no manifest folder to compact: its bookkeeping per unit is measured
    with JobProgress(job.images_in(job.pending)) as bar:  # the real bar: its updates are driver work too
        ActorPoolScheduler(job, actors, [()], summary, counter, compactor).run(bar)
    compactor.close()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert summary.shards_done == shards, summary.as_dict()
    ray.kill(counter)
    return 1e6 * cpu / shards, 1e6 * wall / shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,30000")
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    ray.init(include_dashboard=False, log_to_driver=False)
    actors = [(f"instant-{i}", InstantActor.remote()) for i in range(args.actors)]
    driver_cpu_per_unit(job_of(200), actors)  # warm-up: workers, connections, imports
    rows, first = [], None
    for shards in sizes:
        cpu, wall = driver_cpu_per_unit(job_of(shards), actors)
        first = first or cpu
        rows.append([f"{shards:,}", f"{cpu:.0f}", f"{wall:.0f}", f"**{cpu / first:.2f}**"])
        print(rows[-1])
    ray.shutdown()
    write_section(
        "driver",
        "Driver work per unit as the queue grows (Ray scheduler, instant actors)",
        f"""
The scheduler (`ActorPoolScheduler`) over every pending unit of a job, with {args.actors} actors that
answer at once: the driver's CPU (process time) and wall time per unit, each size run to the end.
Target: CPU per unit at 30k pending within 1.5× of that at 1k.

{table(["pending shards", "driver CPU µs per unit", "wall µs per unit", "CPU vs the first"], rows)}
""",
    )


if __name__ == "__main__":
    main()
