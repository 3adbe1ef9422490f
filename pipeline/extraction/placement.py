"""Placing the extraction actors: how many, with what resources, fitted to the cluster; a request
the cluster cannot place fails before any work, naming the flags, and an actor that waits to be
placed (an autoscaling or busy cluster) never waits silently. And how a shard's shifts are spread
over the actors placed (`shift_batches`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import ray

from pipeline.engine.shifts import Shift, split_shifts
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.flags import ConfigError
from pipeline.extraction.runner import Job

log = logging.getLogger("srt")

START_REPORT_SECONDS = 15.0


Nodes = list[dict[str, float]]


def local_nodes() -> Nodes:
    """The one node of a local instance this job would start: this machine's CPUs (as Ray counts
    them, cgroup limits included) and GPUs, known without starting it."""
    import torch
    from ray._private.utils import get_num_cpus

    return [{"CPU": float(get_num_cpus()), "GPU": float(torch.cuda.device_count())}]


def joins_a_cluster() -> bool:
    """Whether ray.init() here would join a running cluster (RAY_ADDRESS, or the one `ray start`
    recorded on this machine) rather than start a local instance of its own."""
    if ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return True
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is not None
    except Exception:  # noqa: BLE001 - a private helper: when it cannot tell, the check after ray.init decides
        return True


def cluster_nodes() -> tuple[Nodes, Nodes | None]:
    """(the alive nodes' resources, the largest nodes its autoscaler may add, or None where the
    cluster cannot grow: a local instance, `ray start` nodes without an autoscaler)."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    try:
        from ray._private.state import state

        autoscaler = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: without it, take the cluster as it is
        autoscaler = None
    if autoscaler is None:
        return nodes, None
    return nodes, [dict(group.resources) for group in autoscaler.node_group_configs for _ in range(max(0, group.max_count))]


def actor_plan(config: ExtractConfig, nodes: Nodes, growth: Nodes | None) -> tuple[int, dict[str, float], int]:
    """(number of actors, resources of each, threads of each) from the flags and the cluster's
    `nodes`; `growth`: the nodes an autoscaler may add (None: the cluster cannot grow).

    Threads not given by --cpus-per-actor are fitted to the cluster (its CPUs shared among the
    actors, within one node). A request the cluster can never place fails here, naming the flags
    and what the cluster has: at once where it cannot grow (a local instance, `ray start` nodes),
    and on an autoscaling cluster when even its largest shape cannot hold it. One that only waits
    for the autoscaler, or for busy nodes, is waited for out loud (`wait_until_started`).
    """
    gpus, cpus = sum(n.get("GPU", 0.0) for n in nodes), int(sum(n.get("CPU", 0) for n in nodes))
    largest = int(max((n.get("CPU", 0) for n in nodes), default=0))
    # A cluster with GPUs, or a head with no CPUs that waits for GPU workers to autoscale.
    use_gpus = gpus > 0 or cpus == 0
    if use_gpus:  # each GPU actor gets its GPUs' share of their node's CPUs: it decodes for them
        shares = [int(n.get("CPU", 0) * config.gpus_per_actor // n["GPU"]) for n in nodes if n.get("GPU")]
        threads = config.cpus_per_actor or max(1, min(shares, default=1))
        count = config.num_actors or int(gpus // config.gpus_per_actor)
        each = {"num_gpus": config.gpus_per_actor, "num_cpus": threads}
        flags = "--num-actors, --gpus-per-actor, --cpus-per-actor"
    else:
        count = config.num_actors or max(1, cpus // min(4, cpus))
        threads = config.cpus_per_actor or max(1, min(cpus // count, largest))
        each = {"num_gpus": 0, "num_cpus": threads}
        flags = "--num-actors, --cpus-per-actor"
    if count < 1:
        raise ConfigError("--num-actors", "the cluster shows no GPUs yet (autoscaling?); give the number of GPU actors to start")
    if problem := placement_problem(count, each, nodes):
        if growth is None:
            raise ConfigError(flags, f"{problem}, and it cannot grow (no autoscaler); ask for less")
        if placement_problem(count, each, nodes + growth):
            raise ConfigError(flags, f"{problem}, nor at the largest its autoscaler may make it ({len(growth)} more nodes); ask for less")
        log.warning("%s; waiting for the autoscaler to add nodes (it may add %d)", problem, len(growth))
    return count, each, threads


def placement_problem(count: int, each: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """Why `count` actors needing `each` cannot all be placed on these nodes as they are, or None.
    An actor must fit on one node."""
    def room(node: dict[str, float]) -> float:
        return min(
            node.get("CPU", 0) // each["num_cpus"] if each["num_cpus"] else math.inf,
            node.get("GPU", 0) // each["num_gpus"] if each["num_gpus"] else math.inf,
        )

    placeable = sum(room(node) for node in nodes)
    if placeable >= count:
        return None
    asked = f"{count} actors of {each['num_cpus']:g} CPUs" + (f" and {each['num_gpus']:g} GPUs" if each["num_gpus"] else "") + " each"
    shape = ", ".join(f"{n.get('CPU', 0):g} CPUs" + (f" + {n.get('GPU', 0):g} GPUs" if n.get("GPU") else "") for n in nodes)
    return f"{asked} do not fit the cluster's {len(nodes)} node(s) ({shape}): {int(placeable)} fit"


def wait_until_started(actors: list[tuple[str, Any]], each: dict[str, float]) -> None:
    """Block until every actor has loaded its model, saying every START_REPORT_SECONDS what it waits
    for: an actor Ray cannot place yet (an autoscaling cluster, a busy one) never waits silently."""
    pending = {actor.ready.remote(): name for name, actor in actors}
    started = time.monotonic()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=START_REPORT_SECONDS)
        for ref in ready:
            ray.get(ref)  # an actor that failed to start raises here
            pending.pop(ref)
        if pending:
            log.warning(
                "waiting %.0f s for %d of %d actors to start (each asks %s); the cluster has %s available of %s",
                time.monotonic() - started, len(pending), len(actors), each, _cpus_gpus(ray.available_resources()), _cpus_gpus(ray.cluster_resources()),
            )


def _cpus_gpus(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"


def shift_batches(job: Job, actors: int) -> list[tuple[Shift, ...]]:
    """How each shard's shifts are spread over the actors (--split-shifts): one batch (data
    parallel), or G batches computed on different actors and added in one commit."""
    shifts = job.resolved.shifts
    setting = job.resolved.config.split_shifts
    if job.resolved.config.adaptive_tol is not None:
        parts = 1  # adaptive views need all of an image's views in one place
    elif setting == "auto":  # few images: known only once the whole dataset is listed
        parts = min(actors, len(shifts)) if job.listing is None and job.images_in(job.pending) < actors else 1
    else:
        parts = min(int(setting), len(shifts))
    return split_shifts(shifts, parts)
