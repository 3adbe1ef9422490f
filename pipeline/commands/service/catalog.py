"""The indexes srt-serve answers for, each with its store, and everything it reads from them.

Every image is named as every command names one (`FeatureStore.find`: image_id, URI, file name
or its stem) and must be a row of the index's store: thumbnails and pictures are read only through
the store's own plan, with its storage options, never from a path a request gives. A request's
name is quoted cut short in answers, and answers never show the server's paths (`public`).
"""

from __future__ import annotations

import collections
import io
import json
import posixpath
import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.extraction.images import ImageError, Prepared, decode_scaled
from pipeline.extraction.reading import read_bytes
from pipeline.extraction.weights import load_store_model
from pipeline.store.reader import AmbiguousName, FeatureStore
from pipeline.store.uris import one_line, read_uri
from pipeline.tasks.pictures import render
from pipeline.tasks.retrieval.index import QueryEncoder, RetrievalIndex, load_index, vectors_of

IMAGE_ERROR_STATUS = {"too_large": 413}  # other kinds of undecodable upload: 400
STORED_IMAGE_STATUS = {"read": 404}  # a stored image whose source is gone: 404; one no longer an image: 422
NAME_SHOWN = 80  # characters of a requested name quoted in an answer
PICTURES_KEPT = 64  # feature pictures kept for the next request of the same image
LOCAL_PATH = re.compile(r"(?:file://)?(?<![\w:/])/(?:[^\s'\"/:]+/)+([^\s'\":]*)")


def quoted(name: str) -> str:
    """A requested name as an answer quotes it: at most NAME_SHOWN characters."""
    return repr(name) if len(name) <= NAME_SHOWN else f"{name[:NAME_SHOWN]!r}... ({len(name)} characters)"


def public(text: str) -> str:
    """An answer's text without the server's paths: each absolute path becomes its last name."""
    return LOCAL_PATH.sub(lambda match: match.group(1) or "/", text)


