"""Store codecs and decode speed: what each codec costs and saves on real SRT features.

    python -m bench.bench_store

Features are SRT maps (ViT-S/16, stride 8, 224², grid radius 1, fp16) of the bundled photos and
crops of them; weights are random init, since no pre-trained weights can be downloaded here
(pass --weights to measure on real ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import fsspec
import numpy as np
import torch
import zarr

from bench.results import imagenet_like, sample_photos, table, write_section
from pipeline.engine.shifts import grid_shifts
from pipeline.engine.srt import SRT
from pipeline.extraction.images import ImagePolicy, prepare
from pipeline.extraction.runner import WRITERS
from pipeline.extraction.weights import load_vit
from pipeline.store.layout import compressors
from pipeline.store.objects import ObjectWriter


def features(vit, blobs: list[bytes]) -> dict[str, np.ndarray]:
    policy = ImagePolicy(224, "square", vit.patch_size, vit.mean, vit.std)
    images = torch.stack([prepare(b, policy).tensor for b in blobs])
    out = SRT(vit, shifts=grid_shifts(1), stride=8).run(images)
    tap = next(iter(out.dense))
    return {
        "dense": out.dense[tap].numpy().astype(np.float16),
        "pooled": out.pooled[tap].numpy().astype(np.float16),
    }


def codec_rows(arrays: dict[str, np.ndarray], shard: int, repeats: int) -> list[list[object]]:
    rows = []
    count = len(arrays["dense"])
    raw = sum(a.nbytes for a in arrays.values())
    for codec in ("none", "zstd", "blosc", "lz4"):
        with tempfile.TemporaryDirectory() as folder:
            group = zarr.open_group(folder, mode="w")
            targets = {
                name: ObjectWriter.of(group.create_array(name, shape=a.shape, chunks=(1, *a.shape[1:]), shards=(shard, *a.shape[1:]), dtype=a.dtype, compressors=compressors(codec), fill_value=0), folder)
                for name, a in arrays.items()
            }
            for name, array in arrays.items():  # warm-up: codec set-up and the first files cost extra
                targets[name].write(0, array[:shard])
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                for name, array in arrays.items():
                    for lo in range(0, count, shard):
                        targets[name].write(lo, array[lo : lo + shard])
            write_s, write_cpu = (time.perf_counter() - start) / repeats, (time.process_time() - cpu) / repeats
            start = time.perf_counter()
            for name in arrays:
                group[name][:]
            read_s = time.perf_counter() - start
            on_disk = fsspec.filesystem("file").du(folder)
        rows.append([codec, f"{on_disk / count / 1024:.1f}", f"{on_disk / raw:.3f}", f"{raw / write_s / 1e6:.0f}", f"{1e3 * write_cpu / count:.2f}", f"{raw / read_s / 1e6:.0f}"])
    return rows


def zarr_io_seconds() -> float:
    """CPU seconds so far of zarr's I/O thread, the one event loop that every synchronous zarr call
    of a process runs on (compression and file writes go to a thread pool, the rest stays there)."""
    thread = next(t for t in threading.enumerate() if t.name == "zarr_io")
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def write_paths() -> list[tuple[str, Callable[[zarr.Array, str], Callable[[int, np.ndarray], None]]]]:
    """(label, make) of each way to write whole shards of an array: `make(array, folder)` gives
    `write(start, block)`. zarrs and tensorstore only where installed (neither is a dependency)."""

    def zarr_python(array: zarr.Array, folder: str) -> Callable[[int, np.ndarray], None]:
        def write(start: int, block: np.ndarray) -> None:
            array[start : start + len(block)] = block

        return write

    def zarrs(array: zarr.Array, folder: str) -> Callable[[int, np.ndarray], None]:
        with zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}):
            return zarr_python(zarr.open_array(f"{folder}/{array.path}", mode="r+"), folder)

    def tensorstore(array: zarr.Array, folder: str) -> Callable[[int, np.ndarray], None]:
        import tensorstore as ts

        opened = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{folder}/{array.path}"}}, open=True).result()

        def write(start: int, block: np.ndarray) -> None:
            opened[start : start + len(block)].write(block).result()

        return write

    paths = [("zarr-python, chunk by chunk", zarr_python)]
    paths += [(f"{name} (installed here for this bench)", make) for name, make in (("zarrs codec pipeline", zarrs), ("tensorstore", tensorstore)) if importlib.util.find_spec(name.split()[0])]
    return paths + [("the store's whole objects (`pipeline.store.objects`)", lambda array, folder: ObjectWriter.of(array, folder).write)]


def writer_rows(dense: np.ndarray, shard: int, shards: int) -> list[list[object]]:
    """WRITERS threads writing `shards` whole shards of dense maps (lz4) at once, as an actor
    commits them, by each write path; the arrays as the store creates them."""
    rows = []
    count = len(dense)
    for label, make in write_paths():
        with tempfile.TemporaryDirectory() as folder:
            group = zarr.open_group(folder, mode="w")
            array = group.create_array("dense", shape=(count * (shards + 1), *dense.shape[1:]), chunks=(1, *dense.shape[1:]), shards=(shard, *dense.shape[1:]), dtype=dense.dtype, compressors=compressors("lz4"), fill_value=0)
            write = make(array, folder)
            write(0, dense)  # warm-up

            started = time.perf_counter(), time.process_time(), zarr_io_seconds()
            with ThreadPoolExecutor(WRITERS) as pool:
                list(pool.map(lambda start: write(start, dense), range(count, count * (shards + 1), count)))
            ended = time.perf_counter(), time.process_time(), zarr_io_seconds()
            stored = zarr.open_array(f"{folder}/dense", mode="r")[count * shards :]
        assert np.array_equal(stored, dense), label
        wall, cpu, loop = (1e3 * (end - start) / (count * shards) for start, end in zip(started, ended))
        rows.append([label, f"{wall:.2f}", f"{cpu:.2f}", f"{loop:.2f}"])
    return rows


def vector_chunk_rows(count: int, shard: int) -> list[list[object]]:
    """Per-image vectors (pooled, cls: 384 fp16 values) chunked one image per chunk vs one shard per chunk."""
    data = np.random.default_rng(0).standard_normal((count, 384)).astype(np.float16)
    rows = []
    for label, chunks, shards in (("one image per chunk, sharded", 1, shard), ("one work shard per chunk", shard, None)):
        with tempfile.TemporaryDirectory() as folder:
            array = zarr.open_group(folder, mode="w").create_array(
                "pooled", shape=data.shape, chunks=(chunks, 384), shards=(shard, 384) if shards else None, dtype="float16", compressors=compressors("blosc"), fill_value=0
            )
            start = time.perf_counter()
            for lo in range(0, count, shard):
                array[lo : lo + shard] = data[lo : lo + shard]
            write_s = time.perf_counter() - start
            start = time.perf_counter()
            array[:]
            read_s = time.perf_counter() - start
        rows.append([label, f"{write_s * 1e6 / count:.1f}", f"{read_s * 1e6 / count:.1f}"])
    return rows


def decode_rows(blobs: list[bytes], repeats: int) -> list[list[object]]:
    """Images/s decoded on 1 and 2 threads of a pool, as `ShardWorker.load` decodes a shard."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    for policy in (ImagePolicy(224, "square", 16, (0.5,) * 3, (0.5,) * 3), ImagePolicy(448, "square", 16, (0.5,) * 3, (0.5,) * 3)):
        rates = []
        for workers in (1, 2):
            with ThreadPoolExecutor(workers) as pool:
                start = time.perf_counter()
                for _ in range(repeats):
                    list(pool.map(lambda blob: prepare(blob, policy), blobs))
                rates.append(len(blobs) * repeats / (time.perf_counter() - start))
        file_kib = np.mean([len(b) for b in blobs]) / 1024
        rows.append([f"{policy.size}² {policy.resize}", len(blobs) * repeats, f"{file_kib:.0f}", f"{rates[0]:.0f}", f"{rates[1]:.0f}", f"**{rates[1] / rates[0]:.2f}**"])
    torch.set_num_threads(threads)
    return rows


