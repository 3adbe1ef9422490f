"""Pictures of what SRT does: original | plain ViT features | SRT features, per image, as PNG.

    python jobs/visualize.py --store out/samples.zarr --out out/samples.png
    python jobs/visualize.py --store s3://b/feats.zarr --image-id cat --image-id dog --out cats.png --pretrained

The SRT maps are read from the store; the plain maps are computed with the store's own model on
the same model input (one view, token stride). Both are projected to RGB by one PCA.
"""

from __future__ import annotations

import argparse
import sys

import fsspec

from pipeline.commands import CommandParser, add_store_flags
from pipeline.store.reader import FeatureStore
from pipeline.tasks.pictures import render


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--store", required=True, help="feature store URI")
    parser.add_argument("--out", required=True, help="PNG path or URI")
    parser.add_argument("--image-id", action="append", default=[], help="images to show: image_id, file name or URI (repeatable; default: the first 4 ok images)")
    add_store_flags(parser, weights_for="for the plain maps")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        store = FeatureStore.open(args.store, args.storage_options)
        ok = [r["image_id"] for r in store.manifest.to_pylist() if r["status"] == "ok"]
        picture = render(store, args.image_id or ok[:4], pretrained=args.pretrained, weights=args.weights, layer=args.layer, storage_options=args.storage_options)
    except (ValueError, FileNotFoundError, KeyError) as error:
        parser.error(str(error))
    with fsspec.open(args.out, "wb", **args.storage_options) as handle:
        picture.save(handle, format="PNG")
    print(f"picture     {args.out}  (original | plain ViT features | SRT features, one PCA)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
