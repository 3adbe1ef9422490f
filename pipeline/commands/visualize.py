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
import torch

from pipeline.commands import add_store_flags
from pipeline.engine.srt import SRT
from pipeline.extraction.images import prepare
from pipeline.extraction.reading import read_bytes
from pipeline.extraction.weights import load_store_model
from pipeline.extraction.worker import build_engine
from pipeline.store.reader import FeatureStore
from pipeline.tasks.pictures import grid, pca_rgb, tile

TILE = 256


def render(store: FeatureStore, image_ids: list[str], *, pretrained=False, weights=None, layer=None, storage_options=None):
    """The picture (a PIL image): one row per image, three tiles per row."""
    options = storage_options or {}
    config = store.config
    image_ids = [store.find(name) for name in image_ids]
    for image_id in image_ids:
        store.transform(image_id)  # an error row fails here, saying why it has no features
    layer = store.layer_index(layer)
    vit = load_store_model(config["model"], config["weights"], pretrained=pretrained, weights=weights, storage_options=options)
    _, policy = build_engine(vit, config, batch_size=1)
    plain_engine = SRT(vit, layers=(layer,), shifts=[(0, 0)], stride=vit.patch_size, norm=config["norm"])
    plan = store.plan()
    originals, maps = [], []
    for image_id, blob in zip(image_ids, read_bytes([plan[i] for i in image_ids], options)):
        if isinstance(blob, Exception):
            raise ValueError(f"cannot read {image_id}: {blob}")
        prepared = prepare(blob, policy)
        shown = prepared.tensor * torch.tensor(policy.std).view(3, 1, 1) + torch.tensor(policy.mean).view(3, 1, 1)
        originals.append(shown.clamp(0, 1).permute(1, 2, 0).numpy())
        maps += [plain_engine(prepared.tensor[None])[layer][0].numpy(), store.dense(image_id, layer).astype("float32")]
    colours = pca_rgb(maps)
    rows = []
    for i, original in enumerate(originals):
        height, width = original.shape[:2]
        size = (TILE, round(TILE * height / width))
        rows.append([tile(original, size), tile(colours[2 * i], size), tile(colours[2 * i + 1], size)])
    return grid(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
