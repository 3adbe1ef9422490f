"""Stochastic Resonance Transformer features: sub-token shift ensembles, aggregated exactly.

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
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.engine.models import ViT

Shift = tuple[int, int]
Boundary = Literal["reflect", "zeros"]
BOUNDARIES: tuple[Boundary, ...] = ("reflect", "zeros")
# 16 random shifts over the whole sub-token lattice: the quality bench (bench/RESULTS.md) scores
# them well above small grids at fewer views, since they cover every phase of the token period.
DEFAULT_RANDOM_SHIFTS = 16
DEFAULT_BATCH_SIZE = 16

# A tokenizer maps a batch of views [N, 3, H, W] to {key: (grid [N, C, h, w], prefix [N, P, C])}.
Tokenizer = Callable[[torch.Tensor], Mapping[Hashable, tuple[torch.Tensor, torch.Tensor]]]


# ---------------------------------------------------------------------------- shift sets


def grid_shifts(n: int) -> list[Shift]:
    """The (2n+1)^2 shifts {-n..n}^2, row-major."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"grid radius must be a non-negative int, got {n!r}")
    return [(dy, dx) for dy in range(-n, n + 1) for dx in range(-n, n + 1)]


def random_shifts(k: int, patch: int, seed: int = 0) -> list[Shift]:
    """k distinct shifts drawn uniformly (seeded) from the sub-token lattice {-(p-1)..p-1}^2."""
    side = 2 * patch - 1
    if not isinstance(k, int) or not 1 <= k <= side * side:
        raise ValueError(f"random shift count must be in 1..{side * side} for patch size {patch}, got {k!r}")
    picks = np.random.default_rng(seed).choice(side * side, size=k, replace=False)
    return [(int(i) // side - (patch - 1), int(i) % side - (patch - 1)) for i in picks]


def validate_shifts(shifts: Iterable[Sequence[int]], patch: int) -> tuple[Shift, ...]:
    """Shifts as int pairs, each sub-token (|dy|, |dx| < patch); duplicates are kept on purpose."""
    checked = []
    for shift in shifts:
        if len(shift) != 2 or not all(isinstance(v, (int, np.integer)) for v in shift):
            raise ValueError(f"a shift is a pair of ints (dy, dx), got {shift!r}")
        dy, dx = int(shift[0]), int(shift[1])
        if abs(dy) >= patch or abs(dx) >= patch:
            raise ValueError(
                f"shift {(dy, dx)} is not sub-token: |dy| and |dx| must be < the patch size {patch} "
                f"(grid radius at most {patch - 1})"
            )
        checked.append((dy, dx))
    if not checked:
        raise ValueError("the shift set is empty: give at least one shift, e.g. [(0, 0)]")
    return tuple(checked)


def split_shifts(shifts: Sequence[Shift], parts: int) -> list[tuple[Shift, ...]]:
    """Cut a shift set into `parts` contiguous, non-empty, near-equal batches (order kept)."""
    if not 1 <= parts <= len(shifts):
        raise ValueError(f"cannot split {len(shifts)} shifts into {parts} batches")
    bounds = np.linspace(0, len(shifts), parts + 1).round().astype(int)
    return [tuple(shifts[a:b]) for a, b in itertools.pairwise(bounds)]


def spread_order(shifts: Sequence[Shift], patch: int) -> tuple[Shift, ...]:
    """The shifts reordered so that every prefix spreads over the sub-token lattice: start nearest
    to (0, 0), then repeatedly take the shift farthest (on the torus of phases mod p) from all
    taken so far; ties keep the given order. Adaptive SRT visits shifts in this order."""
    phases = torch.tensor([[dy % patch, dx % patch] for dy, dx in shifts], dtype=torch.float64)

    def torus_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        delta = (a - b).abs()
        return torch.minimum(delta, patch - delta).pow(2).sum(-1)

    remaining = list(range(len(shifts)))
    first = min(remaining, key=lambda i: (abs(shifts[i][0]) + abs(shifts[i][1]), i))
    order = [first]
    remaining.remove(first)
    nearest = torus_distance(phases, phases[first])
    while remaining:
        best = max(remaining, key=lambda i: (nearest[i].item(), -i))
        order.append(best)
        remaining.remove(best)
        nearest = torch.minimum(nearest, torus_distance(phases, phases[best]))
    return tuple(shifts[i] for i in order)


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


def shift_ensemble(
    images: torch.Tensor,
    tokenize: Tokenizer,
    shifts: Sequence[Shift],
    *,
    patch: int,
    stride: int,
    boundary: Boundary,
    batch_size: int = DEFAULT_BATCH_SIZE,
    valid: torch.Tensor | None = None,
) -> PartialSum:
    """Sum the aligned token grids of every (image, shift) view, `batch_size` views per forward.

    Views are ordered image-major, so a micro-batch holds few images and memory is bounded by
    batch_size views whatever the number of shifts. `valid` [B, 1, H, W] marks each input's real
    pixels when it is a padded canvas: every view is masked to it after translation, so a view is
    the shifted image padded afterwards (DINOv2's CenterPadding), content shifted out is cut off.
    """
    batch, _, height, width = images.shape
    out_h, out_w = height // stride, width // stride
    padded, pad = pad_for_shifts(images, shifts, boundary)
    device = images.device
    # Per shift, the axis weights; one copy to the device each.
    row_weights = torch.stack([axis_weights(height, patch, stride, dy) for dy, _ in shifts]).to(device)  # [V, Ho, h]
    col_weights = torch.stack([axis_weights(width, patch, stride, dx) for _, dx in shifts]).to(device)  # [V, Wo, w]
    coverage = torch.einsum("vi,vj->ij", row_weights.sum(2), col_weights.sum(2))

    dense: dict[Hashable, torch.Tensor] = {}
    prefix: dict[Hashable, torch.Tensor] = {}
    total = batch * len(shifts)
    for start in range(0, total, batch_size):
        end = min(start + batch_size, total)
        stacked = views_between(padded, pad, shifts, (height, width), start, end)
        index = torch.arange(start, end, device=device)
        owners, which = index // len(shifts), index % len(shifts)
        if valid is not None:
            stacked = stacked * valid[owners].to(stacked.dtype)
        rows, cols = row_weights[which], col_weights[which]
        owner_list = [i // len(shifts) for i in range(start, end)]
        for key, (grid, tokens) in tokenize(stacked).items():
            if key not in dense:
                dense[key] = grid.new_zeros(batch, grid.shape[1], out_h, out_w, dtype=torch.float32)
                prefix[key] = tokens.new_zeros(batch, *tokens.shape[1:], dtype=torch.float32)
            add_aligned(dense[key], grid, rows, cols, owner_list)
            prefix[key].index_add_(0, owners, tokens.float())
    return PartialSum(
        dense=dense,
        prefix=prefix,
        coverage=coverage.expand(batch, -1, -1).clone(),
        n_views=torch.full((batch,), len(shifts), device=device),
    )


def relative_change(before: SRTOutput, after: SRTOutput) -> float:
    """How much the running mean moved: max over taps of |after - before| / |after| (Frobenius)."""
    return max(
        ((after.dense[k] - before.dense[k]).norm() / after.dense[k].norm().clamp_min(1e-12)).item() for k in after.dense
    )


def adaptive_ensemble(
    image: torch.Tensor,
    tokenize: Tokenizer,
    shifts: Sequence[Shift],
    *,
    patch: int,
    stride: int,
    boundary: Boundary,
    tolerance: float,
    min_views: int,
    check_every: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    valid: torch.Tensor | None = None,
) -> PartialSum:
    """Views of one image [1, 3, H, W] in the given order, `check_every` at a time, until (with at
    least `min_views` seen) the running mean moved by less than `tolerance` (relative) since the
    last check, or the shifts run out."""
    running = previous = None
    for start in range(0, len(shifts), check_every):
        chunk = shifts[start : start + check_every]
        step = shift_ensemble(image, tokenize, chunk, patch=patch, stride=stride, boundary=boundary, batch_size=batch_size, valid=valid)
        running = step if running is None else running + step
        current = finalize(running, boundary)
        enough = start + len(chunk) >= min_views
        if enough and previous is not None and relative_change(previous, current) < tolerance:
            break
        previous = current
    return running


# ---------------------------------------------------------------------------- the engine


class SRT:
    """SRT features of a frozen ViT: `SRT(vit, layers=(-1,), shifts=random_shifts(16, p), stride=4)(images)`.

    Calling it on normalized images [B, 3, H, W] returns {requested layer: [B, C, H/s, W/s]}.
    `run` gives every output (dense, prefix, pooled, for block outputs and attention keys);
    `partial` and `finalize` split the work over shift subsets. With `tolerance`, each image stops
    adding views (visited in `spread_order`, `min_views` at a time) once its mean moves less than that.
    """

    def __init__(
        self,
        vit: ViT,
        *,
        layers: Sequence[int] = (-1,),
        keys: Sequence[int] = (),
        shifts: Sequence[Sequence[int]] | None = None,
        stride: int | None = None,
        boundary: str = "reflect",
        norm: bool = True,
        batch_size: int = DEFAULT_BATCH_SIZE,
        autocast: torch.dtype | None = None,
        tolerance: float | None = None,
        min_views: int = 8,
        check_every: int = 4,
    ) -> None:
        self.vit = vit
        self.patch = vit.patch_size
        self.layers = tuple(layers)
        self.taps = vit.taps(self.layers, keys)
        default = random_shifts(DEFAULT_RANDOM_SHIFTS, self.patch, seed=0)
        self.shifts = validate_shifts(default if shifts is None else shifts, self.patch)
        self.stride = validate_stride(self.patch if stride is None else stride, self.patch)
        self.boundary = validate_boundary(boundary)
        self.norm = norm
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size (views per forward pass) must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size
        if autocast not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {autocast!r}")
        self.autocast = autocast
        if tolerance is not None and tolerance < 0:
            raise ValueError(f"tolerance (adaptive views) must be >= 0 or None, got {tolerance!r}")
        for name, value in (("min_views", min_views), ("check_every", check_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.tolerance, self.min_views, self.check_every = tolerance, min_views, check_every
        if tolerance is not None:  # visit shifts so that any prefix covers the lattice evenly
            self.shifts = spread_order(self.shifts, self.patch)

    def __call__(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        dense = self.run(images).dense
        return {layer: dense[self.vit.taps([layer])[0]] for layer in self.layers}

    def run(self, images: torch.Tensor) -> SRTOutput:
        return self.finalize(self.partial(images))

    def finalize(self, partial: PartialSum) -> SRTOutput:
        return finalize(partial, self.boundary)

    @torch.no_grad()
    def partial(self, images: torch.Tensor, shifts: Sequence[Sequence[int]] | None = None, valid: torch.Tensor | None = None) -> PartialSum:
        """Sums over `shifts` (default: the whole set); add parts with `combine`, then `finalize`.
        `valid` [B, 1, H, W]: the real pixels of padded inputs (see `shift_ensemble`)."""
        self.vit.check_input(images)
        if self.tolerance is not None and shifts is not None:
            raise ValueError("adaptive views (tolerance) need the whole shift set: it cannot be split into batches")
        subset = self.shifts if shifts is None else validate_shifts(shifts, self.patch)
        return self._ensemble(images, self._tokenize, subset, valid)

    @torch.no_grad()
    def output_ensemble(
        self, images: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], layer: int | None = None, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Output-space ensembling, the paper's baseline for SRT: `head` (a dense head on token
        grids, [N, C, h, w] -> [N, K, h, w]) runs on each shifted view's plain tokens of block
        `layer` (default: the first requested), and its outputs, instead of the features, are
        aligned back and averaged exactly as SRT averages features: [B, K, H/s, W/s].

        With "reflect" (each cell a weighted mean, weights summing to 1) an affine head (a 1x1
        conv) gives the same map in both orders; any non-linear head differs, which is what
        comparing `head(srt(images)[layer])` against this measures.
        """
        tap = self.vit.taps([self.layers[0] if layer is None else layer])[0]

        def predict(views: torch.Tensor) -> dict[Hashable, tuple[torch.Tensor, torch.Tensor]]:
            grid, prefix = self._tokenize(views)[tap]
            outputs = head(grid.float())
            if outputs.shape[0] != grid.shape[0] or outputs.shape[2:] != grid.shape[2:]:
                raise ValueError(f"the head must keep the token grid: {tuple(grid.shape)} -> {tuple(outputs.shape)}")
            return {tap: (outputs, prefix)}

        return self.finalize(self._ensemble(images, predict, self.shifts, valid)).dense[tap]

    def _ensemble(self, images: torch.Tensor, tokenize: Tokenizer, shifts: Sequence[Shift], valid: torch.Tensor | None) -> PartialSum:
        """Sums of what `tokenize` returns per view over `shifts`: all of them, or adaptively chosen."""
        images = images.to(device=self.vit.device, dtype=self.vit.dtype)
        valid = None if valid is None else valid.to(images.device)
        geometry = {"patch": self.patch, "stride": self.stride, "boundary": self.boundary, "batch_size": self.batch_size}
        if self.tolerance is None:
            return shift_ensemble(images, tokenize, shifts, **geometry, valid=valid)
        stopping = {"tolerance": self.tolerance, "min_views": self.min_views, "check_every": self.check_every}
        return concatenate([
            adaptive_ensemble(image[None], tokenize, shifts, **geometry, **stopping, valid=None if valid is None else valid[i : i + 1])
            for i, image in enumerate(images)
        ])  # fmt: skip

    def _tokenize(self, views: torch.Tensor) -> dict[Hashable, tuple[torch.Tensor, torch.Tensor]]:
        context = (
            torch.autocast(device_type=views.device.type, dtype=self.autocast) if self.autocast else nullcontext()
        )
        with context:
            return self.vit.forward_taps(views, self.taps, norm=self.norm)
