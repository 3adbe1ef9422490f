"""Single-object discovery on a feature map: one box per image, and CorLoc.

Both methods follow their authors' code (valeoai/LOST `object_discovery.py`, TokenCut's use of it):

- LOST: similarities are raw dot products of the cells' features (attention keys by default). The
  seed is the cell with the fewest positive similarities to the others (ties: the first cell).
  Among the `k_patches` cells of lowest degree, those similar to the seed (> 0) vote: their
  similarity rows are summed, and the box is that of the 4-connected component of positive votes
  holding the seed.
- TokenCut: the normalized-cut bipartition's component holding the seed (pipeline.tasks.shared.tokencut).

A box of cells spans [min, max + 1) on both axes, as LOST's `detect_box`; it is mapped to original
pixels through the manifest's region and clipped to the image. CorLoc (LOST's `main_lost.py`): an
image counts when its box has IoU >= 0.5 with any ground-truth box, IoU as LOST's `bbox_iou`
(continuous coordinates, eps 1e-7 in the union and heights, computed in float32 as torch computes
it on the integer boxes of ViT runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pipeline.tasks.shared.tokencut import EPS, TAU, tokencut

METHODS = ("tokencut", "lost")
K_PATCHES = 100
IOU_EPS = 1e-7
CORLOC_IOU = 0.5


@dataclass
class Discovery:
    mask: np.ndarray  # [h, w] bool: the cells of the object
    seed: tuple[int, int]


def lost(features: np.ndarray, k_patches: int = K_PATCHES) -> Discovery:
    """LOST's seed and expansion on a feature map [C, h, w]."""
    channels, h, w = features.shape
    cells = features.reshape(channels, h * w).T.astype(np.float32)
    similarity = cells @ cells.T
    positive = similarity.copy()
    np.fill_diagonal(positive, 0)
    degree = (positive > 0).sum(1)
    order = np.argsort(degree, kind="stable")  # lowest degree first; ties keep cell order
    seed = int(order[0])
    potentials = order[:k_patches]
    voters = potentials[similarity[seed, potentials] > 0]
    votes = similarity[voters].sum(0).reshape(h, w)
    components, _ = ndimage.label(votes > 0)
    seed_cell = np.unravel_index(seed, (h, w))
    if components[seed_cell] == 0:
        raise ValueError("the seed's votes are not positive: no object found")
    return Discovery(components == components[seed_cell], (int(seed_cell[0]), int(seed_cell[1])))


def discover(features: np.ndarray, method: str, *, k_patches: int = K_PATCHES, tau: float = TAU, eps: float = EPS) -> Discovery:
    if method == "lost":
        return lost(features, k_patches)
    if method == "tokencut":
        cut = tokencut(features, tau, eps)
        return Discovery(cut.mask, cut.seed)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a non-empty cell mask, the maxima exclusive."""
    rows, columns = np.nonzero(mask)
    return int(columns.min()), int(rows.min()), int(columns.max()) + 1, int(rows.max()) + 1


def box_to_original(
    box: tuple[int, int, int, int], *, stride: int, input_size: tuple[int, int], region: tuple[float, float, float, float], height: int, width: int
) -> tuple[float, float, float, float]:
    """A box of feature cells -> (x0, y0, x1, y1) in original pixels, clipped to the image."""
    y0, x0, y1, x1 = region
    sy, sx = stride * (y1 - y0) / input_size[0], stride * (x1 - x0) / input_size[1]
    left, top, right, bottom = x0 + box[0] * sx, y0 + box[1] * sy, x0 + box[2] * sx, y0 + box[3] * sy
    return max(left, 0.0), max(top, 0.0), min(right, float(width)), min(bottom, float(height))


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x0, y0, x1, y1) box with each of `boxes` [n, 4], as LOST's `bbox_iou` computes
    it on ViT runs: in float32, the default dtype torch promotes its integer boxes to once the eps
    terms are added. There the eps terms vanish against pixel-sized boxes, so a box covering half
    of its truth scores exactly 0.5 and counts."""
    box, boxes = np.asarray(box, np.float32), np.asarray(boxes, np.float32).reshape(-1, 4)
    eps = np.float32(IOU_EPS)
    inter = (np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])).clip(0) * (
        np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    ).clip(0)
    w1, h1 = box[2] - box[0], box[3] - box[1] + eps
    w2, h2 = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1] + eps
    return inter / (w1 * h1 + w2 * h2 - inter + eps)


def localized(box: tuple[float, float, float, float] | None, truth: np.ndarray) -> bool:
    """Whether a predicted box counts for CorLoc: IoU >= 0.5 with any ground-truth box."""
    return box is not None and len(truth) > 0 and bool((box_iou(np.asarray(box), truth) >= CORLOC_IOU).any())
