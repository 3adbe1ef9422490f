"""A work shard between the worker's steps: its loaded inputs, its computed arrays on the host,
and the stats its commit reports."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.engine.accelerator import pinned_upload
from pipeline.extraction.images import ImageError, Prepared


@dataclass
class LoadedShard:
    """A shard's plan rows and, for each, a model input or the reason there is none."""

    shard: int
    rows: list[dict[str, Any]]
    inputs: list[Prepared | ImageError]
    uploads: list[torch.cuda.Event] = field(default_factory=list)  # copies to the GPU still in flight

    def without_pixels(self) -> LoadedShard:
        """The same shard minus its input tensors: what a commit needs, cheap to ship."""
        inputs = [dataclasses.replace(i, pixels=torch.empty(0), valid=None) if isinstance(i, Prepared) else i for i in self.inputs]
        return LoadedShard(self.shard, self.rows, inputs)

    def upload(self, device: torch.device, stream: torch.cuda.Stream) -> None:
        """Start copying the inputs decoded on the host to `device` (pinned, non-blocking, on
        `stream`), one copy per input size; `uploads` holds what the forward passes must wait for."""
        for group in self.groups(len(self.inputs)):
            members = [i for i in group if self.inputs[i].pixels.device.type == "cpu"]  # not decoded on the device
            if not members:
                continue
            items = [self.inputs[i] for i in members]
            tensors, done = pinned_upload([item.pixels for item in items], device, stream)
            self.uploads.append(done)
            valid = [None] * len(items)
            if items[0].valid is not None:
                valid, done = pinned_upload([item.valid for item in items], device, stream)
                self.uploads.append(done)
            for i, item, tensor, mask in zip(members, items, tensors, valid):
                self.inputs[i] = dataclasses.replace(item, pixels=tensor, valid=mask)

    @property
    def decoded(self) -> int:
        """Inputs that became model inputs (the rest are error rows, done without the model)."""
        return sum(isinstance(item, Prepared) for item in self.inputs)

    def groups(self, images_per_call: int) -> list[list[int]]:
        """Indices of decoded inputs, grouped by input size, at most `images_per_call` a group."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(self.inputs):
            if isinstance(item, Prepared):
                by_size.setdefault(item.input_size, []).append(index)
        return [members[i : i + images_per_call] for members in by_size.values() for i in range(0, len(members), images_per_call)]


@dataclass
class ShardStats:
    """What a committed shard reports back: small enough to travel to a driver."""

    shard: int
    ok: int = 0
    errors: Counter = field(default_factory=Counter)  # error_kind -> count
    views: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    committed: bool = True  # False: another attempt committed this shard first; nothing was written


@dataclass
class ShardArrays:
    """A computed shard on the host, in the stored dtype: what `ShardWorker.commit` writes."""

    blocks: dict[str, np.ndarray] = field(default_factory=dict)  # array path -> [rows in shard, ...]
    filled: dict[str, list[int]] = field(default_factory=dict)  # rows of each block that hold an image's values; the rest are zeros
    views: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)  # (rows, views averaged for each), in host memory
    copied: torch.cuda.Event | None = None  # beside a GPU: its copies into `blocks` and `views`, still in flight

    def views_of(self) -> dict[int, int]:
        """Row in shard -> views averaged, once the copies from a GPU are done (the host waits
        for them here, in the writer that needs them, not where the next shard is launched)."""
        if self.copied is not None:
            self.copied.synchronize()
        return {row: int(count) for rows, counts in self.views for row, count in zip(rows, counts.tolist())}


def input_tensors(inputs: list[Prepared | ImageError]) -> list[torch.Tensor]:
    """The GPU tensors of model inputs: what a side stream hands over to the forward passes."""
    return [t for item in inputs if isinstance(item, Prepared) for t in (item.pixels, item.valid) if t is not None and t.device.type == "cuda"]
