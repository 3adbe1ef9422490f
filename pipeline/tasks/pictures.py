"""Pictures of feature maps: project maps to RGB with one PCA fitted on all of them, tile them;
`render` draws stored images as original | plain ViT features | SRT features (srt-visualize,
srt-serve), each column named above it.

One PCA over every map shown (plain and SRT, all images) keeps colours comparable across the
picture; component signs are fixed (largest loading positive) so the same maps always give the
same colours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline.engine.models import ViT
from pipeline.engine.srt import SRT
from pipeline.extraction.images import ImageError, prepare
from pipeline.extraction.reading import read_bytes
from pipeline.extraction.weights import load_store_model
from pipeline.extraction.worker import build_engine
from pipeline.store.reader import FeatureStore

MAX_FIT_CELLS = 50_000
TILE = 256  # width of each tile of a rendered picture
LABEL_HEIGHT = 28  # the strip above the tiles naming each column
COLUMNS = ("original (model input)", "plain ViT features", "SRT features")


def pca_rgb(maps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """[C, h, w] maps -> [h, w, 3] images in 0..1, from the top 3 principal components of all cells."""
    cells = np.concatenate([m.reshape(m.shape[0], -1).T for m in maps]).astype(np.float64)
    mean = cells.mean(axis=0)
    step = max(1, len(cells) // MAX_FIT_CELLS)  # a deterministic subsample bounds the SVD's cost
    _, _, components = np.linalg.svd(cells[::step] - mean, full_matrices=False)
    basis = components[:3]
    basis *= np.sign(basis[np.arange(len(basis)), np.abs(basis).argmax(axis=1)])[:, None]
    projected = [(m.reshape(m.shape[0], -1).T - mean) @ basis.T for m in maps]
    everything = np.concatenate(projected)
    low, high = np.percentile(everything, 1, axis=0), np.percentile(everything, 99, axis=0)
    scale = np.where(high > low, high - low, 1.0)
    return [np.clip((p - low) / scale, 0, 1).reshape(*m.shape[1:], -1) for p, m in zip(projected, maps)]


def tile(image: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """An [h, w, 3] array in 0..1 as an image of `size` (width, height), cells kept sharp."""
    return Image.fromarray((image * 255).round().astype(np.uint8)).resize(size, Image.Resampling.NEAREST)


def grid(rows: Sequence[Sequence[Image.Image]], labels: Sequence[str] = ()) -> Image.Image:
    """Rows of equally sized tiles as one picture, under a strip naming each column when `labels` are given."""
    width, height = rows[0][0].size
    top = LABEL_HEIGHT if labels else 0
    canvas = Image.new("RGB", (width * max(len(r) for r in rows), top + height * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=16)
    for x, label in enumerate(labels):
        draw.text((x * width + width / 2, top / 2), label, fill="black", font=font, anchor="mm")
    for y, row in enumerate(rows):
        for x, picture in enumerate(row):
            canvas.paste(picture, (x * width, top + y * height))
    return canvas


def render(
    store: FeatureStore, image_ids: list[str], *, pretrained=False, weights=None, layer=None, storage_options=None, vit: ViT | None = None, blobs: list[bytes] | None = None
) -> Image.Image:
    """Original | plain ViT features | SRT features of stored images (a PIL image, one row per
    image): the SRT maps read from the store, the plain maps computed by the store's own model
    (`vit` when already loaded) on the same model input, both projected by one PCA. `blobs`: the
    images' bytes when already read. An image that cannot be read or decoded raises ImageError."""
    options = storage_options or {}
    config = store.config
    image_ids = [store.find(name) for name in image_ids]
    for image_id in image_ids:
        store.transform(image_id)  # an error row fails here, saying why it has no features
    layer = store.layer_index(layer)
    vit = vit or load_store_model(config["model"], config["weights"], pretrained=pretrained, weights=weights, storage_options=options)
    _, policy = build_engine(vit, config, batch_size=1)
    plain_engine = SRT(vit, layers=(layer,), shifts=[(0, 0)], stride=vit.patch_size, norm=config["norm"])
    if blobs is None:
        plan = store.plan()
        blobs = read_bytes([plan[i] for i in image_ids], options)
    originals, maps = [], []
    for image_id, blob in zip(image_ids, blobs):
        if isinstance(blob, Exception):
            raise ImageError("read", f"cannot read {image_id}: {blob}")
        prepared = prepare(blob, policy)
        shown = prepared.tensor * torch.tensor(policy.std).view(3, 1, 1) + torch.tensor(policy.mean).view(3, 1, 1)
        originals.append(shown.clamp(0, 1).permute(1, 2, 0).numpy())
        maps += [plain_engine(prepared.tensor[None])[layer][0].numpy(), store.dense(image_id, layer).astype("float32")]
    colours = pca_rgb(maps)
    rows = []
    for i, original in enumerate(originals):
        height, width = original.shape[:2]
        size = (TILE, round(TILE * height / width))
        rows.append([tile(original, size), tile(colours[2 * i], size), tile(colours[2 * i + 1], size)])
    return grid(rows, COLUMNS)
