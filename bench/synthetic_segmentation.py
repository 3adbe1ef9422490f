"""Seeded synthetic data with exact masks for the segmentation consumers: a DAVIS-layout video of
textured shapes moving over a textured background, and salient-object images (ECSSD layout).

Used by the tests and by bench/bench_segmentation.py; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.draw import disk, ellipse, polygon

from pipeline.tasks.segmentation.davis import write_labels


@dataclass
class Video:
    frames: list[np.ndarray]  # [H, W, 3] uint8
    masks: list[np.ndarray]  # [H, W] uint8: 0 background, 1..N objects


def _texture(rng: np.random.Generator, shape: tuple[int, int], smooth: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal((*shape, 3)), sigma=(smooth, smooth, 0))
    return noise / noise.std()


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return 0.3 + 0.08 * _texture(rng, (height, width), height / 12) + 0.03 * rng.standard_normal((height, width, 3))


def _foreground(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A bright colour with diagonal stripes and grain: distinct from the background and each other."""
    stripes = 0.1 * np.sin(np.add.outer(np.arange(height) * rng.uniform(0.3, 0.7), np.arange(width) * rng.uniform(0.3, 0.7)))
    return rng.uniform(0.55, 0.95, 3) + stripes[..., None] + 0.04 * rng.standard_normal((height, width, 3))


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (image.clip(0, 1) * 255).round().astype(np.uint8)


def make_video(height: int = 96, width: int = 160, frames: int = 10, seed: int = 0) -> Video:
    """Two objects (an ellipse, a triangle) with their own textures, moving 2 to 4 pixels per frame
    in straight lines over a fixed background, drifting apart (object 1 left, object 2 right)."""
    rng = np.random.default_rng(seed)
    background = _background(rng, height, width)
    textures = [_foreground(rng, height, width) for _ in range(2)]
    starts = [np.array([0.45 * height, 0.3 * width]), np.array([0.5 * height, 0.65 * width])]
    velocities = [rng.uniform(2, 4, 2) * [rng.choice([-1, 1]), side] for side in (-1, 1)]
    out = Video([], [])
    for t in range(frames):
        image, labels = background.copy(), np.zeros((height, width), np.uint8)
        for obj, (start, velocity, texture) in enumerate(zip(starts, velocities, textures), start=1):
            cy, cx = start + t * velocity
            if obj == 1:
                rows, cols = ellipse(cy, cx, height * 0.22, width * 0.14, shape=(height, width))
            else:
                r = height * 0.22
                rows, cols = polygon([cy - r, cy + r, cy + r], [cx, cx - r, cx + r], shape=(height, width))
            image[rows, cols] = texture[rows, cols]
            labels[rows, cols] = obj
        out.frames.append(_to_uint8(image))
        out.masks.append(labels)
    return out


def write_davis(root: Path, videos: dict[str, Video], split: str = "val") -> None:
    """Videos in the DAVIS-2017 layout, every frame annotated."""
    (root / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text("".join(f"{name}\n" for name in videos))
    for name, video in videos.items():
        frames, annotations = root / "JPEGImages" / "480p" / name, root / "Annotations" / "480p" / name
        frames.mkdir(parents=True, exist_ok=True)
        annotations.mkdir(parents=True, exist_ok=True)
        for t, (frame, mask) in enumerate(zip(video.frames, video.masks)):
            Image.fromarray(frame).save(frames / f"{t:05d}.jpg", quality=95)
            write_labels(str(annotations / f"{t:05d}.png"), mask)


def make_salient(size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One bright textured disk or ellipse, off centre, on a textured background: (image, mask)."""
    rng = np.random.default_rng(seed)
    image = _background(rng, size, size)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    if rng.random() < 0.5:
        rows, cols = disk((cy, cx), rng.uniform(0.15, 0.3) * size, shape=(size, size))
    else:
        rows, cols = ellipse(cy, cx, rng.uniform(0.15, 0.3) * size, rng.uniform(0.15, 0.3) * size, shape=(size, size), rotation=rng.uniform(0, np.pi))
    image[rows, cols] = _foreground(rng, size, size)[rows, cols]
    mask = np.zeros((size, size), bool)
    mask[rows, cols] = True
    return _to_uint8(image), mask


def write_saliency(root: Path, count: int, size: int = 128, seed: int = 0) -> None:
    """`count` salient-object images in the ECSSD layout: images/<n>.jpg, ground_truth_mask/<n>.png."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "ground_truth_mask").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image, mask = make_salient(size, seed * 1000 + i)
        Image.fromarray(image).save(root / "images" / f"{i:04d}.jpg", quality=95)
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "ground_truth_mask" / f"{i:04d}.png")
