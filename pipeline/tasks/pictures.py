"""Pictures of feature maps: project maps to RGB with one PCA fitted on all of them, tile them.

One PCA over every map shown (plain and SRT, all images) keeps colours comparable across the
picture; component signs are fixed (largest loading positive) so the same maps always give the
same colours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

MAX_FIT_CELLS = 50_000


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


def grid(rows: Sequence[Sequence[Image.Image]]) -> Image.Image:
    """Rows of equally sized tiles as one picture."""
    width, height = rows[0][0].size
    canvas = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, picture in enumerate(row):
            canvas.paste(picture, (x * width, y * height))
    return canvas
