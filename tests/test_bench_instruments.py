"""The instruments of bench_dataplane's "beside a GPU" mode measure what they say: the real job runs
with the GPU's share stood in (and everything is put back), and the interpreter-lock sampler counts
the time Python code holds the lock, not the time threads wait."""

from __future__ import annotations

import threading
import time

import pytest

from bench import bench_dataplane
from bench.bench_dataplane import beside_a_gpu, host_job, stand_in
from bench.instruments import LockSampler, lock_sampling_problem
from pipeline.engine.srt import SRT
from pipeline.extraction import device_decoding
from pipeline.extraction.weights import load_vit
from pipeline.extraction.worker import ShardWorker
from pipeline.store.reader import FeatureStore
from tests.images_factory import encode, gradient, write_files


def busy(seconds: float) -> None:
    """Pure Python: holds the interpreter lock all along."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_the_lock_sampler_counts_the_seconds_python_holds_the_lock():
    with LockSampler() as holding:
        busy(0.6)
    with LockSampler() as waiting:
        sleeper = threading.Thread(target=time.sleep, args=(0.6,))
        sleeper.start()
        sleeper.join()
    assert 0.3 <= holding.seconds <= 0.9
    assert waiting.seconds <= 0.1
    assert lock_sampling_problem() is None


@pytest.mark.parametrize(("decoder", "lock"), [("device", True), ("pillow", False)])
def test_beside_a_gpu_the_real_job_stores_every_image_and_is_put_back(tmp_path, decoder, lock):
    originals = (SRT.finalize, ShardWorker._reduced, ShardWorker.compute, ShardWorker.load, ShardWorker._fill, device_decoding.decode_batches)
    files = {f"{i}.jpg": encode(gradient(60 + 7 * i, 80, seed=i), "JPEG", quality=90) for i in range(6)}
    write_files(tmp_path / "images", files)
    run = host_job(str(tmp_path / "images"), str(tmp_path / "out.zarr"), 224, 4, stand_in(load_vit(bench_dataplane.MODEL, device="cpu")), decoder, {"pca_dims": 8}, lock)
    store = FeatureStore.open(str(tmp_path / "out.zarr"))
    assert store.manifest.column("status").to_pylist() == ["ok"] * len(files)
    assert store.dense(store.manifest.column("image_id")[0].as_py()).shape == (8, 28, 28)
    assert run.cpu_ms > 0
    assert (run.lock_ms is not None and run.lock_ms > 0) if lock else run.lock_ms is None
    assert (SRT.finalize, ShardWorker._reduced, ShardWorker.compute, ShardWorker.load, ShardWorker._fill, device_decoding.decode_batches) == originals
    with beside_a_gpu():
        assert device_decoding.decode_batches is not originals[-1] and SRT.finalize is not originals[0]
