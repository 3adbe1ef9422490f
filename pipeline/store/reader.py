"""Read a feature store: its provenance, its manifest, and features by image_id (`FeatureStore`).

Every task reads stores through this class; the layout it reads is described in
`pipeline.store.layout`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import zarr

from pipeline.engine.models import Tap
from pipeline.engine.pca import Basis, reconstruct
from pipeline.store.layout import (
    ATTRIBUTE,
    OUTPUTS,
    VECTOR_KINDS,
    dense_path,
    open_group,
    read_basis,
    store_exists,
)
from pipeline.store.manifest import read_manifest
from pipeline.store.plan import read_plan
from pipeline.store.schemas import READABLE_STORE_FORMATS
from pipeline.store.uris import normalize_uri


class AmbiguousName(KeyError):
    """A name (a file name or stem) that more than one image of the store has."""


class FeatureStore:
    """Read a feature store: its config, its manifest, and features by `image_id`.

    `FeatureStore.open("s3://bucket/feats.zarr", storage_options={...})`
    """

    def __init__(self, out: str, group: zarr.Group, manifest: pa.Table, storage_options: dict[str, Any] | None = None) -> None:
        self.uri = out
        self.storage_options = storage_options or {}
        self.group = group
        self.config: dict[str, Any] = dict(group.attrs[ATTRIBUTE])
        if self.config.get("store_format") not in READABLE_STORE_FORMATS:
            raise ValueError(f"{out}: store format {self.config.get('store_format')} is not one of {READABLE_STORE_FORMATS}")
        self.manifest = manifest
        self._rows = {image_id: i for i, image_id in enumerate(manifest.column("image_id").to_pylist())}
        self._bases: dict[str, Basis | None] = {}
        self._name_index: dict[tuple[str, str], set[str]] | None = None
        self._plan: dict[str, dict[str, Any]] | None = None

    @classmethod
    def open(cls, out: str, storage_options: dict[str, Any] | None = None) -> FeatureStore:
        if not store_exists(out, storage_options):
            raise FileNotFoundError(f"no feature store at {out}")
        return cls(out, open_group(out, "r", storage_options), read_manifest(out, storage_options), storage_options)

    def plan(self) -> dict[str, dict[str, Any]]:
        """image_id -> planned row: what `reading.read_bytes` reads an image's bytes from. Read
        once per opened store, as its manifest is (a service draws many pictures from one store)."""
        if self._plan is None:
            self._plan = {row["image_id"]: row for row in read_plan(self.uri, self.config["shard_size"], self.storage_options).to_pylist()}
        return self._plan

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
        name, or its file name without extension, as long as exactly one image of the manifest matches.
        A name with a '/' is a URI: it must be a stored URI, however spelled (a file elsewhere that
        has a stored image's file name names nothing); bare file names are the convenience."""
        if name in self._rows:
            return name
        names = self._names()
        key = ("uri", normalize_uri(name)) if "/" in name else ("file", name)
        found = sorted(names.get(key, set()), key=self._rows.__getitem__)
        if len(found) == 1:
            return found[0]
        if found:
            raise AmbiguousName(f"{name!r} names {len(found)} images of {self.uri} ({', '.join(found[:5])}); give its image_id or its full URI")
        example = self.example_name()
        raise KeyError(f"no image {name!r} in {self.uri}: give an image_id, a URI or a file name from its manifest" + (f" (e.g. {example})" if example else ""))

    def example_name(self) -> str | None:
        """The file name of the first image with features, to suggest to whoever names one that is not there."""
        ok = pc.index(self.manifest.column("status"), "ok").as_py()
        return None if ok < 0 else PurePosixPath(self.manifest.column("uri")[ok].as_py().split("#")[-1]).name

    def _names(self) -> dict[tuple[str, str], set[str]]:
        """Every other name of each image (its normalized URI, its file name, that name's stem),
        built once, so naming thousands of images (a benchmark's ground truth) stays linear."""
        if self._name_index is None:
            self._name_index = {}
            for image_id, uri in zip(self.manifest.column("image_id").to_pylist(), self.manifest.column("uri").to_pylist()):
                file = PurePosixPath(uri.split("#")[-1]).name
                for key in (("uri", normalize_uri(uri)), ("file", file), ("file", PurePosixPath(file).stem)):
                    self._name_index.setdefault(key, set()).add(image_id)
        return self._name_index

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
