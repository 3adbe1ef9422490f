"""Segmentation scores as the benchmarks define them: DAVIS-2017 J and F, saliency maxF and IoU.

J and F follow the DAVIS-2017 evaluation: J is region IoU, F the boundary F-measure with a
dilation tolerance of ceil(0.008 x image diagonal) pixels; void pixels (label 255) are ignored;
a sequence's first and last frames are not scored; scores are means over objects. maxF follows
the saliency literature's (and TokenCut's) protocol: beta^2 = 0.3, 255 thresholds, F averaged over
images at each threshold, then the best threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from skimage.morphology import disk

VOID = 255
BOUNDARY_TOLERANCE = 0.008  # of the image diagonal
BETA2 = 0.3
THRESHOLDS = 255


def region_similarity(truth: np.ndarray, prediction: np.ndarray, void: np.ndarray | None = None) -> float:
    """J: intersection over union of two boolean masks, outside `void`; 1 when both are empty."""
    keep = ~void if void is not None else np.ones(truth.shape, bool)
    union = ((truth | prediction) & keep).sum()
    return 1.0 if union == 0 else float(((truth & prediction) & keep).sum() / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: where the mask differs from its east, south or south-east neighbour."""
    east, south, south_east = (np.zeros_like(mask) for _ in range(3))
    east[:, :-1], south[:-1, :], south_east[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    boundary = (mask ^ east) | (mask ^ south) | (mask ^ south_east)
    boundary[-1, :] = mask[-1, :] ^ east[-1, :]
    boundary[:, -1] = mask[:, -1] ^ south[:, -1]
    boundary[-1, -1] = False
    return boundary


def boundary_tolerance(shape: tuple[int, int], tolerance: float = BOUNDARY_TOLERANCE) -> int:
    """The match distance in pixels: `tolerance` itself if >= 1, else that fraction of the diagonal."""
    return int(tolerance) if tolerance >= 1 else math.ceil(tolerance * math.hypot(*shape))


def boundary_measure(
    truth: np.ndarray, prediction: np.ndarray, void: np.ndarray | None = None, tolerance: float = BOUNDARY_TOLERANCE
) -> float:
    """F: boundary F-measure, a boundary pixel matching if the other boundary lies within a disk of
    `boundary_tolerance` pixels."""
    keep = ~void if void is not None else np.ones(truth.shape, bool)
    truth_boundary, predicted_boundary = boundary_map(truth & keep), boundary_map(prediction & keep)
    footprint = disk(boundary_tolerance(truth.shape, tolerance)).astype(bool)
    n_truth, n_predicted = truth_boundary.sum(), predicted_boundary.sum()
    if n_predicted == 0 or n_truth == 0:
        return 1.0 if n_predicted == n_truth else 0.0
    precision = (predicted_boundary & ndimage.binary_dilation(truth_boundary, footprint)).sum() / n_predicted
    recall = (truth_boundary & ndimage.binary_dilation(predicted_boundary, footprint)).sum() / n_truth
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def davis_scores(truth: Sequence[np.ndarray], predicted: Sequence[np.ndarray]) -> dict[int, tuple[float, float]]:
    """{object id: (J mean, F mean)} of one sequence: label frames [H, W] of the truth (255 = void)
    and of the prediction. Objects are 1..max label of the first truth frame; the first and last
    frames are not scored."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} truth frames but {len(predicted)} predicted")
    if len(truth) < 3:
        raise ValueError("DAVIS scores frames 1..T-2: a sequence needs at least 3 frames")
    first = np.where(truth[0] == VOID, 0, truth[0])
    scores = {}
    for obj in range(1, int(first.max()) + 1):
        j, f = [], []
        for target, guess in zip(truth[1:-1], predicted[1:-1]):
            void = target == VOID
            j.append(region_similarity(target == obj, guess == obj, void))
            f.append(boundary_measure(target == obj, guess == obj, void))
        scores[obj] = (float(np.mean(j)), float(np.mean(f)))
    return scores


def precision_recall(prediction: np.ndarray, truth: np.ndarray, thresholds: int = THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of a saliency map in 0..1 against a boolean mask at `thresholds` evenly
    spaced thresholds in [0, 1)."""
    levels = np.linspace(0, 1 - 1e-10, thresholds)
    positive = prediction.ravel()[None, :] >= levels[:, None]
    hits = (positive & truth.ravel()[None, :]).sum(1)
    return hits / (positive.sum(1) + 1e-20), hits / (truth.sum() + 1e-20)


def max_f(predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray], beta2: float = BETA2, thresholds: int = THRESHOLDS) -> float:
    """maxF: the F-beta curve averaged over images (0 where undefined), at its best threshold."""
    curves = []
    for prediction, truth in zip(predictions, truths, strict=True):
        precision, recall = precision_recall(prediction, truth, thresholds)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = (1 + beta2) * precision * recall / (beta2 * precision + recall)
        curves.append(np.nan_to_num(f, nan=0.0))
    return float(np.mean(curves, axis=0).max())
