"""The extraction job on a GPU: is it model-bound, and what does the rest cost?

    python -m bench.bench_gpu [--images 2000]      # needs CUDA

For ViT-S/16 (random init: speed does not depend on weights), 16 random shifts, stride 8, with
the device defaults (`--precision auto`, `--batch-size 0`), on ImageNet-like JPEGs in a folder:
- the model alone (SRT forward passes and aggregation on decoded inputs already on the GPU);
- the whole job (`run_local`: read, decode, copy, SRT, fp16, Zarr writes, manifest commits) with
  the real model, and the GPU's utilization meanwhile, decoding on the GPU (`--decoder device`)
  and on the host's threads (`--decoder torch`);
- `--decoder device` alone: images/s, and its inputs against Pillow's;
- the whole job with a near-free stand-in model: the data plane's own ceiling on this machine,
  and the CPU it spends per image, hence the cores a GPU actor needs at 1,000 and 2,000 images/s,
  and the interpreter lock it holds per image, hence one process's ceiling (py-spy);
- features on the GPU against the CPU (fp32), and bf16 autocast against fp32; whole stores too.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import multiprocessing as mp
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.bench_dataplane import MODEL, decode_rate, stand_in
from bench.instruments import lock_sampled, lock_sampling_problem
from bench.results import imagenet_like, median_seconds, table, write_section
from pipeline.engine.accelerator import view_budget
from pipeline.engine.shifts import random_shifts
from pipeline.engine.srt import SRT
from pipeline.extraction import jpeg_library
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.device_decoding import decode_batches
from pipeline.extraction.images import ImagePolicy, encoded, prepare
from pipeline.extraction.runner import run_local
from pipeline.extraction.weights import load_vit
from pipeline.extraction.worker import images_per_call
from pipeline.store.reader import FeatureStore

VIEWS = 16
STRIDE = 8


class Utilization:
    """GPU utilization (%) sampled every 0.1 s while the block runs (NVML through torch)."""

    def __enter__(self) -> Utilization:
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.1):
            self.samples.append(torch.cuda.utilization())

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def mean(self) -> float:
        busy = self.samples[len(self.samples) // 10 :]  # the start-up tenth (planning, model load) left out
        return float(np.mean(busy)) if busy else float("nan")


def model_only_rate(vit, size: int, blobs: list[bytes]) -> tuple[float, int]:
    """Images/s of SRT on decoded inputs already on the GPU, in the job's calls; and views per pass."""
    srt = SRT(vit, shifts=random_shifts(VIEWS, vit.patch_size), stride=STRIDE, autocast=torch.bfloat16)
    srt.batch_size = view_budget(srt, 0, (size, size)).views((size, size), vit.patch_size)
    policy = ImagePolicy(size, "square", vit.patch_size, (0.5,) * 3, (0.5,) * 3)
    per_call = images_per_call(0, VIEWS)
    images = torch.stack([prepare(blob, policy).tensor for blob in blobs[: 4 * per_call]]).cuda()
    calls = images.split(per_call)
    seconds = median_seconds(lambda: [srt.partial(call) for call in calls])
    return len(images) / seconds, srt.batch_size


def job(folder: Path, out: Path, size: int, vit, decoder: str, lock: bool = False) -> tuple[float, float, float, float | None]:
    """(images/s after start-up, mean GPU utilization %, CPU ms per image, and with `lock` ms per
    image some thread held the interpreter lock from the first shard's load on) of the whole job."""
    config = ExtractConfig(dataset=str(folder), out=str(out), model=MODEL, image_size=size, stride=STRIDE, decoder=decoder)
    cpu = time.process_time()
    with Utilization() as gpu, lock_sampled(lock) as held:
        summary = run_local(config, vit=vit)
    cpu_ms = 1000 * (time.process_time() - cpu) / summary.images
    return summary.images / (summary.seconds - summary.startup_seconds), gpu.mean, cpu_ms, held.ms_per(summary.images)


def agreement(vit_gpu, vit_cpu) -> tuple[float, float]:
    """Relative (Frobenius) difference of SRT maps: GPU fp32 vs CPU fp32, GPU bf16 vs GPU fp32."""
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    shifts = random_shifts(VIEWS, vit_cpu.patch_size)

    def srt_map(vit, autocast=None) -> torch.Tensor:
        return SRT(vit, shifts=shifts, stride=STRIDE, autocast=autocast)(images)[-1].float().cpu()

    cpu, gpu, bf16 = srt_map(vit_cpu), srt_map(vit_gpu), srt_map(vit_gpu, torch.bfloat16)
    return float((gpu - cpu).norm() / cpu.norm()), float((bf16 - gpu).norm() / gpu.norm())


