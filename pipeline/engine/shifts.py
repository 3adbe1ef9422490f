"""Shift sets of the SRT engine: the grid, random draws from the sub-token lattice, explicit lists
(validated), splitting a set into batches, and the spread-out order adaptive SRT visits them in.

A shift d = (dy, dx) moves content by +d: view_d[u] = image[u - d]; |dy|, |dx| < patch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import torch

Shift = tuple[int, int]
# 16 random shifts over the whole sub-token lattice: the quality bench (bench/RESULTS.md) scores
# them well above small grids at fewer views, since they cover every phase of the token period.
DEFAULT_RANDOM_SHIFTS = 16


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
