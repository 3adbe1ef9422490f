"""Stochastic Resonance Transformer features: a frozen ViT run on sub-token shifts of each image,
its token grids aggregated exactly (`pipeline.engine.aggregation`), whole or adaptively.

Pure torch: no Ray, no I/O. See shared SRT.md for the method. `SRT` is the engine every job
uses: `run` for finished features, `partial` for a sum over part of a shift set that other
parts (on other devices or actors) add to with `combine`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch

from pipeline.engine.aggregation import (
    Boundary,
    PartialSum,
    SRTOutput,
    add_aligned,
    axis_weights,
    concatenate,
    finalize,
    pad_for_shifts,
    validate_boundary,
    validate_stride,
    views_between,
)
from pipeline.engine.shifts import DEFAULT_RANDOM_SHIFTS, Shift, random_shifts, spread_order, validate_shifts

if TYPE_CHECKING:
    from pipeline.engine.models import ViT

DEFAULT_BATCH_SIZE = 16

# A tokenizer maps a batch of views [N, 3, H, W] to {key: (grid [N, C, h, w], prefix [N, P, C])}.
Tokenizer = Callable[[torch.Tensor], Mapping[Hashable, tuple[torch.Tensor, torch.Tensor]]]


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
