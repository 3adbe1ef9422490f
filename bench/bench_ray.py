"""The Ray runner's costs: end to end against the model alone, and scaling over CPU actors.

    python -m bench.bench_ray

Same images (the bundled photos and crops of them), same model (ViT-S/16, random init), same
shifts (grid radius 2, 25 views), stride 8, in one run on a local Ray instance.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import ray
import torch

from bench.results import sample_photos, table, write_section
from pipeline.engine.srt import SRT
from pipeline.extraction.config import ExtractConfig, resolve
from pipeline.extraction.distributed import run_ray
from pipeline.extraction.images import ImagePolicy, prepare
from pipeline.extraction.runner import run_local
from pipeline.extraction.weights import load_vit
from pipeline.extraction.worker import MAX_IMAGES_PER_CALL


def model_only_images_per_second(cfg: ExtractConfig, blobs: list[bytes], threads: int) -> float:
    """The engine on pre-decoded tensors already in memory: no reading, decoding or writing."""
    torch.set_num_threads(threads)
    resolved = resolve(cfg)
    vit = load_vit(cfg.model, device="cpu")
    policy = ImagePolicy(cfg.image_size, cfg.resize, vit.patch_size, vit.mean, vit.std)
    images = torch.stack([prepare(b, policy).tensor for b in blobs])
    srt = SRT(vit, layers=resolved.layers, shifts=resolved.shifts, stride=resolved.stride, batch_size=cfg.batch_size)
    srt(images[:1])  # warm-up
    start = time.perf_counter()
    for group in images.split(MAX_IMAGES_PER_CALL):
        srt(group)
    return len(blobs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--copies", type=int, default=5, help="crops per bundled photo (24 images at 5)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    blobs = sample_photos(args.copies)
    with tempfile.TemporaryDirectory() as folder:
        dataset = Path(folder) / "images"
        dataset.mkdir()
        for i, blob in enumerate(blobs):
            (dataset / f"{i:03d}.jpg").write_bytes(blob)

        def cfg(name: str, **flags) -> ExtractConfig:
            return ExtractConfig(dataset=str(dataset), out=f"{folder}/{name}.zarr", model=args.model, radius=2, stride=8, shard_size=4, **flags)

        model_only = model_only_images_per_second(cfg("x"), blobs, threads=2)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            one_actor = run_ray(cfg("ray1", num_actors=1, cpus_per_actor=2, split_shifts="1"))
            one_thread = run_ray(cfg("ray1x1", num_actors=1, cpus_per_actor=1, split_shifts="1"))
            two_threads = run_ray(cfg("ray2x1", num_actors=2, cpus_per_actor=1, split_shifts="1"))
        finally:
            ray.shutdown()
        torch.set_num_threads(2)
        local = run_local(cfg("local"))

    def rate(summary) -> float:
        return summary.images / summary.seconds

    def busy_rate(summary) -> float:
        return summary.images / (summary.seconds - summary.startup_seconds)

    end_to_end = table(
        ["run", "images/s, whole job", "ratio to model only", "images/s after start-up", "ratio to model only"],
        [
            ["model only (decoded tensors in memory)", f"{model_only:.2f}", "1", "", ""],
            ["Ray job, 1 actor × 2 threads", f"{rate(one_actor):.2f}", f"**{rate(one_actor) / model_only:.3f}**", f"{busy_rate(one_actor):.2f}", f"**{busy_rate(one_actor) / model_only:.3f}**"],
            ["in-process (`--local`), 2 threads", f"{rate(local):.2f}", f"{rate(local) / model_only:.3f}", f"{busy_rate(local):.2f}", f"{busy_rate(local) / model_only:.3f}"],
        ],
    )
    scaling = table(
        ["actors × threads", "images/s, whole job", "images/s after start-up"],
        [["1 × 1", f"{rate(one_thread):.2f}", f"{busy_rate(one_thread):.2f}"], ["2 × 1", f"{rate(two_threads):.2f}", f"{busy_rate(two_threads):.2f}"]],
    )
    write_section(
        "ray",
        f"Ray runner: {args.model}, random init, {len(blobs)} images, 25 views, stride 8",
        f"""
"Whole job" is wall time from the call to the summary: planning, actor start and model load
included, a fixed cost of a few seconds that a real dataset amortizes. "After start-up" leaves
out that fixed cost (measured as the time until every actor has its model loaded): the steady
state of a long job.

{end_to_end}

Target: end to end ≥ 0.9 of the model alone.

Scaling from one CPU actor of one thread to two (this machine has 2 cores):
whole job **{rate(two_threads) / rate(one_thread):.2f}×**, after start-up **{busy_rate(two_threads) / busy_rate(one_thread):.2f}×**.

{scaling}
""",
    )


if __name__ == "__main__":
    main()
