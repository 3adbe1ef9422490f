"""A synthetic retrieval set: groups of augmented copies of distinct real photos (scikit-image's data)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from skimage import data

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")
AUGMENTATIONS = ("crop", "flip", "jitter", "rotate")


def augment(image: Image.Image, how: str, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    if how == "crop":
        scale = rng.uniform(0.7, 0.85)
        w, h = int(width * scale), int(height * scale)
        left, top = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        return image.crop((left, top, left + w, top + h))
    if how == "flip":
        return ImageOps.mirror(image)
    if how == "jitter":
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
        return ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    return image.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BICUBIC, expand=False)


def write_retrieval_set(folder: Path, seed: int = 0) -> dict[str, list[str]]:
    """JPEGs named `<photo>_<augmentation>.jpg`; returns group -> image names (file stems)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    groups = {}
    for photo in PHOTOS:
        image = Image.fromarray(getattr(data, photo)()).convert("RGB")
        names = []
        for how in AUGMENTATIONS:
            buffer = io.BytesIO()
            augment(image, how, rng).save(buffer, format="JPEG", quality=90)
            (folder / f"{photo}_{how}.jpg").write_bytes(buffer.getvalue())
            names.append(f"{photo}_{how}")
        groups[photo] = names
    return groups


def write_ground_truth(groups: dict[str, list[str]], folder: Path) -> tuple[Path, Path]:
    """The same truth twice: a CSV (query, positives) and a revisited Oxford pickle (easy only)."""
    import pickle

    names = [n for members in groups.values() for n in members]
    csv_path, pkl_path = folder / "truth.csv", folder / "truth.pkl"
    rows = ["query,positives"] + [f"{n},{' '.join(m for m in members if m != n)}" for members in groups.values() for n in members]
    csv_path.write_text("\n".join(rows) + "\n")
    gnd = [{"easy": [names.index(m) for m in members if m != n], "hard": [], "junk": []} for members in groups.values() for n in members]
    pkl_path.write_bytes(pickle.dumps({"imlist": names, "qimlist": names, "gnd": gnd}))
    return csv_path, pkl_path
