"""Retrieval index costs: flat against IVF-PQ on a store of 100k descriptors (dimension 384).

    python -m bench.bench_retrieval

The store is real (Zarr arrays and manifest parts written by the pipeline's own writers); its
pooled descriptors are synthetic: uniformly random on the sphere (no structure: the worst case for
IVF-PQ) and clustered (1,000 Gaussian clusters, closer to real image descriptors).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from bench.results import table, write_section
from pipeline.extraction.config import ExtractConfig, resolve
from pipeline.store.layout import create_store, write_shard
from pipeline.store.manifest import write_part
from pipeline.store.reader import FeatureStore
from pipeline.tasks.retrieval.index import DescriptorSpec, build_index, l2_normalize

SHARD = 4096


def synthetic_store(out: str, vectors: np.ndarray) -> FeatureStore:
    resolved = resolve(ExtractConfig(dataset="synthetic", out=out, model="vit_small_patch16_224", shard_size=SHARD))
    group = create_store(resolved.store_spec(), len(vectors))
    for shard, start in enumerate(range(0, len(vectors), SHARD)):
        block = vectors[start : start + SHARD]
        write_shard(group, resolved.store_spec(), shard, {f"pooled/L{resolved.layers[0]}": block}, len(vectors))
        rows = [{"image_id": f"img{start + i:07d}", "uri": f"synthetic://{start + i}", "shard": shard, "row": start + i, "status": "ok"} for i in range(len(block))]
        write_part(out, shard, rows)
    return FeatureStore.open(out)


def descriptors(kind: str, count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        return l2_normalize(rng.standard_normal((count, dim)))
    centres = rng.standard_normal((1000, dim))
    return l2_normalize(centres[rng.integers(0, 1000, count)] + 0.35 * rng.standard_normal((count, dim)))


def measure(store: FeatureStore, queries: np.ndarray, index_type: str) -> dict:
    start = time.perf_counter()
    built = build_index(store, DescriptorSpec("pooled"), index_type=index_type)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    _, batch_ids = built.search(queries, 10)
    batch_ms = (time.perf_counter() - start) * 1000 / len(queries)
    start = time.perf_counter()
    for query in queries[:100]:
        built.search(query[None], 10)
    single_ms = (time.perf_counter() - start) * 1000 / 100
    return {"build_s": build_s, "batch_ms": batch_ms, "single_ms": single_ms, "ids": batch_ids, "factory": built.sidecar["factory"], "params": built.sidecar["params"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for kind in ("uniform", "clustered"):
        data = descriptors(kind, args.count, 384, rng)
        queries = l2_normalize(data[rng.choice(args.count, args.queries, replace=False)] + 0.05 * rng.standard_normal((args.queries, 384)))
        with tempfile.TemporaryDirectory() as folder:
            store = synthetic_store(f"{folder}/store.zarr", data.astype(np.float16))
            flat, ivfpq = measure(store, queries, "flat"), measure(store, queries, "ivfpq")
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(flat["ids"], ivfpq["ids"])])
        for name, m in (("flat", flat), ("ivfpq", ivfpq)):
            rows.append([kind, f"`{m['factory']}` {m['params'] or ''}", f"{m['build_s']:.1f}", f"{m['batch_ms']:.3f}", f"{m['single_ms']:.3f}", "1 (reference)" if name == "flat" else f"**{recall:.3f}**"])
    write_section(
        "retrieval",
        f"Retrieval indexes: {args.count:,} pooled descriptors of dimension 384",
        f"""
Build = stream the descriptors out of the store, train (IVF-PQ: on a sample) and add. Query
latency per query: {args.queries} queries in one batch, and 100 one at a time; top 10.
Recall@10 of IVF-PQ = overlap of its top 10 with the flat index's exact top 10.

{table(["descriptors", "index (parameters from the store size)", "build s", "ms/query, batched", "ms/query, single", "recall@10 vs flat"], rows)}
""",
    )


if __name__ == "__main__":
    main()
