"""Unsupervised salient-region segmentation (TokenCut) of a feature store's images, with maxF and IoU.

    python jobs/extract.py --dataset ecssd/images --resize aspect --keys -1 --out ecssd.zarr ...
    python jobs/saliency.py --store ecssd.zarr --masks ecssd/ground_truth_mask --out results/ecssd

TokenCut runs on the stored attention keys of the last tapped block (`--features keys`, extract
with `--keys -1`) or on the stored block output (`--features dense`). With `--masks` (binary PNGs
named like the images: ECSSD, DUTS) it prints maxF and IoU; with `--out` it writes the predicted
masks as PNGs and the scores as scores.json.
"""

from __future__ import annotations

import argparse
import json
import sys

import fsspec
import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.commands import CommandParser, add_store_flags
from pipeline.store.reader import FeatureStore
from pipeline.tasks.segmentation.saliency import MaskFolder, scores, segment_store
from pipeline.tasks.shared.tokencut import EPS, TAU


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--store", required=True, help="feature store URI")
    parser.add_argument("--masks", default=None, help="folder of ground-truth PNG masks named like the images")
    parser.add_argument("--out", default=None, help="folder URI for predicted masks and scores.json")
    parser.add_argument("--features", default="keys", choices=("keys", "dense"), help="stored attention keys (TokenCut's choice, default) or block outputs")
    parser.add_argument("--tau", type=float, default=TAU, help="cosine above which two cells are joined (default: %(default)s)")
    parser.add_argument("--eps", type=float, default=EPS, help="weight of the other pairs (default: %(default)s)")
    add_store_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keys = args.features == "keys"
    try:
        store = FeatureStore.open(args.store, args.storage_options)
        store.layer_index(args.layer, keys)
        truth = MaskFolder(args.masks, args.storage_options) if args.masks else None
    except KeyError as error:
        hint = " (extract with --keys -1, or pass --features dense)" if keys else ""
        parser.error(f"--features {args.features}: {error.args[0]}{hint}")
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    if not 0 < args.eps < 1:
        parser.error(f"--eps: must be between 0 and 1, got {args.eps}")
    out = args.out.rstrip("/") if args.out else None
    predictions, truths, missing = [], [], []
    ok = sum(r["status"] == "ok" for r in store.manifest.to_pylist())
    for result in tqdm(segment_store(store, keys=keys, layer=args.layer, tau=args.tau, eps=args.eps), total=ok, unit="img", desc="tokencut"):
        if out:
            with fsspec.open(f"{out}/{result.name}.png", "wb", **args.storage_options) as handle:
                Image.fromarray((result.mask * 255).astype(np.uint8)).save(handle, format="PNG")
        if truth is None:
            continue
        if result.name not in truth.paths:
            missing.append(result.name)
            continue
        predictions.append(result.mask)
        truths.append(truth.read(result.name))
    print(f"segmented   {ok} images with TokenCut on {'attention keys' if keys else 'block outputs'} at stride {store.config['stride']}")
    if missing:
        print(f"no mask     {len(missing)} images (e.g. {missing[0]}) were not scored")
    if predictions:
        result = scores(predictions, truths)
        print(f"maxF        {result['maxF']:.4f}\nIoU         {result['IoU']:.4f}\naccuracy    {result['accuracy']:.4f}   ({result['images']} images)")
        if out:
            with fsspec.open(f"{out}/scores.json", "w", **args.storage_options) as handle:
                json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
