"""The Ray runner on a real local Ray instance: data parallel, split shifts, actor death, driver restart, S3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest
import ray
from ray.exceptions import RayTaskError

from pipeline.extraction.config import resolve
from pipeline.extraction.distributed import ACTOR_PREFIX, UNITS_PER_ACTOR, ActorPoolScheduler, run_ray
from pipeline.extraction.listing import SourceError
from pipeline.extraction.progress import JobProgress
from pipeline.extraction.runner import Compactor, Job, run_local
from pipeline.extraction.summary import RunSummary
from pipeline.extraction.shards import ShardStats
from pipeline.store.plan import PlanIndex
from pipeline.store.reader import FeatureStore
from tests.images_factory import encode, gradient, write_files
from tests.test_append import committed_files
from tests.test_extract_local import (
    assert_every_input_accounted_for,
    assert_store_matches_engine,
    config,
    put_damaged_dataset,
    write_damaged_dataset,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Twelve distinct photos-like images, so runs have several shards."""
    folder = tmp_path_factory.mktemp("photos")
    write_files(folder, {f"{i:02d}.jpg": encode(gradient(40 + 4 * i, 56, seed=i), "JPEG") for i in range(12)})
    return folder


def sources(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.glob("*.jpg")}


def all_arrays(out: str) -> dict[str, np.ndarray]:
    store = FeatureStore.open(out)
    return {i: store.dense(i) for i in store.manifest.column("image_id").to_pylist()}


def assert_exactly_once(out: str, expected: int) -> None:
    manifest = FeatureStore.open(out).manifest
    ids = manifest.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == expected
    assert manifest.column("row").to_pylist() == list(range(expected))


def test_data_parallel_two_actors_give_the_engine_features(tmp_path, photos):
    out = str(tmp_path / "dp.zarr")
    cfg = config(str(photos), out, num_actors=2, cpus_per_actor=1, split_shifts="1")
    summary = run_ray(cfg)
    assert (summary.ok, summary.shards_done) == (12, 6)
    assert set(summary.per_worker) == {name for name in summary.per_worker if name.startswith(ACTOR_PREFIX)}
    assert len(summary.per_worker) == 2, "both actors took work"
    assert_exactly_once(out, 12)
    assert_store_matches_engine(FeatureStore.open(out), sources(photos), cfg)
    assert [p.name for p in (tmp_path / "dp.zarr" / "manifest").iterdir()] == ["shards-000000-000005.parquet"]
    assert (tmp_path / "dp.zarr" / "summary.json").exists()


def test_split_shifts_equal_data_parallel_before_the_fp16_cast(tmp_path, photos):
    common = dict(num_actors=2, cpus_per_actor=1, dtype="float32", radius=2)
    dp = str(tmp_path / "dp.zarr")
    split = str(tmp_path / "split.zarr")
    run_ray(config(str(photos), dp, split_shifts="1", **common))
    summary = run_ray(config(str(photos), split, split_shifts="3", **common))
    assert summary.shards_done == 6 and summary.ok == 12
    a, b = all_arrays(dp), all_arrays(split)
    assert a.keys() == b.keys()
    for image_id in a:
        np.testing.assert_allclose(b[image_id], a[image_id], atol=1e-5, rtol=0)


@ray.remote(num_cpus=0)
class InstantSplitActor:
    """Answers split units at once: a payload per shift batch, then a commit."""

    def ready(self) -> bool:
        return True

    @ray.method(num_returns=2)
    def compute(self, shard: int, shifts, counter):
        return shard, np.zeros(100_000, np.float32)

    def commit(self, shard: int, *payloads) -> ShardStats:
        return ShardStats(shard=shard, ok=len(payloads))


def test_split_payloads_are_let_go_once_their_commit_is_queued(tmp_path):
    """The driver keeps no ref to a committed shard's partial sums: they would pin the object store."""
    resolved = resolve(config(str(tmp_path), str(tmp_path / "out.zarr"), shard_size=1))
    index = PlanIndex.of([{"path": "x/part-000000.parquet", "input": "x", "kind": "files", "first_row": 0, "count": 8, "errors": 0}], 1)
    job = Job(resolved=resolved, index=index, pending=np.arange(8), resumed=False)
    summary = RunSummary()
    actors = [(f"split-{i}", InstantSplitActor.remote()) for i in range(2)]
    scheduler = ActorPoolScheduler(job, actors, [(), ()], summary, None, Compactor(job))
    with JobProgress(8) as bar:
        scheduler.run(bar)
    assert summary.shards_done == 8 and summary.ok == 16
    assert not scheduler.payloads


