"""Build (or extend) a FAISS retrieval index from a feature store.

    python jobs/build_index.py --store out/samples.zarr --index out/samples.index
    python jobs/build_index.py --store s3://b/feats.zarr --index s3://b/feats.index --index-type ivfpq --whiten 256

Run it again after more shards were committed: only their images are added.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.commands import CommandParser, add_store_flags
from pipeline.store.reader import FeatureStore
from pipeline.tasks.retrieval.index import (
    DESCRIPTORS,
    INDEX_TYPES,
    DescriptorSpec,
    build_index,
    index_exists,
    load_index,
    save_index,
)


def descriptor_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--descriptor", default="pooled", choices=DESCRIPTORS, help="cls token, pooled SRT map, or GeM of the dense map (default: pooled)")
    parser.add_argument("--gem-p", type=float, default=3.0, help="GeM exponent (default: 3)")
    add_store_flags(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--store", required=True, help="feature store URI")
    parser.add_argument("--index", required=True, help="index folder URI")
    descriptor_arguments(parser)
    parser.add_argument("--index-type", default="flat", choices=INDEX_TYPES, help="flat (exact, default), ivf, or ivfpq for large stores")
    parser.add_argument("--whiten", type=int, default=None, help="PCA-whiten to this many dimensions, learned on the store")
    parser.add_argument("--rebuild", action="store_true", help="build from scratch even if the index exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = DescriptorSpec(args.descriptor, args.layer, args.gem_p)
        store = FeatureStore.open(args.store, args.storage_options)
        existing = None if args.rebuild or not index_exists(args.index, args.storage_options) else load_index(args.index, args.storage_options, mmap=False)
        before = existing.index.ntotal if existing else 0
        built = build_index(store, spec, index_type=args.index_type, whiten=args.whiten, existing=existing)
    except (ValueError, FileNotFoundError, KeyError) as error:
        parser.error(str(error))
    save_index(built, args.index, args.storage_options)
    print(f"{built.index.ntotal - before} vectors added ({built.index.ntotal} in all, {len(built.sidecar['shards'])} shards) "
          f"to {args.index}: {built.sidecar['factory']}, {spec.kind} descriptors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
