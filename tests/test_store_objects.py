"""The store writes whole Zarr shards and chunks itself: the bytes must be zarr-python's own."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from pipeline.store.layout import compressors
from pipeline.store.objects import ObjectWriter

ROWS, SHARD = 70, 32  # the last work shard holds 6 rows


def arrays(folder, codec: str) -> tuple[zarr.Array, zarr.Array]:
    """A dense array and a vector array laid out as the store lays them out."""
    group = zarr.open_group(str(folder), mode="w")
    dense = group.create_array("dense/L1", shape=(ROWS, 4, 3, 5), chunks=(1, 4, 3, 5), shards=(SHARD, 4, 3, 5), dtype="float16", compressors=compressors(codec), fill_value=0)
    pooled = group.create_array("pooled/L1", shape=(ROWS, 4), chunks=(SHARD, 4), dtype="float16", compressors=compressors(codec), fill_value=0)
    return dense.with_config({"write_empty_chunks": True}), pooled.with_config({"write_empty_chunks": True})


@pytest.mark.parametrize("codec", ["lz4", "blosc", "zstd", "none"])
def test_whole_objects_are_byte_for_byte_what_zarr_writes(tmp_path, codec):
    rng = np.random.default_rng(0)
    values = {"dense": rng.standard_normal((ROWS, 4, 3, 5)).astype("float16"), "pooled": rng.standard_normal((ROWS, 4)).astype("float16")}
    values["dense"][3] = 0  # a failed image's row
    by_zarr, by_store = arrays(tmp_path / "zarr", codec), arrays(tmp_path / "store", codec)
    for start in range(0, ROWS, SHARD):
        for theirs, ours, block in zip(by_zarr, by_store, values.values()):
            theirs[start : start + SHARD] = block[start : start + SHARD]
            ObjectWriter.of(ours, str(tmp_path / "store")).write(start, block[start : start + SHARD])
    objects = [p for p in (tmp_path / "zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(objects) == 6  # 3 shards of dense maps, 3 chunks of vectors
    for path in objects:
        assert (tmp_path / "store" / path.relative_to(tmp_path / "zarr")).read_bytes() == path.read_bytes(), path
    reopened = zarr.open_group(str(tmp_path / "store"), mode="r")
    assert np.array_equal(reopened["dense/L1"][:], values["dense"]) and np.array_equal(reopened["pooled/L1"][:], values["pooled"])


def test_a_block_that_is_not_whole_objects_is_refused(tmp_path):
    dense, pooled = arrays(tmp_path, "lz4")
    with pytest.raises(ValueError, match="not whole stored objects"):
        ObjectWriter.of(dense, str(tmp_path)).write(1, np.zeros((SHARD, 4, 3, 5), dtype="float16"))
    with pytest.raises(ValueError, match="not whole stored objects"):
        ObjectWriter.of(pooled, str(tmp_path)).write(0, np.zeros((5, 4), dtype="float16"))


def test_an_array_of_another_layout_is_refused(tmp_path):
    group = zarr.open_group(str(tmp_path), mode="w")
    two_per_chunk = group.create_array("dense", shape=(8, 4), chunks=(2, 4), shards=(4, 4), dtype="float16")
    with pytest.raises(ValueError, match="not a layout of this store"):
        ObjectWriter.of(two_per_chunk, str(tmp_path))
