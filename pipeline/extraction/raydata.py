"""Ray Data interop, both ways: SRT features inside a user's Ray Data pipeline, and a store as a
Ray Dataset for training downstream models on a cluster.

    ds = ray.data.read_images("s3://bucket/images")              # or read_binary_files: bytes
    feats = ds.map_batches(SRTPredictor, fn_constructor_kwargs={"model": "vit_small_patch16_224.dino",
                           "pretrained": True, "stride": 8}, concurrency=4, num_gpus=1, batch_size=64)

    vectors = read_store("s3://bucket/feats.zarr", kind="pooled")  # rows: image_id, uri, features
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch

from pipeline.engine.accelerator import view_budget
from pipeline.extraction.config import ExtractConfig, resolve
from pipeline.extraction.device_decoding import decode_encoded
from pipeline.extraction.images import (
    Encoded,
    ImageError,
    ImagePolicy,
    Prepared,
    prepare,
    prepare_array,
    prepare_or_defer,
)
from pipeline.extraction.weights import load_vit
from pipeline.extraction.worker import build_engine
from pipeline.store.reader import FeatureStore

OUTPUTS = ("pooled", "cls", "dense")


class SRTPredictor:
    """A callable class for `Dataset.map_batches`: one model per Ray Data actor.

    Takes the batch column `column` of decoded images ([H, W, 3] arrays, as `read_images` gives)
    or encoded bytes (`read_binary_files`), and adds `outputs` of the first tapped layer (pooled and
    cls vectors [C], dense maps [C, H/s, W/s]) and `error` ("" when the image was used). Every
    other keyword is an extraction flag (`--stride 8` is `stride=8`), validated as extraction
    validates it, so the features are those the extraction job would store. Images become square
    model inputs (`resize="square"`), so every row's arrays have one shape.
    """

    def __init__(self, *, column: str = "image", outputs: tuple[str, ...] = ("pooled", "cls"), device: str | None = None, **flags: Any) -> None:
        if unknown := [o for o in outputs if o not in OUTPUTS]:
            raise ValueError(f"outputs must be among {OUTPUTS}, got {unknown}")
        if flags.get("resize", "square") != "square":
            raise ValueError("SRTPredictor makes square inputs (resize='square'): a batch's rows must share one shape")
        resolved = resolve(ExtractConfig(dataset="ray-data", out="ray-data", **flags))
        c = resolved.config
        self.vit = load_vit(c.model, pretrained=c.pretrained, weights=c.weights, seed=c.seed, device=device, storage_options=c.storage_options)
        self.srt, self.policy = build_engine(self.vit, resolved.provenance(), batch_size=c.batch_size)
        side = (c.image_size, c.image_size)
        self.srt.batch_size = view_budget(self.srt, c.batch_size, side).views(side, self.vit.patch_size)  # a GPU's worth on CUDA
        self.column, self.outputs, self.tap = column, outputs, self.srt.taps[0]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        items = batch[self.column]
        inputs = [self._prepare(item, prepare_or_defer) for item in items]
        if self.policy.decoder == "device":  # the batch's JPEGs decoded together on the model's device
            inputs = decode_encoded(inputs, self.policy, self.vit.device, lambda i: self._prepare(items[i]))
        good = [i for i, item in enumerate(inputs) if isinstance(item, Prepared)]
        side = self.policy.size // self.srt.stride
        channels = self.vit.embed_dim
        shapes = {"pooled": (channels,), "cls": (channels,), "dense": (channels, side, side)}
        results = {name: np.zeros((len(inputs), *shapes[name]), np.float32) for name in self.outputs}
        if good:
            output = self.srt.run(torch.stack([inputs[i].tensor.to(self.vit.device) for i in good]))  # decoded on the host or the device
            values = {"pooled": output.pooled[self.tap], "cls": output.prefix[self.tap][:, 0], "dense": output.dense[self.tap]}
            for name in self.outputs:
                results[name][good] = values[name].cpu().numpy()
        errors = [f"{item.kind}: {item}" if isinstance(item, ImageError) else "" for item in inputs]
        return {**{k: v for k, v in batch.items() if k != self.column}, **results, "error": np.array(errors, dtype=object)}

    def _prepare(self, item: Any, decode: Callable[[bytes, ImagePolicy], Prepared | Encoded] = prepare) -> Prepared | Encoded | ImageError:
        """An item as a model input (`decode` takes encoded bytes), or the error that names why not."""
        try:
            if isinstance(item, (bytes, bytearray)):
                return decode(bytes(item), self.policy)
            return prepare_array(np.asarray(item), self.policy)
        except ImageError as error:
            return error


class _ShardReader:
    """Reads whole work shards of one store (opened once per Ray Data actor)."""

    def __init__(self, uri: str, kind: str, layer: int | None, storage_options: dict[str, Any] | None) -> None:
        self.store, self.kind, self.layer = FeatureStore.open(uri, storage_options), kind, layer
        manifest = self.store.manifest
        self.ok = [r for r in manifest.select(["image_id", "uri", "shard", "status"]).to_pylist() if r["status"] == "ok"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        shards = set(batch["shard"].tolist())
        rows = [r for r in self.ok if r["shard"] in shards]
        read = (lambda i: self.store.dense(i, self.layer)) if self.kind == "dense" else (lambda i: self.store.vector(self.kind, i, self.layer))
        return {
            "image_id": np.array([r["image_id"] for r in rows], dtype=object),
            "uri": np.array([r["uri"] for r in rows], dtype=object),
            "features": [read(r["image_id"]).astype(np.float32) for r in rows],
        }


def read_store(uri: str, kind: str = "pooled", layer: int | None = None, storage_options: dict[str, Any] | None = None, concurrency: int = 1) -> ray.data.Dataset:
    """A Ray Dataset of (image_id, uri, features) of every ok image of a store, read a work shard
    per task (`kind`: pooled, cls or dense; `layer`: a stored block, by default the only one)."""
    if kind not in ("pooled", "cls", "dense"):
        raise ValueError(f"kind must be pooled, cls or dense, got {kind!r}")
    store = FeatureStore.open(uri, storage_options)
    store.layer_index(layer)  # fails now, naming the stored layers, not inside a task
    shards = sorted(set(store.manifest.column("shard").to_pylist()))
    return ray.data.from_items([{"shard": s} for s in shards]).map_batches(
        _ShardReader, fn_constructor_kwargs={"uri": uri, "kind": kind, "layer": layer, "storage_options": storage_options}, batch_size=1, concurrency=concurrency
    )
