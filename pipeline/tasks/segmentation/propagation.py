"""Semi-supervised video object segmentation by label propagation (the DINO protocol), pure torch.

Frame 0's labels are given. Every later frame takes, for each feature cell, the labels of its
`topk` most similar cells (affinity exp(cos / temperature)) among the cells of frame 0 and of the
`n_last_frames` previous frames that lie within a square window of `neighborhood` cells around
it, weighted by affinity. Later frames carry soft labels forward, as DINO's evaluation does.
Features may be at any stride (plain tokens or SRT maps); the window is counted in cells.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Affinity elements held at once (queries x context cells): about 128 MiB of float32.
MAX_AFFINITY_ELEMENTS = 2**25


@dataclass(frozen=True)
class PropagationSettings:
    temperature: float = 0.1
    n_last_frames: int = 7
    neighborhood: int = 12  # DINO's size_mask_neighborhood: the window's half side in cells; 0: no window
    topk: int = 5

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        for name in ("n_last_frames", "neighborhood"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.topk < 1:
            raise ValueError(f"topk must be a positive integer, got {self.topk}")


def one_hot(labels: np.ndarray | torch.Tensor, num_labels: int) -> torch.Tensor:
    """[h, w] integer labels -> [num_labels, h, w] float."""
    labels = torch.as_tensor(np.array(labels), dtype=torch.long)
    return F.one_hot(labels, num_labels).permute(2, 0, 1).float()


def propagate(
    query: torch.Tensor, context: torch.Tensor, labels: torch.Tensor, settings: PropagationSettings
) -> torch.Tensor:
    """Soft labels [K, h, w] of one frame from L2-normalized features: `query` [C, h, w], `context`
    [n, C, h, w] and the context's soft labels [n, K, h, w].

    Queries are taken a square tile at a time against only the context cells their windows reach,
    so memory stays bounded and little work is wasted at any stride (a 480p frame at stride 4 has
    25k cells, of which a window holds 625).
    """
    n, channels, h, w = context.shape
    if query.shape != (channels, h, w) or labels.shape[0] != n or labels.shape[2:] != (h, w):
        raise ValueError(f"query {tuple(query.shape)}, context {tuple(context.shape)} and labels {tuple(labels.shape)} disagree")
    radius = settings.neighborhood or max(h, w)
    side = _tile_side(n, h, w, radius)
    out = torch.empty(labels.shape[1], h, w)
    for top in range(0, h, side):
        for left in range(0, w, side):
            rows, cols = slice(top, min(h, top + side)), slice(left, min(w, left + side))
            near_rows = slice(max(0, top - radius), min(h, rows.stop + radius))
            near_cols = slice(max(0, left - radius), min(w, cols.stop + radius))
            queries = query[:, rows, cols].flatten(1)  # [C, tile cells]
            sources = context[:, :, near_rows, near_cols].flatten(2)  # [n, C, reachable cells]
            affinity = torch.exp(torch.einsum("cq,ncs->nqs", queries, sources) / settings.temperature)
            affinity = affinity * _window(rows, cols, near_rows, near_cols, radius)
            affinity = affinity.permute(1, 0, 2).flatten(1)  # [tile cells, n * reachable cells]
            kth = affinity.topk(min(settings.topk, affinity.shape[1]), dim=1).values[:, -1:]
            affinity = torch.where(affinity < kth, 0.0, affinity)
            affinity = affinity / affinity.sum(1, keepdim=True)
            source_labels = labels[:, :, near_rows, near_cols].flatten(2).permute(1, 0, 2).flatten(1)  # [K, n * reachable]
            out[:, rows, cols] = (source_labels @ affinity.T).reshape(-1, rows.stop - rows.start, cols.stop - cols.start)
    return out


def _tile_side(n: int, h: int, w: int, radius: int) -> int:
    """About the window's half side (tiles much larger than the window waste pairs outside it),
    at least 4 (per-tile overhead), shrunk until a tile's affinity fits MAX_AFFINITY_ELEMENTS."""
    side = max(4, min(radius, max(h, w)))
    while side > 1 and n * side * side * min(h, side + 2 * radius) * min(w, side + 2 * radius) > MAX_AFFINITY_ELEMENTS:
        side -= 1
    return side


def _window(rows: slice, cols: slice, near_rows: slice, near_cols: slice, radius: int) -> torch.Tensor:
    """[tile cells, reachable cells]: 1 where the source is within `radius` cells (each axis) of the query."""
    query_i, query_j = torch.meshgrid(torch.arange(rows.start, rows.stop), torch.arange(cols.start, cols.stop), indexing="ij")
    source_i, source_j = torch.meshgrid(torch.arange(near_rows.start, near_rows.stop), torch.arange(near_cols.start, near_cols.stop), indexing="ij")
    near_i = (query_i.reshape(-1, 1) - source_i.reshape(1, -1)).abs() <= radius
    near_j = (query_j.reshape(-1, 1) - source_j.reshape(1, -1)).abs() <= radius
    return (near_i & near_j).float()


def propagate_video(
    features: Iterable[torch.Tensor], first_labels: torch.Tensor, settings: PropagationSettings
) -> Iterator[torch.Tensor]:
    """Soft labels [K, h, w] of frames 1, 2, ... from each frame's features [C, h, w] (frame 0
    first) and frame 0's labels [K, h, w]. Features are read one frame at a time."""
    frames = iter(features)
    first = F.normalize(next(frames).float(), dim=0)
    recent: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=settings.n_last_frames)
    for feature in frames:
        feature = F.normalize(feature.float(), dim=0)
        context = [(first, first_labels), *recent]
        soft = propagate(feature, torch.stack([f for f, _ in context]), torch.stack([l for _, l in context]), settings)
        recent.append((feature, soft))
        yield soft


def to_labels(soft: torch.Tensor, stride: int) -> np.ndarray:
    """Soft labels [K, h, w] at `stride` -> hard labels [h * stride, w * stride] (uint8) of the model
    input: bilinear upsampling, each label's scores rescaled to 0..1 (DINO's norm_mask, so a small
    object's weak scores still win where they peak), argmax."""
    up = F.interpolate(soft[None].float(), scale_factor=stride, mode="bilinear", align_corners=False)[0]
    low = up.amin(dim=(1, 2), keepdim=True)
    span = (up - low).amax(dim=(1, 2), keepdim=True)
    scaled = torch.where(up.amax(dim=(1, 2), keepdim=True) > 0, (up - low) / span.clamp_min(1e-12), up)
    return scaled.argmax(0).numpy().astype(np.uint8)
