"""The path around the model, measured without a GPU: the whole extraction job with a near-free
stand-in for the ViT (everything else real: read, decode, SRT aggregation, fp16 conversion, Zarr
writes, manifest commits), against decoding alone.

    python -m bench.bench_dataplane [--images 384] [--shard-size 32]

On a GPU, ViT-S/16 at 224² eats 600-2,000 images/s with 16 views, so the rest of the job must keep
up. The stand-in keeps the real model's output shapes (ViT-S/16: 384 channels) and costs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import tarfile
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.instruments import LOCK_RATE, THREAD_GROUPS, ThreadCPU, lock_sampled, on_first_load
from bench.results import imagenet_like, loopback_s3, table, write_section
from pipeline.engine import pca
from pipeline.engine.aggregation import PartialSum, SRTOutput
from pipeline.engine.models import TokenMap, ViT
from pipeline.engine.srt import SRT
from pipeline.extraction import device_decoding
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.images import (
    DECODERS,
    Encoded,
    ImagePolicy,
    Prepared,
    as_input,
    encoded,
    input_geometry,
    prepare,
)
from pipeline.extraction.planning import plan_dataset, thread_map
from pipeline.extraction.reading import read_bytes
from pipeline.extraction.runner import plan_job, preflight, run_local
from pipeline.extraction.weights import load_vit
from pipeline.extraction.worker import ShardWorker
from pipeline.store.plan import PlanReader

MODEL = "vit_small_patch16_224"


def stand_in(vit: ViT) -> ViT:
    """The model with its forward pass replaced by one pixel per token, of the right output shapes
    (a view of the input: no arithmetic, so what is measured is the rest of the job)."""
    def forward_taps(images: torch.Tensor, taps, *, norm: bool) -> dict:
        patch = vit.patch_size
        grid = images[:, :1, patch // 2 :: patch, patch // 2 :: patch].expand(-1, vit.embed_dim, -1, -1)
        prefix = grid.new_zeros(images.shape[0], vit.facts.num_prefix_tokens, vit.embed_dim)
        return {tap: TokenMap(grid, prefix) for tap in taps}

    vit.forward_taps = forward_taps
    return vit


@contextlib.contextmanager
def engine_on_device() -> Iterator[None]:
    """Replace the workers' whole SRT computation (cutting views, the model, the aggregation) by
    sums of the right shapes, fixed random values, as if it ran on a GPU: what is left is the host's
    path (read, decode, finalize, fp16, Zarr writes, manifest commits). Restored on exit."""
    computed: dict[tuple, PartialSum] = {}

    def compute(self: ShardWorker, loaded, shifts=None, progress=None) -> list[PartialSum]:
        partials = []
        for members in loaded.groups(self.images_per_call):
            height, width = loaded.inputs[members[0]].input_size
            key = (len(members), height, width)
            if key not in computed:
                cells = (len(members), self.vit.embed_dim, height // self.srt.stride, width // self.srt.stride)
                random = torch.randn(cells, generator=torch.Generator().manual_seed(0))
                prefix = torch.randn(len(members), self.vit.facts.num_prefix_tokens, self.vit.embed_dim)
                computed[key] = PartialSum(
                    dense=dict.fromkeys(self.srt.taps, random), prefix=dict.fromkeys(self.srt.taps, prefix),
                    coverage=torch.ones(cells[0], *cells[2:]), n_views=torch.full((len(members),), len(self.srt.shifts)),
                )  # fmt: skip
            partials.append(computed[key])
        return partials

    original = ShardWorker.compute
    ShardWorker.compute = compute
    try:
        yield
    finally:
        ShardWorker.compute = original


@contextlib.contextmanager
def beside_a_gpu() -> Iterator[None]:
    """`engine_on_device`, and also what a GPU does after the sums precomputed: finalize, the PCA
    fit and projection (--pca-dims) and the cast to the stored fp16, so the host only copies the stored
    dtype into the shard's blocks (as from a GPU) and does the rest: read, decode, store writes,
    manifest commits. With `--decoder device` the batch decode and resize are the GPU's too: the
    host reads and parses headers. Restored on exit."""
    finished: dict[tuple, SRTOutput] = {}
    projected: dict[tuple, torch.Tensor] = {}
    pixels: dict[tuple, torch.Tensor] = {}

    def decoded_on_gpu(items: list[Encoded], policy: ImagePolicy, device: torch.device) -> list[Prepared]:
        inputs = []
        for item in items:
            size, region = input_geometry(item.height, item.width, policy)
            if size not in pixels:
                pixels[size] = torch.zeros((3, *size), dtype=torch.uint8)
            inputs.append(as_input(pixels[size], policy, (item.height, item.width), region))
        return inputs

    def finalize(self: SRT, partial: PartialSum) -> SRTOutput:
        tap = next(iter(partial.dense))
        key = tuple(partial.dense[tap].shape) + tuple(partial.prefix[tap].shape)
        if key not in finished:
            dense, prefix = partial.dense[tap].half(), partial.prefix[tap].half()
            finished[key] = SRTOutput(
                dense=dict.fromkeys(partial.dense, dense), prefix=dict.fromkeys(partial.dense, prefix),
                pooled=dict.fromkeys(partial.dense, dense.mean(dim=(2, 3))), n_views=partial.n_views,
            )  # fmt: skip
        return finished[key]

    def reduced(self: ShardWorker, tap, dense: torch.Tensor) -> torch.Tensor:
        if not self.resolved.config.pca_dims:
            return dense
        key = (tuple(dense.shape), self.resolved.config.pca_dims)
        if key not in projected:
            projected[key] = dense[:, : self.resolved.config.pca_dims].clone()
        return projected[key]

    def fit(maps: list[torch.Tensor], dims: int, seed: int = 0) -> pca.Basis:
        channels = maps[0].shape[1]
        return pca.Basis(mean=torch.zeros(channels), components=torch.eye(channels)[:dims], explained=1.0)

    originals = SRT.finalize, ShardWorker._reduced, pca.fit, device_decoding.decode_batches
    SRT.finalize, ShardWorker._reduced, pca.fit, device_decoding.decode_batches = finalize, reduced, fit, decoded_on_gpu
    try:
        with engine_on_device():
            yield
    finally:
        SRT.finalize, ShardWorker._reduced, pca.fit, device_decoding.decode_batches = originals


def decode_rate(blobs: list[bytes], size: int, threads: int, decoder: str = "pillow") -> float:
    policy = ImagePolicy(size, "square", 16, (0.5,) * 3, (0.5,) * 3, decoder=decoder)
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        list(pool.map(lambda blob: prepare(blob, policy), blobs))
    return len(blobs) / (time.perf_counter() - started)


def job_rate(dataset: str, out: str, size: int, shard_size: int, vit: ViT, storage_options: dict | None = None) -> tuple[float, float]:
    """(images/s of the whole job, start-up (planning, model) left out; process CPU ms per image)."""
    config = ExtractConfig(dataset=dataset, out=out, model=MODEL, image_size=size, stride=8, shard_size=shard_size, storage_options=storage_options or {})
    cpu = time.process_time()
    summary = run_local(config, vit=vit)
    return summary.images / (summary.seconds - summary.startup_seconds), 1000 * (time.process_time() - cpu) / summary.images


def bytes_read() -> int:
    """Bytes this process has read through system calls so far (Linux /proc/self/io rchar)."""
    return int(next(line.split()[1] for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar:")))


def tar_read_ratio(tar: Path, out: str, shard_size: int, vit: ViT) -> float:
    """Bytes read by the whole job (listing included) over the tar's size."""
    before = bytes_read()
    job_rate(str(tar), out, 224, shard_size, vit)
    return (bytes_read() - before) / tar.stat().st_size


