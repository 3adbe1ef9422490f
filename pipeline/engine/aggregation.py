"""The exact SRT aggregation: views cut from a padded image, token grids mapped back and summed.

Pure torch: no Ray, no I/O. See shared SRT.md for the method. Conventions:

- A shift d = (dy, dx) moves content by +d: view_d[u] = image[u - d]; |dy|, |dx| < patch.
- Pixel u of the original lies in token floor((u + d) / p) of view d. Mapping a view's token
  grid back to the original, and average-pooling to output stride s, is per axis the matrix
  W_d[i, t] = (1/s) * #{u in cell i : floor((u + d) / p) = t}, so one view contributes
  W_dy @ G_d @ W_dx^T, and the full-resolution field is never built (unless s = 1).
- Boundaries: "reflect" fills the strip a shift uncovers by reflection and divides each
  output cell by the weight it received (count-normalized); "zeros" fills with 0 and divides
  by the number of views (the reference code's behaviour).

Everything is a sum over views until `finalize`, so a shift set can be cut into parts,
computed anywhere (`SRT.partial`), and added back in a fixed order (`combine`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.engine.shifts import Shift

Boundary = Literal["reflect", "zeros"]
BOUNDARIES: tuple[Boundary, ...] = ("reflect", "zeros")


def validate_stride(stride: int, patch: int) -> int:
    if not isinstance(stride, int) or stride < 1 or patch % stride:
        divisors = [s for s in range(1, patch + 1) if patch % s == 0]
        raise ValueError(f"stride {stride!r} must divide the patch size {patch}: use one of {divisors}")
    return stride


def validate_boundary(boundary: str) -> Boundary:
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
    return boundary  # type: ignore[return-value]


# ---------------------------------------------------------------------------- the math


@functools.lru_cache(maxsize=4096)
def axis_weights(length: int, patch: int, stride: int, shift: int) -> torch.Tensor:
    """W_d along one axis (CPU, cached): [length/stride, length/patch], entry = share of cell i that token t covers."""
    pixel = torch.arange(length)
    token = torch.div(pixel + shift, patch, rounding_mode="floor")
    tokens = length // patch
    covered = (token >= 0) & (token < tokens)
    weights = torch.zeros(length, tokens)
    weights[pixel[covered], token[covered]] = 1.0
    return weights.reshape(length // stride, stride, tokens).mean(dim=1)


def translate(padded: torch.Tensor, pad: int, shift: Shift, size: tuple[int, int]) -> torch.Tensor:
    """View T_d x cut from an image padded by `pad` on every side: view[u] = image[u - d]."""
    dy, dx = shift
    height, width = size
    return padded[..., pad - dy : pad - dy + height, pad - dx : pad - dx + width]


def pad_for_shifts(images: torch.Tensor, shifts: Sequence[Shift], boundary: Boundary) -> tuple[torch.Tensor, int]:
    """Pad once so every view is a slice; reflect, or 0 (the mean colour in normalized space)."""
    pad = max(max(abs(dy), abs(dx)) for dy, dx in shifts)
    mode = "reflect" if boundary == "reflect" else "constant"
    return (F.pad(images, (pad,) * 4, mode=mode) if pad else images), pad


def add_aligned(
    out: torch.Tensor, grids: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, owners: Sequence[int]
) -> None:
    """out[b] += sum over views n of image b of rows[n] @ grids[n] @ cols[n]^T, in fp32.

    grids [N, C, h, w]; rows [N, Ho, h]; cols [N, Wo, w]; owners[n] = image of view n (an image's
    views are consecutive). The column product runs per view on the grid laid out [N, h, C, w]
    (one copy, of the smallest tensor here), so its result [N, h, C, Wo] already stacks an image's
    views along h: the row product and the sum over views are then one batched matmul over the
    images that have as many views here (a micro-batch has at most three such runs), and neither
    per-view [C, Ho, Wo] maps nor a transposed copy of the larger intermediate are ever made.
    """
    views, channels, height, width = grids.shape
    by_row = grids.transpose(1, 2).reshape(views, height * channels, width).float()
    right = torch.bmm(by_row, cols.transpose(1, 2).to(torch.float32))  # [N, h * C, Wo]
    out_h, out_w = rows.shape[1], cols.shape[1]
    runs = [(owner, len(list(group))) for owner, group in itertools.groupby(owners)]
    start = 0
    for count, same in itertools.groupby(runs, key=lambda run: run[1]):
        images = [owner for owner, _ in same]
        span = len(images) * count
        stacked_rows = rows[start : start + span].view(len(images), count, out_h, height).transpose(1, 2).reshape(len(images), out_h, count * height)
        product = torch.bmm(stacked_rows, right[start : start + span].view(len(images), count * height, channels * out_w))
        aligned = product.view(len(images), out_h, channels, out_w).transpose(1, 2)
        if images == list(range(images[0], images[0] + len(images))):
            out[images[0] : images[0] + len(images)] += aligned
        else:
            out.index_add_(0, torch.tensor(images, device=out.device), aligned)
        start += span


def views_between(padded: torch.Tensor, pad: int, shifts: Sequence[Shift], size: tuple[int, int], start: int, end: int) -> torch.Tensor:
    """Views start..end-1 of a batch in image-major order (view i: image i // V under shift i % V),
    cut from the padded images with at most 3V slices whatever the number of views: whole images
    take one slice per shift across all of them, an image cut by `start` or `end` one per view."""
    count = len(shifts)
    parts = []
    position = start
    while position < end:
        image, first = divmod(position, count)
        if first == 0 and end - position >= count:
            whole = (end - position) // count
            parts.append(torch.stack([translate(padded[image : image + whole], pad, shift, size) for shift in shifts], dim=1).flatten(0, 1))
            position += whole * count
        else:
            last = min(count, first + end - position)
            parts.append(torch.stack([translate(padded[image], pad, shift, size) for shift in shifts[first:last]]))
            position += last - first
    return parts[0] if len(parts) == 1 else torch.cat(parts)


# ---------------------------------------------------------------------------- sums and results


@dataclass
class PartialSum:
    """Unnormalized SRT over some views: sums that add up exactly across any partition of a shift set."""

    dense: dict[Hashable, torch.Tensor]  # [B, C, Ho, Wo] fp32, sum over views of the aligned maps
    prefix: dict[Hashable, torch.Tensor]  # [B, P, C] fp32, sum over views
    coverage: torch.Tensor  # [B, Ho, Wo] fp32, sum over views of the weight each cell received
    n_views: torch.Tensor  # [B] views summed per image (they differ when views are chosen adaptively)

    def __add__(self, other: PartialSum) -> PartialSum:
        if self.dense.keys() != other.dense.keys() or self.coverage.shape != other.coverage.shape:
            raise ValueError("partial sums of different taps or image sizes cannot be combined")
        return PartialSum(
            dense={k: v + other.dense[k].to(v.device) for k, v in self.dense.items()},
            prefix={k: v + other.prefix[k].to(v.device) for k, v in self.prefix.items()},
            coverage=self.coverage + other.coverage.to(self.coverage.device),
            n_views=self.n_views + other.n_views.to(self.n_views.device),
        )

    def to(self, device: str | torch.device) -> PartialSum:
        return PartialSum(
            dense={k: v.to(device) for k, v in self.dense.items()},
            prefix={k: v.to(device) for k, v in self.prefix.items()},
            coverage=self.coverage.to(device),
            n_views=self.n_views.to(device),
        )


def combine(parts: Sequence[PartialSum]) -> PartialSum:
    """Add partial sums in the given order (a fixed order keeps results bit-reproducible)."""
    if not parts:
        raise ValueError("nothing to combine")
    return functools.reduce(PartialSum.__add__, parts)


def concatenate(parts: Sequence[PartialSum]) -> PartialSum:
    """Partial sums of different images, stacked along the batch in the given order."""
    return PartialSum(
        dense={k: torch.cat([p.dense[k] for p in parts]) for k in parts[0].dense},
        prefix={k: torch.cat([p.prefix[k] for p in parts]) for k in parts[0].prefix},
        coverage=torch.cat([p.coverage for p in parts]),
        n_views=torch.cat([p.n_views for p in parts]),
    )


@dataclass
class SRTOutput:
    """Per tap: the dense SRT map, the prefix tokens averaged over views, and a pooled descriptor."""

    dense: dict[Hashable, torch.Tensor]  # [B, C, H/s, W/s]
    prefix: dict[Hashable, torch.Tensor]  # [B, P, C]
    pooled: dict[Hashable, torch.Tensor]  # [B, C], mean of the dense map
    n_views: torch.Tensor  # [B] views averaged per image


def finalize(partial: PartialSum, boundary: Boundary) -> SRTOutput:
    """Normalize sums into means: by received weight ("reflect") or by view count ("zeros").

    With "reflect", a cell that no view covers (possible only for lopsided shift sets) is 0.
    """
    views = partial.n_views.to(partial.coverage.dtype)
    if boundary == "reflect":
        coverage = partial.coverage
        scale = torch.where(coverage > 0, 1.0 / coverage.clamp_min(1e-12), torch.zeros_like(coverage))
    else:
        scale = (1.0 / views)[:, None, None].expand_as(partial.coverage)
    dense = {k: v * scale[:, None] for k, v in partial.dense.items()}
    return SRTOutput(
        dense=dense,
        prefix={k: v / views[:, None, None] for k, v in partial.prefix.items()},
        pooled={k: v.mean(dim=(2, 3)) for k, v in dense.items()},
        n_views=partial.n_views,
    )
