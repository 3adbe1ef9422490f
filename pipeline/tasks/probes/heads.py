"""Linear dense heads on stored features, as DINOv2's linear depth and segmentation heads (pure torch).

Input: the maps of several blocks [B, C, h, w], each optionally with its class token broadcast
over the map, concatenated on channels; a batch norm, then one 1x1 convolution. Depth comes from
`bins` logits as DINOv2's classification head makes it (uniform bins over [min, max], ReLU + 0.1,
normalized, the bins' weighted mean), or with `bins=0` from one channel (ReLU + min depth).
Predictions are made at the feature stride and resized bilinearly onto the original pixels through
the manifest's region, as DINOv2 resizes its predictions to the ground truth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BIN_EPS = 0.1  # DINOv2's "linear" bin normalization
SIGLOSS_EPS = 0.001  # DINOv2's SigLoss
SIGLOSS_VARIANCE_FOCUS = 0.15


class LinearHead(nn.Module):
    def __init__(self, channels: int, outputs: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, outputs, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(features))


def head_input(dense: list[torch.Tensor], cls: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Concatenate block maps [B, C, h, w], each followed by its class token [B, C] broadcast."""
    parts = []
    for i, grid in enumerate(dense):
        parts.append(grid)
        if cls is not None:
            parts.append(cls[i][:, :, None, None].expand_as(grid))
    return torch.cat(parts, dim=1)


def depth_from_outputs(outputs: torch.Tensor, min_depth: float, max_depth: float) -> torch.Tensor:
    """[B, K, h, w] head outputs -> [B, 1, h, w] depth in metres (K bins, or K = 1 regression)."""
    if outputs.shape[1] == 1:
        return F.relu(outputs) + min_depth
    bins = torch.linspace(min_depth, max_depth, outputs.shape[1], device=outputs.device, dtype=outputs.dtype)
    weights = F.relu(outputs) + BIN_EPS
    weights = weights / weights.sum(dim=1, keepdim=True)
    return torch.einsum("bkhw,k->bhw", weights, bins)[:, None]


def sigloss(prediction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """DINOv2's scale-invariant log loss over valid pixels (1-D tensors of equal length)."""
    g = torch.log(prediction + SIGLOSS_EPS) - torch.log(truth + SIGLOSS_EPS)
    return torch.sqrt(torch.var(g) + SIGLOSS_VARIANCE_FOCUS * g.mean() ** 2)


def to_original(values: torch.Tensor, *, height: int, width: int, region: tuple[float, float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A map over the model input [K, h, w] -> ([K, height, width] bilinear, [height, width] bool:
    the pixels the model saw). The region may reach past the image (padding): that part is dropped."""
    top, left, bottom, right = (round(v) for v in region)
    resized = F.interpolate(values[None], size=(bottom - top, right - left), mode="bilinear", align_corners=False)[0]
    canvas = values.new_zeros((values.shape[0], height, width))
    covered = torch.zeros((height, width), dtype=torch.bool, device=values.device)
    rows, columns = slice(max(top, 0), min(bottom, height)), slice(max(left, 0), min(right, width))
    canvas[:, rows, columns] = resized[:, rows.start - top : rows.stop - top, columns.start - left : columns.stop - left]
    covered[rows, columns] = True
    return canvas, covered