def test_auto_split_spreads_shifts_when_images_are_fewer_than_actors(tmp_path, photos):
    one = tmp_path / "one"
    write_files(one, {"only.jpg": (photos / "03.jpg").read_bytes()})
    out = str(tmp_path / "auto.zarr")
    cfg = config(str(one), out, num_actors=2, cpus_per_actor=1, radius=2)
    summary = run_ray(cfg)
    assert summary.ok == 1 and summary.shift_batches == 2
    assert_store_matches_engine(FeatureStore.open(out), sources(one), cfg)


def kill_an_actor_once_work_is_committed(out: Path, killed: list[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list((out / "manifest").glob("part-*.parquet")):
        time.sleep(0.05)
    actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ACTOR_PREFIX)]
    if actors:
        ray.kill(ray.get_actor(actors[0]), no_restart=False)
        killed.append(actors[0])


def test_a_killed_actor_costs_nothing_but_time(tmp_path, photos):
    reference = str(tmp_path / "undisturbed.zarr")
    run_local(config(str(photos), reference, shard_size=1, image_size=64, radius=2, model="vit_small_patch16_224", dtype="float32"))
    out = tmp_path / "disturbed.zarr"
    killed: list[str] = []
    killer = threading.Thread(target=kill_an_actor_once_work_is_committed, args=(out, killed))
    killer.start()
    cfg = config(str(photos), str(out), shard_size=1, image_size=64, radius=2, model="vit_small_patch16_224", dtype="float32", num_actors=2, cpus_per_actor=1, split_shifts="1")
    summary = run_ray(cfg)
    killer.join()
    assert killed, "the test killed no actor"
    assert 1 <= summary.retries <= UNITS_PER_ACTOR, "one retry per unit in flight on the killed actor, none bounced off it while it restarts"
    # A unit whose actor died after committing and before answering is retried and finds its shard
    # committed: the store holds it once, the run counts it as discarded.
    assert summary.ok + summary.discarded == 12 and summary.discarded <= 1 and not summary.failed_shards
    assert_exactly_once(str(out), 12)
    expected, got = all_arrays(reference), all_arrays(str(out))
    for image_id in expected:
        np.testing.assert_allclose(got[image_id], expected[image_id], atol=1e-6, rtol=0)


def test_stragglers_get_a_second_copy_and_the_first_commit_wins(tmp_path, photos):
    out = str(tmp_path / "stragglers.zarr")
    cfg = config(str(photos), out, shard_size=5, image_size=64, radius=2, model="vit_small_patch16_224", num_actors=2, cpus_per_actor=1, split_shifts="1", straggler_timeout=0.05)
    summary = run_ray(cfg)
    assert summary.duplicates >= 1, "no unit was duplicated"
    assert summary.discarded == summary.duplicates, "each duplicated unit commits once and is discarded once"
    assert (summary.ok, summary.shards_done) == (12, 3)
    assert_exactly_once(out, 12)
    assert_store_matches_engine(FeatureStore.open(out), sources(photos), cfg)


