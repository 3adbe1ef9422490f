"""In-process extraction end to end: sources -> store + manifest, bad input, resume, S3."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml
import zarr

from pipeline.commands.extract import main as extract_main
from pipeline.engine.reference import srt_naive
from pipeline.engine.shifts import grid_shifts
from pipeline.engine.srt import SRT
from pipeline.extraction import runner
from pipeline.extraction.config import ExtractConfig, resolve
from pipeline.extraction.flags import ConfigError
from pipeline.extraction.images import ImagePolicy, prepare, resolve_decoder
from pipeline.extraction.reading import read_bytes
from pipeline.extraction.runner import plan_job, preflight, run_local
from pipeline.extraction.weights import load_vit
from pipeline.extraction.worker import ShardWorker
from pipeline.store import manifest
from pipeline.store.layout import StoreMismatchError
from pipeline.store.manifest import uncommit
from pipeline.store.reader import FeatureStore
from tests.conftest import cached_vit
from tests.images_factory import BOMB_LIMIT, bad_input_files, damaged_dataset, encode, gradient, write_files

MODEL = "vit_tiny_patch16_224"
ROOT = Path(__file__).resolve().parent.parent


def config(dataset: str, out: str, **overrides) -> ExtractConfig:
    """Small and fast: 32-pixel inputs, 9 shifts, stride 8, 2 images per shard."""
    base = dict(dataset=dataset, out=out, model=MODEL, image_size=32, radius=1, stride=8, shard_size=2, batch_size=9, max_pixels=BOMB_LIMIT)
    return ExtractConfig(**{**base, **overrides})


def expected_features(data: bytes, cfg: ExtractConfig) -> dict[str, np.ndarray]:
    """What the engine gives for one image, computed directly, independently of the store."""
    resolved = resolve(cfg)
    vit = cached_vit(cfg.model)
    prepared = prepare(data, ImagePolicy(cfg.image_size, cfg.resize, vit.patch_size, vit.mean, vit.std, cfg.max_pixels, reducing_gap=cfg.reducing_gap, decoder=resolve_decoder(cfg.decoder, vit.device)))
    srt = SRT(vit, layers=resolved.layers, shifts=resolved.shifts, stride=resolved.stride, boundary=cfg.boundary, tolerance=cfg.adaptive_tol, min_views=cfg.min_views)
    out = srt.run(prepared.tensor[None])
    tap = srt.taps[0]
    return {"dense": out.dense[tap][0].numpy(), "cls": out.prefix[tap][0, 0].numpy(), "pooled": out.pooled[tap][0].numpy()}


def assert_fp16_close(stored: np.ndarray, expected: np.ndarray) -> None:
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2e-3, atol=2e-3)


def assert_store_matches_engine(store: FeatureStore, sources: dict[str, bytes], cfg: ExtractConfig) -> None:
    for record in store.manifest.to_pylist():
        if record["status"] != "ok":
            continue
        expected = expected_features(sources[record["uri"]], cfg)
        assert_fp16_close(store.dense(record["image_id"]), expected["dense"])
        assert_fp16_close(store.vector("cls", record["image_id"]), expected["cls"])
        assert_fp16_close(store.vector("pooled", record["image_id"]), expected["pooled"])


def test_directory_tar_and_parquet_sources_give_the_engine_features(tmp_path, sample_paths):
    photos = {p.name: p.read_bytes() for p in sample_paths}
    folder = tmp_path / "photos"
    write_files(folder, photos)
    with tarfile.open(tmp_path / "shard.tar", "w") as archive:
        for name, data in photos.items():
            info = tarfile.TarInfo(f"sample/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"id": list(photos), "image": list(photos.values())}), tmp_path / "bytes.parquet")

    for dataset, uri_of in (
        (str(folder), lambda n: str(folder / n)),
        (str(tmp_path / "shard.tar"), lambda n: f"{tmp_path}/shard.tar#sample/{n}"),
        (str(tmp_path / "bytes.parquet"), lambda n: f"{tmp_path}/bytes.parquet#{list(photos).index(n)}"),
    ):
        out = str(tmp_path / f"out-{dataset.rsplit('/', 1)[1]}.zarr")
        cfg = config(dataset, out)
        summary = run_local(cfg)
        assert (summary.ok, sum(summary.errors.values()), summary.shards_done) == (4, 0, 2)
        store = FeatureStore.open(out)
        assert store.manifest.num_rows == 4 and set(store.manifest.column("status").to_pylist()) == {"ok"}
        assert pads.dataset(out + "/manifest").to_table().num_rows == 4  # readable by plain pyarrow
        assert_store_matches_engine(store, {uri_of(n): d for n, d in photos.items()}, cfg)


def test_batch_iteration_yields_ok_rows_in_plan_order(tmp_path, sample_paths):
    folder = tmp_path / "mixed"
    write_files(folder, {p.name: p.read_bytes() for p in sample_paths} | {"broken.jpg": b"not an image"})
    out = str(tmp_path / "out.zarr")
    run_local(config(str(folder), out, shard_size=2))
    store = FeatureStore.open(out)
    ok_ids = [r["image_id"] for r in store.manifest.to_pylist() if r["status"] == "ok"]
    batches = list(store.iter_batches("pooled", batch_size=3))
    assert [len(ids) for ids, _ in batches] == [3, 1]
    assert [i for ids, _ in batches for i in ids] == ok_ids
    stacked = np.concatenate([vectors for _, vectors in batches])
    np.testing.assert_array_equal(stacked, np.stack([store.vector("pooled", i) for i in ok_ids]))
    broken = next(r["image_id"] for r in store.manifest.to_pylist() if r["status"] == "error")
    with pytest.raises(KeyError, match="has no features: decode"):
        store.dense(broken)


def test_adaptive_views_are_recorded_per_image(tmp_path, sample_paths):
    from PIL import Image

    from tests.images_factory import encode

    folder = tmp_path / "mixed"
    write_files(folder, {p.name: p.read_bytes() for p in sample_paths} | {"grey.png": encode(Image.new("RGB", (80, 64), (128, 128, 128)), "PNG")})
    out = str(tmp_path / "out.zarr")
    cfg = config(str(folder), out, radius=3, adaptive_tol=0.05, min_views=8, image_size=64)
    summary = run_local(cfg)
    views = {r["uri"].rsplit("/", 1)[1]: r["n_views"] for r in FeatureStore.open(out).manifest.to_pylist()}
    assert views["grey.png"] == 8, "a flat image stops at --min-views"
    assert all(8 <= n <= 49 for n in views.values()) and summary.views == sum(views.values())
    assert FeatureStore.open(out).config["adaptive_tol"] == 0.05
    assert_store_matches_engine(FeatureStore.open(out), sources_of(folder), cfg)


def sources_of(folder) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.iterdir()}


def test_every_bad_input_is_accounted_for_and_the_rest_completes(tmp_path):
    files = bad_input_files()
    folder = tmp_path / "bad"
    write_files(folder, {name: data for name, (data, _, _) in files.items()})
    listing = [str(folder / n) for n in sorted(files)] + [str(folder / "missing.jpg"), str(folder / "good.jpg")]
    (tmp_path / "list.txt").write_text("\n".join(listing))
    out = str(tmp_path / "out.zarr")
    cfg = config(str(tmp_path / "list.txt"), out)
    summary = run_local(cfg)
    store = FeatureStore.open(out)
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in store.manifest.to_pylist()}
    assert store.manifest.num_rows == len(listing) == summary.images
    assert len(set(store.manifest.column("image_id").to_pylist())) == len(listing)
    for name, (_, kind, upright) in files.items():
        record = rows[name] if name != "good.jpg" else next(r for r in store.manifest.to_pylist() if r["uri"].endswith("good.jpg") and r["status"] == "ok")
        assert record["error_kind"] == kind, name
        if kind is None:
            assert (record["height"], record["width"]) == upright and record["n_views"] == 9
    assert rows["missing.jpg"]["error_kind"] == "read" and "missing.jpg" in rows["missing.jpg"]["error"]
    duplicates = [r for r in store.manifest.to_pylist() if r["error_kind"] == "duplicate"]
    assert len(duplicates) == 1 and duplicates[0]["uri"].endswith("good.jpg")
    assert summary.errors == {"decode": 2, "empty": 1, "too_large": 1, "read": 1, "duplicate": 1}
    assert_store_matches_engine(store, {str(folder / n): d for n, (d, k, _) in files.items() if k is None}, cfg)
    said = summary.render().splitlines()  # the first failed files by name, and how to list them all
    start = next(i for i, line in enumerate(said) if line.startswith("failed"))
    first_errors = [r for r in store.manifest.sort_by("row").to_pylist() if r["status"] == "error"][:3]
    assert all(r["uri"] in line and f"{r['error_kind']}:" in line for r, line in zip(first_errors, said[start : start + 3], strict=True))
    assert said[start + 3].strip() == f"all of them: duckdb -c \"SELECT uri, error_kind, error FROM '{out}/manifest/*.parquet' WHERE status = 'error'\""


def test_rows_without_an_image_hold_zeros_in_blocks_an_earlier_shard_used(tmp_path):
    """A worker reuses the memory of committed shards' blocks: the rows of a later shard's error
    rows (no image, nothing computed) must still be written as zeros, not as what was there."""
    files = {f"{i}.jpg": encode(gradient(40, 40, seed=i), "JPEG") for i in range(5)}
    files["5.jpg"] = b"not an image"
    write_files(tmp_path / "images", files)
    out = str(tmp_path / "out.zarr")
    run_local(config(str(tmp_path / "images"), out, shard_size=2, dtype="float32"))  # the last shard: one image, one error
    store = FeatureStore.open(out)
    (error,) = [r for r in store.manifest.to_pylist() if r["status"] == "error"]
    assert error["shard"] == 2
    for kind in ("dense", "pooled", "cls"):
        array = store.group[f"{kind}/L{store.layers[0]}"]
        assert not np.any(array[error["row"]]) and np.any(array[error["row"] - 1]), kind  # its neighbour holds an image's values


def test_rerun_recomputes_only_uncommitted_shards(tmp_path, sample_paths):
    out = tmp_path / "out.zarr"
    cfg = config(str(sample_paths[0].parent), str(out), shard_size=1)
    first = run_local(cfg)
    assert first.shards_done == 4
    before = {i: FeatureStore.open(str(out)).dense(i) for i in FeatureStore.open(str(out)).manifest.column("image_id").to_pylist()}
    # A run that died after writing shard 2's arrays but before its manifest part, and before shard 3.
    uncommit(str(out), {2, 3})
    shutil.rmtree(out / "dense" / "L11" / "c" / "3")
    second = run_local(cfg)
    assert (second.shards_done, second.shards_skipped, second.images) == (2, 2, 2)
    store = FeatureStore.open(str(out))
    assert store.manifest.column("row").to_pylist() == [0, 1, 2, 3]
    for image_id, dense in before.items():
        np.testing.assert_array_equal(store.dense(image_id), dense)
    assert run_local(cfg).shards_done == 0


def test_range_files_hold_committed_shards_once_and_give_shards_back_as_parts(tmp_path, sample_paths):
    out = tmp_path / "out.zarr"
    run_local(config(str(sample_paths[0].parent), str(out), shard_size=1))
    assert sorted(p.name for p in (out / "manifest").iterdir()) == ["shards-000000-000003.parquet"]  # the parts went
    (out / "manifest" / "part-000001.parquet").write_bytes(b"corrupt")  # never read: the range covers shard 1
    assert FeatureStore.open(str(out)).manifest.num_rows == 4
    uncommit(str(out), {1})  # --retry-errors: shard 1 pending again, the others committed as parts
    assert sorted(p.name for p in (out / "manifest").iterdir()) == ["part-000000.parquet", "part-000002.parquet", "part-000003.parquet"]
    assert FeatureStore.open(str(out)).manifest.column("shard").to_pylist() == [0, 2, 3]
    assert run_local(config(str(sample_paths[0].parent), str(out), shard_size=1)).shards_done == 1
    assert sorted(p.name for p in (out / "manifest").iterdir()) == ["shards-000000-000003.parquet"]


def test_a_rerun_of_a_finished_store_rewrites_nothing_and_keeps_the_summary(tmp_path, sample_paths):
    out = tmp_path / "out.zarr"
    cfg = config(str(sample_paths[0].parent), str(out))
    run_local(cfg)
    files = ("manifest/shards-000000-000001.parquet", "plan/index.parquet", "summary.json")
    before = {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in files}
    assert run_local(cfg).shards_done == 0
    assert {name: ((out / name).stat().st_ino, (out / name).stat().st_mtime_ns) for name in files} == before
    assert json.loads((out / "summary.json").read_text())["run"]["ok"] == len(sample_paths)


def test_a_rerun_writes_a_missing_or_stale_summary_keeping_the_figures_it_knows(tmp_path, sample_paths):
    """After a driver is killed its actors may still commit the last shards: the rerun finds
    nothing to do, and must still leave a summary that says what the store holds."""
    out = tmp_path / "out.zarr"
    cfg = config(str(sample_paths[0].parent), str(out))
    run_local(cfg)
    first = json.loads((out / "summary.json").read_text())
    shards = -(-len(sample_paths) // 2)
    assert first["store"] == {"images": len(sample_paths), "ok": len(sample_paths), "errors": 0, "error_kinds": {}, "error_examples": [], "shards_committed": shards, "shards": shards}

    (out / "summary.json").unlink()
    assert run_local(cfg).shards_done == 0
    rewritten = json.loads((out / "summary.json").read_text())
    assert rewritten["store"] == first["store"] and rewritten["run"] is None  # that run's figures died with it
    assert rewritten["config"] == first["config"] and rewritten["flags"] == first["flags"]

    stale = {**first, "store": {**first["store"], "images": 1, "shards_committed": 1}}
    (out / "summary.json").write_text(json.dumps(stale))
    assert run_local(cfg).shards_done == 0
    assert json.loads((out / "summary.json").read_text()) == {**first, "store": first["store"]}  # counts mended, figures kept


def test_whole_groups_of_shards_are_compacted_while_the_run_goes(tmp_path, sample_paths, monkeypatch):
    monkeypatch.setattr(runner, "GROUP_SHARDS", 2)
    monkeypatch.setattr(manifest, "GROUP_SHARDS", 2)
    out = tmp_path / "out.zarr"
    before_the_end: list[list[str]] = []
    real_finish = runner.finish

    def finish(job, summary):
        before_the_end.append(sorted(p.name for p in (out / "manifest").iterdir()))
        real_finish(job, summary)

    monkeypatch.setattr(runner, "finish", finish)
    run_local(config(str(sample_paths[0].parent), str(out), shard_size=1))
    assert before_the_end == [["shards-000000-000001.parquet", "shards-000002-000003.parquet"]]
    assert FeatureStore.open(str(out)).manifest.column("row").to_pylist() == [0, 1, 2, 3]


def test_parts_left_by_a_killed_compaction_are_read_once_and_removed_by_the_next_run(tmp_path, sample_paths):
    out = tmp_path / "out.zarr"
    cfg = config(str(sample_paths[0].parent), str(out))
    run_local(cfg)
    (ranged,) = (out / "manifest").iterdir()
    rows = pq.read_table(ranged)
    for shard in (0, 1):  # the range was written, the kill came before its parts went
        pq.write_table(rows.filter(pc.equal(rows.column("shard"), shard)), out / "manifest" / f"part-{shard:06d}.parquet")
    assert FeatureStore.open(str(out)).manifest.num_rows == len(sample_paths)
    assert extract_main([*small_argv(str(sample_paths[0].parent), str(out)), "--local"]) == 0
    assert [p.name for p in (out / "manifest").iterdir()] == [ranged.name]


KILLED_WRITER = """
import sys
import pyarrow as pa
import pyarrow.compute as pc
from pipeline.store.manifest import parquet_bytes, put_atomically
table = pa.table({"x": list(range(300_000))})
print("writing", flush=True)
for n in range(10_000):
    put_atomically(sys.argv[1], parquet_bytes(table.slice(0, 100_000 + n)))
