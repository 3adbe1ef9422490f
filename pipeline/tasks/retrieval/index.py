"""Retrieval indexes over a feature store: descriptors, FAISS index building, incremental adds, search.

An index lives in a folder (any fsspec URI) of three files:
    index.faiss    the FAISS index; vectors are added in order, so FAISS id i is row i of ids.parquet
    ids.parquet    faiss_id -> image_id, uri, shard: results are mapped back by id, never by file order
    sidecar.json   the descriptor, the index parameters, and which store (fingerprint) and shards it covers
Descriptors are L2-normalized and searched by inner product (cosine); optional PCA-whitening is
learned on the store and lives inside the index (faiss `PCAW{d},L2norm`), so queries need no
separate transform.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.engine.aggregation import SRTOutput
from pipeline.engine.models import ViT, check_same_model
from pipeline.extraction.images import ImageError, Prepared, prepare
from pipeline.extraction.worker import build_engine
from pipeline.store.layout import differences, fingerprint_of
from pipeline.store.reader import FeatureStore
from pipeline.store.uris import normalize_uri
from pipeline.tasks.retrieval.ranking import rank_database

DESCRIPTORS = ("cls", "pooled", "gem")
INDEX_TYPES = ("flat", "ivf", "ivfpq")
# FAISS 1.15 raised the batch size from which exhaustive search runs as one BLAS product (20 ->
# 128000): batches of 32 queries on 100k descriptors then take 4x as long on CPU (bench_serve).
faiss.cvar.distance_compute_blas_threshold = 20
IDS_SCHEMA = pa.schema([("faiss_id", pa.int64()), ("image_id", pa.string()), ("uri", pa.string()), ("shard", pa.int32())])


@dataclass(frozen=True)
class DescriptorSpec:
    """Which vector describes an image: the class token, the pooled SRT map, or GeM of the dense map."""

    kind: str = "pooled"
    layer: int | None = None  # None: the store's only layer
    gem_p: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in DESCRIPTORS:
            raise ValueError(f"--descriptor must be one of {DESCRIPTORS}, got {self.kind!r}")
        if self.gem_p <= 0:
            raise ValueError(f"--gem-p must be positive, got {self.gem_p}")


def gem(dense: np.ndarray, p: float, eps: float = 1e-6) -> np.ndarray:
    """Generalized-mean pooling over the spatial cells of [n, C, h, w] maps -> [n, C]."""
    clamped = np.clip(dense.astype(np.float32), eps, None)
    return np.power(np.power(clamped, p).mean(axis=(2, 3)), 1.0 / p)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def store_descriptors(store: FeatureStore, spec: DescriptorSpec, batch_size: int = 1024) -> Iterator[tuple[list[str], np.ndarray]]:
    """(image_ids, L2-normalized descriptors) of every ok image of the store, a batch at a time."""
    source = "dense" if spec.kind == "gem" else spec.kind
    for ids, values in store.iter_batches(source, spec.layer, batch_size):
        yield ids, l2_normalize(gem(values, spec.gem_p) if spec.kind == "gem" else values)


def output_descriptors(output: SRTOutput, spec: DescriptorSpec, layer: int) -> np.ndarray:
    """The same descriptors, for images just run through the engine (queries)."""
    tap = next(t for t in output.dense if t.kind == "block" and t.layer == layer)
    if spec.kind == "gem":
        return l2_normalize(gem(output.dense[tap].numpy(), spec.gem_p))
    values = output.prefix[tap][:, 0] if spec.kind == "cls" else output.pooled[tap]
    return l2_normalize(values.numpy())


# ---------------------------------------------------------------------------- building


def factory_string(index_type: str, count: int, dim: int, whiten: int | None) -> tuple[str, dict[str, int]]:
    """A faiss index_factory description with parameters scaled to the store size."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"--index must be one of {INDEX_TYPES}, got {index_type!r}")
    prefix = f"PCAW{whiten},L2norm," if whiten else ""
    dim = whiten or dim
    if index_type == "flat":
        return prefix + "Flat", {}
    nlist = max(1, min(2 ** round(math.log2(4 * math.sqrt(count))), count // 39 or 1))
    params = {"nlist": nlist, "nprobe": max(1, nlist // 16)}
    if index_type == "ivf":
        return prefix + f"IVF{nlist},Flat", params
    m = max(d for d in range(1, dim // 4 + 1) if dim % d == 0)  # about 4 dimensions per code
    bits = min(8, int(math.log2(count)))  # a code's 2^bits centroids need as many training vectors
    return prefix + f"IVF{nlist},PQ{m}" + (f"x{bits}" if bits < 8 else ""), {**params, "pq_m": m, "pq_bits": bits}


def _training_sample(store: FeatureStore, spec: DescriptorSpec, size: int, seed: int = 0) -> np.ndarray:
    """Up to `size` descriptors spread over the store (a seeded subset), read batch by batch."""
    total = int(pc.sum(pc.equal(store.manifest.column("status"), "ok")).as_py() or 0)
    keep = set(np.random.default_rng(seed).choice(total, size=min(size, total), replace=False).tolist())
    picked, offset = [], 0
    for _, vectors in store_descriptors(store, spec):
        picked.extend(v for i, v in enumerate(vectors, start=offset) if i in keep)
        offset += len(vectors)
    return np.stack(picked)


@dataclass
class RetrievalIndex:
    index: faiss.Index
    ids: pa.Table
    sidecar: dict[str, Any]

    @property
    def spec(self) -> DescriptorSpec:
        return DescriptorSpec(**self.sidecar["descriptor"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Scores [q, k] and image_ids of the k best matches of each L2-normalized query."""
        if "nprobe" in self.sidecar["params"]:
            faiss.ParameterSpace().set_index_parameter(self.index, "nprobe", self.sidecar["params"]["nprobe"])
        scores, found = self.index.search(l2_normalize(queries), min(k, self.index.ntotal))
        return scores, [[self._image_ids[i] for i in row if i >= 0] for row in found]

    @property
    def keeps_vectors(self) -> bool:
        """Whether the index holds every descriptor exactly as the store gives it (Flat, no PCA)."""
        return self.sidecar["factory"] == "Flat"

    def indexed_vector(self, image_id: str) -> np.ndarray | None:
        """An image's descriptor from the index, where it `keeps_vectors`; else None (read the store)."""
        if not self.keeps_vectors or (faiss_id := self._faiss_ids.get(image_id)) is None:
            return None
        return self.index.reconstruct(faiss_id)

    @functools.cached_property
    def _faiss_ids(self) -> dict[str, int]:
        return {image_id: i for i, image_id in enumerate(self._image_ids)}

    def uris(self, image_ids: Sequence[str]) -> list[str]:
        return [self._uris[i] for i in image_ids]

    def check_store(self, store: FeatureStore) -> None:
        """Refuse a store whose config changed since the index was built (re-extracted with other
        weights or another model): its vectors would not match the index's, and queries return junk."""
        if diff := differences(self.sidecar["fingerprint"], fingerprint_of(store.config)):
            raise ValueError(
                f"the index was built from {self.sidecar['store']} when it had another config; rebuild it "
                "(jobs/build_index.py with a new --index). Differences: " + "; ".join(diff)
            )

    @functools.cached_property
    def _image_ids(self) -> list[str]:
        """FAISS id -> image_id, converted once rather than on every search."""
        return self.ids.column("image_id").to_pylist()

    @functools.cached_property
    def _uris(self) -> dict[str, str]:
        return dict(zip(self._image_ids, self.ids.column("uri").to_pylist()))


def build_index(
    store: FeatureStore,
    spec: DescriptorSpec,
    *,
    index_type: str = "flat",
    whiten: int | None = None,
    existing: RetrievalIndex | None = None,
    batch_size: int = 4096,
) -> RetrievalIndex:
    """Index every ok image of committed shards not already covered by `existing` (incremental).

    A new index is trained (IVF, PCA) on a sample of the store; an existing one must come from a
    store with the same fingerprint and the same descriptor, and is only added to.
    """
    manifest = store.manifest
    committed = sorted(set(manifest.column("shard").to_pylist()))
    if existing is None:
        ok = manifest.filter(pc.equal(manifest.column("status"), "ok")).num_rows
        if ok == 0:
            raise ValueError(f"{store.uri} has no image with status ok to index")
        dim = next(store_descriptors(store, spec, batch_size=1))[1].shape[1]
        if whiten and not 1 <= whiten <= min(dim, ok):
            raise ValueError(
                f"--whiten {whiten}: PCA-whitening keeps at most as many dimensions as the descriptor has ({dim}) "
                f"and as there are images to learn it from ({ok} ok images in {store.uri}); give --whiten {min(dim, ok)} or less"
            )
        description, params = factory_string(index_type, ok, dim, whiten)
        index = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(_training_sample(store, spec, max(256 * params.get("nlist", 1), 4 * (whiten or 0), 10_000)))
        sidecar = {"store": normalize_uri(store.uri), "fingerprint": fingerprint_of(store.config), "descriptor": asdict(spec), "factory": description, "params": params, "shards": []}
        ids = IDS_SCHEMA.empty_table()
    else:
        existing.check_store(store)
        index, ids, sidecar = existing.index, existing.ids, dict(existing.sidecar)
        if sidecar["descriptor"] != asdict(spec):
            raise ValueError(f"the index holds {sidecar['descriptor']} descriptors, not {asdict(spec)}")
    new_shards = [s for s in committed if s not in set(sidecar["shards"])]
    wanted = manifest.filter(pc.is_in(manifest.column("shard"), pa.array(new_shards, pa.int64())))
    wanted_ids = set(wanted.filter(pc.equal(wanted.column("status"), "ok")).column("image_id").to_pylist())
    info = {r["image_id"]: r for r in wanted.select(["image_id", "uri", "shard"]).to_pylist()}
    added: list[dict[str, Any]] = []
    for image_ids, vectors in store_descriptors(store, spec, batch_size):
        keep = [i for i, image_id in enumerate(image_ids) if image_id in wanted_ids]
        if keep:
            index.add(vectors[keep])
            added.extend({"faiss_id": len(ids) + len(added), **info[image_ids[i]]} for i in keep)
    ids = pa.concat_tables([ids, pa.Table.from_pylist(added, schema=IDS_SCHEMA)]) if added else ids
    sidecar["shards"] = sorted(set(sidecar["shards"]) | set(new_shards))
    sidecar["count"] = index.ntotal
    return RetrievalIndex(index, ids, sidecar)


# ---------------------------------------------------------------------------- persistence


def save_index(built: RetrievalIndex, uri: str, storage_options: dict[str, Any] | None = None) -> None:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/index.faiss", faiss.serialize_index(built.index).tobytes())
    with fs.open(f"{path}/ids.parquet", "wb") as handle:
        pq.write_table(built.ids, handle)
    fs.pipe_file(f"{path}/sidecar.json", json.dumps(built.sidecar, indent=2).encode())


def load_index(uri: str, storage_options: dict[str, Any] | None = None, *, mmap: bool = True) -> RetrievalIndex:
    """Load an index; a local IVF index is memory-mapped from disk rather than read into memory."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    if not fs.exists(f"{path}/sidecar.json"):
        raise FileNotFoundError(f"no index at {uri}")
    sidecar = json.loads(fs.cat_file(f"{path}/sidecar.json"))
    with fs.open(f"{path}/ids.parquet", "rb") as handle:
        ids = pq.read_table(handle)
    if mmap and fs.protocol in ("file", ("file", "local")) and "IVF" in sidecar["factory"]:
        index = faiss.read_index(f"{path}/index.faiss", faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    else:
        index = faiss.deserialize_index(np.frombuffer(fs.cat_file(f"{path}/index.faiss"), dtype=np.uint8))
    return RetrievalIndex(index, ids, sidecar)


def index_exists(uri: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return fs.exists(f"{path}/sidecar.json")


# ---------------------------------------------------------------------------- queries


class QueryEncoder:
    """New images to descriptors exactly as a store's were computed (same model, shifts, image
    policy): each decoded on its own, then images of one input size run through the model together."""

    def __init__(self, store: FeatureStore, vit: ViT, spec: DescriptorSpec) -> None:
        check_same_model(vit, store.config["model"], store.config["weights"])
        self.srt, self.policy = build_engine(vit, store.config, batch_size=16)
        self.layer, self.spec = store.layer_index(spec.layer), spec

    def prepare(self, blob: bytes) -> Prepared:
        """The model input of an image's bytes; raises ImageError (decode, too_large, ...)."""
        return prepare(blob, self.policy)

    def describe(self, inputs: Sequence[Prepared]) -> np.ndarray:
        """Descriptors [n, D] of prepared inputs, in their order."""
        vectors: list[np.ndarray | None] = [None] * len(inputs)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(inputs):
            by_size.setdefault(tuple(image.tensor.shape), []).append(i)
        for members in by_size.values():
            output = self.srt.run(torch.stack([inputs[i].tensor for i in members]))
            for i, vector in zip(members, output_descriptors(output, self.spec, self.layer)):
                vectors[i] = vector
        return np.stack(vectors)


def describe_images(store: FeatureStore, vit: ViT, blobs: Sequence[tuple[str, bytes]], spec: DescriptorSpec) -> np.ndarray:
    """Descriptors of new images (name, bytes), computed exactly as the store's were (same model,
    shifts, policy). An image that cannot be decoded raises ImageError naming it."""
    encoder = QueryEncoder(store, vit, spec)
    inputs = []
    for name, blob in blobs:
        try:
            inputs.append(encoder.prepare(blob))
        except ImageError as error:
            raise ImageError(error.kind, f"{name}: {str(error).splitlines()[0]}") from error
    return encoder.describe(inputs)


def vectors_of(store: FeatureStore, image_ids: Sequence[str], spec: DescriptorSpec) -> np.ndarray:
    """Stored descriptors of chosen images of the store (query by image_id)."""
    layer = store.layer_index(spec.layer)
    if spec.kind == "gem":
        return l2_normalize(gem(np.stack([store.dense(i, layer) for i in image_ids]), spec.gem_p))
    return l2_normalize(np.stack([store.vector(spec.kind, i, layer) for i in image_ids]))


def exact_rankings(store: FeatureStore, spec: DescriptorSpec, queries: Sequence[str]) -> dict[str, list[str]]:
    """For each query image_id, every ok image's image_id by decreasing cosine similarity (exact).
    Benchmarks name images otherwise: resolve their names with `FeatureStore.find` first."""
    ids, vectors = [], []
    for batch_ids, batch in store_descriptors(store, spec):
        ids.extend(batch_ids)
        vectors.append(batch)
    database = np.concatenate(vectors)
    position = {image_id: i for i, image_id in enumerate(ids)}
    missing = [q for q in queries if q not in position]
    if missing:
        raise KeyError(f"{len(missing)} queries are not ok images of {store.uri}, e.g. {missing[:3]}")
    scores = database[[position[q] for q in queries]] @ database.T
    return {q: rank_database(row, ids) for q, row in zip(queries, scores)}
