"""Channel reduction of dense maps (`--pca-dims K`): a PCA basis fitted on sample maps, the
projection onto it and the way back. Pure torch: the store keeps the basis, the worker projects.

A store of K-channel maps is C/K times smaller; `reconstruct` gives the best rank-K approximation
of the original C-channel maps (in the least-squares sense, over the sample it was fitted on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_SAMPLE_CELLS = 100_000  # cells the basis is fitted on, drawn at random beyond that


@dataclass
class Basis:
    mean: torch.Tensor  # [C]
    components: torch.Tensor  # [K, C], orthonormal rows, by decreasing variance
    explained: float  # share of the sample's variance the K components keep

    def to(self, device: torch.device | str) -> Basis:
        return Basis(self.mean.to(device), self.components.to(device), self.explained)


def fit(maps: list[torch.Tensor], dims: int, seed: int = 0) -> Basis:
    """The top-`dims` principal directions of the cells of `maps` ([N, C, h, w] each, any sizes)."""
    per_map = [m.permute(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in maps]
    keep = min(1.0, MAX_SAMPLE_CELLS / sum(len(c) for c in per_map))  # the same share of every map, drawn where it lies
    generator = torch.Generator().manual_seed(seed)
    cells = torch.cat([c[torch.randperm(len(c), generator=generator)[: round(len(c) * keep)].to(c.device)].double().cpu() for c in per_map])
    if not 0 < dims <= cells.shape[1]:
        raise ValueError(f"PCA dims must be in 1..{cells.shape[1]}, got {dims}")
    mean = cells.mean(dim=0)
    _, singular, directions = torch.linalg.svd(cells - mean, full_matrices=False)
    variance = singular.square()
    explained = float(variance[:dims].sum() / variance.sum()) if variance.sum() > 0 else 1.0
    return Basis(mean.float(), directions[:dims].float().contiguous(), explained)


def project(maps: torch.Tensor, basis: Basis) -> torch.Tensor:
    """[B, C, h, w] maps -> [B, K, h, w] coefficients on the basis."""
    return torch.einsum("bchw,kc->bkhw", maps.float() - basis.mean.view(1, -1, 1, 1), basis.components)


def reconstruct(coefficients: torch.Tensor, basis: Basis) -> torch.Tensor:
    """[..., K, h, w] coefficients -> [..., C, h, w] maps: the projection's way back."""
    return torch.einsum("...khw,kc->...chw", coefficients.float(), basis.components) + basis.mean.view(-1, 1, 1)
