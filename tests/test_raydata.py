"""Ray Data interop on a real local Ray instance: SRT inside map_batches, and a store as a Dataset."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from pipeline.extraction.raydata import SRTPredictor, read_store
from pipeline.extraction.runner import run_local
from pipeline.store.reader import FeatureStore
from tests.images_factory import write_files
from tests.test_extract_local import config

FLAGS = {"model": "vit_tiny_patch16_224", "image_size": 32, "radius": 1, "stride": 8, "max_pixels": 1_000_000}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory, sample_paths):
    """The extraction job's store of the sample photos plus a broken file, float32, same settings as FLAGS."""
    folder = tmp_path_factory.mktemp("raydata")
    write_files(folder / "images", {p.name: p.read_bytes() for p in sample_paths} | {"broken.jpg": b"not an image"})
    out = str(folder / "store.zarr")
    run_local(config(str(folder / "images"), out, dtype="float32", shard_size=2))
    return folder, out


@pytest.mark.parametrize("reader", ["read_binary_files", "read_images"])
def test_srt_predictor_in_map_batches_gives_the_extraction_jobs_features(store, reader):
    folder, out = store
    stored = FeatureStore.open(out)
    by_path = {r["uri"]: r["image_id"] for r in stored.manifest.to_pylist() if r["status"] == "ok"}
    if reader == "read_binary_files":  # encoded bytes; the broken file becomes an error row
        ds, column = ray.data.read_binary_files(str(folder / "images"), include_paths=True), "bytes"
    else:  # decoded arrays (the broken file cannot be read as an image: left out of the listing)
        ds, column = ray.data.read_images([p for p in by_path], include_paths=True, mode="RGB"), "image"
    predicted = ds.map_batches(SRTPredictor, fn_constructor_kwargs={**FLAGS, "column": column, "outputs": ("pooled", "cls", "dense")}, concurrency=1, batch_size=3)
    rows = predicted.take_all()
    assert len(rows) == (5 if reader == "read_binary_files" else 4)
    for row in rows:
        if row["path"].endswith("broken.jpg"):
            assert row["error"].startswith("decode:") and not row["pooled"].any()
            continue
        image_id = by_path[row["path"]]
        assert row["error"] == ""
        tolerance = 1e-4
        np.testing.assert_allclose(row["pooled"], stored.vector("pooled", image_id), atol=tolerance)
        np.testing.assert_allclose(row["cls"], stored.vector("cls", image_id), atol=tolerance)
        np.testing.assert_allclose(row["dense"], stored.dense(image_id), atol=tolerance * 10)


@pytest.mark.parametrize("kind", ["pooled", "dense"])
def test_read_store_gives_every_ok_image_once(store, kind):
    _, out = store
    stored = FeatureStore.open(out)
    rows = read_store(out, kind=kind).take_all()
    ok = [r["image_id"] for r in stored.manifest.to_pylist() if r["status"] == "ok"]
    assert sorted(r["image_id"] for r in rows) == sorted(ok)
    for row in rows:
        expected = stored.dense(row["image_id"]) if kind == "dense" else stored.vector("pooled", row["image_id"])
        np.testing.assert_array_equal(row["features"], expected)


def test_bad_arguments_are_named_before_any_task():
    with pytest.raises(ValueError, match="kind must be pooled, cls or dense"):
        read_store("nowhere", kind="keys")
    with pytest.raises(ValueError, match="outputs must be among"):
        SRTPredictor(outputs=("logits",), **FLAGS)
