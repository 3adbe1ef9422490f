"""Ground truth of a store's images, found through its manifest: depth maps, label maps, boxes.

A store's image and its ground truth are paired by file stem (any of the allowed suffixes); where
several files share the stem, by the folders they share with the image's path:
`images/validation/ADE_val_00000001.jpg` pairs with `annotations/validation/ADE_val_00000001.png`. A list file pairs them explicitly instead (NYU-v2's `nyu_test.txt`: lines
`image truth [...]`, whitespace- or comma-separated, relative to the list's folder).
"""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
from PIL import Image

from pipeline.store.reader import FeatureStore
from pipeline.store.uris import normalize_uri, read_uri

DENSE_SUFFIXES = (".png", ".npy")
LIST_SUFFIXES = (".txt", ".csv")


def shared_tail(a: PurePosixPath, b: PurePosixPath) -> int:
    """How many trailing folder names two paths share (their file names aside)."""
    count = 0
    for x, y in zip(reversed(a.parent.parts), reversed(b.parent.parts)):
        if x != y:
            break
        count += 1
    return count


class TruthFiles:
    """Ground-truth file URIs of a store's ok images: `files[image_id]`; `missing` names the rest."""

    def __init__(self, uri: str, store: FeatureStore, suffixes: tuple[str, ...], storage_options: dict[str, Any] | None = None) -> None:
        options = storage_options or {}
        fs, path = fsspec.core.url_to_fs(uri, **options)
        self.files: dict[str, str] = {}
        ok = [r for r in store.manifest.to_pylist() if r["status"] == "ok"]
        if fs.isfile(path) and path.endswith(LIST_SUFFIXES):
            self._from_list(uri, store, options, {r["image_id"] for r in ok})
        else:
            self._from_folder(fs, path, ok, suffixes)
        if not self.files:
            raise FileNotFoundError(f"no ground truth under {uri} pairs with an image of {store.uri} (files with {', '.join(suffixes)}, named like the images, or a list file)")
        self.missing = [r["image_id"] for r in ok if r["image_id"] not in self.files]

    def _from_folder(self, fs: Any, path: str, ok: list[dict[str, Any]], suffixes: tuple[str, ...]) -> None:
        """Pair by file stem; among files of one stem, the one whose folders match the image's
        trailing folders furthest (images/val/x.jpg -> labels/val/x.png, not labels/train/x.png)."""
        by_stem: dict[str, list[PurePosixPath]] = defaultdict(list)
        for found in fs.find(path.rstrip("/")):
            if found.endswith(suffixes):
                by_stem[PurePosixPath(found).stem].append(PurePosixPath(found))
        for row in ok:
            image = PurePosixPath(normalize_uri(row["uri"]).replace("#", "/"))
            candidates = by_stem.get(image.stem, [])
            ranked = sorted(((shared_tail(image, c), str(c)) for c in candidates), reverse=True)
            if len(ranked) == 1 or (len(ranked) > 1 and ranked[0][0] > ranked[1][0]):
                self.files[row["image_id"]] = fs.unstrip_protocol(ranked[0][1])

    def _from_list(self, uri: str, store: FeatureStore, options: dict[str, Any], ok: set[str]) -> None:
        root = uri.rsplit("/", 1)[0]
        for line in read_uri(uri, options).decode().splitlines():
            fields = [f for f in line.replace(",", " ").split() if f]
            if len(fields) < 2 or fields[1] == "None" or fields[0] in ("image", "uri"):
                continue  # a header, or the NYU lists' images without depth
            try:
                image_id = store.find(f"{root}/{fields[0].lstrip('/')}")
            except KeyError:
                continue
            if image_id in ok:
                self.files[image_id] = f"{root}/{fields[1].lstrip('/')}"


def read_depth(uri: str, depth_scale: float, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """Depth in metres, float32: a 16-bit PNG divided by `depth_scale` (NYU: millimetres, 1000), or a .npy in metres."""
    data = read_uri(uri, storage_options or {})
    if uri.endswith(".npy"):
        return np.load(io.BytesIO(data)).astype(np.float32)
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / depth_scale


def read_labels(uri: str, storage_options: dict[str, Any] | None = None) -> np.ndarray:
    """A label map: the PNG's values (palette indices for palette PNGs), or a .npy."""
    data = read_uri(uri, storage_options or {})
    if uri.endswith(".npy"):
        return np.load(io.BytesIO(data))
    return np.asarray(Image.open(io.BytesIO(data)))


# ---------------------------------------------------------------------------- boxes


def voc_boxes(xml: bytes, no_hard: bool = False) -> np.ndarray:
    """[n, 4] boxes (x0, y0, x1, y1) of a VOC annotation, as LOST reads them: the 1-based inclusive
    corners become x0 = xmin - 1, x1 = xmax; with `no_hard`, truncated and difficult objects are left out."""
    boxes = []
    for item in ElementTree.fromstring(xml).iter("object"):
        hard = item.findtext("truncated", "0").strip() == "1" or item.findtext("difficult", "0").strip() == "1"
        if no_hard and hard:
            continue
        corner = item.find("bndbox")
        x0, y0, x1, y1 = (int(float(corner.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x0 - 1, y0 - 1, x1, y1])
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


class BoxTruth:
    """Ground-truth boxes by image file stem: a folder of VOC XML annotations, or a CSV with
    columns image,x0,y0,x1,y1 (pixels, continuous, x1 and y1 exclusive)."""

    def __init__(self, uri: str, no_hard: bool = False, storage_options: dict[str, Any] | None = None) -> None:
        options = storage_options or {}
        self.boxes: dict[str, np.ndarray] = {}
        if uri.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(read_uri(uri, options).decode())))
            wanted = {"image", "x0", "y0", "x1", "y1"}
            if rows and not wanted <= set(rows[0]):
                raise ValueError(f"{uri}: columns must include {sorted(wanted)}, got {sorted(rows[0])}")
            grouped: dict[str, list[list[float]]] = defaultdict(list)
            for row in rows:
                grouped[PurePosixPath(row["image"]).stem].append([float(row[k]) for k in ("x0", "y0", "x1", "y1")])
            self.boxes = {stem: np.asarray(b, np.float64) for stem, b in grouped.items()}
        else:
            fs, path = fsspec.core.url_to_fs(uri, **options)
            for file in fs.glob(f"{path.rstrip('/')}/*.xml"):
                self.boxes[PurePosixPath(file).stem] = voc_boxes(fs.cat_file(file), no_hard)
        if not self.boxes:
            raise FileNotFoundError(f"no boxes in {uri} (a folder of VOC .xml annotations, or a .csv of image,x0,y0,x1,y1)")