"""


def test_a_writer_killed_at_any_moment_leaves_the_old_file_or_the_new(tmp_path):
    target = tmp_path / "manifest.parquet"
    for attempt in range(5):
        writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE)
        assert writer.stdout.readline() == b"writing\n"
        time.sleep(0.05 + 0.07 * attempt)  # a different moment of a write each time, not a timing check
        writer.kill()
        writer.wait()
        if target.exists():
            assert pq.read_table(target).num_rows >= 100_000


def test_reducing_gap_stores_the_reduced_decode_in_the_original_geometry(tmp_path):
    photo = encode(gradient(1200, 1800), "JPEG", quality=92)
    write_files(tmp_path / "large", {"photo.jpg": photo})
    cfg = config(str(tmp_path / "large"), str(tmp_path / "out.zarr"), reducing_gap=2.0, max_pixels=10_000_000)
    run_local(cfg)
    store = FeatureStore.open(cfg.out)
    record = store.manifest.to_pylist()[0]
    assert (record["height"], record["width"], record["region"]) == (1200, 1800, [0.0, 300.0, 1200.0, 1500.0])
    assert store.config["reducing_gap"] == 2.0
    assert_store_matches_engine(store, {str(tmp_path / "large" / "photo.jpg"): photo}, cfg)


def test_rerun_with_a_different_config_is_refused_unless_overwrite(tmp_path, sample_paths):
    out = str(tmp_path / "out.zarr")
    run_local(config(str(sample_paths[0].parent), out))
    with pytest.raises(StoreMismatchError, match=r"Differences: stride: stored 8, requested 4"):
        run_local(config(str(sample_paths[0].parent), out, stride=4))
    with pytest.raises(StoreMismatchError, match=r"boundary: stored 'reflect', requested 'zeros'.*shifts"):
        run_local(config(str(sample_paths[0].parent), out, boundary="zeros", radius=2))
    with pytest.raises(StoreMismatchError, match=r"Differences: reducing_gap: stored None, requested 2.0"):  # absent when off
        run_local(config(str(sample_paths[0].parent), out, reducing_gap=2.0))
    summary = run_local(config(str(sample_paths[0].parent), out, stride=4, overwrite=True))
    assert summary.shards_done == 2 and FeatureStore.open(out).config["stride"] == 4


def test_aspect_policy_stores_size_buckets_with_their_geometry(tmp_path, sample_paths):
    out = str(tmp_path / "out.zarr")
    cfg = config(str(sample_paths[0].parent), out, resize="aspect", image_size=32, shard_size=4)
    run_local(cfg)
    store = FeatureStore.open(out)
    buckets = {r["uri"].rsplit("/", 1)[1]: r["bucket"] for r in store.manifest.to_pylist()}
    assert buckets == {"astronaut.jpg": "32x32", "chelsea.jpg": "32x48", "coffee.jpg": "32x48", "rocket.jpg": "32x48"}
    chelsea = next(r for r in store.manifest.to_pylist() if r["uri"].endswith("chelsea.jpg"))
    assert store.dense(chelsea["image_id"]).shape == (192, 4, 6)
    assert store.transform(chelsea["image_id"])["region"] == (0.0, 0.0, 300.0, 451.0)
    assert_store_matches_engine(store, {str(p): p.read_bytes() for p in sample_paths}, cfg)


def test_s3_dataset_and_store_on_a_loopback_server(tmp_path, sample_paths, s3_server):
    fs = fsspec.filesystem("s3", **s3_server)
    for path in sample_paths:
        fs.pipe(f"bucket/images/{path.name}", path.read_bytes())
    fs.pipe("bucket/lists/with-missing.txt", b"s3://bucket/images/coffee.jpg\ns3://bucket/images/no-such-key.jpg\n")
    cfg = config("s3://bucket/images", "s3://bucket/feats.zarr", storage_options=s3_server)
    assert run_local(cfg).ok == 4
    store = FeatureStore.open("s3://bucket/feats.zarr", storage_options=s3_server)
    assert_store_matches_engine(store, {f"s3://bucket/images/{p.name}": p.read_bytes() for p in sample_paths}, cfg)
    assert "testing" not in fs.cat("bucket/feats.zarr/zarr.json").decode()  # credentials never stored

    # Images on S3, features on local disk: the one set of storage options serves the S3 side only.
    listed = config("s3://bucket/lists/with-missing.txt", str(tmp_path / "local.zarr"), storage_options=s3_server)
    run_local(listed)
    rows = FeatureStore.open(str(tmp_path / "local.zarr"), storage_options=s3_server).manifest.to_pylist()
    assert [(r["uri"].rsplit("/", 1)[1], r["status"], r["error_kind"]) for r in rows] == [
        ("coffee.jpg", "ok", None),
        ("no-such-key.jpg", "error", "read"),
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stride", "5"], "--stride: stride 5 must divide the patch size 16"),
        (["--layers", "12"], "--layers: 12 is out of range"),
        (["--keys", "-13"], "--keys: -13 is out of range"),
        (["--radius", "16"], "--radius: shift .* is not sub-token"),
        (["--radius", "1", "--random-shifts", "4"], "--random-shifts: give only one of"),
        (["--image-size", "40"], "--image-size: 40 is not a multiple of the patch size 16"),
        (["--model", "resnet18"], "--model: 'resnet18' is not a Vision Transformer"),
        (["--shard-size", "0"], "--shard-size: must be a positive integer"),
        (["--storage-options", "{not json"], "--storage-options: .*not valid JSON"),
        (["--boundary", "wrap"], "--boundary: invalid choice"),
        (["--reducing-gap", "0.5"], "--reducing-gap: must be 0 .off. or at least 1"),
        (["--reducing-gap", "2", "--resize", "pad", "--boundary", "zeros"], "--reducing-gap: .*not --resize pad"),
        (["--weights", "/no/such/file.pt"], "--weights: cannot read /no/such/file.pt"),
    ],
)
def test_bad_flags_fail_before_any_work_naming_the_flag(tmp_path, sample_paths, capsys, argv, message):
    out = tmp_path / "never.zarr"
    with pytest.raises(SystemExit) as exited:
        extract_main(["--dataset", str(sample_paths[0].parent), "--out", str(out), "--model", MODEL, "--local", *argv])
    assert exited.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not out.exists()


def test_empty_dataset_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no images found"):
        run_local(config(str(tmp_path / "empty"), str(tmp_path / "out.zarr")))


def test_config_errors_carry_the_flag():
    with pytest.raises(ConfigError) as caught:
        resolve(ExtractConfig(dataset="x", out="y", model=MODEL, layers=(99,)))
    assert caught.value.flag == "--layers"


def test_features_dtype_float32_on_request(tmp_path, sample_paths):
    out = str(tmp_path / "out.zarr")
    run_local(config(str(sample_paths[0].parent), out, dtype="float32", codec="none"))
    store = FeatureStore.open(out)
    image_id = store.manifest.column("image_id")[0].as_py()
    assert store.dense(image_id).dtype == np.float32
    record = store.record(image_id)
    expected = expected_features(open(record["uri"], "rb").read(), config("x", "y"))
    np.testing.assert_allclose(store.dense(image_id), expected["dense"], atol=1e-5, rtol=1e-5)


def test_attention_keys_are_stored_beside_the_block_outputs(tmp_path, sample_paths):
    out = str(tmp_path / "out.zarr")
    cfg = config(str(sample_paths[0].parent), out, keys=(-1,), layers=(5,), dtype="float32", resize="aspect")
    run_local(cfg)
    store = FeatureStore.open(out)
    assert (store.layers, store.keys) == ([5], [11])
    vit = cached_vit(MODEL)
    resolved = resolve(cfg)
    srt = SRT(vit, layers=[5], keys=[11], shifts=resolved.shifts, stride=resolved.stride)
    policy = ImagePolicy(cfg.image_size, cfg.resize, vit.patch_size, vit.mean, vit.std, cfg.max_pixels, decoder=resolve_decoder(cfg.decoder, vit.device))
    for record in store.manifest.to_pylist():
        output = srt.run(prepare(open(record["uri"], "rb").read(), policy).tensor[None])
        block, keys = srt.taps
        assert (block.kind, keys.kind) == ("block", "keys")
        np.testing.assert_allclose(store.dense(record["image_id"], keys=True), output.dense[keys][0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(store.dense(record["image_id"]), output.dense[block][0], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(store.vector("cls", record["image_id"], keys=True), output.prefix[keys][0, 0], atol=1e-5, rtol=1e-5)
    assert not np.allclose(store.dense(record["image_id"], keys=True), store.dense(record["image_id"]))
    with pytest.raises(KeyError, match="attention keys .* of block 5 not stored"):
        store.dense(record["image_id"], layer=5, keys=True)


def write_damaged_dataset(folder: Path) -> dict[str, str | None]:
    files, expected = damaged_dataset(special_files_in=folder)
    write_files(folder, files)
    return expected


def assert_every_input_accounted_for(out: str, expected: dict[str, str | None], storage_options=None) -> None:
    """Exactly one manifest row per input the listing could name, each ok or with its error kind,
    and every ok row holds the engine's features of its bytes."""
    store = FeatureStore.open(out, storage_options=storage_options)
    rows = store.manifest.to_pylist()
    found = {r["uri"].rsplit("/damaged/", 1)[1]: r for r in rows}
    assert len(found) == len(rows) == len(expected)
    assert {name: r["error_kind"] for name, r in found.items()} == expected
    assert all((r["status"] == "ok") == (r["error_kind"] is None) for r in rows)
    assert all(r["error"] for r in rows if r["status"] == "error")
    assert "bad-second-header.tar is damaged" in found["bad-second-header.tar"]["error"]
    assert "the 1 image members before it are kept" in found["bad-second-header.tar"]["error"]
    assert "container truncated" in found["truncated.tar#t2.jpg"]["error"]
    assert "Parquet magic bytes not found" in found["truncated.parquet"]["error"]
    if "pipe.jpg" in found:
        assert "FIFO" in found["pipe.jpg"]["error"] and "symbolic link" in found["loop.jpg"]["error"]
    ok = [r for r in rows if r["status"] == "ok"]
    plan = store.plan()
    blobs = read_bytes([plan[r["image_id"]] for r in ok], storage_options)
    for record, data in zip(ok, blobs):
        assert_fp16_close(store.dense(record["image_id"]), expected_features(data, config("x", "y"))["dense"])