def store_agreement(root: Path, blobs: list[bytes]) -> list[list[object]]:
    """Whole jobs on CUDA (fp32) and on CPU over the same photos of mixed shapes, for the resize
    policies whose inputs differ in size (several size buckets) or are padded (validity masks):
    the largest difference between the stored maps, relative to the largest stored value."""
    folder = root / "mixed"
    folder.mkdir()
    for i, blob in enumerate(blobs[:12]):
        image = Image.open(io.BytesIO(blob))
        crop = image.crop((0, 0, 500 - 40 * (i % 4), 375 - 90 * (i % 3)))  # four widths, three heights
        crop.save(folder / f"{i:02d}.jpg", quality=90)
    rows = []
    for resize, boundary in (("aspect", "reflect"), ("pad", "zeros")):
        stores = {}
        for device in ("cuda", "cpu"):
            out = root / f"agree-{resize}-{device}.zarr"
            config = ExtractConfig(dataset=str(folder), out=str(out), model=MODEL, image_size=224, stride=STRIDE, resize=resize, boundary=boundary, precision="fp32", shard_size=4)
            run_local(config, device=device)
            stores[device] = FeatureStore.open(str(out))
        ids = stores["cpu"].manifest.column("image_id").to_pylist()
        gpu = [stores["cuda"].dense(i).astype(np.float32) for i in ids]
        cpu = [stores["cpu"].dense(i).astype(np.float32) for i in ids]
        worst = max(np.abs(g - c).max() for g, c in zip(gpu, cpu)) / max(np.abs(c).max() for c in cpu)
        buckets = len(set(stores["cpu"].manifest.column("bucket").to_pylist()))
        rows.append([resize, len(ids), buckets, f"{worst:.1e}"])
    return rows


def device_decoding(blobs: list[bytes], size: int, batch: int = 32) -> list[object]:
    """`--decoder device` alone on the GPU, in a shard's batches: images/s (headers parsed on the
    host included, as a worker does), and the inputs' mean and largest difference from Pillow's
    (nvJPEG's decode against libjpeg-turbo's; the resize is Pillow's arithmetic either way)."""
    policy = ImagePolicy(size, "square", 16, (0.5,) * 3, (0.5,) * 3, decoder="device")
    cuda = torch.device("cuda")

    def decode_all() -> list:
        inputs = []
        for start in range(0, len(blobs), batch):
            inputs += decode_batches([encoded(blob, policy) for blob in blobs[start : start + batch]], policy, cuda)
        torch.cuda.synchronize()
        return inputs

    rate = len(blobs) / median_seconds(decode_all)
    pillow = [prepare(blob, dataclasses.replace(policy, decoder="pillow")).pixels for blob in blobs]
    differences = [(item.pixels.cpu().int() - expected.int()).abs() for item, expected in zip(decode_all(), pillow)]
    return [f"{size}²", f"{rate:.0f}", f"{np.mean([d.float().mean().item() for d in differences]):.4f}", max(int(d.max()) for d in differences)]


def _one_thread() -> None:
    torch.set_num_threads(1)


def _decoded(job: tuple[bytes, ImagePolicy]) -> np.ndarray:
    return prepare(*job).pixels.numpy()  # numpy, so processes return it by plain pickling


