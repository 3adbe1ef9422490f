"""SRT engine costs: aggregation overhead, separable vs naive chain, early stop.

    python -m bench.bench_srt            # ViT-S/16, random init (the cost does not depend on weights)

Every figure is a ratio of two things measured side by side in this one run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp

import torch

from bench.results import median_seconds, peak_rss_delta_mb, table, write_section
from pipeline.engine.aggregation import pad_for_shifts, translate
from pipeline.engine.reference import srt_naive
from pipeline.engine.shifts import grid_shifts
from pipeline.engine.srt import SRT
from pipeline.extraction.weights import load_vit


def inputs(size: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def overhead_rows(vit, radius: int, batch_size: int) -> list[list[object]]:
    """SRT time / time of the same views through bare forward_features, in the same micro-batches."""
    rows = []
    shifts = grid_shifts(radius)
    for size in (224, 448):
        images = inputs(size)
        padded, pad = pad_for_shifts(images, shifts, "reflect")
        views = torch.stack([translate(padded[0], pad, d, (size, size)) for d in shifts])
        chunks = views.split(batch_size)

        def bare() -> None:
            with torch.no_grad():
                for chunk in chunks:
                    vit.model.forward_features(chunk)

        bare_s = median_seconds(bare)
        for stride in (vit.patch_size, 4):
            srt = SRT(vit, shifts=shifts, stride=stride, batch_size=batch_size)
            srt_s = median_seconds(lambda: srt(images))
            target = 1.05 if stride == vit.patch_size else 1.10
            ratio = srt_s / bare_s
            rows.append([f"{size}²", stride, len(shifts), f"{bare_s:.3f}", f"{srt_s:.3f}", f"**{ratio:.3f}**", f"≤ {target}", "yes" if ratio <= target else "no"])
    return rows


def _probe(variant: str, model: str, size: int, radius: int, queue: mp.Queue) -> None:
    """Child process: time and peak memory of one way of computing SRT at stride 4."""
    torch.set_num_threads(2)
    vit = load_vit(model, device="cpu")
    images, shifts = inputs(size), grid_shifts(radius)
    if variant == "naive":
        run = lambda: srt_naive(vit, images, layer=-1, shifts=shifts, stride=4, boundary="reflect")  # noqa: E731
    else:
        srt = SRT(vit, shifts=shifts, stride=4, batch_size=int(variant.split("=")[1]))
        run = lambda: srt(images)  # noqa: E731
    run()  # warm-up outside the memory probe, so lazy allocations are not counted
    seconds = median_seconds(run, repeats=1, warmup=0)
    queue.put((seconds, peak_rss_delta_mb(run)))


def naive_rows(model: str, radius: int, batch_size: int) -> list[list[object]]:
    context = mp.get_context("spawn")
    rows = []
    for size in (224, 448):
        measured = {}
        for variant in ("naive", "batch=1", f"batch={batch_size}"):
            queue = context.Queue()
            child = context.Process(target=_probe, args=(variant, model, size, radius, queue))
            child.start()
            measured[variant] = queue.get()
            child.join()
        naive_s, naive_mb = measured["naive"]
        for variant in ("batch=1", f"batch={batch_size}"):
            seconds, mb = measured[variant]
            rows.append([f"{size}²", f"separable, {variant}", f"{seconds:.2f}", f"{mb:.0f}", f"{naive_s:.2f}", f"{naive_mb:.0f}", f"**{seconds / naive_s:.3f}**", f"**{mb / naive_mb:.3f}**"])
    return rows


def max_difference_to_naive(vit, size: int, radius: int, batch_size: int) -> float:
    images, shifts = inputs(size), grid_shifts(radius)
    fast = SRT(vit, shifts=shifts, stride=4, batch_size=batch_size)(images)[-1]
    slow = srt_naive(vit, images, layer=-1, shifts=shifts, stride=4, boundary="reflect")
    return (fast - slow).abs().max().item()


def early_stop_rows(vit, radius: int, batch_size: int) -> list[list[object]]:
    images, shifts = inputs(224), grid_shifts(radius)
    full = median_seconds(lambda: SRT(vit, layers=(-1,), shifts=shifts, batch_size=batch_size)(images))
    rows = []
    for layer in (5, 2):
        part = median_seconds(lambda: SRT(vit, layers=(layer,), shifts=shifts, batch_size=batch_size)(images))
        bound = (layer + 2) / vit.depth + 0.05
        rows.append([f"block {layer} (runs {layer + 1} of {vit.depth})", f"{part:.3f}", f"{full:.3f}", f"**{part / full:.3f}**", f"≤ {bound:.3f}", "yes" if part / full <= bound else "no"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--radius", type=int, default=2, help="grid radius of the shift set (25 views at 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="views per forward pass")
    args = parser.parse_args()
    torch.set_num_threads(2)
    vit = load_vit(args.model, device="cpu")

    overhead = table(
        ["input", "stride", "views", "bare forward s", "SRT s", "SRT / bare", "target", "met"],
        overhead_rows(vit, args.radius, args.batch_size),
    )
    naive_radius = 1
    diff = max_difference_to_naive(vit, 448, naive_radius, args.batch_size)
    naive = table(
        ["input", "engine", "engine s", "engine peak MB", "naive s", "naive peak MB", "time ratio", "memory ratio"],
        naive_rows(args.model, naive_radius, args.batch_size),
    )
    early = table(["tap", "tap s", "full pass s", "ratio", "target", "met"], early_stop_rows(vit, args.radius, args.batch_size))
    write_section(
        "srt",
        f"SRT engine: {args.model}, random init, one image",
        f"""
### Aggregation overhead
SRT (views cut from one padded image, forward to the last block with final norm, separable
aggregation) against `forward_features` on the same pre-built views in the same micro-batches
of {args.batch_size}: grid radius {args.radius}.

{overhead}

### Separable aggregation against the naive full-resolution chain (stride 4)
Same output (max |difference| at 448²: {diff:.1e}), grid radius {naive_radius} (9 views). The naive
chain (`pipeline/engine/reference.py`) upsamples every view to pixels, translates back, accumulates the
C×H×W field and pools; it runs one view per forward pass, so "batch=1" is the like-for-like row.
Peak memory: resident-set growth during the call, each variant in a fresh process.

{naive}

### Early stop
Time of a tap at an inner block over a last-block tap, same views (224², radius {args.radius}).
Target: blocks run / depth plus one block of slack (patch embedding, aggregation) plus 5%.

{early}
""",
    )


if __name__ == "__main__":
    main()