class ServiceError(Exception):
    """A request that cannot be answered: its HTTP status and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Served:
    """One index and its store."""

    name: str
    uri: str
    index: RetrievalIndex
    store: FeatureStore

    @property
    def has_pictures(self) -> bool:
        """Feature pictures need the dense maps (a store made with --outputs cls,pooled has none)."""
        return "dense" in self.store.config.get("outputs", ["dense"])


class Catalog:
    """The served indexes, loaded and checked at start-up; the model of each store is loaded only
    when a new image is first queried (or a picture drawn)."""

    def __init__(self, index_uris: Sequence[str], *, storage_options: dict[str, Any] | None = None, pretrained: bool = False, weights: str | None = None) -> None:
        self.options = storage_options or {}
        self.pretrained, self.weights = pretrained, weights
        self.served: dict[str, Served] = {}
        for uri in index_uris:
            index = load_index(uri, self.options)
            store = FeatureStore.open(index.sidecar["store"], self.options)
            index.check_store(store)  # a stale index is refused, as srt-query refuses it
            name = posixpath.basename(uri.rstrip("/")) or uri
            while name in self.served:
                name += "+"
            self.served[name] = Served(name, uri, index, store)
        self._encoders: dict[str, QueryEncoder] = {}
        self._loading = threading.Lock()
        self._pictures: collections.OrderedDict[tuple[str, str], bytes] = collections.OrderedDict()
        self._pictures_lock = threading.Lock()
        for served in self.served.values():
            self._warm(served)

    def _warm(self, served: Served) -> None:
        """One query of each index at start-up: its lookups (image_id <-> FAISS id, URIs) are
        built before the first request, and a broken index fails here, not on a user's query."""
        if served.index.index.ntotal:
            image_id = served.index.ids.column("image_id")[0].as_py()
            self.search([(served.name, self.stored_query(served, image_id)[1], 1)])

    def get(self, name: str | None) -> Served:
        if name is None:
            return next(iter(self.served.values()))
        if name not in self.served:
            raise ServiceError(404, f"no index {name!r}; served: {', '.join(self.served)}")
        return self.served[name]

    def find(self, served: Served, name: str) -> str:
        """The image_id of a row of the store, or 404 with an image to try (an ok one)."""
        try:
            return served.store.find(name)
        except AmbiguousName:
            raise ServiceError(404, f"{quoted(name)} names several images of index {served.name}; give an image_id or a full URI") from None
        except KeyError:
            example = served.store.example_name()
            hint = f" (e.g. {example})" if example else ""
            raise ServiceError(404, f"no image {quoted(name)} in index {served.name}: give an image_id, a URI or a file name from its manifest{hint}") from None

    def stored_query(self, served: Served, name: str) -> tuple[str, np.ndarray]:
        """(image_id, its stored descriptor) of an image of the store; 422 for an error row."""
        image_id = self.find(served, name)
        record = served.store.record(image_id)
        if record["status"] != "ok":
            raise ServiceError(422, f"{image_id} has no features: {record['error_kind']}: {one_line(record['error'])}")
        vector = served.index.indexed_vector(image_id)
        return image_id, vectors_of(served.store, [image_id], served.index.spec)[0] if vector is None else vector

    def encoder(self, served: Served) -> QueryEncoder:
        """The store's model, engine and image policy, loaded on first use."""
        with self._loading:
            if served.name not in self._encoders:
                config = served.store.config
                vit = load_store_model(config["model"], config["weights"], pretrained=self.pretrained, weights=self.weights, storage_options=self.options)
                self._encoders[served.name] = QueryEncoder(served.store, vit, served.index.spec)
            return self._encoders[served.name]

    def prepare_upload(self, served: Served, blob: bytes) -> Prepared:
        """An uploaded image as the store's model input; 400 or 413 with the reason."""
        try:
            return self.encoder(served).prepare(blob)
        except ImageError as error:
            raise ServiceError(IMAGE_ERROR_STATUS.get(error.kind, 400), f"the upload is not an image the store's policy accepts: {error.kind}: {str(error).splitlines()[0]}") from None

    def describe(self, requests: Sequence[tuple[str, Prepared]]) -> list[np.ndarray]:
        """Descriptors of uploaded images (index name, input), each index's in one model call."""
        vectors: list[np.ndarray] = [np.empty(0)] * len(requests)
        for name, members in _by_index(requests).items():
            for i, vector in zip(members, self.encoder(self.served[name]).describe([requests[i][1] for i in members])):
                vectors[i] = vector
        return vectors

    def search(self, requests: Sequence[tuple[str, np.ndarray, int]]) -> list[list[dict[str, Any]]]:
        """Neighbours of query vectors (index name, vector, k), each index's in one FAISS search."""
        results: list[list[dict[str, Any]]] = [[] for _ in requests]
        for name, members in _by_index(requests).items():
            index = self.served[name].index
            k = max(requests[i][2] for i in members)
            scores, found = index.search(np.stack([requests[i][1] for i in members]), k)
            for i, row_scores, row_ids in zip(members, scores, found):
                kept = row_ids[: requests[i][2]]
                results[i] = [{"rank": rank, "image_id": image_id, "score": float(score), "uri": uri} for rank, (image_id, score, uri) in enumerate(zip(kept, row_scores, index.uris(kept)))]
        return results

    def source(self, served: Served, image_id: str) -> bytes:
        """The bytes of a row of the store, read through its plan; 404 when they are gone."""
        blob = read_bytes([served.store.plan()[image_id]], self.options)[0]
        if isinstance(blob, Exception):
            raise stored_image_error(image_id, ImageError("read", f"cannot read it: {one_line(blob)}"))
        return blob

    def thumbnail(self, served: Served, name: str, size: int) -> bytes:
        """A JPEG of at most size x size of a row of the store, read through its plan."""
        image_id = self.find(served, name)
        blob = self.source(served, image_id)
        try:  # as extraction decodes it: upright, RGB, within the store's --max-pixels; JPEGs at a fraction of their size
            shown = decode_scaled(blob, served.store.config["max_pixels"], shorter_side=size)[0]
        except ImageError as error:
            raise stored_image_error(image_id, error) from None
        shown.thumbnail((size, size))
        out = io.BytesIO()
        shown.save(out, format="JPEG", quality=85)
        return out.getvalue()

    def pictures(self, served: Served, name: str) -> bytes:
        """PNG of original | plain | SRT features of a stored image, as srt-visualize draws it; the
        last PICTURES_KEPT are kept (each costs a forward pass of the model)."""
        if not served.has_pictures:
            raise ServiceError(422, f"index {served.name}'s store has no dense maps (extracted with --outputs {','.join(served.store.config['outputs'])}): no feature pictures")
        image_id = self.find(served, name)
        if served.store.record(image_id)["status"] != "ok":
            raise ServiceError(422, f"{image_id} has no features to picture")
        key = (served.name, image_id)
        with self._pictures_lock:
            if key in self._pictures:
                self._pictures.move_to_end(key)
                return self._pictures[key]
        blob = self.source(served, image_id)
        try:
            picture = render(served.store, [image_id], layer=served.index.spec.layer, storage_options=self.options, vit=self.encoder(served).srt.vit, blobs=[blob])
        except ImageError as error:
            raise stored_image_error(image_id, error) from None
        out = io.BytesIO()
        picture.save(out, format="PNG")
        with self._pictures_lock:
            self._pictures[key] = out.getvalue()
            while len(self._pictures) > PICTURES_KEPT:
                self._pictures.popitem(last=False)
        return out.getvalue()

    def summary(self, served: Served) -> dict[str, Any]:
        """What the store holds, how it was made, and its index."""
        manifest = served.store.manifest
        kinds = Counter(kind for kind in manifest.column("error_kind").to_pylist() if kind)
        try:
            run = json.loads(read_uri(f"{served.store.uri.rstrip('/')}/summary.json", self.options)).get("run")
        except FileNotFoundError:
            run = None
        index = served.index
        return {
            "index": served.name,
            "store": posixpath.basename(served.store.uri.rstrip("/")),
            "pictures": served.has_pictures,
            "images": manifest.num_rows,
            "ok": manifest.num_rows - sum(kinds.values()),
            "errors": dict(kinds.most_common()),
            "descriptor": index.sidecar["descriptor"],
            "factory": index.sidecar["factory"],
            "vectors": index.index.ntotal,
            "config": {**served.store.config, "dataset": posixpath.basename(str(served.store.config.get("dataset", "")).rstrip("/"))},
            "run": run,
        }


def stored_image_error(image_id: str, error: ImageError) -> ServiceError:
    """A stored image that cannot be read (404) or shown (422) any more, as thumbnails and pictures say it."""
    return ServiceError(STORED_IMAGE_STATUS.get(error.kind, 422), f"{image_id} cannot be shown: {error.kind}: {str(error).splitlines()[0]}")


def _by_index(requests: Sequence[tuple[Any, ...]]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(request[0], []).append(i)
    return groups