def tar_shard_read_times(root: Path, members: int, shard_size: int) -> tuple[float, float]:
    """Seconds to read the first and the last shard of a tar of `members` small members (medians of 5)."""
    tar = root / "long.tar"
    with tarfile.open(tar, "w") as archive:
        for i in range(members):
            payload = i.to_bytes(4, "little") * 512
            info = tarfile.TarInfo(f"{i:06d}.jpg")
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    out = str(root / "long-plan")
    _, index = plan_dataset(str(tar), out, shard_size, {}, thread_map(1))
    plan = PlanReader(out, index)
    last = (members - 1) // shard_size

    def seconds(shard: int) -> float:
        rows = plan.rows(shard)
        times = []
        for _ in range(5):
            started = time.perf_counter()
            read_bytes(rows, {})
            times.append(time.perf_counter() - started)
        return float(np.median(times))

    return seconds(0), seconds(last)


def decode_in_job(dataset: str, out: str, shard_size: int, vit: ViT, threads: int) -> float:
    """Images/s of the job's load stage (read + decode on the worker's pool) with `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # the worker sizes its decode pool from it
    try:
        job = plan_job(preflight(ExtractConfig(dataset=dataset, out=out, model=MODEL, image_size=224, stride=8, shard_size=shard_size)))
        worker = ShardWorker(job.resolved, job.reader(), vit=vit)
        started = time.perf_counter()
        for shard in job.pending:
            worker.load(int(shard))
        return job.images_in(job.pending) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous)


# Common photo sizes of ImageNet and COCO: about half have an odd margin around a square centre crop.
PHOTO_SIZES = ((500, 375), (500, 333), (640, 480), (375, 500), (640, 427), (500, 334))
OUTPUT_CHOICES = {"dense maps + vectors": {}, "--outputs cls,pooled": {"outputs": ("cls", "pooled")}, "--pca-dims 64": {"pca_dims": 64}}
SINGLE_THREADS = ("zarr event loop", "main", "prefetch (read)")  # one thread each, however many cores
COPY = "of main: copy into blocks (DMA beside a GPU)"
COMPARED = 384  # photos whose inputs are compared across decoders (the device decoder's resize is slow on a CPU)


def mixed_photos(count: int) -> list[bytes]:
    """ImageNet-like JPEGs in the common photo sizes, in turn."""
    per_size = -(-count // len(PHOTO_SIZES))
    batches = [imagenet_like(per_size, seed=i, width=w, height=h) for i, (w, h) in enumerate(PHOTO_SIZES)]
    return [batch[i] for i in range(per_size) for batch in batches][:count]


class HostRun(NamedTuple):
    """A job beside a GPU, counted from its first shard's load: images/s, process CPU ms per image,
    CPU seconds by thread group, CPU seconds of the busiest thread more cores cannot share, and
    (from a run of its own, `lock=True`) ms per image that a thread holds the interpreter lock."""

    rate: float
    cpu_ms: float
    groups: dict[str, float]
    single: float
    lock_ms: float | None = None


def host_job(dataset: str, out: str, size: int, shard_size: int, vit: ViT, decoder: str, extra: dict, lock: bool = False) -> HostRun:
    """The job beside a GPU (`beside_a_gpu`), counted from the first shard's load (planning and
    start-up left out). The main thread's copies of the stored values into the shard's blocks are
    counted apart ("copy into blocks"), and left out of the busiest thread: beside a GPU they are
    the GPU's DMA into pinned buffers, here a CPU memcpy. With `lock`, py-spy samples the
    interpreter lock from the first load on (its own CPU then counts too: use only `lock_ms`)."""
    config = ExtractConfig(dataset=dataset, out=out, model=MODEL, image_size=size, stride=8, shard_size=shard_size, decoder=decoder, **extra)
    threads, marks, copying = ThreadCPU(), [], [0.0]
    original_fill = ShardWorker._fill

    def mark() -> None:
        marks.append(time.process_time())
        threads.mark()

    def fill(self: ShardWorker, *args: object) -> list[str]:
        started = time.thread_time()
        paths = original_fill(self, *args)
        copying[0] += time.thread_time() - started
        return paths

    ShardWorker._fill = fill
    try:
        with beside_a_gpu(), threads, on_first_load(mark), lock_sampled(lock) as held:
            summary = run_local(config, vit=vit)
            cpu = time.process_time() - marks[0]
    finally:
        ShardWorker._fill = original_fill
    groups, busiest, own = threads.by_group()
    busiest["main"] = busiest.get("main", 0.0) - copying[0]
    groups[COPY] = copying[0]
    single = max(busiest.get(group, 0.0) for group in SINGLE_THREADS)
    rate = summary.images / (summary.seconds - summary.startup_seconds)
    return HostRun(rate, 1000 * (cpu - own) / summary.images, groups, single, held.ms_per(summary.images))


MEMORY = "/dev/shm" if os.path.isdir("/dev/shm") else None  # stores in memory: the host's work, not this VM's disk


def host_row(dataset: str, size: int, shard_size: int, decoder: str, extra: dict, lock: bool = False) -> HostRun:
    """`host_job` in a process of its own, with its own stand-in model (what `spawn` can run),
    writing a store in memory that is removed afterwards."""
    with tempfile.TemporaryDirectory(dir=MEMORY) as tmp:
        return host_job(dataset, f"{tmp}/out.zarr", size, shard_size, stand_in(load_vit(MODEL, device="cpu")), decoder, extra, lock)


def pinned_rate(core: int, dataset: str, size: int, shard_size: int, decoder: str) -> float:
    """Images/s of one process on one core (decode pool of one thread), beside a GPU."""
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    return host_row(dataset, size, shard_size, decoder, {}).rate


def process_scaling(datasets: list[str], size: int, shard_size: int, decoder: str) -> tuple[float, float]:
    """(images/s of one process on one core, of two processes on two cores together)."""
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        one = pool.apply(pinned_rate, (0, datasets[0], size, shard_size, decoder))
    with spawn.Pool(2) as pool:
        runs = [pool.apply_async(pinned_rate, (core, datasets[core], size, shard_size, decoder)) for core in (0, 1)]
        two = sum(run.get() for run in runs)
    return one, two


def beside_a_gpu_section(images: int, shard_size: int) -> None:
    """The host's work beside a GPU: CPU per image by thread group, per decoder, size and output
    choice; the decoders side by side; one process on one core against two on two."""
    blobs = mixed_photos(images)
    # Each job runs in a fresh process that loads torch with OpenMP's workers sleeping when idle:
    # beside a GPU the copy of the stored values into the shard's blocks is a device-to-host copy,
    # not a CPU torch op whose OpenMP team spins after every copy (which would be counted here).
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    spawn = multiprocessing.get_context("spawn")
    groups = [label for _, label in THREAD_GROUPS] + [COPY, "other (torch, blosc, Ray)"]
    rows, decoders, scaling, dense_cpu, dense_lock = [], [], [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        datasets = []
        for copy in ("a", "b"):
            (root / copy).mkdir()
            for i, blob in enumerate(blobs):
                (root / copy / f"{i:06d}.jpg").write_bytes(blob)
            datasets.append(str(root / copy))
        for size in (224, 448):
            policies = {name: ImagePolicy(size, "square", 16, (0.5,) * 3, (0.5,) * 3, decoder=name) for name in DECODERS}
            compared = blobs[:COMPARED]
            inputs = {name: [prepare(blob, policies[name]) for blob in compared] for name in ("pillow", "torch")}
            inputs["device"] = device_decoding.decode_batches([encoded(blob, policies["device"]) for blob in compared], policies["device"], torch.device("cpu"))
            difference = {name: np.mean([(a.pixels.int() - b.pixels.int()).abs().float().mean().item() for a, b in zip(inputs[name], inputs["pillow"])]) for name in ("torch", "device")}
            rates = {name: decode_rate(blobs, size, 1, name) for name in ("pillow", "torch")}
            started = time.process_time()
            headers = [encoded(blob, policies["device"]) for blob in blobs]
            header_ms = 1000 * (time.process_time() - started) / len(headers)
            decoders.append([f"{size}²", f"{rates['pillow']:.0f}", f"{rates['torch']:.0f}", f"**{rates['torch'] / rates['pillow']:.2f}**", f"{difference['torch']:.4f}", f"{header_ms:.3f}", f"{difference['device']:.4f}"])
            print(decoders[-1])
            for decoder in DECODERS:
                for label, extra in OUTPUT_CHOICES.items():
                    with spawn.Pool(1) as pool:
                        run = pool.apply(host_row, (datasets[0], size, shard_size, decoder, extra))
                    with spawn.Pool(1) as pool:
                        lock_ms = pool.apply(host_row, (datasets[0], size, shard_size, decoder, extra, True)).lock_ms
                    rows.append([
                        f"{size}²", decoder, label, f"{run.rate:.0f}", f"**{run.cpu_ms:.2f}**", *(f"{1000 * run.groups.get(g, 0.0) / images:.2f}" for g in groups),
                        f"**{1000 * run.single / images:.2f}**", f"**{lock_ms:.2f}**", f"{1000 / lock_ms:.0f}",
                    ])  # fmt: skip
                    if size == 224 and not extra:
                        dense_cpu[decoder], dense_lock[decoder] = run.cpu_ms, lock_ms
                    print(rows[-1])
            for decoder in DECODERS:
                one, two = process_scaling(datasets, size, shard_size, decoder)
                scaling.append([f"{size}²", decoder, f"{one:.0f}", f"{two:.0f}", f"**{two / one:.2f}**"])
                print(scaling[-1])
    body = f"""
