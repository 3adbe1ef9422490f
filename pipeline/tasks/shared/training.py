"""What the jobs that train on a store share (distillation, probes): the seeded batch stream that a
resumed run replays, checkpoints committed by their state file, and Ray Train workers.

Checkpoint layout under a run's folder (any fsspec URI):

    checkpoints/step-NNNNNNN/<files>      what the job saves (weights, optimizer state)
    checkpoints/step-NNNNNNN/state.json   written last: the checkpoint is complete
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import fsspec
import numpy as np

from pipeline.store.uris import read_uri

TRAIN_RESTARTS = 3  # worker-group restarts a Ray Train run may take before it fails

Report = Callable[[dict[str, Any]], None]


def by_bucket(rows: list[dict[str, Any]], batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """Batches of manifest rows sharing a model input size, in row order; incomplete batches come last."""
    pending: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        group = pending.setdefault(row["bucket"], [])
        group.append(row)
        if len(group) == batch_size:
            yield pending.pop(row["bucket"])
    yield from pending.values()


def batches(rows: list[dict[str, Any]], batch_size: int, seed: int) -> Iterator[list[dict[str, Any]]]:
    """Endless `by_bucket` batches, reshuffled every epoch (seeded: a resumed run replays the order)."""
    if not rows:
        raise ValueError("no training images for this worker: use fewer workers than training images")
    for epoch in itertools.count():
        order = np.random.default_rng([seed, epoch]).permutation(len(rows))
        yield from by_bucket([rows[i] for i in order], batch_size)


def join(out: str, *parts: str) -> str:
    return "/".join([out.rstrip("/"), *parts])


def write_bytes(uri: str, data: bytes, storage_options: dict[str, Any]) -> None:
    with fsspec.open(uri, "wb", **storage_options) as handle:
        handle.write(data)


def latest_checkpoint(out: str, storage_options: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(folder URI, state) of the last complete checkpoint under `out`, or None."""
    fs, path = fsspec.core.url_to_fs(out, **storage_options)
    states = sorted(fs.glob(f"{path.rstrip('/')}/checkpoints/step-*/state.json"))
    if not states:
        return None
    folder = join(out, "checkpoints", states[-1].rstrip("/").split("/")[-2])
    return folder, json.loads(fs.cat_file(states[-1]))


def save_checkpoint(out: str, state: dict[str, Any], files: dict[str, bytes], storage_options: dict[str, Any]) -> str:
    """Write `files` into the step's folder, then its state.json: the commit point."""
    folder = join(out, "checkpoints", f"step-{state['step']:07d}")
    for name, data in files.items():
        write_bytes(f"{folder}/{name}", data, storage_options)
    write_bytes(f"{folder}/state.json", json.dumps(state, indent=2).encode(), storage_options)
    return folder


def checkpoint_file(folder: str, name: str, storage_options: dict[str, Any]) -> bytes:
    return read_uri(f"{folder}/{name}", storage_options)


def progress_line(job: str, metrics: dict[str, Any]) -> str:
    return f"{job}  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def _ray_train_loop(arguments: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, job = context.get_world_rank(), arguments["job"]

    def report(metrics: dict[str, Any]) -> None:
        if rank == 0:  # through logging: Ray Train shows a worker's print() twice
            logging.getLogger(f"srt.{job}").info(progress_line(job, metrics))
        if "loss" in metrics:  # every worker reports the same steps: Ray Train synchronizes on them
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    config = arguments["config_type"](**arguments["config"])
    arguments["loop"](config, rank=rank, world=context.get_world_size(), device=ray.train.torch.get_device(), report=report, **arguments["extra"])


def fit_on_ray(job: str, loop: Callable[..., Any], config: Any, num_workers: int, **extra: Any) -> None:
    """Run `loop(config, rank=, world=, device=, report=, **extra)` on Ray Train workers: one per
    GPU by default (or one CPU worker); `num_workers` overrides. Resuming is the loop's own, from
    its checkpoints, so Ray Train's run folder is only named."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = num_workers or max(1, gpus)
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"job": job, "loop": loop, "config_type": type(config), "config": dataclasses.asdict(config), "extra": extra},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=None if gpus else {"CPU": 1}),
        # A worker lost (a crash, a failed health check on a loaded node) restarts the group, which
        # resumes from the loop's last checkpoint instead of failing the run.
        run_config=RunConfig(name=f"{job}-{time.strftime('%Y%m%d-%H%M%S')}", failure_config=FailureConfig(max_failures=TRAIN_RESTARTS)),
    )
    trainer.fit()