def reduced_decode_rows(repeats: int) -> list[list[object]]:
    """Large photos prepared at 224² decoded in full and with --reducing-gap 2 (JPEG DCT scaling),
    one thread: images/s, and how far the 8-bit model inputs differ."""
    full = ImagePolicy(224, "square", 16, (0.5,) * 3, (0.5,) * 3)
    reduced = dataclasses.replace(full, reducing_gap=2.0)
    rows = []
    for width, height in ((1024, 768), (2048, 1536), (4000, 3000)):
        blobs = imagenet_like(2, seed=width, width=width, height=height)
        rates = []
        for policy in (full, reduced):
            start = time.perf_counter()
            for _ in range(repeats):
                for blob in blobs:
                    prepare(blob, policy)
            rates.append(len(blobs) * repeats / (time.perf_counter() - start))
        difference = torch.cat([(prepare(b, full).pixels.int() - prepare(b, reduced).pixels.int()).abs().flatten() for b in blobs]).float()
        rows.append([f"{width} × {height}", f"{np.mean([len(b) for b in blobs]) / 1024:.0f}", f"{rates[0]:.1f}", f"{rates[1]:.1f}", f"**{rates[1] / rates[0]:.1f}×**", f"{difference.mean():.2f}", f"{difference.max():.0f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--copies", type=int, default=7, help="crops per bundled photo (32 images at 7)")
    parser.add_argument("--shard-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    vit = load_vit(args.model, weights=args.weights, device="cpu")
    blobs = sample_photos(args.copies)
    arrays = features(vit, blobs)
    measured = codec_rows(arrays, args.shard_size, repeats=3)
    codecs = table(["codec", "KiB per image", "stored / raw", "write MB/s (raw)", "write CPU ms per image", "read MB/s (raw)"], measured)
    by_codec = {row[0]: row for row in measured}
    cpu_ms = {name: float(row[4]) for name, row in by_codec.items()}
    smaller = 1 - float(by_codec["blosc"][1]) / float(by_codec["lz4"][1])
    writers = writer_rows(arrays["dense"], args.shard_size, shards=24)
    write_path = table(["write path", "wall ms per image", "process CPU ms per image", "zarr event-loop CPU ms per image"], writers)
    by_path = {row[0]: row for row in writers}
    zarr_python, objects = by_path["zarr-python, chunk by chunk"], writers[-1]
    vectors = table(["vector array layout", "µs per image, write", "µs per image, read"], vector_chunk_rows(20_000, args.shard_size))
    decode = table(["policy", "images", "mean file KiB", "images/s, 1 thread", "images/s, 2 threads", "2 / 1"], decode_rows(blobs, repeats=3))
    reduced = table(["photo", "KiB", "full decode, images/s", "--reducing-gap 2, images/s", "speed-up", "mean abs. difference (of 255)", "max abs. difference"], reduced_decode_rows(repeats=3))
    write_section(
        "store",
        f"Store codecs and decoding: {args.model}, {'weights ' + args.weights if args.weights else 'random init'}",
        f"""
{len(blobs)} images (the bundled photos and crops of them); per image a dense SRT map
[{', '.join(map(str, arrays['dense'].shape[1:]))}] and a pooled vector, fp16, one image per chunk,
{args.shard_size} images per Zarr shard, written a shard at a time as the pipeline does, to local disk.
lz4 is blosc-lz4 with bit shuffle, blosc is blosc-zstd (level 3, byte shuffle). Written as the
store writes them (whole Zarr shards encoded by `pipeline.store.objects`). "Write CPU ms per image"
is process CPU time: what a GPU actor's cores pay per image, so at 1,000 images/s also the cores
it needs. Writing costs {cpu_ms["none"]:.2f} ms uncompressed (the most bytes), {cpu_ms["lz4"]:.2f} with lz4 and {cpu_ms["blosc"]:.2f} with blosc-zstd, whose store is
{smaller:.0%} smaller than lz4's: lz4 is the default, blosc the choice where storage costs more than CPU.

{codecs}

One actor's writers: {WRITERS} threads writing 24 shards of dense maps (lz4) at once, as an actor
commits them, each path writing the same arrays, read back equal. zarr-python runs everything of
a write but compression and file I/O on its one event-loop thread per process, which every writer
thread waits on; the store encodes each work shard's Zarr shard itself (numcodecs, which releases
the interpreter lock) and puts it in one call, the same bytes zarr-python writes
(tests/test_store_objects.py): {float(zarr_python[2]) / float(objects[2]):.1f}x less process CPU and
{float(zarr_python[3]) / max(float(objects[3]), 0.01):.0f}x less of the event-loop thread per image than zarr-python here.

{write_path}

Per-image vectors (20,000 × 384 fp16, blosc), written a shard at a time: zarr's cost per chunk
dwarfs a 768-byte chunk, so the store gives vectors one chunk per work shard (dense maps, hundreds
of KiB per image, keep one image per chunk).

{vectors}

Decoding (read bytes already in memory; Pillow decode, EXIF, RGB, resize, normalize) on a pool of
1 and 2 threads, as the workers decode a shard (Pillow releases the GIL while it decodes and resizes):

{decode}

Large photos (ImageNet-like content, JPEG quality 90) to 224² model inputs on one thread, decoded in
full and with `--reducing-gap 2`: the JPEG decoder's DCT scaling (1/2, 1/4, 1/8) wherever the shorter
side keeps at least 2 × 224 pixels, then the same bicubic resampling; the 8-bit inputs compared:

{reduced}
""",
    )


if __name__ == "__main__":
    main()
