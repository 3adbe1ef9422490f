"""The Zarr v3 feature store's layout: creation with a provenance check, shard writes, the PCA basis.

Layout under the output URI (N = planned items, n = one image per chunk):

    zarr.json                 group attributes: {"srt": provenance of the run, "plan_size": N}
    plan/                     the work plan: an index and a part per listed input (pipeline.store.plan)
    manifest/*.parquet        committed rows: a part per shard, range files of shards (pipeline.store.manifest)
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
Arrays are sized from the plan up front, and grow only when --append adds rows after the
existing ones (metadata only: no stored object changes). Rows of failed images hold the fill
value 0 (stored: a work shard is written whole, `pipeline.store.objects`).
"""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.errors import ContainsArrayError, ZarrUserWarning

from pipeline.engine.models import Tap
from pipeline.engine.pca import Basis
from pipeline.store.objects import ObjectWriter
from pipeline.store.uris import one_line

ATTRIBUTE = "srt"
OUTPUTS = ("dense", "cls", "pooled", "registers")  # the store's array kinds
# Provenance that says how a run computed, not what it stored: no part of a fingerprint, so a
# store resumes (and an index stays fresh) across package versions and decoders.
RUN_FACTS = ("package_version", "decoder")
VECTOR_KINDS = tuple(kind for kind in OUTPUTS if kind != "dense")


class StoreMismatchError(ValueError):
    """An existing output was made with a different config."""


class NotWritableError(OSError):
    """The output URI cannot hold a store (an existing file, a read-only or pseudo filesystem)."""


@dataclass(frozen=True)
class StoreSpec:
    """What a run tells the store to lay out and write its arrays; made by the job's config
    (`ResolvedConfig.store_spec`), so the store never needs to know the job's flags."""

    out: str
    storage_options: dict[str, Any]
    provenance: dict[str, Any]  # the group attributes: the fingerprint plus the package version
    taps: tuple[Tap, ...]
    outputs: tuple[str, ...]
    fixed_shapes: dict[str, tuple[int, ...]]  # per-image shapes known before any image is read, by kind
    shard_size: int
    stride: int
    dtype: str
    codec: str


def fingerprint_of(provenance: dict[str, Any]) -> dict[str, Any]:
    """The part of a store's provenance a resumed run, an index or a query must match."""
    return {k: v for k, v in provenance.items() if k not in RUN_FACTS}


def differences(stored: dict[str, Any], wanted: dict[str, Any], names: tuple[str, str] = ("stored", "requested")) -> list[str]:
    """Human-readable differences between two fingerprints, e.g. "stride: stored 8, requested 4"."""
    keys = sorted(stored.keys() | wanted.keys())
    return [f"{k}: {names[0]} {stored.get(k)!r}, {names[1]} {wanted.get(k)!r}" for k in keys if stored.get(k) != wanted.get(k)]


# What two stores may differ in and still hold features one head can be trained on and tested on:
# where the images came from and how the features were kept, not how they were computed. Layers
# are compared by the blocks a reader chooses, not by every block a store holds.
STORAGE_FACTS = ("dataset", "shard_size", "max_pixels", "codec", "dtype", "outputs", "pca_dims", "precision", "layers", "keys")


def feature_differences(first: dict[str, Any], second: dict[str, Any], names: tuple[str, str]) -> list[str]:
    """How two stores' features were computed differently (model, weights, image policy, shifts):
    features of such stores are not the same function of their images."""
    def computed(provenance: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in fingerprint_of(provenance).items() if k not in STORAGE_FACTS}

    return differences(computed(first), computed(second), names)


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


def store_exists(out: str, storage_options: dict[str, Any] | None) -> bool:
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    return fs.exists(f"{path.rstrip('/')}/zarr.json")


