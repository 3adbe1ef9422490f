"""The DAVIS-2017 layout, read and written through fsspec (local, s3://, gs://, ...).

    <root>/ImageSets/2017/<split>.txt            one video name per line
    <root>/JPEGImages/480p/<video>/<frame>.jpg   frames, in name order
    <root>/Annotations/480p/<video>/<frame>.png  palette PNGs: 0 background, 1..N objects, 255 void

Results are written as `<out>/<video>/<frame>.png` palette PNGs, which the DAVIS evaluation reads.
`propagate_davis` segments videos from a feature store extracted from the frames and scores them.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image

from pipeline.extraction.images import from_original, to_original
from pipeline.store.reader import FeatureStore
from pipeline.store.uris import uri_path
from pipeline.tasks.segmentation.metrics import VOID, davis_scores, davis_summary
from pipeline.tasks.segmentation.propagation import PropagationSettings, one_hot, propagate_video, to_labels

RESOLUTION = "480p"


def _palette() -> list[int]:
    """The DAVIS colour map: bit-interleaved colours, as in the dataset's own annotations."""
    colours = []
    for index in range(256):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours += [r, g, b]
    return colours


PALETTE = _palette()


class DavisLayout:
    def __init__(self, root: str, storage_options: dict[str, Any] | None = None) -> None:
        self.root = root.rstrip("/")
        self.options = storage_options or {}
        self.fs, self.path = fsspec.core.url_to_fs(self.root, **self.options)

    def videos(self, split: str) -> list[str]:
        index = f"{self.path}/ImageSets/2017/{split}.txt"
        if not self.fs.exists(index):
            raise FileNotFoundError(f"no split file {self.root}/ImageSets/2017/{split}.txt")
        return [line.strip() for line in self.fs.cat_file(index).decode().splitlines() if line.strip()]

    def frames(self, video: str) -> list[str]:
        """Frame names (no extension) in order."""
        names = sorted(PurePosixPath(p).stem for p in self.fs.glob(f"{self.path}/JPEGImages/{RESOLUTION}/{video}/*.jpg"))
        if not names:
            raise FileNotFoundError(f"no frames under {self.root}/JPEGImages/{RESOLUTION}/{video}/")
        return names

    def annotated_frames(self, video: str) -> list[str]:
        """Names (no extension) of the frames with an annotation PNG, in order: what DAVIS scores."""
        names = sorted(PurePosixPath(p).stem for p in self.fs.glob(f"{self.path}/Annotations/{RESOLUTION}/{video}/*.png"))
        if not names:
            raise FileNotFoundError(f"no annotations under {self.root}/Annotations/{RESOLUTION}/{video}/")
        return names

    def annotation(self, video: str, frame: str) -> np.ndarray | None:
        """Labels [H, W] uint8 of one frame, or None when it has no annotation."""
        path = f"{self.path}/Annotations/{RESOLUTION}/{video}/{frame}.png"
        if not self.fs.exists(path):
            return None
        return read_labels(self.fs.cat_file(path))


def read_labels(data: bytes) -> np.ndarray:
    """A palette (or grey) PNG -> its label indices [H, W] uint8."""
    image = Image.open(io.BytesIO(data))
    if image.mode not in ("P", "L"):
        raise ValueError(f"annotations are palette or grey PNGs of label indices, got mode {image.mode}")
    return np.asarray(image, dtype=np.uint8)


def write_labels(uri: str, labels: np.ndarray, storage_options: dict[str, Any] | None = None) -> None:
    """Labels [H, W] -> a palette PNG with the DAVIS colours."""
    image = Image.fromarray(labels.astype(np.uint8))
    image.putpalette(PALETTE)  # makes the grey image a palette image
    with fsspec.open(uri, "wb", **(storage_options or {})) as handle:
        image.save(handle, format="PNG")


def frame_key(uri: str) -> tuple[str, str]:
    """(video, frame) of a frame's URI: its folder and file stem, whatever the mount or bucket."""
    path = uri_path(uri)
    return path.parent.name, path.stem


# ---------------------------------------------------------------------------- propagation from a store


