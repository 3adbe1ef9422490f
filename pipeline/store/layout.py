"""The Zarr v3 feature store: layout, creation with a provenance check, shard writes, the reader.

Layout under the output URI (N = planned items, n = one image per chunk):

    zarr.json                 group attributes: {"srt": provenance of the run, "plan_size": N}
    plan.parquet              the work plan (pipeline.extraction.sources)
    manifest/part-*.parquet   one part per committed shard (pipeline.store.manifest)
    dense/L{L}                [N, C, H/s, W/s] SRT maps of block L  (aspect policy: dense/L{L}/{H}x{W})
    cls/L{L}                  [N, C] class token averaged over views (models with a class token)
    registers/L{L}            [N, R, C] register tokens averaged over views (models with registers)
    pooled/L{L}               [N, C] mean of the dense map
    pca/L{L}/components, mean [K, C] and [C]: the basis of dense maps stored as K channels (--pca-dims)
    dense/K{L}, cls/K{L}, ... the same for the attention keys of block L (`--keys`)

Dense arrays have one image per chunk inside one Zarr shard per work shard; per-image vectors
(cls, registers, pooled) have one chunk per work shard, since a 768-byte chunk costs about 100x
more to write and read than its bytes (bench/RESULTS.md). Either way each stored object belongs
to exactly one work shard, so it has exactly one writer (two writers of one Zarr shard lose data).
Arrays are sized from the plan up front and never resized. Rows of failed images keep the fill
value 0 and cost no storage.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.errors import ContainsArrayError

from pipeline.extraction.config import OUTPUTS, ConfigError, ResolvedConfig, differences
from pipeline.store.manifest import read_manifest
from pipeline.engine.models import Tap
from pipeline.engine.pca import Basis, reconstruct
from pipeline.extraction.sources import normalize_uri
from schemas import PLAN_SCHEMA_VERSION, STORE_FORMAT_VERSION

ATTRIBUTE = "srt"
VECTOR_KINDS = tuple(kind for kind in OUTPUTS if kind != "dense")


class StoreMismatchError(ValueError):
    """An existing output was made with a different config."""


def compressors(codec: str) -> Any:
    return {
        "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
        "blosc": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
        "zstd": ZstdCodec(level=3),
        "none": None,
    }[codec]


def dense_path(tap: Tap, bucket: str | None) -> str:
    return f"dense/{tap.name}" + (f"/{bucket}" if bucket else "")


def open_group(out: str, mode: str, storage_options: dict[str, Any] | None, **kwargs: Any) -> zarr.Group:
    """zarr.open_group, with storage options only for remote URIs: zarr refuses them for local
    paths, and one set of options serves every URI of a job (s3 images, a local store)."""
    remote = "://" in out and not out.startswith("file://")
    return zarr.open_group(out, mode=mode, storage_options=(storage_options or None) if remote else None, **kwargs)


def plan_uri(out: str) -> str:
    return out.rstrip("/") + "/plan.parquet"


def read_plan(out: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The work plan saved beside the store (pipeline.extraction.sources.make_plan), of this schema version."""
    with fsspec.open(plan_uri(out), "rb", **(storage_options or {})) as handle:
        plan = pq.read_table(handle)
    version = int((plan.schema.metadata or {}).get(b"schema_version", b"1"))
    if version != PLAN_SCHEMA_VERSION:
        raise StoreMismatchError(
            f"{plan_uri(out)} has plan schema {version}, this version reads {PLAN_SCHEMA_VERSION}: "
            "extract again into another --out, or pass --overwrite"
        )
    return plan


def _store_exists(out: str, storage_options: dict[str, Any] | None) -> bool:
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    return fs.exists(f"{path.rstrip('/')}/zarr.json")


