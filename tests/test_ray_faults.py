"""Faults on a simulated multi-node cluster (`ray.cluster_utils.Cluster`): a head with no CPUs where
the driver runs, two worker nodes of one CPU, one extraction actor on each. Losing a node mid-job
costs its units a retry, never an image, and never the job; losing the progress counter costs
only the bar's moves within shards."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from pipeline.extraction.distributed import run_ray
from pipeline.extraction.progress import COUNTER_PREFIX
from pipeline.extraction.runner import run_local
from pipeline.store.reader import FeatureStore
from tests.images_factory import encode, gradient, write_files
from tests.test_extract_local import config

IMAGES = 16
MODEL = "vit_small_patch16_224"


@pytest.fixture
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_files(folder, {f"{i:02d}.png": encode(gradient(48, 64, seed=i), "PNG") for i in range(IMAGES)})
    return folder


def local_reference(photos: Path, out: Path) -> None:
    """The same job in this process, on one thread as each actor computes: MKL's sums depend on
    the thread count, which moves some fp16 values by one unit on some CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_local(config(str(photos), str(out), shard_size=2, image_size=64, model=MODEL, radius=2))
    finally:
        torch.set_num_threads(threads)


def committed_parts(out: Path) -> int:
    return len(list((out / "manifest").glob("*.parquet"))) if (out / "manifest").exists() else 0


def when(condition, action, timeout: float = 300.0) -> threading.Thread:
    """Run `action` in a thread as soon as `condition()` holds: faults keyed to the job's events."""

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def actor_nodes(prefix: str) -> dict[str, str]:
    """Named actors of this job whose name has `prefix` -> the node each lives on."""
    from ray.util.state import list_actors

    return {a.name: a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.name and a.name.startswith(prefix)}


def assert_same_as_local(out: Path, reference: Path) -> None:
    store, expected = FeatureStore.open(str(out)), FeatureStore.open(str(reference))
    ids = store.manifest.column("image_id").to_pylist()
    assert sorted(ids) == sorted(expected.manifest.column("image_id").to_pylist()) and len(set(ids)) == IMAGES  # every image once
    assert store.manifest.column("status").to_pylist() == ["ok"] * IMAGES
    for image_id in ids:
        np.testing.assert_array_equal(store.dense(image_id), expected.dense(image_id))


def job_config(photos: Path, out: Path):
    """Slow enough per shard (a small ViT, 25 views) that faults keyed to the first commit land mid-job."""
    return config(str(photos), str(out), shard_size=2, image_size=64, model=MODEL, radius=2, num_actors=2, cpus_per_actor=1, split_shifts="1", max_retries=5)


def test_losing_a_worker_node_mid_job_loses_no_image(cluster, photos, tmp_path):
    """Each worker node holds one extraction actor; the head, where the driver runs, holds the
    progress counter, so the node lost takes an actor and never the counter."""
    cluster, workers = cluster
    out = tmp_path / "out.zarr"
    seen: list[int] = []

    def remove_a_worker_node() -> None:
        seen.append(committed_parts(out))
        cluster.remove_node(workers[0])

    killer = when(lambda: committed_parts(out) >= 1, remove_a_worker_node)
    summary = run_ray(job_config(photos, out))
    killer.join(timeout=30)
    assert seen and seen[0] < IMAGES // 2, "the node went after the job had finished"
    assert summary.ok == IMAGES and not summary.failed_shards
    local_reference(photos, tmp_path / "local.zarr")
    assert_same_as_local(out, tmp_path / "local.zarr")


def test_losing_the_progress_counter_is_a_warning_and_the_job_goes_on(cluster, photos, tmp_path, caplog):
    out = tmp_path / "out.zarr"
    seen: list[int] = []

    def kill_the_counter() -> None:
        seen.append(committed_parts(out))
        (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(COUNTER_PREFIX)]
        ray.kill(ray.get_actor(name), no_restart=True)

    killer = when(lambda: committed_parts(out) >= 1, kill_the_counter)
    with caplog.at_level(logging.WARNING, logger="srt"):
        summary = run_ray(job_config(photos, out))
    killer.join(timeout=30)
    assert seen and seen[0] < IMAGES // 2, "the counter went after the job had finished"
    assert summary.ok == IMAGES and not summary.failed_shards
    assert "the progress counter is lost" in caplog.text
    local_reference(photos, tmp_path / "local.zarr")
    assert_same_as_local(out, tmp_path / "local.zarr")
