"""Semi-supervised video object segmentation (DAVIS-2017) by label propagation from a feature store.

    python jobs/extract.py --dataset davis/JPEGImages/480p --resize aspect --image-size 480 --out davis.zarr ...
    python jobs/propagate.py --store davis.zarr --davis davis --split val --out results/davis

Writes the DAVIS results layout (<out>/<video>/<frame>.png), prints J&F per object and overall
and saves them as <out>/global_results-<split>.csv and <out>/per-sequence_results-<split>.csv.
Plain features (a store extracted with --shifts 0,0 --stride <patch>) and SRT features at any
stride work alike.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import fsspec
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.davis import DavisLayout, VideoResult, propagate_davis, summarize  # noqa: E402
from pipeline.propagation import PropagationSettings  # noqa: E402
from pipeline.store import FeatureStore  # noqa: E402


def count(minimum: int):
    """An argparse type: an integer of at least `minimum` (errors name the flag)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def write_csv(uri: str, rows: list[dict], storage_options: dict) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with fsspec.open(uri, "w", **storage_options) as handle:
        handle.write(text.getvalue())


def report(results: list[VideoResult], out: str, split: str, storage_options: dict) -> None:
    per_object = [
        {"Sequence": f"{r.video}_{obj}", "J-Mean": round(j, 4), "F-Mean": round(f, 4)}
        for r in results if r.scores for obj, (j, f) in r.scores.items()
    ]
    frames = sum(r.frames - 1 for r in results)
    seconds = sum(r.seconds for r in results)
    print(f"propagated  {frames} frames of {len(results)} videos, {1000 * seconds / max(frames, 1):.1f} ms per frame")
    if not per_object:
        print("scores      none: the videos have no annotations beyond the first frame")
        return
    print(f"{'sequence':<28} {'J':>7} {'F':>7}")
    for row in per_object:
        print(f"{row['Sequence']:<28} {row['J-Mean']:>7.3f} {row['F-Mean']:>7.3f}")
    overall = summarize(results)
    print(f"{'J&F':<28} {overall['J&F-Mean']:>7.3f}   (J {overall['J-Mean']:.3f}, F {overall['F-Mean']:.3f})")
    write_csv(f"{out}/global_results-{split}.csv", [{k: round(v, 4) for k, v in overall.items()}], storage_options)
    write_csv(f"{out}/per-sequence_results-{split}.csv", per_object, storage_options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="feature store extracted from the frames (--resize aspect)")
    parser.add_argument("--davis", required=True, help="DAVIS-2017 root (ImageSets, JPEGImages, Annotations)")
    parser.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt (default: val)")
    parser.add_argument("--video", action="append", default=[], help="only these videos (default: the whole split)")
    parser.add_argument("--out", required=True, help="results folder URI")
    parser.add_argument("--layer", type=int, default=None, help="stored layer (default: the store's only layer)")
    defaults = PropagationSettings()
    parser.add_argument("--n-last-frames", type=count(0), default=defaults.n_last_frames, help="previous frames in the context, beside the first (default: %(default)s)")
    parser.add_argument("--size-mask-neighborhood", type=count(0), default=defaults.neighborhood, help="half side of the square window of context cells, in feature cells; 0: no window (default: %(default)s)")
    parser.add_argument("--topk", type=count(1), default=defaults.topk, help="context cells kept per query cell (default: %(default)s)")
    parser.add_argument("--temperature", type=positive_float, default=defaults.temperature, help="affinity exp(cos / temperature) (default: %(default)s)")
    parser.add_argument("--storage-options", type=json.loads, default={}, help="JSON of fsspec storage options")
    args = parser.parse_args(argv)
    try:
        settings = PropagationSettings(args.temperature, args.n_last_frames, args.size_mask_neighborhood, args.topk)
        store = FeatureStore.open(args.store, args.storage_options)
        store.layer_index(args.layer)
        layout = DavisLayout(args.davis, args.storage_options)
        videos = args.video or layout.videos(args.split)
    except (ValueError, FileNotFoundError, KeyError) as error:
        parser.error(str(error))
    out = args.out.rstrip("/")
    results = []
    try:
        for result in tqdm(propagate_davis(store, layout, videos, out, settings, args.layer), total=len(videos), unit="video", desc="propagate"):
            results.append(result)
    except (FileNotFoundError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    report(results, out, args.split, args.storage_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
