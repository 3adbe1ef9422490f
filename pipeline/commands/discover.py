"""Single-object discovery on a feature store (TokenCut or LOST), with CorLoc against boxes.

    python jobs/extract.py --dataset VOC2007/JPEGImages --resize aspect --image-size 480 \\
        --keys -1 --out voc07.zarr ...
    python jobs/discover.py --store voc07.zarr --boxes VOC2007/Annotations --method lost,tokencut

One box per image from the stored attention keys of the last tapped block (`--features keys`,
extract with `--keys -1`; TokenCut's and LOST's choice) or the block output (`--features dense`),
mapped onto the original pixels. With --boxes (a folder of VOC XML annotations or a CSV of
image,x0,y0,x1,y1) it prints CorLoc: the share of images whose box has IoU >= 0.5 with a
ground-truth box, as LOST's evaluation counts it. --out writes boxes.csv and scores.json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import PurePosixPath

import fsspec
import numpy as np
from tqdm import tqdm

from pipeline.commands import CommandParser, add_store_flags
from pipeline.extraction.flags import parse_words
from pipeline.store.reader import FeatureStore
from pipeline.tasks.discovery import K_PATCHES, METHODS, box_to_original, discover, localized, mask_box
from pipeline.tasks.shared.ground_truth import BoxTruth
from pipeline.tasks.shared.tokencut import EPS, TAU


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--store", required=True, help="feature store URI")
    parser.add_argument("--method", type=parse_words, default=("tokencut",), help=f"comma-separated, of {', '.join(METHODS)} (default: tokencut)")
    parser.add_argument("--boxes", default=None, help="ground-truth boxes: a folder of VOC .xml annotations, or a .csv with columns image,x0,y0,x1,y1")
    parser.add_argument("--no-hard", action="store_true", help="leave out truncated and difficult VOC objects, and images left without boxes (LOST's --no_hard)")
    parser.add_argument("--out", default=None, help="folder URI for boxes.csv and scores.json")
    parser.add_argument("--features", default="keys", choices=("keys", "dense"), help="stored attention keys (default) or block outputs")
    parser.add_argument("--k-patches", type=int, default=K_PATCHES, help="LOST: lowest-degree cells that may vote for the seed's box (default: %(default)s)")
    parser.add_argument("--tau", type=float, default=TAU, help="TokenCut: cosine above which two cells are joined (default: %(default)s)")
    parser.add_argument("--eps", type=float, default=EPS, help="TokenCut: weight of the other pairs (default: %(default)s)")
    add_store_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keys = args.features == "keys"
    if unknown := [m for m in args.method if m not in METHODS]:
        parser.error(f"--method: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.k_patches < 1:
        parser.error(f"--k-patches: must be a positive integer, got {args.k_patches}")
    if not 0 < args.eps < 1:
        parser.error(f"--eps: must be between 0 and 1, got {args.eps}")
    try:
        store = FeatureStore.open(args.store, args.storage_options)
        store.layer_index(args.layer, keys)
    except KeyError as error:
        parser.error(f"--features {args.features}: {error.args[0]}" + (" (extract with --keys -1, or pass --features dense)" if keys else ""))
    except (ValueError, FileNotFoundError) as error:
        parser.error(f"--store: {error}")
    try:
        truth = BoxTruth(args.boxes, args.no_hard, args.storage_options) if args.boxes else None
    except (ValueError, OSError) as error:
        parser.error(f"--boxes: {error}")

    store.warn_if_cropped()
    records = [r for r in store.manifest.to_pylist() if r["status"] == "ok"]
    found = {m: 0 for m in args.method}
    scored, unmatched, skipped, failed = 0, 0, 0, {m: 0 for m in args.method}
    lines = []
    for record in tqdm(records, unit="img", desc="discover"):
        name = PurePosixPath(record["uri"].split("#")[-1]).stem
        boxes = truth.boxes.get(name) if truth else None
        if truth and boxes is None:
            unmatched += 1
        if truth and boxes is not None and args.no_hard and len(boxes) == 0:
            skipped += 1
            boxes = None
        features = store.dense(record["image_id"], args.layer, keys).astype(np.float32)
        t = store.transform(record["image_id"])
        for method in args.method:
            try:
                cells = mask_box(discover(features, method, k_patches=args.k_patches, tau=args.tau, eps=args.eps).mask)
                box = box_to_original(cells, stride=t["stride"], input_size=t["input_size"], region=t["region"], height=t["height"], width=t["width"])
            except ValueError:
                box, failed[method] = None, failed[method] + 1
            if boxes is not None:
                found[method] += localized(box, boxes)
            lines.append([record["image_id"], name, method, *(f"{v:.2f}" for v in box or ())])
        scored += boxes is not None
    print(f"discovered  {len(records)} images by {', '.join(args.method)} on {'attention keys' if keys else 'block outputs'} at stride {store.config['stride']}")
    for method, count in failed.items():
        if count:
            print(f"no box      {count} images by {method} (the seed had no positive votes); they count as misses")
    if truth and unmatched:
        print(f"no boxes    {unmatched} images have no ground-truth boxes in {args.boxes} and were not scored")
    if skipped:
        print(f"no hard     {skipped} images were left with no box by --no-hard and were not scored")
    scores = {m: {"CorLoc": found[m] / scored if scored else float("nan"), "localized": found[m], "images": scored} for m in args.method}
    for method, score in scores.items():
        if truth:
            print(f"CorLoc      {method:<9} {100 * score['CorLoc']:.2f}  ({score['localized']}/{score['images']})")
    if args.out:
        out = args.out.rstrip("/")
        text = io.StringIO()
        csv.writer(text).writerows([["image_id", "image", "method", "x0", "y0", "x1", "y1"], *lines])
        with fsspec.open(f"{out}/boxes.csv", "w", **args.storage_options) as handle:
            handle.write(text.getvalue())
        if truth:
            with fsspec.open(f"{out}/scores.json", "w", **args.storage_options) as handle:
                json.dump(scores, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
