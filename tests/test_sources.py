"""Listing and reading: directories, globs, file lists, tar shards, Parquet bytes; stable plans."""

from __future__ import annotations

import io
import os
import posixpath
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.store.plan as plan_module
from bench.results import loopback_s3
from pipeline.extraction import listing
from pipeline.extraction.listing import Item, SourceError, dataset_inputs, list_input, uri_id
from pipeline.extraction.planning import plan_dataset, thread_map
from pipeline.extraction.reading import prefetch, read_bytes
from pipeline.store.plan import PlanReader, read_plan, write_index


def list_items(dataset: str, storage_options: dict | None = None) -> list[Item]:
    """Every item of a dataset, input by input, as the planning step lists them."""
    return [Item(**row) for unit in dataset_inputs(dataset, storage_options) for row in list_input(unit, storage_options).to_pylist()]


def planned(dataset: str, out, shard_size: int) -> PlanReader:
    """The dataset planned into `out` (parts and index), and a reader of its shards' rows."""
    _, index = plan_dataset(dataset, str(out), shard_size, {}, thread_map(2))
    write_index(str(out), index)
    return PlanReader(str(out), index)


def make_tar(path, members: dict[str, bytes]) -> None:
    """A tar of these members at `path` (a file name or a binary file object)."""
    with tarfile.open(path, "w") if not hasattr(path, "write") else tarfile.open(fileobj=path, mode="w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_directory_listing_is_recursive_sorted_and_skips_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ("b/2.PNG", "a.jpg", "notes.txt", "b/1.webp"):
        (tmp_path / name).write_bytes(name.encode())
    items = list_items(str(tmp_path))
    assert [i.uri for i in items] == [str(tmp_path / n) for n in ("a.jpg", "b/1.webp", "b/2.PNG")]
    assert all(i.image_id == uri_id(i.uri) for i in items)
    glob_items = list_items(str(tmp_path / "b" / "*.webp"))
    assert [i.uri for i in glob_items] == [str(tmp_path / "b/1.webp")]
    plan = planned(str(tmp_path), tmp_path / "out", 2)
    assert read_bytes(plan.rows(0) + plan.rows(1)) == [b"a.jpg", b"b/1.webp", b"b/2.PNG"]


def test_file_lists_resolve_relative_uris_and_keep_user_ids(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"x")
    (tmp_path / "list.txt").write_text("# comment\nx.jpg\n\n" + str(tmp_path / "x.jpg") + "\n")
    (tmp_path / "list.csv").write_text("id,url\ncat,x.jpg\ndog,missing.jpg\n")
    txt = list_items(str(tmp_path / "list.txt"))
    assert [i.uri for i in txt] == [str(tmp_path / "x.jpg")] * 2
    assert txt[1].duplicate_of == txt[0].image_id and txt[1].image_id != txt[0].image_id
    csv_items = list_items(str(tmp_path / "list.csv"))
    assert [(i.image_id, i.uri) for i in csv_items] == [("cat", str(tmp_path / "x.jpg")), ("dog", str(tmp_path / "missing.jpg"))]
    data = read_bytes(planned(str(tmp_path / "list.csv"), tmp_path / "out", 10).rows(0))
    assert data[0] == b"x" and isinstance(data[1], Exception)
    pq.write_table(pa.table({"path": ["x.jpg"], "key": ["k1"]}), tmp_path / "uris.parquet")
    assert [(i.image_id, i.uri) for i in list_items(str(tmp_path / "uris.parquet"))] == [("k1", str(tmp_path / "x.jpg"))]


def test_webdataset_tar_groups_members_by_key(tmp_path):
    make_tar(tmp_path / "shard-0.tar", {"a/0001.jpg": b"img1", "a/0001.json": b"{}", "a/0002.png": b"img2", "a/0002.cls": b"3"})
    make_tar(tmp_path / "shard-1.tar", {"0003.jpg": b"img3"})
    items = list_items(str(tmp_path / "*.tar"))
    assert [i.image_id for i in items] == ["a/0001", "a/0002", "0003"]
    assert items[0].uri == f"{tmp_path}/shard-0.tar#a/0001.jpg" and items[0].source == "tar"
    plan = planned(str(tmp_path / "*.tar"), tmp_path / "out", 2)
    assert read_bytes(plan.rows(0)) == [b"img1", b"img2"]
    assert read_bytes(plan.rows(1)) == [b"img3"]


def test_parquet_of_image_bytes_reads_only_the_needed_row_groups(tmp_path):
    images = [f"img{i}".encode() for i in range(10)]
    table = pa.table({"key": [f"k{i}" for i in range(10)], "image": pa.array(images, pa.binary())})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=3)
    hf = pa.table({"image": pa.array([{"bytes": b"hf0", "path": "p"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    pq.write_table(hf, tmp_path / "hf.parquet")
    items = list_items(str(tmp_path))
    assert [i.image_id for i in items[:10]] == [f"k{i}" for i in range(10)] and items[10].uri.endswith("hf.parquet#0")
    plan = planned(str(tmp_path), tmp_path / "out", 4)
    assert read_bytes(plan.rows(1)) == images[4:8]
    assert read_bytes(plan.rows(2)) == images[8:] + [b"hf0"]


def test_tar_members_are_read_by_their_planned_byte_ranges(tmp_path):
    make_tar(tmp_path / "a.tar", {f"{i:03d}.jpg": bytes([i]) * (100 + i) for i in range(40)})
    items = list_items(str(tmp_path / "a.tar"))
    with tarfile.open(tmp_path / "a.tar") as archive:
        assert [(i.offset, i.size) for i in items] == [(m.offset_data, m.size) for m in archive]
    plan = planned(str(tmp_path / "a.tar"), tmp_path / "out", 8)
    assert read_bytes(plan.rows(4)) == [bytes([i]) * (100 + i) for i in range(32, 40)]


def test_containers_changed_after_listing_give_read_errors_not_crashes(tmp_path):
    make_tar(tmp_path / "a.tar", {"0.jpg": b"x" * 600, "1.jpg": b"y" * 700, "2.jpg": b"z" * 800})
    pq.write_table(pa.table({"image": pa.array([b"p0", b"p1", b"p2"], pa.binary())}), tmp_path / "b.parquet")
    rows = planned(str(tmp_path), tmp_path / "out", 10).rows(0)
    make_tar(tmp_path / "a.tar", {"0.jpg": b"x" * 600, "1.jpg": b"y" * 9000})  # rewritten: 1 grew, 2 gone
    pq.write_table(pa.table({"image": pa.array([b"p0"], pa.binary())}), tmp_path / "b.parquet")  # rows 1, 2 gone
    data = read_bytes(rows)
    assert data[0] == b"x" * 600
    assert "says 9000 bytes, 700 were listed" in str(data[1]) and "no member header before the planned data" in str(data[2])
    assert all(isinstance(d, Exception) for d in data[3:])


def test_special_files_are_listed_as_errors_and_never_opened(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"a")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "notes").symlink_to(tmp_path / "missing")  # no input extension: not an input
    items = {posixpath.basename(i.uri): i for i in list_items(str(tmp_path))}
    assert sorted(items) == ["a.jpg", "pipe.png"]
    assert (items["pipe.png"].error_kind, items["pipe.png"].error) == ("special_file", "not a regular file: a FIFO (named pipe)")
    listed = [{"source": "file", "uri": str(tmp_path / "pipe.png"), "container": None, "offset": None, "size": None, "error_kind": None}]
    assert "FIFO" in str(read_bytes(listed)[0])  # a file list naming a FIFO: refused at read, not blocked on


def test_plan_is_deterministic_and_sharded(tmp_path):
    (tmp_path / "data").mkdir()
    for i in range(7):
        (tmp_path / "data" / f"{i}.jpg").write_bytes(b"")
    first, second = (planned(str(tmp_path / "data"), tmp_path / name, 3) for name in ("one", "two"))
    first, second = read_plan(first.out, 3), read_plan(second.out, 3)
    assert first.equals(second)
    assert first.column("shard").to_pylist() == [0, 0, 0, 1, 1, 1, 2]
    assert first.column("row").to_pylist() == list(range(7))


def test_missing_dataset_and_list_without_uri_column_are_named(tmp_path):
    with pytest.raises(SourceError, match="no such file or directory"):
        list_items(str(tmp_path / "nope"))
    (tmp_path / "bad.csv").write_text("name,size\na,1\n")
    with pytest.raises(SourceError, match=r"no URI column; expected one of"):
        list_items(str(tmp_path / "bad.csv"))


def test_prefetch_keeps_order_and_reraises():
    assert list(prefetch(iter(range(20)), depth=2)) == list(range(20))

    def failing():
        yield 1
        raise RuntimeError("boom")

    stream = prefetch(failing())
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(stream)


def test_a_tar_on_s3_is_listed_in_few_large_requests_not_one_per_member():
    members = {f"{i:06d}{ext}": data for i in range(1000) for ext, data in ((".jpg", bytes([i % 256]) * 100), (".txt", b"a caption"))}
    requests: list[tuple[str, str]] = []
    with loopback_s3("bucket", requests) as options:
        fs = fsspec.filesystem("s3", **options)
        for name in ("a", "b"):
            buffer = io.BytesIO()
            make_tar(buffer, members)
            fs.pipe(f"bucket/tars/{name}.tar", buffer.getvalue())
        del requests[:]
        single = list_items("s3://bucket/tars/a.tar", options)
        assert len(single) == 1000 and len(requests) <= 3, requests  # the size, then the headers in one read
        del requests[:]
        folder = list_items("s3://bucket/tars", options)
        assert len(folder) == 2000
        reads = [path for method, path in requests if path.endswith(".tar")]
        assert sorted(reads) == ["/bucket/tars/a.tar", "/bucket/tars/b.tar"], requests  # sizes from the folder listing
        assert read_bytes([dict(folder[-1].__dict__)], options) == [bytes([999 % 256]) * 100]


def test_a_file_list_is_listed_in_byte_ranges_each_line_in_exactly_one(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "LIST_BYTES_PER_INPUT", 37)  # ranges that cut lines anywhere
    uris = [f"s3://bucket/images/{i:04d}{'x' * (i % 7)}.jpg" for i in range(60)]
    (tmp_path / "list.txt").write_text("".join(f"{u}\n" for u in uris))
    (tmp_path / "list.csv").write_text("key,url\n" + "".join(f"k{i},{u}\n" for i, u in enumerate(uris)))
    units = list(dataset_inputs(str(tmp_path / "list.txt")))
    assert len(units) > 20 and [u.start for u in units] == list(range(0, (tmp_path / "list.txt").stat().st_size, 37))
    assert [uri for unit in units for uri in list_input(unit).column("uri").to_pylist()] == uris
    assert [(i.image_id, i.uri) for i in list_items(str(tmp_path / "list.csv"))] == [(f"k{i}", u) for i, u in enumerate(uris)]


def test_plan_rows_of_shards_across_parts_row_groups_and_the_gap_before_appended_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "PART_ROW_GROUP", 4)
    monkeypatch.setattr(listing, "FILES_PER_INPUT", 7)
    for i in range(17):
        (tmp_path / f"{i:02d}.jpg").write_bytes(b"")
    plan = planned(str(tmp_path), tmp_path / "out", 5)  # parts of 7, 7, 3 items: shards cross them
    assert plan.index.counts.tolist() == [7, 7, 3] and plan.index.shard_counts.tolist() == [5, 5, 5, 2]
    assert [[r["uri"][-6:] for r in plan.rows(s)] for s in range(4)] == [[f"{i:02d}.jpg" for i in range(s * 5, min(17, s * 5 + 5))] for s in range(4)]
    assert [r["row"] for r in plan.rows(2)] == [10, 11, 12, 13, 14] and {r["shard"] for r in plan.rows(2)} == {2}
    grown = plan.index.extended([{"path": "x/part-000000.parquet", "input": "new", "kind": "files", "first_row": 20, "count": 6, "errors": 0}])
    assert grown.size == 26 and grown.shards == 6 and grown.shard_counts.tolist() == [5, 5, 5, 2, 5, 1]  # rows 17..19: no item
    assert grown.spans(3) == [(2, 1, 3)] and grown.spans(4) == [(3, 0, 5)] and grown.images_in([3, 4, 5]) == 8
