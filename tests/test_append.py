"""--append: a dataset that grows is extracted again for its new items only, and nothing committed changes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest

from pipeline.extraction.flags import ConfigError
from pipeline.extraction.runner import preflight, run_local
from pipeline.store.reader import FeatureStore
from pipeline.tasks.retrieval.index import DescriptorSpec, build_index
from tests.images_factory import encode, gradient, write_files
from tests.test_extract_local import config
from tests.test_sources import make_tar

# What --append may rewrite: the arrays' metadata (they grow), the plan's index, the summary.
REWRITTEN = ("zarr.json", "index.parquet", "summary.json")


def photo(seed: int) -> bytes:
    return encode(gradient(40 + seed, 48, seed=seed), "JPEG")


def committed_files(out: Path) -> dict[str, tuple[str, int]]:
    """Every file of a local store but those --append may rewrite: (sha1 of its bytes, mtime)."""
    files = {}
    for folder, _, names in os.walk(out):
        for name in names:
            if name not in REWRITTEN:
                path = Path(folder) / name
                files[str(path.relative_to(out))] = (hashlib.sha1(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return files


def values(store: FeatureStore) -> dict[str, np.ndarray]:
    return {r["image_id"]: store.dense(r["image_id"]) for r in store.manifest.to_pylist() if r["status"] == "ok"}


def test_append_computes_only_new_items_and_leaves_every_committed_file_as_it_was(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out.zarr"
    data.mkdir()
    make_tar(data / "a.tar", {f"a{i}.jpg": photo(i) for i in range(3)})
    write_files(data, {"loose0.jpg": photo(10), "loose1.jpg": photo(11)})
    cfg = config(str(data), str(out))
    assert run_local(cfg).images == 5  # rows 0..4, shards 0..2 (shard 2 holds one image)
    before = FeatureStore.open(str(out))
    old_values, old_rows = values(before), before.manifest.select(["image_id", "uri", "row"]).to_pylist()
    index = build_index(before, DescriptorSpec("pooled"))
    files = committed_files(out)

    make_tar(data / "b.tar", {f"b{i}.jpg": photo(20 + i) for i in range(2)})
    write_files(data, {"loose2.jpg": photo(12)})
    (data / "loose0.jpg").unlink()
    summary = run_local(config(str(data), str(out), append=True))

    assert (summary.images, summary.shards_done, summary.shards_skipped) == (3, 2, 3)  # only the new items
    assert summary.appended["items"] == 3 and summary.appended["first_row"] == 6  # from the next shard boundary
    assert summary.appended["removed_examples"] == [str(data / "loose0.jpg")]  # reported, not deleted
    after = FeatureStore.open(str(out))
    assert after.manifest.column("row").to_pylist() == [0, 1, 2, 3, 4, 6, 7, 8]
    assert after.manifest.select(["image_id", "uri", "row"]).to_pylist()[:5] == old_rows
    assert {r["uri"].rsplit("/", 1)[-1] for r in after.manifest.to_pylist()[5:]} == {"b.tar#b0.jpg", "b.tar#b1.jpg", "loose2.jpg"}
    for image_id, dense in old_values.items():
        np.testing.assert_array_equal(after.dense(image_id), dense)
    assert after.group["pooled/L11"].shape[0] == 9
    unchanged = committed_files(out)
    assert {path: unchanged.get(path) for path in files} == files  # same bytes, same mtime
    stored = json.loads((out / "summary.json").read_text())
    assert stored["store"]["images"] == 8 and stored["run"]["appended"]["removed"] == 1

    grown = build_index(after, DescriptorSpec("pooled"), existing=index)  # the old index gains the new shards only
    assert grown.index.ntotal == 8 and grown.ids.column("image_id").to_pylist()[:5] == index.ids.column("image_id").to_pylist()
    assert run_local(config(str(data), str(out), append=True)).images == 0  # nothing new the second time


def test_append_lists_the_lines_added_to_a_file_list_and_reports_an_edited_one(tmp_path, caplog):
    write_files(tmp_path, {f"{i}.jpg": photo(i) for i in range(5)})
    listing, out = tmp_path / "list.txt", tmp_path / "out.zarr"
    listing.write_text("0.jpg\n1.jpg\n2.jpg\n")
    run_local(config(str(listing), str(out)))
    with listing.open("a") as handle:
        handle.write("3.jpg\n4.jpg\n")
    summary = run_local(config(str(listing), str(out), append=True))
    assert summary.images == 2
    assert [r["uri"] for r in FeatureStore.open(str(out)).manifest.to_pylist()] == [str(tmp_path / f"{i}.jpg") for i in range(5)]

    listing.write_text("4.jpg\n0.jpg\n1.jpg\n2.jpg\n3.jpg\n5.jpg\n")  # reordered, not grown at the end
    with caplog.at_level("INFO", logger="srt"):
        assert run_local(config(str(listing), str(out), append=True)).images == 0
    assert f"file lists edited other than by adding lines at the end are not listed again: {listing}" in caplog.text


def test_append_on_s3_adds_the_new_objects_only(s3_server):
    fs = fsspec.filesystem("s3", **s3_server)
    for i in range(4):
        fs.pipe(f"bucket/growing/{i}.jpg", photo(i))
    cfg = config("s3://bucket/growing", "s3://bucket/growing.zarr", storage_options=s3_server)
    run_local(cfg)
    before = {path: fs.info(path)["ETag"] for path in fs.find("bucket/growing.zarr") if path.rsplit("/", 1)[-1] not in REWRITTEN}
    fs.pipe("bucket/growing/4.jpg", photo(4))
    summary = run_local(config("s3://bucket/growing", "s3://bucket/growing.zarr", storage_options=s3_server, append=True))
    assert (summary.images, summary.ok) == (1, 1)
    fs.invalidate_cache()
    assert {path: fs.info(path)["ETag"] for path in before} == before  # every committed object as it was
    store = FeatureStore.open("s3://bucket/growing.zarr", storage_options=s3_server)
    assert store.manifest.column("uri").to_pylist() == [f"s3://bucket/growing/{i}.jpg" for i in range(5)]


def test_append_and_overwrite_together_are_refused_naming_append(tmp_path):
    with pytest.raises(ConfigError, match="--append"):
        preflight(config(str(tmp_path), str(tmp_path / "out.zarr"), append=True, overwrite=True))
