"""What differs between CPU and CUDA execution, kept out of the SRT math and the data plane.

CPU keeps small, fixed defaults: 16 views per forward pass, fp32. On CUDA, `--precision auto`
runs the model under bf16 autocast (the engine aggregates in fp32 whatever the model's dtype),
`--batch-size 0` fits the views per forward pass to the GPU's free memory by measuring what a
view costs, and inputs travel through pinned memory on a side stream, so the next shard's copy
overlaps the current shard's forward passes (and a shard's JPEGs decode there, `on_stream`).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from pipeline.engine.srt import DEFAULT_BATCH_SIZE, SRT

log = logging.getLogger("srt")
T = TypeVar("T")

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_VIEWS_PER_FORWARD = 512  # past a few hundred views a ViT's forward pass is no faster per view
MEMORY_SHARE = 0.5  # of the memory free after the probe: the rest is for sums, outputs and other tenants
PROBE_VIEWS = 8


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The model's autocast dtype for `--precision` on `device`: None (fp32) on CPU; `auto` is bf16
    on GPUs that have it (Ampere and later), else fp16."""
    if device.type != "cuda":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return AUTOCAST_DTYPES[precision]


@dataclass
class ViewBudget:
    """Views per forward pass for each input size: `fixed` (--batch-size, or 16 on CPU), or fitted
    to `memory` bytes at `bytes_per_token` (measured), so larger inputs get fewer views."""

    fixed: int | None
    bytes_per_token: float = 0.0
    memory: float = 0.0

    def views(self, size: tuple[int, int], patch: int) -> int:
        if self.fixed is not None:
            return self.fixed
        tokens = (size[0] // patch) * (size[1] // patch)
        return max(1, min(MAX_VIEWS_PER_FORWARD, int(self.memory / (self.bytes_per_token * tokens))))

    def halve(self) -> None:
        """After running out of memory: half as many views per pass from now on."""
        if self.fixed is not None:
            self.fixed = max(1, self.fixed // 2)
        else:
            self.memory /= 2


def view_budget(srt: SRT, requested: int, size: tuple[int, int]) -> ViewBudget:
    """--batch-size `requested`, or for 0 the default of the engine's device: 16 on CPU, and on
    CUDA what a share of free memory holds, from the peak memory of two probe passes on a `size`
    input (their difference is the cost of PROBE_VIEWS views, free of fixed costs)."""
    device = srt.vit.device
    if requested:
        return ViewBudget(fixed=requested)
    if device.type != "cuda":
        return ViewBudget(fixed=DEFAULT_BATCH_SIZE)
    image = torch.zeros(1, 3, *size, device=device, dtype=srt.vit.dtype)
    peaks = []
    for views in (PROBE_VIEWS, 2 * PROBE_VIEWS):
        probe = copy.copy(srt)
        probe.batch_size, probe.tolerance = views, None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        probe.partial(image, (srt.shifts * views)[:views])
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
    torch.cuda.empty_cache()
    tokens = (size[0] // srt.patch) * (size[1] // srt.patch)
    per_view = max(peaks[1] - peaks[0], 1) / PROBE_VIEWS
    budget = ViewBudget(fixed=None, bytes_per_token=per_view / tokens, memory=MEMORY_SHARE * torch.cuda.mem_get_info(device)[0])
    log.info("%.1f MB per view at %dx%d: %d views per forward pass (--batch-size 0 fits them to free GPU memory)", per_view / 1e6, *size, budget.views(size, srt.patch))
    return budget


def pinned_upload(tensors: list[torch.Tensor], device: torch.device, stream: torch.cuda.Stream) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Stack same-shaped CPU tensors into pinned memory and copy them to `device` on `stream`
    (non-blocking). Work on the default stream must wait for the returned event before use."""
    pinned = torch.stack(tensors).pin_memory()
    return on_stream(stream, lambda: pinned.to(device, non_blocking=True), lambda uploaded: [uploaded])


class HostBuffers:
    """Host memory for values copied back from `source`, reused from one shard to the next: pinned
    beside a GPU, so the copy is the GPU's DMA rather than the host's memcpy through a staging
    buffer, and reused anywhere, since fresh memory costs a page fault per 4 KiB at its first
    touch (on the CPU, most of the thread's time copying maps into a shard's blocks)."""

    KEPT_BYTES = 1 << 30  # free buffers kept, all shapes together (size buckets each have their own)

    def __init__(self, source: torch.device) -> None:
        self.pinned = source.type == "cuda"
        self.free: dict[tuple, list[np.ndarray]] = {}
        self.kept = 0  # bytes of the free buffers
        self.lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialized buffer."""
        with self.lock:
            spare = self.free.get((shape, dtype))
            if spare:
                self.kept -= spare[-1].nbytes
                return spare.pop()
        if not self.pinned:
            return np.empty(shape, dtype)
        return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True).numpy()

    def give(self, buffers: Iterable[np.ndarray]) -> None:
        """Buffers no longer read by anyone, for later `take`s (those past KEPT_BYTES are let go)."""
        with self.lock:
            for buffer in buffers:
                if self.kept + buffer.nbytes <= self.KEPT_BYTES:
                    self.free.setdefault((buffer.shape, buffer.dtype), []).append(buffer)
                    self.kept += buffer.nbytes


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory, started without waiting where `tensor` is on a GPU (pinned memory,
    ready once `copies_done`'s event is); the tensor itself where it is on the CPU already."""
    if tensor.device.type != "cuda":
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


def copies_done(device: torch.device) -> torch.cuda.Event | None:
    """An event after the copies queued so far on `device`'s current stream (None off a GPU):
    the host synchronizes on it before reading what they copy."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def on_stream(stream: torch.cuda.Stream | None, work: Callable[[], T], tensors_of: Callable[[T], list[torch.Tensor]]) -> tuple[T, torch.cuda.Event | None]:
    """Run `work` on `stream` (a GPU's side stream; None: the current stream, no event). Its
    tensors (`tensors_of` its result) are kept reserved for the default stream, which must wait
    for the returned event before using them."""
    if stream is None:
        return work(), None
    with torch.cuda.stream(stream):
        result = work()
        done = torch.cuda.Event()
        done.record(stream)
    for tensor in tensors_of(result):
        tensor.record_stream(torch.cuda.default_stream(stream.device))
    return result, done
