"""Segmentation scores exactly as the benchmarks' own evaluation code computes them.

DAVIS-2017, semi-supervised (davis2017-evaluation, `DAVISEvaluation._evaluate_semisupervised`):
J is region IoU (1 when both masks are empty); F is the boundary F-measure with a dilation
tolerance of ceil(0.008 x image diagonal) pixels. Void pixels (255) of the ground truth count as
background, since that evaluation passes no void mask: an object predicted over void is a false
positive. Objects are 1..max label of the first frame; the first and last annotated frames are
not scored; per object, Mean, Recall (share of frames above 0.5) and Decay (first quarter's mean
minus the last quarter's) over frames, then means over objects; J&F is the mean of J and F.

Salient objects (TokenCut's unsupervised_saliency_detection/metric.py): the ground truth is every
non-zero pixel of a grey mask. maxF: beta^2 = 0.3 at the thresholds k/255, k = 0..254, a pixel
positive when strictly above; precision 1 for an empty prediction, recall 1 for an empty truth, an
undefined F counts 0; F averaged over images at each threshold, then the best. IoU (and pixel
accuracy) per image, averaged over images; an image where both masks are empty has IoU NaN there,
and so here. That code computes in float32, and so does this.
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
THRESHOLDS = np.arange(0.0, 1.0, 1.0 / 255)  # k/255, k = 0..254
DAVIS_COLUMNS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


def region_similarity(truth: np.ndarray, prediction: np.ndarray) -> float:
    """J: intersection over union of two boolean masks; 1 when both are empty."""
    union = (truth | prediction).sum()
    return 1.0 if union == 0 else float((truth & prediction).sum() / union)


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


def boundary_measure(truth: np.ndarray, prediction: np.ndarray, tolerance: float = BOUNDARY_TOLERANCE) -> float:
    """F: boundary F-measure, a boundary pixel matching if the other boundary lies within a disk of
    `boundary_tolerance` pixels. No boundary on one side: precision or recall is 1 and F is 0; on
    neither side: F is 1."""
    truth_boundary, predicted_boundary = boundary_map(truth), boundary_map(prediction)
    footprint = disk(boundary_tolerance(truth.shape, tolerance)).astype(bool)
    n_truth, n_predicted = truth_boundary.sum(), predicted_boundary.sum()
    if n_predicted == 0 or n_truth == 0:
        return 1.0 if n_predicted == n_truth else 0.0
    precision = (predicted_boundary & ndimage.binary_dilation(truth_boundary, footprint)).sum() / n_predicted
    recall = (truth_boundary & ndimage.binary_dilation(predicted_boundary, footprint)).sum() / n_truth
    return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def davis_frame_scores(truth: Sequence[np.ndarray], predicted: Sequence[np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{object id: (J per scored frame, F per scored frame)} of one sequence, from label frames
    [H, W] of the truth (255 = void, counted as background) and of the prediction."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} truth frames but {len(predicted)} predicted")
    if len(truth) < 3:
        raise ValueError("DAVIS scores frames 1..T-2: a sequence needs at least 3 frames")
    truth = [np.where(frame == VOID, 0, frame) for frame in truth]
    objects = int(truth[0].max())
    scored = list(zip(truth[1:-1], predicted[1:-1]))
    if scored and (highest := max(int(guess.max()) for _, guess in scored)) > objects:
        raise ValueError(f"a predicted frame holds label {highest}, but the sequence has {objects} objects")
    return {
        obj: (
            np.array([region_similarity(target == obj, guess == obj) for target, guess in scored]),
            np.array([boundary_measure(target == obj, guess == obj) for target, guess in scored]),
        )
        for obj in range(1, objects + 1)
    }


def statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame scores, as the DAVIS code defines them:
    Recall is the share of frames above 0.5, Decay the mean of the first of four bins of frames
    minus that of the last (bin edges computed in uint8, as there)."""
    edges = (np.round(np.linspace(1, len(per_frame), 5) + 1e-10) - 1).astype(np.uint8)
    bins = [per_frame[edges[i] : edges[i + 1] + 1] for i in range(4)]
    return float(np.nanmean(per_frame)), float(np.nanmean(per_frame > 0.5)), float(np.nanmean(bins[0]) - np.nanmean(bins[3]))


def davis_scores(truth: Sequence[np.ndarray], predicted: Sequence[np.ndarray]) -> dict[int, dict[str, float]]:
    """{object id: {"J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"}} of one sequence."""
    scores = {}
    for obj, (j, f) in davis_frame_scores(truth, predicted).items():
        scores[obj] = dict(zip(("J-Mean", "J-Recall", "J-Decay"), statistics(j))) | dict(zip(("F-Mean", "F-Recall", "F-Decay"), statistics(f)))
    return scores


def davis_summary(objects: Sequence[dict[str, float]]) -> dict[str, float]:
    """The global table (DAVIS_COLUMNS): every statistic's mean over all objects of all sequences."""
    means = {column: float(np.mean([o[column] for o in objects])) for column in DAVIS_COLUMNS[1:]}
    return {"J&F-Mean": (means["J-Mean"] + means["F-Mean"]) / 2, **means}


def saliency_precision_recall(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall (float32) of a map in [0, 1] against a mask (non-zero = salient) at
    each of THRESHOLDS, positive strictly above; 1 where the prediction, or the truth, is empty."""
    salient = truth.ravel() != 0
    positive = prediction.ravel()[None, :] > THRESHOLDS[:, None]
    hits = (positive & salient[None, :]).sum(1).astype(np.float32)
    area, truth_area = positive.sum(1).astype(np.float32), np.float32(salient.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(area == 0, np.float32(1), hits / area)
        recall = np.full_like(hits, 1) if truth_area == 0 else hits / truth_area
    return precision.astype(np.float32), recall.astype(np.float32)


def max_f(predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray], beta2: float = BETA2) -> float:
    """maxF: the F-beta curve averaged over images (an undefined F counts 0), at its best threshold."""
    curves = []
    for prediction, truth in zip(predictions, truths, strict=True):
        precision, recall = saliency_precision_recall(prediction, truth)
        with np.errstate(invalid="ignore", divide="ignore"):
            f = (1 + beta2) * precision * recall / (beta2 * precision + recall)
        curves.append(np.nan_to_num(f, nan=0.0))
    return float(np.stack(curves).mean(0, dtype=np.float32).max())


def saliency_iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """IoU of prediction > 0.5 and truth > 0.5 (float32); NaN when both are empty."""
    predicted, salient = prediction > 0.5, truth > 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.float32((predicted & salient).sum()) / np.float32((predicted | salient).sum()))


def pixel_accuracy(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Share of pixels where prediction > 0.5 agrees with truth > 0.5."""
    return float(np.mean((prediction > 0.5) == (truth > 0.5), dtype=np.float32))