def decode_scaling(blobs: list[bytes], size: int, workers: list[int]) -> list[list[object]]:
    """Images/s of decoding on a pool of threads against a pool of processes (spawned, one torch
    thread each, results pickled back): what the workers' decode pool should be made of."""
    jobs = [(blob, ImagePolicy(size, "square", 16, (0.5,) * 3, (0.5,) * 3)) for blob in blobs]
    rows = []
    for count in workers:
        rates = []
        for pool in (ThreadPoolExecutor(count), ProcessPoolExecutor(count, mp_context=mp.get_context("spawn"), initializer=_one_thread)):
            with pool:
                list(pool.map(_decoded, jobs[: 4 * count]))  # start-up and warm-up
                started = time.perf_counter()
                list(pool.map(_decoded, jobs, chunksize=4))
                rates.append(len(jobs) / (time.perf_counter() - started))
        rows.append([f"{size}²", count, f"{rates[0]:.0f}", f"{rates[1]:.0f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu needs CUDA; bench_dataplane measures the CPU path")
    if jpeg_library.LIBRARY is None:
        raise SystemExit(f"no JPEG library loads here, so nothing decodes on the GPU: {jpeg_library.LIBRARY_ERROR}")
    cannot_sample = lock_sampling_problem()
    if cannot_sample:
        print(f"no interpreter lock figures: {cannot_sample}")
    cores = torch.get_num_threads()
    unique = imagenet_like(min(args.images, 400))
    vit = load_vit(MODEL, device="cuda")
    gpu_vs_cpu, bf16_vs_fp32 = agreement(vit, load_vit(MODEL, device="cpu"))
    scaling = [row for size in (224, 448) for row in decode_scaling(unique, size, sorted({1, 2, 4, 8, cores}))]
    threads_win = sum(float(threads) >= float(processes) for *_, threads, processes in scaling)
    verdict = (
        f"threads match or beat processes in {threads_win} of {len(scaling)} rows (Pillow releases the GIL while it "
        "decodes and resizes; a process pays a hop and pickling per image)"
    )
    rows, needs, decoding = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        agreeing = store_agreement(Path(tmp), unique)
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i in range(args.images):  # repeated bytes under distinct names: decoding costs the same
            (folder / f"{i:06d}.jpg").write_bytes(unique[i % len(unique)])
        for size in (224, 448):
            model_rate, views = model_only_rate(vit, size, unique)
            decoding.append(device_decoding(unique, size))
            for decoder in ("device", "torch"):
                real_rate, busy, real_cpu, _ = job(folder, Path(tmp) / f"real-{size}-{decoder}.zarr", size, vit, decoder)
                free = stand_in(load_vit(MODEL, device="cuda"))
                free_rate, _, free_cpu, _ = job(folder, Path(tmp) / f"free-{size}-{decoder}.zarr", size, free, decoder)
                lock_ms = None if cannot_sample else job(folder, Path(tmp) / f"lock-{size}-{decoder}.zarr", size, free, decoder, lock=True)[-1]
                one, many = decode_rate(unique, size, 1, "torch"), decode_rate(unique, size, cores, "torch")
                rows.append([f"{size}²", decoder, views, f"{model_rate:.0f}", f"{real_rate:.0f}", f"**{real_rate / model_rate:.2f}**", f"{busy:.0f}",
                             f"{free_rate:.0f}", f"{free_cpu:.1f}", f"**{lock_ms:.2f}**" if lock_ms else "—", f"{1000 / lock_ms:.0f}" if lock_ms else "—", f"{one:.0f}", f"{many:.0f}"])  # fmt: skip
                needs.append([f"{size}²", decoder, f"{free_cpu:.1f}", f"{free_cpu:.1f}", f"{2 * free_cpu:.1f}"])
                print(rows[-1])
    body = f"""
ViT-S/16 (random init), {VIEWS} random shifts, stride {STRIDE}, dense maps + vectors stored (fp16,
lz4), device defaults (bf16 autocast, views per pass fitted to free memory), {args.images} ImageNet-like
JPEGs (500 × 375) in a local folder, `run_local` with {cores} decode threads, 32 images per shard.
"model only": SRT calls on inputs already decoded and on the GPU. "job / model": the whole job's
rate over that (1.00 = model-bound), with each decoder: `device` (a shard's JPEGs decoded by
nvJPEG and resized on the GPU; the default beside a GPU) and `torch` (libjpeg-turbo and torch's
resize on the host's decode threads), both through {jpeg_library.LIBRARY.name}. "stand-in job": the same job with a near-free model (the
data plane's own ceiling here); its CPU ms per image is process CPU time over images, and its
interpreter lock the time per image some thread holds it, sampled by py-spy from the first shard's
load on in a run of its own (kernel launches included): one process runs no faster than 1000 / that
many images/s. Decode images/s: the torch decoder on the host's threads, for scale.

{table(["input", "decoder", "views per pass", "model only, images/s", "whole job, images/s", "job / model", "GPU busy %", "stand-in job, images/s", "stand-in CPU ms per image", "stand-in: interpreter lock ms per image", "one process's ceiling, images/s", "host decode images/s, 1 thread", f"host decode images/s, {cores} threads"], rows)}

Cores a GPU actor needs (CPU ms per image of the stand-in job × images/s):

{table(["input", "decoder", "CPU ms per image", "cores at 1,000 images/s", "cores at 2,000 images/s"], needs)}

`--decoder device` alone on the GPU, in batches of 32 (the host's header parse included); the
inputs' difference from Pillow's in levels of 255 (the resize is Pillow's arithmetic bit for bit,
so what differs is nvJPEG's decode against libjpeg-turbo's):

{table(["input", "images/s", "mean |difference|", "largest difference"], decoding)}

Decoding (Pillow decode, EXIF, RGB, resize; 8-bit pixels out) on a pool of threads or of
processes, images/s: {verdict}.

{table(["input", "workers", "threads", "processes"], scaling)}

Agreement: SRT maps on the GPU (fp32) vs the CPU: relative difference {gpu_vs_cpu:.1e}; bf16 autocast
vs fp32 on the GPU: {bf16_vs_fp32:.1e} (the shift aggregation runs in fp32 in both). Whole jobs on
the GPU (fp32, inputs through pinned memory and the copy stream, maps cast to fp16 on the GPU) and
on the CPU, same photos of mixed shapes; largest difference of stored values over the largest value
(fp16 storage rounds at about 5e-4 relative):

{table(["--resize", "images", "size buckets", "max difference"], agreeing)}
"""
    write_section("gpu", "The job on a GPU: model-bound or not", body)


if __name__ == "__main__":
    main()
