"""Stores open with the tools users already have, without our code: zarr, xarray, dask, DuckDB, pandas."""

from __future__ import annotations

import dask.array
import duckdb
import numpy as np
import pandas as pd
import pytest
import xarray
import zarr

from pipeline.extraction.runner import run_local
from pipeline.store.reader import FeatureStore
from tests.test_extract_local import config


@pytest.fixture(scope="module")
def stores(tmp_path_factory, sample_paths):
    root = tmp_path_factory.mktemp("interop")
    square, aspect = str(root / "square.zarr"), str(root / "aspect.zarr")
    run_local(config(str(sample_paths[0].parent), square, layers=(5, -1), keys=(-1,)))
    run_local(config(str(sample_paths[0].parent), aspect, resize="aspect"))
    return square, aspect


def test_xarray_and_dask_see_named_axes_and_the_stored_values(stores):
    square, _ = stores
    store = FeatureStore.open(square)
    ids = store.manifest.column("image_id").to_pylist()
    dense = xarray.open_zarr(square, group="dense", consolidated=False)
    assert set(dense.data_vars) == {"L5", "L11", "K11"}
    assert dense["L11"].dims == ("image", "channel", "y", "x") and dense.sizes["y"] == 4
    assert dense["K11"].attrs["tap"] == "attention keys" and dense["L11"].attrs["stride_px"] == 8 and dense["L5"].attrs["layer"] == 5
    np.testing.assert_array_equal(dense["L11"].values[2], store.dense(ids[2], 11))
    vectors = xarray.open_zarr(square, group="pooled", consolidated=False)
    assert vectors["L11"].dims == ("image", "channel")
    lazy = dask.array.from_zarr(square, component="cls/L11")
    np.testing.assert_array_equal(lazy.compute()[1], store.vector("cls", ids[1], 11))
    assert zarr.open_array(square, path="dense/L11", mode="r").metadata.dimension_names == ("image", "channel", "y", "x")


def test_size_buckets_name_their_own_spatial_axes(stores):
    _, aspect = stores
    buckets = xarray.open_zarr(aspect, group="dense/L11", consolidated=False)
    for name, variable in buckets.data_vars.items():
        height, width = (int(v) // 8 for v in name.split("x"))
        assert variable.dims == ("image", "channel", f"y_{name}", f"x_{name}") and variable.shape[2:] == (height, width)


def test_duckdb_and_pandas_read_the_manifest(stores):
    square, _ = stores
    counts = duckdb.sql(f"SELECT status, count(*) AS n FROM '{square}/manifest/*.parquet' GROUP BY status").fetchall()
    assert counts == [("ok", 4)]
    frame = pd.read_parquet(f"{square}/manifest")  # the folder: every file in it
    assert list(frame["row"]) == [0, 1, 2, 3] and set(frame.columns) >= {"image_id", "uri", "status", "region"}
