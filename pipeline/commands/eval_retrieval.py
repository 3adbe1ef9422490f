"""Evaluate retrieval (mAP, recall@k) of one or more stores and descriptors, side by side.

    python jobs/eval_retrieval.py --gt gnd_roxford5k.pkl --store plain.zarr --store srt.zarr
    python jobs/eval_retrieval.py --gt groups.csv --store srt.zarr --descriptor cls --descriptor pooled

Ground truth: the revisited Oxford/Paris pickle (easy/medium/hard protocols) or a CSV with
columns query, positives (space-separated image names) and optional junk. Images are named as
every command names them: image_id, URI, file name, or file name without extension (`FeatureStore.find`).
Rankings are exact.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.commands import CommandParser, add_store_flags
from pipeline.store.reader import FeatureStore
from pipeline.tasks.retrieval.index import DESCRIPTORS, DescriptorSpec, exact_rankings
from pipeline.tasks.retrieval.ranking import check_names, evaluate, load_ground_truth, named_by


def evaluate_stores(gt: str, stores: list[str], descriptors: list[str], *, layer=None, gem_p=3.0, storage_options=None) -> dict[str, dict]:
    """{"store descriptor": {protocol: metrics}} for every store and descriptor."""
    queries = load_ground_truth(gt, storage_options)
    results = {}
    for uri in stores:
        store = FeatureStore.open(uri, storage_options)
        named = named_by(queries, store.find, uri)
        for kind in descriptors:
            rankings = exact_rankings(store, DescriptorSpec(kind, layer, gem_p), [q.image for q in named])
            check_names(named, set(next(iter(rankings.values()))), uri)
            results[f"{uri} {kind}"] = evaluate(rankings, named)
    return results


def render(results: dict[str, dict]) -> str:
    columns = list(results)
    protocols = list(next(iter(results.values())))
    metrics = [m for m in next(iter(next(iter(results.values())).values())) if m != "queries"]
    lines = ["| protocol | metric | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for protocol in protocols:
        for metric in metrics:
            lines.append(f"| {protocol} | {metric} | " + " | ".join(f"{100 * results[c][protocol][metric]:.2f}" for c in columns) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--gt", required=True, help="ground truth: revisited .pkl or .csv")
    parser.add_argument("--store", action="append", required=True, help="feature store URI (repeat to compare)")
    parser.add_argument("--descriptor", action="append", choices=DESCRIPTORS, help="descriptor (repeat to compare; default pooled)")
    parser.add_argument("--gem-p", type=float, default=3.0, help="GeM exponent of --descriptor gem (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="JSON instead of a table")
    add_store_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        results = evaluate_stores(args.gt, args.store, args.descriptor or ["pooled"], layer=args.layer, gem_p=args.gem_p, storage_options=args.storage_options)
    except (ValueError, FileNotFoundError, KeyError) as error:
        parser.error(str(error))
    print(json.dumps(results, indent=2) if args.json else render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
