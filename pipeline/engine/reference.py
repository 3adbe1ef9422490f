"""The naive full-resolution SRT chain, written as literally as SRT.md states it.

Upsample each view's tokens to pixels, translate back by -d, average, pool to the stride.
It builds the C x H x W field the engine avoids, one view at a time; tests check the engine
against it and bench/ measures what the separable form saves. Translation here uses explicit
index arithmetic, independent of the engine's pad-and-slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.engine.aggregation import Boundary
from pipeline.engine.models import Tap, ViT
from pipeline.engine.shifts import Shift


def source_index(length: int, shift: int, boundary: Boundary) -> tuple[torch.Tensor, torch.Tensor]:
    """For view pixels v: which original pixel v - d shows, and whether it is real or filled."""
    src = torch.arange(length) - shift
    inside = (src >= 0) & (src < length)
    if boundary == "reflect":
        src = torch.where(src < 0, -src, src)
        src = torch.where(src >= length, 2 * (length - 1) - src, src)
    return src.clamp(0, length - 1), inside


def translate_naive(image: torch.Tensor, shift: Shift, boundary: Boundary) -> torch.Tensor:
    """T_d x for one image [3, H, W]: reflection fill, or 0 outside the original."""
    (rows, row_in), (cols, col_in) = (source_index(n, d, boundary) for n, d in zip(image.shape[-2:], shift))
    view = image[:, rows][:, :, cols]
    if boundary == "zeros":
        view = view * torch.outer(row_in, col_in).to(view.dtype)
    return view


def align_naive(grid: torch.Tensor, shift: Shift, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi_d[u] = G_d[floor((u + d) / p)] at full resolution [C, H, W], and its coverage mask [H, W]."""
    upsampled = grid.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    height, width = upsampled.shape[1:]
    target_rows = torch.arange(height) + shift[0]
    target_cols = torch.arange(width) + shift[1]
    row_ok = (target_rows >= 0) & (target_rows < height)
    col_ok = (target_cols >= 0) & (target_cols < width)
    mask = torch.outer(row_ok, col_ok).float()
    aligned = upsampled[:, target_rows.clamp(0, height - 1)][:, :, target_cols.clamp(0, width - 1)]
    return aligned * mask, mask


def aggregate_naive(
    grids: Sequence[torch.Tensor], shifts: Sequence[Shift], *, patch: int, stride: int, boundary: Boundary
) -> torch.Tensor:
    """Mean of the aligned full-resolution fields, pooled to `stride`: [C, H/s, W/s]."""
    total = count = None
    for grid, shift in zip(grids, shifts):
        aligned, mask = align_naive(grid.float(), shift, patch)
        total = aligned if total is None else total + aligned
        count = mask if count is None else count + mask
    pooled = F.avg_pool2d(total[None], stride)[0]
    if boundary == "zeros":
        return pooled / len(shifts)
    weight = F.avg_pool2d(count[None, None], stride)[0, 0]
    return torch.where(weight > 0, pooled / weight.clamp_min(1e-12), torch.zeros_like(pooled))


@torch.no_grad()
def srt_naive(
    vit: ViT,
    images: torch.Tensor,
    *,
    layer: int,
    shifts: Sequence[Shift],
    stride: int,
    boundary: Boundary,
    norm: bool = True,
    pad_after_shift: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """The whole chain, one view per forward pass: [B, C, H/s, W/s] for block `layer`.

    `pad_after_shift` (top, bottom, left, right): images are shifted at their own size, then each
    view is padded with zeros (DINOv2's CenterPadding); the result lives on the padded canvas."""
    tap = Tap("block", vit.resolve_layer(layer))
    results = []
    for image in images:
        views = [translate_naive(image, shift, boundary) for shift in shifts]
        if pad_after_shift is not None:
            top, bottom, left, right = pad_after_shift
            views = [F.pad(view, (left, right, top, bottom)) for view in views]
        grids = [vit.forward_taps(view[None], [tap], norm=norm)[tap].grid[0] for view in views]
        results.append(aggregate_naive(grids, shifts, patch=vit.patch_size, stride=stride, boundary=boundary))
    return torch.stack(results)