def stored_provenance(out: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The provenance of an existing store, or None when there is no store at `out`."""
    if not store_exists(out, storage_options):
        return None
    return dict(open_group(out, "r", storage_options).attrs.get(ATTRIBUTE, {}))


def check_existing(out: str, storage_options: dict[str, Any] | None, fingerprint: dict[str, Any], *, overwrite: bool = False) -> bool:
    """Whether `out` holds a store to resume; it must come from the same config (`fingerprint`).

    Raises StoreMismatchError naming every difference. With `overwrite` nothing is resumed, and
    the old output stays until `remove_output` (after the new listing succeeded).
    """
    existing = stored_provenance(out, storage_options)
    if existing is None or overwrite:
        return False
    if diff := differences(fingerprint_of(existing), fingerprint):
        raise StoreMismatchError(
            f"--out {out} was written with a different config; pass --overwrite to replace it, "
            "or choose another --out. Differences: " + "; ".join(diff)
        )
    return True


def check_writable(out: str, storage_options: dict[str, Any] | None = None) -> None:
    """Fail before any listing when `--out` cannot hold a store: an existing file, a path under a
    file, a read-only or pseudo filesystem. A probe object is written and removed, and so are the
    local folders made for it, so a refused or failed run leaves nothing behind."""
    try:
        fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
        path = path.rstrip("/")
        if fs.isfile(path):
            raise NotWritableError(f"{out} is an existing file; give a folder for the store")
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
    except NotWritableError:
        raise
    except Exception as error:  # filesystems, credentials and endpoints fail in many types
        hint = "; check the URI and --storage-options" if "://" in out else ""
        raise NotWritableError(f"cannot write a store at {out} ({one_line(error)}){hint}") from error


def remove_output(out: str, storage_options: dict[str, Any] | None = None, keep: str | None = None) -> None:
    """Delete whatever is at `out` (--overwrite), so no file of the old run is mistaken for the new
    one's; `keep`: a path under `out` to leave (the new run's plan listing, made before)."""
    fs, path = fsspec.core.url_to_fs(out, **(storage_options or {}))
    path = path.rstrip("/")
    if not fs.exists(path):
        return
    if keep is None:
        fs.rm(path, recursive=True)
        return
    kept = f"{path}/{keep.strip('/')}"
    folder = path
    while folder != kept:  # down the kept path, removing every sibling on the way
        child = kept[: kept.index("/", len(folder) + 1)] if "/" in kept[len(folder) + 1 :] else kept
        for entry in fs.ls(folder, detail=False):
            if entry.rstrip("/") != child:
                fs.rm(entry, recursive=True)
        folder = child


def create_store(spec: StoreSpec, plan_size: int) -> zarr.Group:
    """A new group with the run's provenance and every array whose shape the plan fixes."""
    # "a", not "w": "w" would wipe the plan already saved beside it (check_existing ran before).
    group = open_group(spec.out, "a", spec.storage_options)
    group.attrs.update({ATTRIBUTE: spec.provenance, "plan_size": plan_size})
    for tap in spec.taps:
        for kind, shape in spec.fixed_shapes.items():
            if kind in spec.outputs:
                _create(group, f"{kind}/{tap.name}", (plan_size, *shape), spec)
    return group


def grow_store(group: zarr.Group, plan_size: int) -> None:
    """--append: every per-image array grows to the new plan size (its metadata only; chunks and
    shards of existing rows are not touched), then the group says so."""
    with warnings.catch_warnings():  # zarr notes the plan and manifest folders beside the arrays
        warnings.simplefilter("ignore", ZarrUserWarning)
        arrays = [node for _, node in group.members(max_depth=None) if isinstance(node, zarr.Array) and not node.path.startswith("pca/")]
    for array in arrays:
        if array.shape[0] < plan_size:
            array.resize((plan_size, *array.shape[1:]))
    group.attrs["plan_size"] = plan_size


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


def _create(group: zarr.Group, path: str, shape: tuple[int, ...], spec: StoreSpec) -> zarr.Array:
    """Dense: one image per chunk, one work shard per Zarr shard. Vectors: one work shard per chunk.
    Creating an existing array opens it."""
    per_shard = (spec.shard_size, *shape[1:])
    dense = path.startswith("dense/")
    names, attributes = axes(path, spec.stride)
    try:
        return group.create_array(
            path,
            shape=shape,
            chunks=(1, *shape[1:]) if dense else per_shard,
            shards=per_shard if dense else None,
            dtype=spec.dtype,
            compressors=compressors(spec.codec),
            fill_value=0,
            dimension_names=names,
            attributes=attributes,
        )
    except ContainsArrayError:  # another worker created this size bucket first
        return group[path]


def write_shard(
    group: zarr.Group,
    spec: StoreSpec,
    shard: int,
    arrays: dict[str, np.ndarray],
    plan_size: int,
    opened: dict[str, ObjectWriter] | None = None,
) -> None:
    """Write one whole work shard: `arrays` maps array paths to [rows in shard, ...] blocks, each
    stored as whole objects (`pipeline.store.objects`), of a plan of `plan_size` rows as the
    writer knows it (it grows while the dataset is listed: the driver grows the arrays).
    `opened`: writers of arrays already opened by earlier calls (opening one reads its metadata), added to."""
    start = shard * spec.shard_size
    opened = {} if opened is None else opened
    for path, block in arrays.items():
        if path not in opened:
            array = group[path] if path in group else _create(group, path, (plan_size, *block.shape[1:]), spec)
            opened[path] = ObjectWriter.of(array, spec.out, spec.storage_options)
        opened[path].write(start, block.astype(spec.dtype, copy=False), plan_size)


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