def test_a_stopped_driver_resumes_with_only_the_uncommitted_shards(tmp_path, photos):
    out = tmp_path / "resumed.zarr"
    argv = [sys.executable, str(ROOT / "jobs" / "extract.py"), "--dataset", str(photos), "--out", str(out), "--model", "vit_small_patch16_224", "--image-size", "64", "--radius", "2", "--shard-size", "1", "--num-actors", "1", "--cpus-per-actor", "1", "--max-pixels", "1000000", "--stride", "8"]
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list((out / "manifest").glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C
    driver.wait(timeout=60)
    committed = len(list((out / "manifest").glob("part-*.parquet")))
    assert 2 <= committed < 12, f"the driver was stopped after {committed} of 12 shards"
    said = log.read_text()
    assert driver.returncode == 130 and "Traceback" not in said
    assert f"interrupted: {committed} of 12 shards of {out} are committed; rerun the same command to resume" in said
    summary = run_ray(config(str(photos), str(out), shard_size=1, image_size=64, radius=2, model="vit_small_patch16_224", num_actors=1))
    assert (summary.shards_done, summary.shards_skipped) == (12 - committed, committed)
    assert_exactly_once(str(out), 12)


def test_ray_job_reads_and_writes_s3(tmp_path, photos, s3_server):
    fs = fsspec.filesystem("s3", **s3_server)
    for path in photos.glob("*.jpg"):
        fs.pipe(f"bucket/ray-images/{path.name}", path.read_bytes())
    cfg = config("s3://bucket/ray-images", "s3://bucket/ray-feats.zarr", storage_options=s3_server, num_actors=2, cpus_per_actor=1)
    assert run_ray(cfg).ok == 12
    store = FeatureStore.open("s3://bucket/ray-feats.zarr", storage_options=s3_server)
    assert_store_matches_engine(store, {f"s3://bucket/ray-images/{p.name}": p.read_bytes() for p in photos.glob("*.jpg")}, cfg)
    assert [p.rsplit("/", 1)[-1] for p in fs.ls("bucket/ray-feats.zarr/manifest")] == ["shards-000000-000005.parquet"]


def test_append_on_ray_lists_with_tasks_and_computes_only_the_new_tenth(tmp_path, photos):
    data = tmp_path / "data"
    write_files(data, {p.name: p.read_bytes() for p in sorted(photos.glob("*.jpg"))[:10]})
    out = str(tmp_path / "grown.zarr")
    assert run_ray(config(str(data), out, num_actors=2, cpus_per_actor=1)).images == 10
    files = committed_files(Path(out))
    write_files(data, {"10.jpg": (photos / "10.jpg").read_bytes()})  # a tenth more
    summary = run_ray(config(str(data), out, num_actors=2, cpus_per_actor=1, append=True))
    assert (summary.images, summary.shards_done, summary.shards_skipped) == (1, 1, 5)
    assert {path: committed_files(Path(out)).get(path) for path in files} == files
    manifest = FeatureStore.open(out).manifest
    assert manifest.column("row").to_pylist() == list(range(11)) and len(set(manifest.column("image_id").to_pylist())) == 11


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--split-shifts", "many"], "--split-shifts: must be 'auto' or a positive integer"),
        (["--num-actors", "-1"], "--num-actors: must be 0 or more"),
        (["--gpus-per-actor", "0"], "--gpus-per-actor: must be positive"),
        (["--straggler-timeout", "-5"], "--straggler-timeout: must be 0"),
        (["--stride", "3"], "--stride: stride 3 must divide"),
    ],
)
def test_bad_flags_fail_before_any_actor_starts(tmp_path, photos, capsys, argv, message):
    from pipeline.commands.extract import main

    with pytest.raises(SystemExit) as exited:
        main(["--dataset", str(photos), "--out", str(tmp_path / "never.zarr"), *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "never.zarr").exists()
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(ACTOR_PREFIX)]


def test_empty_dataset_says_so_before_any_actor_starts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no images found"):
        run_ray(config(str(tmp_path / "empty"), str(tmp_path / "out.zarr")))


def test_a_listing_error_in_a_ray_task_is_raised_as_itself_in_one_line(tmp_path):
    (tmp_path / "bad.csv").write_text("name,size\na,1\n")
    with pytest.raises(SourceError, match="no URI column") as raised:
        run_ray(config(str(tmp_path / "bad.csv"), str(tmp_path / "out.zarr")))
    assert "\n" not in str(raised.value) and not isinstance(raised.value, RayTaskError)


@pytest.mark.timeout(180)  # a FIFO opened for reading would block an actor forever
def test_ray_job_accounts_for_damaged_containers_and_special_files(tmp_path):
    expected = write_damaged_dataset(tmp_path / "damaged")
    out = str(tmp_path / "out.zarr")
    run_ray(config(str(tmp_path / "damaged"), out, num_actors=2, cpus_per_actor=1))
    assert_every_input_accounted_for(out, expected)


@pytest.mark.timeout(180)
def test_ray_job_accounts_for_damaged_containers_on_s3(s3_server):
    expected = put_damaged_dataset("s3://bucket/ray/damaged", s3_server)
    run_ray(config("s3://bucket/ray/damaged", "s3://bucket/ray/damaged.zarr", storage_options=s3_server, num_actors=2, cpus_per_actor=1))
    assert_every_input_accounted_for("s3://bucket/ray/damaged.zarr", expected, s3_server)


@pytest.mark.parametrize(
    "flags",
    [
        {"shard_size": 6, "split_shifts": "1"},  # data parallel
        {"shard_size": 12, "split_shifts": "2"},  # one shard, its shifts split across the actors
        {"shard_size": 3, "split_shifts": "1", "pca_dims": 8},  # the PCA fitting sample counted too
    ],
)
def test_the_progress_bar_counts_every_image_once_in_every_mode(tmp_path, photos, progress_bars, flags):
    """Within a shard the bar moves as the actors report image groups (shares of an image while
    shifts are split); how often the driver shows them depends on timing, what they add up to never."""
    summary = run_ray(config(str(photos), str(tmp_path / "out.zarr"), image_size=64, batch_size=1, num_actors=2, cpus_per_actor=1, **flags))
    (bar,) = progress_bars
    assert bar.total == 12 and sum(bar.steps) == pytest.approx(12) and min(bar.steps) >= 0
    assert bar.n == pytest.approx(12) and summary.ok == 12
    assert float(bar.postfix.split("views_per_s=")[1].split(",")[0]) > 0
    assert bar.format_dict["rate"] is None or "img/s" in str(bar)  # a rate in images per second, never s/img


