"""Datasets made by img2dataset: its webdataset and parquet outputs as its writers lay them out,
run through the whole job, and how Parquet files are read by where they are."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.extraction.listing import SourceError
from pipeline.extraction.repeated_keys import RepeatedKeys, _hashes
from pipeline.extraction.runner import run_local
from pipeline.store.reader import FeatureStore
from tests.images_factory import img2dataset_output, tar_bytes
from tests.test_extract_local import config


def manifest_of(out) -> list[dict]:
    return FeatureStore.open(str(out)).manifest.to_pylist()


def test_a_webdataset_folder_plans_each_sample_once_from_its_tar_and_joins_its_metadata(tmp_path):
    folder = tmp_path / "laion"
    images = img2dataset_output(folder, "webdataset", 0, 6, failed=(2,), broken=(4,))
    images |= img2dataset_output(folder, "webdataset", 1, 5, failed=(0,))
    out = tmp_path / "feats.zarr"
    summary = run_local(config(str(folder), str(out)))

    rows = manifest_of(out)
    assert sorted(r["image_id"] for r in rows) == sorted(images)  # every downloaded sample once, no failed download, no URL
    assert all(r["uri"] == f"{folder}/{r['image_id'][:5]}.tar#{r['image_id']}.jpg" for r in rows)
    assert {r["image_id"]: r["error_kind"] for r in rows if r["status"] != "ok"} == {"000000004": "decode"}
    assert (summary.ok, sum(summary.errors.values())) == (len(images) - 1, 1)
    assert summary.repeated_keys is None and json.loads((out / "summary.json").read_text())["plan"]["repeated_keys"] is None

    # The README's join: image_id is img2dataset's key, so captions and URLs come from its sidecars.
    joined = duckdb.sql(
        f"SELECT m.image_id, s.caption, s.url FROM '{out}/manifest/*.parquet' m JOIN '{folder}/*.parquet' s ON m.image_id = s.key WHERE m.status = 'ok'"
    ).fetchall()
    assert sorted(joined) == sorted((key, f"caption of {key}", f"http://images.example/{key}.jpg") for key in images if key != "000000004")


def test_a_files_output_folder_plans_its_images_and_not_its_metadata(tmp_path):
    folder = tmp_path / "laion-files"
    images = img2dataset_output(folder, "files", 0, 4, failed=(3,))
    out = tmp_path / "feats.zarr"
    summary = run_local(config(str(folder), str(out)))
    assert summary.ok == len(images) == 3
    assert sorted(r["uri"] for r in manifest_of(out)) == sorted(f"{folder}/00000/{key}.jpg" for key in images)


def test_append_after_incremental_extend_adds_only_the_new_tars_samples(tmp_path):
    folder = tmp_path / "laion"
    first = img2dataset_output(folder, "webdataset", 0, 4, failed=(1,))
    out = tmp_path / "feats.zarr"
    run_local(config(str(folder), str(out)))
    added = img2dataset_output(folder, "webdataset", 1, 3)  # img2dataset --incremental_mode extend writes the next shard
    summary = run_local(config(str(folder), str(out), append=True))
    assert summary.appended["items"] == len(added)  # the new tar's samples; its metadata Parquet lists none
    assert sorted(r["image_id"] for r in manifest_of(out)) == sorted(first | added)


def test_img2dataset_parquet_output_failed_samples_are_missing_cells_never_retried(tmp_path):
    folder = tmp_path / "laion-parquet"
    images = img2dataset_output(folder, "parquet", 0, 6, failed=(1, 3))
    out = tmp_path / "feats.zarr"
    summary = run_local(config(str(folder), str(out)))
    rows = {r["image_id"]: r for r in manifest_of(out)}
    assert set(rows) == {f"0000000{i:02d}" for i in range(6)}
    missing = {key: r["error"] for key, r in rows.items() if r["status"] != "ok"}
    assert set(missing) == {"000000001", "000000003"} and set(images) == set(rows) - set(missing)
    assert {rows[key]["error_kind"] for key in missing} == {"missing"}
    assert "empty 'jpg' cell" in missing["000000001"] and "row 1 of 00000.parquet" in missing["000000001"]
    assert dict(summary.errors) == {"missing": 2}
    again = run_local(config(str(folder), str(out), retry_errors=("read", "empty", "decode")))
    assert again.shards_done == 0  # an empty cell stays empty: nothing to recompute


def test_a_folders_parquet_of_uris_is_refused_naming_it_and_is_a_file_list_only_as_the_dataset(tmp_path, sample_paths):
    folder = tmp_path / "mixed"
    folder.mkdir()
    pq.write_table(pa.table({"url": [str(p) for p in sample_paths[:2]]}), folder / "list.parquet")
    with pytest.raises(SourceError, match=r"list\.parquet holds no image bytes.*only when given as --dataset itself"):
        run_local(config(str(folder), str(tmp_path / "a.zarr")))
    assert not (tmp_path / "a.zarr").exists()
    summary = run_local(config(str(folder / "list.parquet"), str(tmp_path / "b.zarr")))
    assert summary.ok == 2


def test_keys_repeated_across_inputs_are_reported_once_exactly_and_both_rows_kept(tmp_path, sample_paths):
    photos = [p.read_bytes() for p in sample_paths]
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.tar").write_bytes(tar_bytes({"k1.jpg": photos[0], "k2.jpg": photos[1]}))
    (folder / "b.tar").write_bytes(tar_bytes({"k1.jpg": photos[2], "k3.jpg": photos[3]}))
    out = tmp_path / "feats.zarr"
    summary = run_local(config(str(folder), str(out)))
    assert summary.ok == 4  # both copies extracted: keys across inputs are the user's
    report = json.loads((out / "summary.json").read_text())["plan"]["repeated_keys"]
    assert (report["keys"], report["rows"], report["lower_bound"]) == (1, 1, False)
    assert report["examples"] == [{"image_id": "k1", "uris": [f"{folder}/a.tar#k1.jpg", f"{folder}/b.tar#k1.jpg"]}]
    assert "repeated    1 image_ids" in summary.render()
    rerun = run_local(config(str(folder), str(out)))  # a resumed run reads the report from the plan
    assert rerun.repeated_keys == report


def test_the_filters_false_candidates_never_reach_the_report(tmp_path):
    from pipeline.extraction.planning import list_inputs, thread_map
    from pipeline.extraction.listing import Input

    (tmp_path / "a.tar").write_bytes(tar_bytes({"x.jpg": b"1", "y.jpg": b"2"}))
    (tmp_path / "b.tar").write_bytes(tar_bytes({"z.jpg": b"3"}))
    _, listed = list_inputs(str(tmp_path / "out"), [Input("tar", str(tmp_path / "a.tar")), Input("tar", str(tmp_path / "b.tar"))], 0, {}, thread_map(1))
    assert listed.repeated_keys is None
    keys = RepeatedKeys()
    keys.add(_hashes(["x", "y"]))
    keys.add(_hashes(["y", "z"]))
    assert keys.candidates == {int(_hashes(["y"])[0])}
    keys.candidates.add(int(_hashes(["z"])[0]))  # as a filter's false positive would flag it
    parts = [r["path"] for r in listed.rows]
    assert keys.confirm(str(tmp_path / "out"), parts, {}, thread_map(1)) is None  # x, y, z each once on disk
