"""Semi-supervised video object segmentation (DAVIS-2017) by label propagation from a feature store.

    python jobs/extract.py --dataset davis/JPEGImages/480p --resize aspect --image-size 480 --out davis.zarr ...
    python jobs/propagate.py --store davis.zarr --davis davis --split val --out results/davis

    python jobs/propagate.py --score-only results/other-method --davis davis --split val

Writes the DAVIS results layout (<out>/<video>/<frame>.png), prints J&F per object and overall
and saves them as <out>/global_results-<split>.csv and <out>/per-sequence_results-<split>.csv,
scored as the official semi-supervised evaluation scores them. Plain features (a store extracted
with --shifts 0,0 --stride <patch>) and SRT features at any stride work alike. --score-only
scores a results folder of any method with the same code, writing its CSVs into that folder.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys

import fsspec
from tqdm import tqdm

from pipeline.commands import CommandParser, add_store_flags
from pipeline.store.reader import FeatureStore
from pipeline.tasks.segmentation.davis import DavisLayout, VideoResult, propagate_davis, score_results, summarize
from pipeline.tasks.segmentation.propagation import PropagationSettings


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
    """Print and save the scores in the official evaluation's tables (its CSV names, columns and
    three decimals)."""
    per_object = [
        {"Sequence": f"{r.video}_{obj}", "J-Mean": f"{s['J-Mean']:.3f}", "F-Mean": f"{s['F-Mean']:.3f}"}
        for r in results if r.scores for obj, s in r.scores.items()
    ]  # fmt: skip
    if not per_object:
        print("scores      none: the videos have no annotations beyond the first frame")
        return
    print(f"{'sequence':<28} {'J':>7} {'F':>7}")
    for row in per_object:
        print(f"{row['Sequence']:<28} {row['J-Mean']:>7} {row['F-Mean']:>7}")
    overall = summarize(results)
    print("  ".join(f"{k} {v:.3f}" for k, v in overall.items()))
    write_csv(f"{out}/global_results-{split}.csv", [{k: f"{v:.3f}" for k, v in overall.items()}], storage_options)
    write_csv(f"{out}/per-sequence_results-{split}.csv", per_object, storage_options)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--store", help="feature store extracted from the frames (--resize aspect)")
    parser.add_argument("--davis", required=True, help="DAVIS-2017 root (ImageSets, JPEGImages, Annotations)")
    parser.add_argument("--split", default="val", help="ImageSets/2017/<split>.txt (default: val)")
    parser.add_argument("--video", action="append", default=[], help="only these videos (default: the whole split)")
    parser.add_argument("--out", help="results folder URI")
    parser.add_argument("--score-only", metavar="RESULTS", help="score this results folder (any method's, DAVIS layout) instead of propagating; needs neither --store nor --out")
    defaults = PropagationSettings()
    parser.add_argument("--n-last-frames", type=count(0), default=defaults.n_last_frames, help="previous frames in the context, beside the first (default: %(default)s)")
    parser.add_argument("--size-mask-neighborhood", type=count(0), default=defaults.neighborhood, help="half side of the square window of context cells, in feature cells; 0: no window (default: %(default)s)")
    parser.add_argument("--topk", type=count(1), default=defaults.topk, help="context cells kept per query cell (default: %(default)s)")
    parser.add_argument("--temperature", type=positive_float, default=defaults.temperature, help="affinity exp(cos / temperature) (default: %(default)s)")
    add_store_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.score_only is None and not (args.store and args.out):
        parser.error("--store and --out are required, unless --score-only names a results folder")
    try:
        layout = DavisLayout(args.davis, args.storage_options)
        videos = args.video or layout.videos(args.split)
        if args.score_only is None:
            settings = PropagationSettings(args.temperature, args.n_last_frames, args.size_mask_neighborhood, args.topk)
            store = FeatureStore.open(args.store, args.storage_options)
            store.layer_index(args.layer)
    except (ValueError, FileNotFoundError, KeyError) as error:
        parser.error(str(error))
    out = (args.score_only or args.out).rstrip("/")
    if args.score_only is None:
        work, desc = propagate_davis(store, layout, videos, out, settings, args.layer), "propagate"
    else:
        work, desc = score_results(layout, out, videos), "score"
    results = []
    try:
        for result in tqdm(work, total=len(videos), unit="video", desc=desc):
            results.append(result)
    except (FileNotFoundError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.score_only is None:
        frames, seconds = sum(r.frames - 1 for r in results), sum(r.seconds for r in results)
        print(f"propagated  {frames} frames of {len(results)} videos, {1000 * seconds / max(frames, 1):.1f} ms per frame")
    report(results, out, args.split, args.storage_options)
    return 0


if __name__ == "__main__":
    sys.exit(main())
