"""Pillow's antialiased bicubic resize as torch ops, bit for bit, on any device.

Pillow (13, src/libImaging/Resample.c) resamples in two passes, one per axis, each a weighted sum over a window of
source pixels whose weights come from the bicubic filter (a = -0.5) stretched by the downscale
factor, normalized, and rounded to 22-bit fixed point; each pass rounds its sums back to 8 bits, so the
order matters: the vertical pass goes first where the height shrinks by more than twice as many
pixels as the width, otherwise the horizontal pass does, on only the rows the vertical one reads.
Doing the same integer arithmetic here gives the very pixels `Image.resize(..., BICUBIC, box=...)`
gives, for any crop box, fractional or not: a GPU decodes and resizes a shard's images and the
model sees what it would have seen from Pillow.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

PRECISION_BITS = 22  # Pillow's: 32 bits less 8 for the pixel less 2 for the filter's overshoot
SUPPORT = 2.0  # the bicubic filter's half-width at scale 1
GATHER_BUDGET = 1 << 24  # elements of a pass's gathered windows held at once (rows are done in chunks)


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel with a = -0.5, evaluated as its C code evaluates it (float64)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def coefficients(in_size: int, start: float, stop: float, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first source index of each output pixel [out], how many it reads [out], fixed-point weights
    [out, taps], zero past that count): Pillow's precompute_coeffs and normalize_coeffs_8bpc. The
    box edges are single precision in Pillow's C, and so is their difference; the weights are
    summed in order, as its loop sums them."""
    start32, stop32 = np.float32(start), np.float32(stop)
    scale = float(np.float32(stop32 - start32)) / out_size
    filterscale = max(scale, 1.0)
    support = SUPPORT * filterscale
    taps = math.ceil(support) * 2 + 1
    center = float(start32) + (np.arange(out_size) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - first
    offsets = np.arange(taps)
    inside = offsets[None, :] < count[:, None]
    weights = np.where(inside, _bicubic((offsets[None, :] + first[:, None] - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    total = np.cumsum(weights, axis=1)[:, -1:]
    weights = np.divide(weights, total, out=weights, where=total != 0.0)
    fixed = np.trunc(weights * (1 << PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5)).astype(np.int32)
    return first, count, fixed


@functools.lru_cache(maxsize=1024)
def _taps(in_size: int, start: float, stop: float, out_size: int, offset: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(source index [out, taps], weights [out, taps]) of a pass on `device`, for a source whose
    first `offset` pixels were cut off; indices past a window point at pixels of zero weight."""
    first, count, weights = coefficients(in_size, start, stop, out_size)
    last = int(first[-1] + count[-1]) - offset - 1  # the last pixel any window reads
    index = np.minimum(first[:, None] - offset + np.arange(weights.shape[1]), last)
    return torch.from_numpy(index).to(device), torch.from_numpy(weights).to(device)


def _pass(pixels: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One pass along the last axis: [..., in] uint8 -> [..., out] uint8, in Pillow's integer
    arithmetic (sums start at half a unit, shift down, clip to 0..255)."""
    rows = pixels.reshape(-1, pixels.shape[-1])
    chunk = max(1, GATHER_BUDGET // index.numel())
    out = torch.empty(rows.shape[0], index.shape[0], dtype=torch.uint8, device=pixels.device)
    for begin in range(0, rows.shape[0], chunk):
        window = rows[begin : begin + chunk, index].to(torch.int32)  # [chunk, out, taps]
        sums = (window * weights).sum(dim=-1, dtype=torch.int64) + (1 << (PRECISION_BITS - 1))
        out[begin : begin + chunk] = (sums >> PRECISION_BITS).clamp_(0, 255).to(torch.uint8)
    return out.reshape(*pixels.shape[:-1], index.shape[0])


def resize(pixels: torch.Tensor, size: tuple[int, int], box: tuple[float, float, float, float]) -> torch.Tensor:
    """[..., H, W] uint8 (channels, and images of one size) -> [..., out_h, out_w] uint8 of the
    region `box` (y0, x0, y1, x1), exactly as Pillow's `resize((out_w, out_h), BICUBIC,
    box=(x0, y0, x1, y1))` gives it, on the pixels' device."""
    (out_h, out_w), (y0, x0, y1, x1) = size, box
    height, width = pixels.shape[-2:]
    device = pixels.device
    horizontal = out_w != width or x0 or x1 != width
    vertical = out_h != height or y0 or y1 != height
    if height - out_h > 0 and height - out_h > (width - out_w) * 2:  # vertical first, over every column
        if vertical:
            pixels = _pass(pixels.transpose(-1, -2), *_taps(height, y0, y1, out_h, 0, device)).transpose(-1, -2)
        return (_pass(pixels, *_taps(width, x0, x1, out_w, 0, device)) if horizontal else pixels).contiguous()
    if horizontal:  # first, over only the rows the vertical pass reads
        first, count, _ = coefficients(height, y0, y1, out_h)
        top, bottom = int(first[0]), int(first[-1] + count[-1])
        pixels = _pass(pixels[..., top:bottom, :], *_taps(width, x0, x1, out_w, 0, device))
    else:
        top = 0
    if vertical:
        pixels = _pass(pixels.transpose(-1, -2), *_taps(height, y0, y1, out_h, top, device)).transpose(-1, -2)
    return pixels.contiguous()
