"""Query a retrieval index by image_id of its store, or with new image files.

    python jobs/query.py --index out/samples.index --image-id 54d59ef0582be3cd --k 5
    python jobs/query.py --index out/samples.index --image photo.jpg --json

New images go through the store's own model, layers, shifts and image policy; give the weights
the store was made with (--pretrained or --weights; random-init stores reuse their seed).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

import fsspec
import numpy as np

from pipeline.commands import CommandParser, add_store_flags
from pipeline.extraction.images import ImageError
from pipeline.extraction.weights import load_store_model
from pipeline.store.reader import FeatureStore
from pipeline.store.uris import one_line
from pipeline.tasks.retrieval.index import DescriptorSpec, describe_images, load_index, vectors_of


def query(index_uri: str, *, image_ids=(), images=(), k=10, pretrained=False, weights=None, storage_options=None) -> list[dict]:
    """Top-k matches of each query: [{"query", "rank", "image_id", "score", "uri"}]."""
    options = storage_options or {}
    built = load_index(index_uri, options)
    store = FeatureStore.open(built.sidecar["store"], options)
    built.check_store(store)
    spec = DescriptorSpec(**built.sidecar["descriptor"])
    names = list(image_ids)
    image_ids = [store.find(name) for name in image_ids]
    vectors = [vectors_of(store, image_ids, spec)] if image_ids else []
    if images:
        blobs = []
        for uri in images:
            try:
                with fsspec.open(uri, "rb", **options) as handle:
                    blobs.append((uri, handle.read()))
            except Exception as error:  # missing, unreachable, a folder: each filesystem says it its own way
                raise ValueError(f"--image {uri}: {one_line(error)}") from error
        vit = load_store_model(store.config["model"], store.config["weights"], pretrained=pretrained, weights=weights, storage_options=options)
        try:
            vectors.append(describe_images(store, vit, blobs, spec))
        except ImageError as error:
            raise ValueError(f"--image {error}") from error
        names += list(images)
    scores, found = built.search(np.concatenate(vectors), k)
    return [
        {"query": name, "rank": rank, "image_id": image_id, "score": float(score), "uri": uri}
        for name, row_scores, row_ids in zip(names, scores, found)
        for rank, (image_id, score, uri) in enumerate(zip(row_ids, row_scores, built.uris(row_ids)))
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--index", required=True, help="index folder URI (jobs/build_index.py)")
    parser.add_argument("--image-id", action="append", default=[], help="query by an image of the store: its image_id, file name or URI (repeatable)")
    parser.add_argument("--image", action="append", default=[], help="query with a new image file or URI (repeatable)")
    parser.add_argument("--k", type=int, default=10, help="matches per query (default: %(default)s)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="table (with a header), json (JSON lines) or csv (with a header)")
    parser.add_argument("--json", action="store_true", help="the same as --format json")
    add_store_flags(parser, layer=False, weights_for="for new query images")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.image_id and not args.image:
        parser.error("give --image-id or --image")
    if args.k < 1:
        parser.error(f"--k: must be a positive number of matches, got {args.k}")
    try:
        rows = query(args.index, image_ids=args.image_id, images=args.image, k=args.k, pretrained=args.pretrained, weights=args.weights, storage_options=args.storage_options)
    except (ValueError, FileNotFoundError, KeyError) as error:
        parser.error(str(error))
    print_rows(rows, "json" if args.json else args.format)
    return 0


COLUMNS = ("query", "rank", "score", "image_id", "uri")
FORMATS = ("table", "json", "csv")


def print_rows(rows: list[dict], form: str) -> None:
    """The matches on stdout: an aligned table with a header, JSON lines, or CSV with a header."""
    if form == "json":
        for row in rows:
            print(json.dumps(row))
    elif form == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(f"{'query':40}  {'rank':>4}  {'score':>6}  {'image_id':16}  uri")
        for row in rows:
            print(f"{row['query'][-40:]:40}  {row['rank']:4}  {row['score']:6.4f}  {row['image_id']:16}  {row['uri']}")


if __name__ == "__main__":
    sys.exit(main())