def small_argv(dataset: str, out: str) -> list[str]:
    """config()'s settings as command-line flags."""
    return ["--dataset", dataset, "--out", out, "--model", MODEL, "--image-size", "32", "--radius", "1", "--stride", "8",
            "--shard-size", "2", "--batch-size", "9", "--max-pixels", str(BOMB_LIMIT)]  # fmt: skip


@pytest.mark.timeout(120)  # a FIFO opened for reading would block forever
def test_damaged_containers_and_special_files_become_error_rows(tmp_path):
    expected = write_damaged_dataset(tmp_path / "damaged")
    out = str(tmp_path / "out.zarr")
    assert extract_main([*small_argv(str(tmp_path / "damaged"), out), "--local"]) == 0
    assert_every_input_accounted_for(out, expected)


def put_damaged_dataset(folder: str, storage_options) -> dict[str, str | None]:
    """The damaged dataset (no special files: object stores have none) under an s3:// folder."""
    files, expected = damaged_dataset()
    fsspec.filesystem("s3", **storage_options).pipe({f"{folder}/{name}": data for name, data in files.items()})
    return expected


@pytest.mark.timeout(120)
def test_s3_damaged_containers_become_error_rows(s3_server):
    expected = put_damaged_dataset("s3://bucket/damaged", s3_server)
    run_local(config("s3://bucket/damaged", "s3://bucket/damaged.zarr", storage_options=s3_server))
    assert_every_input_accounted_for("s3://bucket/damaged.zarr", expected, s3_server)