def stored_provenance(out: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The provenance of an existing store, or None when there is no store at `out`."""
    if not _store_exists(out, storage_options):
        return None
    return dict(open_group(out, "r", storage_options).attrs.get(ATTRIBUTE, {}))


def check_existing(resolved: ResolvedConfig) -> bool:
    """Whether `--out` holds a store to resume; it must come from the same config.

    Raises StoreMismatchError naming every difference. With `--overwrite` nothing is resumed, and
    the old output stays until `remove_output` (after the new listing succeeded).
    """
    config = resolved.config
    existing = stored_provenance(config.out, config.storage_options)
    if existing is None or config.overwrite:
        return False
    stored = {k: v for k, v in existing.items() if k != "package_version"}
    if diff := differences(stored, resolved.fingerprint()):
        raise StoreMismatchError(
            f"--out {config.out} was written with a different config; pass --overwrite to replace it, "
            "or choose another --out. Differences: " + "; ".join(diff)
        )
    return True


def check_writable(out: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail before any listing when `--out` cannot hold a store: an existing file, a path under a
    file, a read-only or pseudo filesystem. A probe object is written and removed, and so are the
    local folders made for it, so a refused or failed run leaves nothing behind."""
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    path = path.rstrip("/")
    try:
        if fs.isfile(path):
            raise ConfigError("--out", f"{out} is an existing file; give a folder for the store")
        made = []
        if isinstance(fs, LocalFileSystem):  # object stores have no folders to make
            folder = path
            while not os.path.lexists(folder):
                made.append(folder)
                folder = os.path.dirname(folder)
            os.makedirs(path, exist_ok=True)
        probe = f"{path}/.write-probe-{uuid.uuid4().hex}"
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
        for folder in made:
            os.rmdir(folder)
    except OSError as error:
        raise ConfigError("--out", f"cannot write a store at {out}: {type(error).__name__}: {error}") from error


def remove_output(out: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete whatever is at `out` (--overwrite), so no file of the old run is mistaken for the new one's."""
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    if fs.exists(path):
        fs.rm(path, recursive=True)


def create_store(resolved: ResolvedConfig, plan_size: int) -> zarr.Group:
    """A new group with the run's provenance and every array whose shape the plan fixes."""
    # "a", not "w": "w" would wipe the plan already saved beside it (check_existing ran before).
    group = open_group(resolved.config.out, "a", resolved.config.storage_options)
    group.attrs.update({ATTRIBUTE: resolved.provenance(), "plan_size": plan_size})
    for tap in resolved.taps:
        for kind, shape in _fixed_shapes(resolved).items():
            if kind in resolved.config.outputs:
                _create(group, f"{kind}/{tap.name}", (plan_size, *shape), resolved)
    return group


def _fixed_shapes(resolved: ResolvedConfig) -> dict[str, tuple[int, ...]]:
    """Per-image shapes of the arrays known before any image is read."""
    facts, c = resolved.facts, resolved.config
    shapes: dict[str, tuple[int, ...]] = {"pooled": (facts.embed_dim,)}
    if facts.num_prefix_tokens > facts.num_registers:
        shapes["cls"] = (facts.embed_dim,)
    if facts.num_registers:
        shapes["registers"] = (facts.num_registers, facts.embed_dim)
    if c.resize == "square":
        side = c.image_size // resolved.stride
        shapes["dense"] = (c.pca_dims or facts.embed_dim, side, side)
    return shapes


def axes(path: str, stride: int) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Dimension names and attributes of the array at `path`, so that xarray, dask or plain zarr
    show what each axis is. Size-bucket arrays (`dense/L{L}/{H}x{W}`) name their spatial axes after
    the bucket: arrays of one group must agree on the sizes of shared names."""
    kind, tap, *bucket = path.split("/")
    attributes: dict[str, Any] = {
        "kind": kind,
        "layer": int(tap[1:]),
        "tap": "attention keys" if tap.startswith("K") else "block output",
        "rows": "plan row = image (manifest.parquet: row); rows of error images are 0",
    }
    if kind == "dense":
        attributes["stride_px"] = stride  # a cell covers stride x stride pixels of the model input (manifest: region)
        suffix = f"_{bucket[0]}" if bucket else ""
        return ("image", "channel", f"y{suffix}", f"x{suffix}"), attributes
    if kind == "registers":
        return ("image", "register", "channel"), attributes
    return ("image", "channel"), attributes


def _create(group: zarr.Group, path: str, shape: tuple[int, ...], resolved: ResolvedConfig) -> zarr.Array:
    """Dense: one image per chunk, one work shard per Zarr shard. Vectors: one work shard per chunk.
    Creating an existing array opens it."""
    per_shard = (resolved.config.shard_size, *shape[1:])
    dense = path.startswith("dense/")
    names, attributes = axes(path, resolved.stride)
    try:
        return group.create_array(
            path,
            shape=shape,
            chunks=(1, *shape[1:]) if dense else per_shard,
            shards=per_shard if dense else None,
            dtype=resolved.config.dtype,
            compressors=compressors(resolved.config.codec),
            fill_value=0,
            dimension_names=names,
            attributes=attributes,
        )
    except ContainsArrayError:  # another worker created this size bucket first
        return group[path]


def for_writing(array: zarr.Array) -> zarr.Array:
    """The array as shards are written to it: every chunk stored, none first compared with the fill
    value. That comparison scans each chunk on zarr's one event-loop thread, which every writer
    thread of a process waits on: skipping it cuts that thread's time per image 1.8-3x (bench_store),
    and costs only the failed images' rows, stored as zeros."""
    return array.with_config({"write_empty_chunks": True})


def write_shard(
    group: zarr.Group,
    resolved: ResolvedConfig,
    shard: int,
    arrays: dict[str, np.ndarray],
    opened: dict[str, zarr.Array] | None = None,
) -> None:
    """Write one whole work shard: `arrays` maps array paths to [rows in shard, ...] blocks.
    `opened`: arrays already opened by earlier calls (opening one reads its metadata), added to."""
    start = shard * resolved.config.shard_size
    opened = {} if opened is None else opened
    for path, block in arrays.items():
        if path not in opened:
            array = group[path] if path in group else _create(group, path, (group.attrs["plan_size"], *block.shape[1:]), resolved)
            opened[path] = for_writing(array)
        opened[path][start : start + len(block)] = block.astype(resolved.config.dtype, copy=False)


def write_basis(group: zarr.Group, tap: Tap, basis: Basis, shards: list[int]) -> None:
    """Store the PCA basis of a tap's dense maps, and what it was fitted on in the group attributes."""
    for name, values in (("components", basis.components), ("mean", basis.mean)):
        array = group.create_array(f"pca/{tap.name}/{name}", shape=tuple(values.shape), dtype="float32", overwrite=True)
        array[...] = values.cpu().numpy()
    fitted = dict(group.attrs.get("pca", {}))
    fitted[tap.name] = {"dims": int(basis.components.shape[0]), "explained_variance": basis.explained, "fitted_on_shards": shards}
    group.attrs["pca"] = fitted


def read_basis(group: zarr.Group, tap: Tap) -> Basis | None:
    """The PCA basis of a tap's dense maps, or None when none is stored (yet)."""
    facts = dict(group.attrs.get("pca", {})).get(tap.name)
    if facts is None:
        return None
    components, mean = (torch.from_numpy(group[f"pca/{tap.name}/{name}"][...]) for name in ("components", "mean"))
    return Basis(mean=mean, components=components, explained=facts["explained_variance"])


# ---------------------------------------------------------------------------- reader


class FeatureStore:
    """Read a feature store: its config, its manifest, and features by `image_id`.

    `FeatureStore.open("s3://bucket/feats.zarr", storage_options={...})`
    """

    def __init__(self, out: str, group: zarr.Group, manifest: pa.Table, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = out
        self.storage_options = storage_options or {}
        self.group = group
        self.config: dict[str, Any] = dict(group.attrs[ATTRIBUTE])
        if self.config.get("store_format") != STORE_FORMAT_VERSION:
            raise ValueError(f"{out}: store format {self.config.get('store_format')} is not {STORE_FORMAT_VERSION}")
        self.manifest = manifest
        self._rows = {image_id: i for i, image_id in enumerate(manifest.column("image_id").to_pylist())}
        self._bases: dict[str, Basis | None] = {}

    @classmethod
    def open(cls, out: str, storage_options: dict[str, Any] | None = None) -> FeatureStore:
        if not _store_exists(out, storage_options):
            raise FileNotFoundError(f"no feature store at {out}")
        return cls(out, open_group(out, "r", storage_options), read_manifest(out, storage_options), storage_options)

    def plan(self) -> dict[str, dict[str, Any]]:
        """image_id -> planned row: what `sources.read_bytes` reads an image's bytes from."""
        return {row["image_id"]: row for row in read_plan(self.uri, self.storage_options).to_pylist()}

    @property
    def layers(self) -> list[int]:
        return list(self.config["layers"])

    def warn_if_cropped(self) -> None:
        """Dense consumers map cells back onto whole images: say so when the model saw centre crops."""
        if self.config["resize"] == "square":
            logging.getLogger("srt").warning(
                "%s was extracted with --resize square: pixels outside each centre crop are predicted background "
                "(extract with --resize aspect to segment whole images)", self.uri
            )

    @property
    def keys(self) -> list[int]:
        """Blocks whose attention keys are stored (`--keys`)."""
        return list(self.config.get("keys", []))

    def record(self, image_id: str) -> dict[str, Any]:
        """The manifest row of one image."""
        if image_id not in self._rows:
            raise KeyError(f"image_id {image_id!r} is not in {self.uri}'s manifest")
        return self.manifest.slice(self._rows[image_id], 1).to_pylist()[0]

    def find(self, name: str) -> str:
        """The image_id that `name` names: an image_id, the image's URI (any spelling of it), its file
        name, or its file name without extension, as long as exactly one image of the manifest matches."""
        if name in self._rows:
            return name
        ids, uris = self.manifest.column("image_id").to_pylist(), self.manifest.column("uri").to_pylist()
        wanted = normalize_uri(name) if "/" in name else None
        base = PurePosixPath(name).name
        found = [
            image_id for image_id, uri in zip(ids, uris)
            if normalize_uri(uri) == wanted or (file := PurePosixPath(uri.split("#")[-1]).name) == base or PurePosixPath(file).stem == base
        ]  # fmt: skip
        if len(found) == 1:
            return found[0]
        if found:
            raise KeyError(f"{name!r} names {len(found)} images of {self.uri} ({', '.join(found[:5])}); give its image_id or its full URI")
        example = f" (e.g. {ids[0]} or {PurePosixPath(uris[0].split('#')[-1]).name})" if ids else ""
        raise KeyError(f"no image {name!r} in {self.uri}: give an image_id, a URI or a file name from its manifest{example}")

    def _ok_record(self, image_id: str) -> dict[str, Any]:
        record = self.record(image_id)
        if record["status"] != "ok":
            raise KeyError(f"image_id {image_id!r} has no features: {record['error_kind']}: {record['error']}")
        return record

    def layer_index(self, layer: int | None, keys: bool = False) -> int:
        """The stored block to read: `layer` if stored, or the only one when None.
        `keys` picks among the blocks whose attention keys are stored."""
        stored, what = (self.keys, "attention keys (--keys)") if keys else (self.layers, "layers")
        if not stored:
            raise KeyError(f"{self.uri} stores no {what}")
        if layer is None:
            if len(stored) > 1:
                raise ValueError(f"this store holds {what} of blocks {stored}: pass layer=")
            return stored[0]
        if layer not in stored:
            raise KeyError(f"{what} of block {layer} not stored; stored: {stored}")
        return layer

    def tap(self, layer: int | None = None, keys: bool = False) -> Tap:
        return Tap("keys" if keys else "block", self.layer_index(layer, keys))

    def stored(self, kind: str) -> None:
        """Raise naming the flag when the store was extracted without `kind` (--outputs)."""
        outputs = self.config.get("outputs", list(OUTPUTS))
        if kind not in outputs:
            raise KeyError(f"{self.uri} stores no {kind} arrays: it was extracted with --outputs {','.join(outputs)} (extract again with {kind} in --outputs)")

    def dense(self, image_id: str, layer: int | None = None, keys: bool = False, full: bool = False) -> np.ndarray:
        """[C, H/s, W/s] SRT map of one image: a block's output, or with `keys` its attention keys.
        A store of reduced maps (--pca-dims K) gives K channels, or with `full` the C-channel
        maps projected back from them (fp32)."""
        self.stored("dense")
        record = self._ok_record(image_id)
        tap = self.tap(layer, keys)
        return self._full(self.group[dense_path(tap, record["bucket"])][record["row"]][None], tap, full)[0]

    def dense_rows(self, records: list[dict[str, Any]], layer: int | None = None, full: bool = False) -> np.ndarray:
        """[n, C, h, w] maps of ok manifest records of one size bucket, read in one indexed call
        (`full`: as `dense`)."""
        self.stored("dense")
        buckets = {r["bucket"] for r in records}
        if len(buckets) != 1:
            raise ValueError(f"records of one size bucket expected, got {sorted(map(str, buckets))}")
        tap = self.tap(layer)
        return self._full(self.group[dense_path(tap, records[0]["bucket"])].oindex[[r["row"] for r in records]], tap, full)

    def basis(self, layer: int | None = None, keys: bool = False) -> Basis | None:
        """The PCA basis the dense maps of a block are stored on (--pca-dims), or None."""
        return self._basis(self.tap(layer, keys))

    def _basis(self, tap: Tap) -> Basis | None:
        if tap.name not in self._bases:  # read once: `full` reads come in loops over images
            self._bases[tap.name] = read_basis(self.group, tap)
        return self._bases[tap.name]

    def _full(self, maps: np.ndarray, tap: Tap, full: bool) -> np.ndarray:
        basis = self._basis(tap) if full else None
        return maps if basis is None else reconstruct(torch.from_numpy(maps), basis).numpy()

    def vector_rows(self, kind: str, records: list[dict[str, Any]], layer: int | None = None) -> np.ndarray:
        """[n, ...] per-image vectors (cls, registers, pooled) of ok manifest records."""
        self.stored(kind)
        return self.group[f"{kind}/{self.tap(layer).name}"].oindex[[r["row"] for r in records]]

    def vector(self, kind: str, image_id: str, layer: int | None = None, keys: bool = False) -> np.ndarray:
        """`kind` in cls, registers, pooled: the per-image vectors of one image."""
        if kind not in VECTOR_KINDS:
            raise ValueError(f"kind must be one of {VECTOR_KINDS}, got {kind!r}")
        self.stored(kind)
        path = f"{kind}/{self.tap(layer, keys).name}"
        if path not in self.group:
            raise KeyError(f"{self.uri} has no {kind} array (the model has none)")
        return self.group[path][self._ok_record(image_id)["row"]]

    def transform(self, image_id: str) -> dict[str, Any]:
        """What maps feature cells back to original pixels (see images.cell_to_pixel)."""
        record = self._ok_record(image_id)
        return {
            "height": record["height"],
            "width": record["width"],
            "input_size": (record["input_height"], record["input_width"]),
            "region": tuple(record["region"]),
            "stride": self.config["stride"],
        }

    def iter_batches(
        self, kind: str = "pooled", layer: int | None = None, batch_size: int = 1024, keys: bool = False
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """(image_ids, [n, ...] arrays) over every ok image, `batch_size` at a time.

        `kind` is cls, registers, pooled (plan order) or dense (plan order within each size
        bucket). Only the chunks of the requested rows are read.
        """
        self.stored(kind)
        tap = self.tap(layer, keys)
        ok = self.manifest.filter(pc.equal(self.manifest.column("status"), "ok"))
        ids, rows = ok.column("image_id").to_pylist(), ok.column("row").to_numpy()
        if kind == "dense":
            buckets = ok.column("bucket").to_pylist()
            groups = {bucket: [i for i, b in enumerate(buckets) if b == bucket] for bucket in dict.fromkeys(buckets)}
            arrays = {bucket: self.group[dense_path(tap, bucket)] for bucket in groups}
        else:
            groups, arrays = {None: list(range(len(ids)))}, {None: self.group[f"{kind}/{tap.name}"]}
        for bucket, members in groups.items():
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                yield [ids[i] for i in chunk], arrays[bucket].oindex[rows[chunk]]