def test_the_bars_views_agree_with_the_summary_when_a_shard_commits_before_its_reports_are_read(tmp_path, photos, progress_bars, monkeypatch):
    """The demo's bar said views_per_s=0.0: reports of a shard that committed before the driver read
    them were dropped, views with the images."""
    monkeypatch.setattr("pipeline.extraction.distributed.PROGRESS_SECONDS", 3600.0)  # the driver reads reports only once
    summary = run_ray(config(str(photos), str(tmp_path / "out.zarr"), image_size=64, num_actors=1, cpus_per_actor=2, split_shifts="1", shard_size=12))
    (bar,) = progress_bars
    shown = float(bar.postfix.split("views_per_s=")[1].split(",")[0])
    assert summary.views == 12 * 9 and shown * bar.format_dict["elapsed"] == pytest.approx(summary.views, rel=0.2)


def extract_command(dataset: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "extract.py"), "--dataset", str(dataset), "--out", str(out), "--model", "vit_tiny_patch16_224",
            "--image-size", "32", "--radius", "1", "--shard-size", "2", *flags]  # fmt: skip


@pytest.mark.timeout(120)  # it used to wait forever for an actor that could never be placed
def test_actors_without_a_thread_count_are_fitted_to_the_cluster(tmp_path, photos):
    done = subprocess.run(extract_command(photos, tmp_path / "out.zarr", "--num-actors", "2", "--split-shifts", "2"), capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "12 ok" in done.stdout


def test_actors_that_cannot_be_placed_on_a_local_instance_fail_at_once_naming_the_flags(tmp_path, photos):
    done = subprocess.run(extract_command(photos, tmp_path / "out.zarr", "--cpus-per-actor", "1024"), capture_output=True, text=True, timeout=110)
    assert done.returncode == 2
    assert "error: --num-actors, --cpus-per-actor: 1 actors of 1024 CPUs each do not fit the cluster's 1 node(s)" in done.stderr
    assert not (tmp_path / "out.zarr").exists()


@ray.remote
class Holder:
    def ready(self) -> bool:
        return True


def test_an_actor_the_cluster_cannot_place_yet_is_waited_for_out_loud(tmp_path, photos, monkeypatch, caplog):
    monkeypatch.setattr("pipeline.extraction.placement.START_REPORT_SECONDS", 0.5)
    holder = Holder.options(num_cpus=3).remote()  # the fixture's cluster has 4 CPUs: 1 stays free
    ray.get(holder.ready.remote())
    release = threading.Timer(3.0, lambda: ray.kill(holder))
    release.start()
    summary = run_ray(config(str(photos), str(tmp_path / "out.zarr"), num_actors=2, cpus_per_actor=2, split_shifts="1"))
    release.join()
    assert summary.ok == 12
    assert "waiting" in caplog.text and "actors to start (each asks {'num_gpus': 0, 'num_cpus': 2})" in caplog.text


def test_pca_basis_is_fitted_by_one_actor_and_used_by_all(tmp_path, photos):
    reduced = config(str(photos), str(tmp_path / "ray.zarr"), num_actors=2, cpus_per_actor=1, split_shifts="1", pca_dims=4)
    summary = run_ray(reduced)
    assert (summary.ok, summary.shards_done) == (12, 6)
    assert_exactly_once(reduced.out, 12)
    local = config(str(photos), str(tmp_path / "local.zarr"), pca_dims=4)
    run_local(local)
    on_ray, in_process = FeatureStore.open(reduced.out), FeatureStore.open(local.out)
    assert on_ray.group.attrs["pca"]["L11"]["fitted_on_shards"] == [0, 1]
    for image_id in in_process.manifest.column("image_id").to_pylist():
        assert on_ray.dense(image_id).shape[0] == 4
        np.testing.assert_allclose(on_ray.dense(image_id, full=True), in_process.dense(image_id, full=True), atol=1e-2)


def test_actors_compute_the_first_shards_while_later_inputs_are_listed(tmp_path):
    """Streaming on Ray: the scheduler hands out what the listing planned so far, and takes in the
    rest as it comes; actors read the index again for rows planned after they started."""
    from tests.test_streaming_plan import TARS, Gate, committed, rows_of, write_tars

    write_tars(tmp_path / "tars")
    out = tmp_path / "ray.zarr"
    gate = Gate(2, lambda: committed(out))
    summary = run_ray(config(str(tmp_path / "tars"), str(out), shard_size=2, num_actors=2, cpus_per_actor=1, split_shifts="auto"), mapper=gate)
    assert gate.held_until is True and summary.ok == 3 * TARS and summary.shift_batches == 1
    assert_exactly_once(str(out), 3 * TARS)
    whole = tmp_path / "local.zarr"
    run_local(config(str(tmp_path / "tars"), str(whole), shard_size=2))
    assert rows_of(out) == rows_of(whole)