What a GPU actor's host does per image, measured on CPU exactly as it runs beside a GPU: the real
job (`run_local`) with everything a GPU does precomputed (`beside_a_gpu`: the SRT sums, finalize,
the PCA projection, the fp16 cast, and with `--decoder device` the batch decode and resize), so
the host reads, decodes (pillow, torch) or parses JPEG headers (device), copies the stored fp16
values into the shard's blocks, writes the store and commits manifests; each job in a process of its own
with OpenMP's idle workers sleeping (`OMP_WAIT_POLICY=PASSIVE`), as no CPU torch op runs there
beside a GPU. {images} ImageNet-like JPEGs in the
common photo sizes ({', '.join(f'{w}×{h}' for w, h in PHOTO_SIZES)}: half of them have an odd
margin around the square centre crop), ViT-S/16 shapes, stride 8, lz4, {shard_size} images per
shard, stores written to memory (`/dev/shm`: the host's work, not this VM's disk; each removed
after its job). CPU is counted from the first shard's load (planning and start-up left out), per thread
from /proc; "busiest single thread" is the busiest of the threads more cores cannot share (zarr's
event loop, main, the reading prefetch thread), which caps one process's rate at 1000 / that many
images/s. "Interpreter lock" is the time per image that some thread of the job holds Python's
interpreter lock, sampled by py-spy (`record --gil`, {LOCK_RATE} samples a second, in a second run
of the same job): whatever the cores, one process runs no faster than 1000 / that many images/s
("one process's ceiling"); on this 2-core machine a thread can lose its core while it holds the
lock, so the figure errs high. Main's copy of the stored values into the shard's blocks is shown apart and left out of
that figure: beside a GPU it is the GPU's DMA into pinned, reused host buffers, here a CPU memcpy
(part of it on torch's OpenMP threads, under "other").

{table(["input", "decoder", "stored", "images/s", "process CPU ms per image", *(f"{g} ms" for g in groups), "busiest single thread ms", "interpreter lock ms", "one process's ceiling, images/s"], rows)}

Why `--decoder auto` is `device` beside a GPU and `torch` elsewhere: beside a GPU the host spends
{dense_cpu["device"]:.2f} CPU ms per image at 224² (dense maps + vectors) with the device decoder, against
{dense_cpu["torch"]:.2f} with torch's and {dense_cpu["pillow"]:.2f} with Pillow's (the GPU's share of decoding is
bench_gpu's to measure); on a CPU there is no device to hand decoding to, and torch's decoder is
never slower than Pillow's (below).

Why one actor per GPU: with the device decoder, one process holds the interpreter lock
{dense_lock["device"]:.2f} ms per image at 224² with dense maps, a ceiling of {1000 / dense_lock["device"]:.0f} images/s however
many cores it has ({1000 / dense_lock["torch"]:.0f} with torch's decoder, {1000 / dense_lock["pillow"]:.0f} with Pillow's), against the
1,020 images/s that ViT-S/16 computes alone on an H100 at 224² with 16 views (the GPU section);
and its threads spread over cores (one process against two, below).

The decoders side by side, one thread, the same photos to the square 224² or 448² input
(decode, orient, resize, channels first); the inputs' mean absolute difference from Pillow's (on
the first {COMPARED} photos) in
levels of 255 (TorchCodec decodes bit-identically to Pillow; torch's antialiased bicubic is
Pillow's filter, and a crop box that starts between pixels is resized by Pillow on the torch path;
the device decoder resizes with Pillow's integer arithmetic, here run on the CPU device). Beside a
GPU the device decoder's host share is the header parse, CPU ms per image:

{table(["input", "Pillow images/s", "torch images/s", "torch / Pillow", "torch: mean |difference| (of 255)", "device: host ms per image (header)", "device: mean |difference| (of 255)"], decoders)}

One process on one core against two processes on two cores (each pinned, decode pool of one
thread, dense maps + vectors), each with its own copy of the photos and its own store:

{table(["input", "decoder", "1 process, 1 core, images/s", "2 processes, 2 cores, images/s", "2 / 1"], scaling)}
"""
    write_section("dataplane-beside-gpu", "Data plane beside a GPU: the host's work per image (CPU)", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--beside-a-gpu", action="store_true", help="only the host's work beside a GPU: CPU by thread, decoders, processes")
    args = parser.parse_args()
    if args.beside_a_gpu:
        return beside_a_gpu_section(args.images, args.shard_size)
    cores = torch.get_num_threads()
    blobs = imagenet_like(args.images)
    vit = stand_in(load_vit(MODEL, device="cpu"))
    rows, host = [], []
    with tempfile.TemporaryDirectory() as tmp, loopback_s3("bench") as s3:
        root = Path(tmp)
        (root / "images").mkdir()
        with tarfile.open(root / "shard-000.tar", "w") as archive:
            for i, blob in enumerate(blobs):
                (root / "images" / f"{i:06d}.jpg").write_bytes(blob)
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(blob)
                archive.addfile(info, io.BytesIO(blob))
        pq.write_table(pa.table({"key": [f"{i:06d}" for i in range(len(blobs))], "image": pa.array(blobs, pa.binary())}), root / "images.parquet", row_group_size=args.shard_size)
        s3fs = fsspec.filesystem("s3", **s3)
        for name in ("shard-000.tar", "images.parquet"):
            s3fs.put(str(root / name), f"bench/{name}")
        s3fs.put(str(root / "images"), "bench/images", recursive=True)
        sources = {
            "directory": (str(root / "images"), None), "tar": (str(root / "shard-000.tar"), None), "parquet": (str(root / "images.parquet"), None),
            "S3 objects": ("s3://bench/images", s3), "S3 tar": ("s3://bench/shard-000.tar", s3), "S3 parquet": ("s3://bench/images.parquet", s3),
        }  # fmt: skip
        for size in (224, 448):
            one, many = decode_rate(blobs, size, 1), decode_rate(blobs, size, cores)
            for source, (dataset, options) in sources.items():
                rate, cpu_ms = job_rate(dataset, str(root / f"{source.replace(' ', '-')}-{size}.zarr"), size, args.shard_size, vit, options)
                rows.append([f"{size}²", source, f"{one:.0f}", f"{many:.0f}", f"{rate:.0f}", f"**{rate / (one * cores):.2f}**", f"{cpu_ms:.2f}"])
                print(rows[-1])
            with engine_on_device():
                for source in ("directory", "tar"):
                    rate, cpu_ms = job_rate(sources[source][0], str(root / f"host-{source}-{size}.zarr"), size, args.shard_size, vit)
                    host.append([f"{size}²", source, f"{one * cores:.0f}", f"{rate:.0f}", f"**{rate / (one * cores):.2f}**", f"{cpu_ms:.2f}", f"{cpu_ms:.1f}", f"{2 * cpu_ms:.1f}"])
                    print(host[-1])
        read_ratio = tar_read_ratio(root / "shard-000.tar", str(root / "tar-bytes.zarr"), args.shard_size, vit)
        first, last = tar_shard_read_times(root, 10_000, args.shard_size)
        in_job = [decode_in_job(str(root / "images"), str(root / f"load-{n}.zarr"), args.shard_size, vit, n) for n in (1, 2)]
    body = f"""
{args.images} ImageNet-like JPEGs (500 × 375, {np.mean([len(b) for b in blobs]) / 1024:.0f} KiB), {MODEL} shapes (384 channels) with a
near-free stand-in for the model, 16 random shifts, stride 8, dense maps + vectors stored (fp16,
lz4), {args.shard_size} images per shard, `run_local` on {cores} threads (decode overlaps the rest).
"job / (decode × cores)" is the whole job's rate over decoding alone on one core times the cores.
This shared machine's speed varies between runs (decoding on one thread ran at 254 to 430 images/s
at 224² on different days): compare rates within one run, as the ratios do.
"CPU ms per image" is the process's CPU time per image. Here the SRT aggregation (and cutting
16 shifted views per image) runs on the CPU too, and it is most of the gap, at 448² nearly all of
it (56 × 56 cells of 384 channels per view); on CUDA it runs on the GPU, and bench_gpu measures
the host's share there.

{table(["input", "source", "decode images/s, 1 thread", f"decode images/s, {cores} threads", "whole job images/s", "job / (decode × cores)", "CPU ms per image"], rows)}

The host's path alone: the same jobs with the whole SRT computation (views, model, aggregation)
replaced by precomputed sums of the right shapes, as when it runs on a GPU; what remains is read,
decode, finalize, fp16, Zarr writes (lz4) and manifest commits, on this machine's cores. The
cores a GPU actor needs at a rate follow from its CPU ms per image (here finalize and the fp16 cast
still run on the CPU; on CUDA they run on the GPU, and bench_gpu measures that host's own figure):

{table(["input", "source", "decode × cores, images/s", "host path, images/s", "host / (decode × cores)", "CPU ms per image", "cores at 1,000 images/s", "cores at 2,000 images/s"], host)}

S3 is moto's server on loopback (no network latency), run inside the bench's process: its CPU
is counted in those rows and it takes the same 2 cores from the job, so the S3 rows understate
what a real endpoint allows. The driver's cost per unit is bench_driver's; GPU figures are bench_gpu's.

Containers and decode inside a job:
- bytes read from a tar during a whole job (listing included) over the tar's size: **{read_ratio:.3f}** (target ≤ 1.1);
- reading a shard of a 10,000-member tar by its planned byte ranges: first shard {1000 * first:.2f} ms,
  last shard {1000 * last:.2f} ms, last / first **{last / first:.2f}** (target ≤ 1.5);
- the job's load stage (read + decode of every shard on the worker's pool): {in_job[0]:.0f} images/s on
  1 thread, {in_job[1]:.0f} on 2, **{in_job[1] / in_job[0]:.2f}×** (target ≥ 1.7).
"""
    write_section("dataplane", "Data plane: the job around a near-free model (CPU)", body)


if __name__ == "__main__":
    main()