@dataclass
class VideoResult:
    video: str
    frames: int
    seconds: float  # reading features, propagation and upsampling; not writing PNGs
    scores: dict[int, dict[str, float]] | None  # {object: {"J-Mean": ..., "F-Decay": ...}}; None without full annotations


def store_frames(store: FeatureStore) -> dict[tuple[str, str], str]:
    """(video, frame) -> image_id of every ok frame in the store."""
    return {frame_key(r["uri"]): r["image_id"] for r in store.manifest.to_pylist() if r["status"] == "ok"}


def propagate_davis(
    store: FeatureStore,
    layout: DavisLayout,
    videos: list[str],
    out: str,
    settings: PropagationSettings,
    layer: int | None = None,
) -> Iterator[VideoResult]:
    """Segment each video from its first annotation and the store's features, write the result
    PNGs under `out`, and score them where every frame is annotated."""
    store.warn_if_cropped()
    index = store_frames(store)
    stride = store.config["stride"]
    for video in videos:
        frames = layout.frames(video)
        missing = [f for f in frames if (video, f) not in index]
        if missing:
            raise KeyError(
                f"{len(missing)} frames of {video} (e.g. {missing[0]}) have no features in {store.uri}; "
                f"extract them with --dataset {layout.root}/JPEGImages/{RESOLUTION} --resize aspect"
            )
        first = layout.annotation(video, frames[0])
        if first is None:
            raise FileNotFoundError(f"{video} has no first-frame annotation {frames[0]}.png")
        first = np.where(first == VOID, 0, first)
        ids = [index[(video, f)] for f in frames]
        transform = store.transform(ids[0])
        cells = (transform["input_size"][0] // stride, transform["input_size"][1] // stride)
        first_labels = one_hot(from_original(first, region=transform["region"], size=cells), int(first.max()) + 1)
        features = (torch.from_numpy(store.dense(i, layer).astype(np.float32)) for i in ids)
        predicted = [first]
        write_labels(f"{out}/{video}/{frames[0]}.png", first, layout.options)
        seconds = 0.0
        started = time.perf_counter()
        for frame, image_id, soft in zip(frames[1:], ids[1:], propagate_video(features, first_labels, settings)):
            t = store.transform(image_id)
            labels = to_original(to_labels(soft, stride), height=t["height"], width=t["width"], region=t["region"])
            seconds += time.perf_counter() - started
            write_labels(f"{out}/{video}/{frame}.png", labels, layout.options)
            predicted.append(labels)
            started = time.perf_counter()
        truth = [layout.annotation(video, f) for f in frames]
        scores = davis_scores(truth, predicted) if all(t is not None for t in truth) and len(frames) >= 3 else None
        yield VideoResult(video, len(frames), seconds, scores)


def score_results(layout: DavisLayout, results: str, videos: list[str]) -> Iterator[VideoResult]:
    """Score a results folder in the DAVIS layout (`<results>/<video>/<frame>.png`, indexed PNGs),
    made by any method, as the official semi-supervised evaluation does: every annotated frame
    but the first and last."""
    fs, path = fsspec.core.url_to_fs(results.rstrip("/"), **layout.options)
    for video in videos:
        started = time.perf_counter()
        frames = layout.annotated_frames(video)
        predicted = []
        for frame in frames:
            png = f"{path}/{video}/{frame}.png"
            if not fs.exists(png):
                raise FileNotFoundError(f"{results.rstrip('/')}/{video}/{frame}.png is missing: results are indexed PNGs named like the annotations")
            predicted.append(read_labels(fs.cat_file(png)))
        truth = [layout.annotation(video, frame) for frame in frames]
        yield VideoResult(video, len(frames), time.perf_counter() - started, davis_scores(truth, predicted))


def summarize(results: list[VideoResult]) -> dict[str, float]:
    """The DAVIS-2017 global figures (J&F, and J and F Mean, Recall, Decay) over every scored object of every video."""
    objects = [score for r in results if r.scores for score in r.scores.values()]
    return davis_summary(objects) if objects else {}
