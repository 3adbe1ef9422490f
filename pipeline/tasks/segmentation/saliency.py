"""Salient-region segmentation of a feature store's images by TokenCut, scored against masks.

Ground truth comes in the ECSSD / DUTS layout: a folder of binary PNG masks named like the
images (`0001.jpg` <-> `0001.png`). Masks are predicted on the stored map (attention keys by
default, as TokenCut does, or block outputs) and mapped back onto the original image.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from pipeline.extraction.images import to_original
from pipeline.store.reader import FeatureStore
from pipeline.store.uris import uri_path
from pipeline.tasks.segmentation.metrics import max_f, pixel_accuracy, saliency_iou
from pipeline.tasks.shared.tokencut import EPS, TAU, tokencut


@dataclass
class SalientMask:
    image_id: str
    name: str  # the image's file stem
    mask: np.ndarray  # [H, W] bool over the original image


def segment_store(store: FeatureStore, *, keys: bool = True, layer: int | None = None, tau: float = TAU, eps: float = EPS) -> Iterator[SalientMask]:
    """TokenCut masks of every ok image of the store, in manifest order."""
    store.layer_index(layer, keys)  # fails now, naming what is stored, rather than per image
    store.warn_if_cropped()
    for record in store.manifest.to_pylist():
        if record["status"] != "ok":
            continue
        cut = tokencut(store.dense(record["image_id"], layer, keys).astype(np.float32), tau, eps)
        t = store.transform(record["image_id"])
        mask = to_original(cut.mask.astype(np.uint8), height=t["height"], width=t["width"], region=t["region"]).astype(bool)
        yield SalientMask(record["image_id"], uri_path(record["uri"]).stem, mask)


class MaskFolder:
    """Ground-truth masks: grey PNGs in one folder, by image file stem; every non-zero pixel is
    salient, as in TokenCut's evaluation (a grey value of 100 is foreground there too)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None) -> None:
        self.fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        self.paths = {PurePosixPath(p).stem: p for p in self.fs.glob(f"{path.rstrip('/')}/*.png")}
        if not self.paths:
            raise FileNotFoundError(f"no PNG masks under {uri}")

    def read(self, name: str) -> np.ndarray:
        if name not in self.paths:
            raise KeyError(f"no mask {name}.png for image {name}")
        return np.asarray(Image.open(io.BytesIO(self.fs.cat_file(self.paths[name]))).convert("L"))


def scores(predictions: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, float]:
    """maxF over the set, mean IoU and mean pixel accuracy of binary predictions against grey
    masks, as TokenCut's evaluation computes them (IoU is NaN if an image has both masks empty)."""
    for prediction, truth in zip(predictions, truths, strict=True):
        if prediction.shape != truth.shape:
            raise ValueError(f"a prediction of {prediction.shape} against a mask of {truth.shape}")
    binary = [p.astype(np.float32) for p in predictions]
    return {
        "maxF": max_f(binary, truths),
        "IoU": float(np.mean([saliency_iou(p, t) for p, t in zip(binary, truths)])),
        "accuracy": float(np.mean([pixel_accuracy(p, t) for p, t in zip(binary, truths)])),
        "images": len(predictions),
    }