def test_a_listing_that_finds_nothing_usable_names_the_dataset_and_writes_nothing(tmp_path, sample_paths, capsys):
    files, _ = damaged_dataset()
    write_files(tmp_path / "broken", {name: files[name] for name in ("bad-first-header.tar", "truncated.parquet")})
    out = tmp_path / "out.zarr"
    with pytest.raises(SystemExit) as exited:
        extract_main([*small_argv(str(tmp_path / "broken"), str(out)), "--local"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert f"error: --dataset {tmp_path / 'broken'}: nothing usable" in error
    assert "bad-first-header.tar is damaged (invalid header)" in error and "magic bytes" in error
    assert not out.exists()

    # --overwrite of a good store with a dataset that fails listing keeps the good store.
    good = tmp_path / "good.zarr"
    run_local(config(str(sample_paths[0].parent), str(good)))
    with pytest.raises(SystemExit):
        extract_main([*small_argv(str(tmp_path / "no-such-folder"), str(good)), "--local", "--overwrite"])
    assert FeatureStore.open(str(good)).manifest.num_rows == len(sample_paths)


@pytest.mark.parametrize("where", ["pseudo_filesystem", "under_a_file", "an_existing_file"])
def test_an_unwritable_out_is_refused_before_listing(tmp_path, capsys, where):
    (tmp_path / "file").write_text("x")
    out = {"pseudo_filesystem": "/proc/srt.zarr", "under_a_file": str(tmp_path / "file" / "out.zarr"), "an_existing_file": str(tmp_path / "file")}[where]
    with pytest.raises(SystemExit) as exited:  # the dataset does not exist: listing it would fail naming --dataset
        extract_main([*small_argv(str(tmp_path / "no-such-dataset"), out), "--local"])
    assert exited.value.code == 2
    assert "error: --out: " in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_one_location_spelt_several_ways_is_one_dataset_and_one_image(tmp_path, sample_paths, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_files(tmp_path / "in", {p.name: p.read_bytes() for p in sample_paths})
    out = str(tmp_path / "out.zarr")
    assert run_local(config("in/", out)).ok == len(sample_paths)
    for spelling in ("in", "./in", str(tmp_path / "in"), f"file://{tmp_path}/in/"):
        summary = run_local(config(spelling, out))  # the same dataset: resumed, not refused
        assert summary.shards_skipped == -(-len(sample_paths) // 2) and summary.shards_done == 0

    name = sample_paths[0].name
    (tmp_path / "list.txt").write_text(f"file://{tmp_path}/in/{name}\n{tmp_path}/in/{name}\nin/./{name}\nin/../in/{name}\n")
    run_local(config(str(tmp_path / "list.txt"), str(tmp_path / "list.zarr")))
    rows = FeatureStore.open(str(tmp_path / "list.zarr")).manifest.to_pylist()
    assert [(r["uri"], r["error_kind"]) for r in rows] == [(str(tmp_path / "in" / name), None)] + [(str(tmp_path / "in" / name), "duplicate")] * 3


@pytest.fixture
def flaky_s3(s3_server):
    """(storage options of an S3 endpoint that refuses connections, a context in which it comes up
    as soon as the job logs its first transient read failure); the same buckets as `s3_server`.
    The clients' own retries are turned off, so what rides out the outage is ours. Keyed to the
    job's own event, not to wall time, the outage always hits a read however slow the machine."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers = []

    class UpOnFirstFailure(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not servers and "reads failed transiently" in record.getMessage():
                servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
                servers[-1].start()  # before the job's backoff ends: its retry finds the endpoint up

    @contextlib.contextmanager
    def up_after_first_failure():
        handler = UpOnFirstFailure(level=logging.WARNING)
        logging.getLogger("srt").addHandler(handler)
        try:
            yield
        finally:
            logging.getLogger("srt").removeHandler(handler)

    options = {
        **s3_server,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
        "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
        "skip_instance_cache": True,
    }
    yield options, up_after_first_failure
    for server in servers:
        server.stop()


def test_reads_are_retried_through_an_outage_and_error_rows_recomputed_on_request(tmp_path, sample_paths, s3_server, flaky_s3, caplog):
    fs = fsspec.filesystem("s3", **s3_server)
    for path in sample_paths:
        fs.pipe(f"bucket/flaky/{path.name}", path.read_bytes())
    (tmp_path / "list.txt").write_text("".join(f"s3://bucket/flaky/{p.name}\n" for p in sample_paths))
    options, up_after_first_failure = flaky_s3
    sources = {f"s3://bucket/flaky/{p.name}": p.read_bytes() for p in sample_paths}

    # No retries, endpoint down: every image is a read error naming the connection failure.
    down = str(tmp_path / "down.zarr")
    summary = run_local(config(str(tmp_path / "list.txt"), down, storage_options=options, read_retries=0))
    assert summary.errors == {"read": len(sample_paths)}
    assert all("EndpointConnectionError" in r["error"] for r in FeatureStore.open(down).manifest.to_pylist())

    # Endpoint down until the first read fails: the default retries ride it out.
    with up_after_first_failure():
        summary = run_local(config(str(tmp_path / "list.txt"), str(tmp_path / "retried.zarr"), storage_options=options))
    assert "reads failed transiently (EndpointConnectionError" in caplog.text, "the outage hit no read"
    assert (summary.ok, summary.errors) == (len(sample_paths), {})
    assert_store_matches_engine(FeatureStore.open(str(tmp_path / "retried.zarr")), sources, config("x", "y"))

    # A plain rerun keeps the committed error rows; --retry-errors read recomputes their shards.
    assert run_local(config(str(tmp_path / "list.txt"), down, storage_options=options)).shards_done == 0
    summary = run_local(config(str(tmp_path / "list.txt"), down, storage_options=options, retry_errors=("read",)))
    assert (summary.shards_done, summary.ok) == (-(-len(sample_paths) // 2), len(sample_paths))
    store = FeatureStore.open(down)
    assert store.manifest.column("status").to_pylist() == ["ok"] * len(sample_paths)
    assert store.manifest.column("row").to_pylist() == list(range(len(sample_paths)))  # each row once
    assert_store_matches_engine(store, sources, config("x", "y"))


def test_retry_errors_refuses_kinds_that_would_come_out_the_same(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        extract_main([*small_argv(str(tmp_path), str(tmp_path / "out.zarr")), "--retry-errors", "read,duplicate"])
    assert exited.value.code == 2 and "--retry-errors: duplicate: only read, empty, decode errors" in capsys.readouterr().err


def test_the_davis_preset_sets_the_papers_settings_and_refuses_contradicting_flags(tmp_path, capsys):
    resolved = resolve(ExtractConfig(dataset="d", out="o", model=MODEL, preset="srt-paper-davis", boundary="zeros"))  # agreeing flags are fine
    c = resolved.config
    assert resolved.shifts == ((0, 0), *grid_shifts(1)) and len(resolved.shifts) == 10  # the frame, then the 3x3 grid
    assert (resolved.stride, c.boundary, resolved.layers, c.norm) == (16, "zeros", (11,), True)
    assert (c.image_size, c.resize, c.resample) == (480, "aspect-floor64", "cv2-bilinear")
    fingerprint = resolved.fingerprint()
    assert (fingerprint["preset"], fingerprint["mean"], fingerprint["std"]) == ("srt-paper-davis", [0.485, 0.456, 0.406], [0.228, 0.224, 0.225])
    for argv, flag in ((["--stride", "8"], "--stride"), (["--radius", "2"], "--radius"), (["--random-shifts", "4"], "--random-shifts"), (["--std", "0.5,0.5,0.5"], "--std")):
        with pytest.raises(SystemExit):
            extract_main(["--dataset", str(tmp_path), "--out", str(tmp_path / "o.zarr"), "--model", MODEL, "--preset", "srt-paper-davis", *argv])
        assert f"error: {flag}: --preset srt-paper-davis sets it to" in capsys.readouterr().err


@pytest.mark.parametrize("model", [MODEL, "vit_small_patch16_224.dino"])
def test_a_davis_preset_store_holds_the_authors_features(tmp_path, model):
    """The preset's store against an engine set up by hand; a DINO model resizes its position table
    by DINO's own rule (`reference`) at the 30 x 44 tokens of a 480 x 704 frame."""
    frame = encode(gradient(60, 90, seed=7), "PNG")
    write_files(tmp_path / "frames", {"00000.png": frame})
    out = str(tmp_path / "out.zarr")
    run_local(ExtractConfig(dataset=str(tmp_path / "frames"), out=out, model=model, preset="srt-paper-davis", dtype="float32"))
    store = FeatureStore.open(out)
    record = store.manifest.to_pylist()[0]
    assert (record["input_height"], record["input_width"], record["n_views"]) == (480, 704, 10)  # 720 floored to 704
    assert store.config["preset"] == "srt-paper-davis"
    assert store.config.get("pos_embed_resize") == (None if model == MODEL else "reference")  # the tiny ViT has no rule of its own
    # The same settings spelt out, independently of the preset and of the store's engine building.
    vit = load_vit(model, device="cpu")
    vit.use_pos_embed_resize("reference")
    policy = ImagePolicy(480, "aspect-floor64", 16, (0.485, 0.456, 0.406), (0.228, 0.224, 0.225), resample="cv2-bilinear")
    srt = SRT(vit, layers=(-1,), shifts=[(0, 0), *grid_shifts(1)], stride=16, boundary="zeros")
    expected = srt(prepare(frame, policy).tensor[None])[-1][0]
    np.testing.assert_allclose(store.dense(record["image_id"]), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model", ["vit_small_patch14_reg4_dinov2", "vit_small_patch14_dinov2"])
def test_a_depth_preset_store_holds_the_authors_features(tmp_path, model):
    """The preset's store against an engine set up by hand: the plain DINOv2 backbone resizes its
    position table by its own rule (`reference`), the one with registers as timm does."""
    image = encode(gradient(41, 57, seed=8), "PNG")
    write_files(tmp_path / "nyu", {"0001.png": image})
    out = str(tmp_path / "out.zarr")
    run_local(ExtractConfig(dataset=str(tmp_path / "nyu"), out=out, model=model, preset="srt-paper-depth", dtype="float32"))
    store = FeatureStore.open(out)
    record = store.manifest.to_pylist()[0]
    assert (record["input_height"], record["input_width"], record["n_views"], record["region"]) == (42, 70, 50, [0.0, -6.0, 42.0, 64.0])
    assert store.layers == [2, 5, 8, 11] and store.config["norm"] is False  # what DINOv2's linear4 head reads
    assert store.config.get("pos_embed_resize") == (None if "reg" in model else "reference")
    vit = load_vit(model, device="cpu")
    vit.use_pos_embed_resize("reference")
    pixels = prepare(image, ImagePolicy(224, "pad", 14, vit.mean, vit.std)).tensor[None, :, 0:41, 6:63]  # the image itself
    shifts = [(0, 0), *grid_shifts(3)]
    for layer in (2, 11):
        expected = srt_naive(vit, pixels, layer=layer, shifts=shifts, stride=14, boundary="zeros", norm=False, pad_after_shift=(0, 1, 6, 7))
        np.testing.assert_allclose(store.dense(record["image_id"], layer), expected[0], atol=1e-4, rtol=1e-4)
        assert store.vector("cls", record["image_id"], layer).shape == (vit.embed_dim,)  # a class token per layer


def test_progress_moves_per_image_group_and_counts_each_image_once(tmp_path, sample_paths):
    write_files(tmp_path / "in", {p.name: p.read_bytes() for p in sample_paths} | {"broken.jpg": b"not an image"})
    cfg = config(str(tmp_path / "in"), str(tmp_path / "out.zarr"), shard_size=5)
    job = plan_job(preflight(cfg))
    worker = ShardWorker(job.resolved, job.reader(), vit=cached_vit(MODEL))
    loaded = worker.load(0)
    groups: list[tuple[float, int]] = []
    worker.commit(loaded, worker.assemble(loaded, worker.compute(loaded, progress=lambda *group: groups.append(group))))
    assert groups == [(1, 9)] * len(sample_paths) and loaded.decoded == len(sample_paths)  # 9 views fill a forward pass of 9: one image a group
    # A split shard's batches report shares of each image, adding up to each image once.
    shifts = job.resolved.shifts
    shares: list[tuple[float, int]] = []
    for batch in (shifts[:3], shifts[3:]):
        worker.compute(loaded, batch, progress=lambda *group: shares.append(group))
    assert [views for _, views in shares] == [3] * len(sample_paths) + [6] * len(sample_paths)
    assert sum(images for images, _ in shares) == pytest.approx(len(sample_paths))


@pytest.mark.parametrize("pca_dims", [0, 8])
def test_the_local_bar_moves_every_image_group_and_counts_every_image_once(tmp_path, sample_paths, progress_bars, pca_dims):
    write_files(tmp_path / "in", {p.name: p.read_bytes() for p in sample_paths} | {"broken.jpg": b"not an image"})
    summary = run_local(config(str(tmp_path / "in"), str(tmp_path / "out.zarr"), shard_size=2, pca_dims=pca_dims))
    (bar,) = progress_bars
    images = len(sample_paths) + 1
    assert bar.total == images and sum(bar.steps) == pytest.approx(images) and summary.images == images
    assert sum(step > 0 for step in bar.steps) >= len(sample_paths)  # one image a group, and the error row
    assert float(bar.postfix.split("views_per_s=")[1].split(",")[0]) > 0 and "errors=1" in bar.postfix


def test_relative_paths_are_made_absolute_on_the_driver(tmp_path, sample_paths, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_files(tmp_path / "in", {p.name: p.read_bytes() for p in sample_paths})
    assert extract_main([*small_argv("in", "try/job.zarr"), "--local"]) == 0
    assert f"features    {tmp_path / 'try' / 'job.zarr'}" in capsys.readouterr().out
    assert FeatureStore.open(str(tmp_path / "try" / "job.zarr")).config["dataset"] == str(tmp_path / "in")
    # Under `ray job submit --working-dir`, the working directory is a temporary copy: a relative
    # output would be written there and deleted with it.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}))
    with pytest.raises(SystemExit) as exited:
        extract_main([*small_argv(str(tmp_path / "in"), "try/other.zarr"), "--local"])
    assert exited.value.code == 2
    assert "error: --out: try/other.zarr is relative, and this job runs in Ray's temporary copy of its --working-dir" in capsys.readouterr().err


def test_the_summary_counts_the_bytes_stored(tmp_path, sample_paths):
    out = str(tmp_path / "out.zarr")
    summary = run_local(config(str(sample_paths[0].parent), out, resize="aspect", shard_size=3))  # float16, size buckets
    store = FeatureStore.open(out)
    channels = cached_vit(MODEL).embed_dim
    per_image = [channels * (r["input_height"] // 8) * (r["input_width"] // 8) + 2 * channels for r in store.manifest.to_pylist()]  # dense, cls, pooled
    assert summary.bytes_written == 2 * sum(per_image)
    assert f"stored      {summary.bytes_written / 1e6:.1f} MB" in summary.render()


def test_a_resumed_run_says_its_plan_is_fixed(tmp_path, sample_paths, caplog):
    write_files(tmp_path / "in", {p.name: p.read_bytes() for p in sample_paths[:2]})
    out = str(tmp_path / "out.zarr")
    run_local(config(str(tmp_path / "in"), out))
    write_files(tmp_path / "in", {sample_paths[2].name: sample_paths[2].read_bytes()})  # added after the first run
    with caplog.at_level("INFO", logger="srt"):
        assert run_local(config(str(tmp_path / "in"), out)).images == 0
    assert "resuming the plan of 2 items listed by the first run" in caplog.text
    assert "--dataset has 1 new input(s) since (image files, containers or file-list ranges), not extracted: pass --append" in caplog.text
    run_local(config(str(tmp_path / "in"), out, append=True))
    caplog.clear()
    with caplog.at_level("INFO", logger="srt"):
        run_local(config(str(tmp_path / "in"), out))
    assert "--dataset holds nothing new since" in caplog.text


def test_offline_pretrained_weights_fail_at_planning_in_one_line(tmp_path):
    out = tmp_path / "out.zarr"
    argv = [sys.executable, str(ROOT / "jobs" / "extract.py"), *small_argv(str(ROOT / "data" / "samples"), str(out)), "--pretrained", "--local"]
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")}  # no hub, nothing cached
    done = subprocess.run(argv, capture_output=True, text=True, env=offline, timeout=120)
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(errors) == 1 and f"--pretrained: weights for {MODEL} are not in the local cache" in errors[0] and "pass --weights URI" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".yaml", ".json", ".toml"])
def test_a_config_file_gives_the_flags_and_flags_override_it(tmp_path, sample_paths, suffix, caplog):
    values = {"dataset": str(sample_paths[0].parent), "out": str(tmp_path / "out.zarr"), "model": MODEL, "image_size": 64, "radius": 1,
              "layers": [5, 11], "shard_size": 2, "storage_options": {"anon": False, "secret": "hunter2"}}  # fmt: skip
    text = {".yaml": yaml.safe_dump(values), ".json": json.dumps(values), ".toml": "\n".join(
        f"{k} = {json.dumps(v)}" for k, v in values.items() if k != "storage_options") + '\n[storage_options]\nanon = false\nsecret = "hunter2"\n'}[suffix]  # fmt: skip
    (tmp_path / f"run{suffix}").write_text(text)
    with caplog.at_level("DEBUG", logger="srt"):  # --verbose: every flag logged, credentials masked
        assert extract_main(["--config", str(tmp_path / f"run{suffix}"), "--image-size", "32", "--local", "--verbose"]) == 0
    store = FeatureStore.open(str(tmp_path / "out.zarr"))
    assert (store.config["image_size"], store.layers) == (32, [5, 11])  # the flag won, the file gave the rest
    summary = json.loads((tmp_path / "out.zarr" / "summary.json").read_text())
    assert summary["flags"]["storage_options"] == {"anon": False, "secret": "***"} and summary["flags"]["radius"] == 1
    assert (summary["flags"]["stride"], len(summary["flags"]["shifts"])) == (8, 9)  # as used: the default stride, the grid listed
    assert "hunter2" not in caplog.text and '"secret": "***"' in caplog.text


def test_a_config_file_with_an_unknown_key_is_refused_naming_it(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("dataset: x\nout: y\nbatchsize: 64\n")
    with pytest.raises(SystemExit) as exited:
        extract_main(["--config", str(tmp_path / "run.yaml"), "--local"])
    assert exited.value.code == 2 and "error: --config: " in (err := capsys.readouterr().err) and "unknown keys ['batchsize']" in err


def test_outputs_store_only_what_is_asked_for(tmp_path, sample_paths, capsys):
    full, vectors = str(tmp_path / "full.zarr"), str(tmp_path / "vectors.zarr")
    everything = run_local(config(str(sample_paths[0].parent), full))
    some = run_local(config(str(sample_paths[0].parent), vectors, outputs=("pooled", "cls")))
    group = zarr.open_group(vectors, mode="r")
    assert sorted(group.group_keys()) == ["cls", "pooled"]
    store, reference = FeatureStore.open(vectors), FeatureStore.open(full)
    image_id = store.manifest.column("image_id")[0].as_py()
    np.testing.assert_array_equal(store.vector("pooled", image_id), reference.vector("pooled", image_id))
    with pytest.raises(KeyError, match=r"stores no dense arrays: it was extracted with --outputs cls,pooled"):
        store.dense(image_id)
    assert some.bytes_written == 2 * 2 * 192 * len(sample_paths) < everything.bytes_written / 5  # cls + pooled, fp16
    with pytest.raises(StoreMismatchError, match=r"outputs: stored \['cls', 'pooled'\], requested \['dense', 'cls', 'pooled', 'registers'\]"):
        run_local(config(str(sample_paths[0].parent), vectors))
    with pytest.raises(SystemExit):
        extract_main([*small_argv(str(sample_paths[0].parent), str(tmp_path / "x.zarr")), "--outputs", "pooled,logits", "--local"])
    assert "error: --outputs: give some of dense, cls, pooled, registers, got pooled,logits" in capsys.readouterr().err


def test_position_embeddings_resize_by_the_model_familys_rule_for_new_stores_and_as_stored_on_resume(tmp_path, sample_paths, capsys):
    dino = "vit_small_patch16_224.dino"
    new = resolve(config("d", str(tmp_path / "new.zarr"), model=dino))
    assert new.pos_embed_resize == "reference" and new.fingerprint()["pos_embed_resize"] == "reference"
    assert "pos_embed_resize" not in resolve(config("d", str(tmp_path / "tiny.zarr"))).fingerprint()  # no rule of its own: timm's
    assert resolve(ExtractConfig(dataset="d", out="o", model=dino, preset="srt-paper-davis")).pos_embed_resize == "reference"
    with pytest.raises(SystemExit):
        extract_main(["--dataset", "d", "--out", "o", "--model", dino, "--preset", "srt-paper-davis", "--pos-embed-resize", "timm"])
    assert "error: --pos-embed-resize: --preset srt-paper-davis sets it to reference" in capsys.readouterr().err
    # A store made with timm's resize (as every store before the flag) resumes under the default, and
    # asking for the reference rule on it names the difference.
    out = str(tmp_path / "timm.zarr")
    made = run_local(config(str(sample_paths[0].parent), out, model=dino, resize="aspect", pos_embed_resize="timm"))
    assert made.ok == 4 and "pos_embed_resize" not in FeatureStore.open(out).config
    assert run_local(config(str(sample_paths[0].parent), out, model=dino, resize="aspect")).shards_skipped == 2
    with pytest.raises(StoreMismatchError, match=r"pos_embed_resize: stored None, requested 'reference'"):
        run_local(config(str(sample_paths[0].parent), out, model=dino, resize="aspect", pos_embed_resize="reference"))
