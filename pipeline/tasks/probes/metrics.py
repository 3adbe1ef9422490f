"""Dense-probe scores exactly as the benchmarks' own evaluation code computes them.

Depth (Monocular-Depth-Estimation-Toolbox, which DINOv2's depth evaluation runs:
`depth/core/evaluation/metrics.py`, `depth/datasets/nyu.py`): ground truth is the PNG divided by
the depth scale, in float32; a pixel counts where min_depth < truth < max_depth and, with the Eigen
crop, inside rows 45:471 and columns 41:601. Per image: the shares of max(t/p, p/t) below 1.25,
1.25² and 1.25³, AbsRel mean |t-p|/t, SqRel mean (t-p)²/t, RMSE, RMSE-log, SILog (0 where it
is NaN) and log10; an image without a valid pixel gives NaN everywhere. Each metric is the mean over
images, NaNs left out: per-image RMSEs averaged, not one RMSE over all pixels. Predictions are
clamped to [min_depth, max_depth] first, as DINOv2's depther does.

Semantic segmentation (mmsegmentation 0.x `intersect_and_union` and `total_area_to_metrics`, which
DINOv2's linear segmentation evaluation uses): with reduce_zero_label, label 0 becomes ignored and
every other label moves down by one (ADE20K: 1..150 -> 0..149); pixels labelled ignore_index are
dropped; areas of intersection, union, prediction and label per class are summed over the whole
set; IoU and accuracy per class are ratios of those sums, mIoU and mAcc their means with NaN
(a class absent from both) left out, aAcc the total intersection over the total labelled area.
Labels outside 0..num_classes-1 fall in no class, as torch.histc drops them there.
"""

from __future__ import annotations

import warnings

import numpy as np

DEPTH_METRICS = ("a1", "a2", "a3", "abs_rel", "sq_rel", "rmse", "rmse_log", "silog", "log_10")
EIGEN_CROP = (slice(45, 471), slice(41, 601))  # NYU-v2 rows and columns, on 480 x 640 maps


def depth_valid_mask(truth: np.ndarray, min_depth: float, max_depth: float, eigen_crop: bool) -> np.ndarray:
    valid = (truth > min_depth) & (truth < max_depth)
    if eigen_crop:
        crop = np.zeros_like(valid)
        crop[EIGEN_CROP] = True
        valid &= crop
    return valid


def depth_errors(truth: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """The metrics of one image over its valid pixels (1-D arrays of equal length)."""
    if truth.size == 0:
        return dict.fromkeys(DEPTH_METRICS, float("nan"))
    ratio = np.maximum(truth / prediction, prediction / truth)
    log_error = np.log(prediction) - np.log(truth)
    with np.errstate(invalid="ignore"):
        silog = np.sqrt(np.mean(log_error**2) - np.mean(log_error) ** 2) * 100
    return {
        "a1": float((ratio < 1.25).mean()),
        "a2": float((ratio < 1.25**2).mean()),
        "a3": float((ratio < 1.25**3).mean()),
        "abs_rel": float(np.mean(np.abs(truth - prediction) / truth)),
        "sq_rel": float(np.mean(((truth - prediction) ** 2) / truth)),
        "rmse": float(np.sqrt(((truth - prediction) ** 2).mean())),
        "rmse_log": float(np.sqrt(((np.log(truth) - np.log(prediction)) ** 2).mean())),
        "silog": 0.0 if np.isnan(silog) else float(silog),
        "log_10": float(np.abs(np.log10(truth) - np.log10(prediction)).mean()),
    }


class DepthScores:
    """Accumulates per-image depth metrics; `result()` is their NaN-skipping mean over images."""

    def __init__(self, min_depth: float, max_depth: float, eigen_crop: bool) -> None:
        self.min_depth, self.max_depth, self.eigen_crop = min_depth, max_depth, eigen_crop
        self.images: list[dict[str, float]] = []

    def add(self, prediction: np.ndarray, truth: np.ndarray, covered: np.ndarray | None = None) -> None:
        """`prediction` and `truth` in metres over the original pixels; `covered` (optional) marks
        the pixels the model saw (a centre crop covers part of the image)."""
        prediction = np.clip(prediction.astype(np.float32), self.min_depth, self.max_depth)
        valid = depth_valid_mask(truth, self.min_depth, self.max_depth, self.eigen_crop)
        if covered is not None:
            valid &= covered
        self.images.append(depth_errors(truth[valid], prediction[valid]))

    def result(self) -> dict[str, float]:
        with warnings.catch_warnings(action="ignore", category=RuntimeWarning):
            return {k: float(np.nanmean([image[k] for image in self.images])) for k in DEPTH_METRICS} | {"images": len(self.images)}


def evaluated_labels(truth: np.ndarray, reduce_zero_label: bool) -> np.ndarray:
    """A label map as scored: with reduce_zero_label, 0 becomes 255 and the rest move down by one."""
    label = truth.astype(np.int64)
    if reduce_zero_label:
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    return label


class SegmentationScores:
    """Accumulates class areas over a set of label maps; `result()` gives mIoU, mAcc and aAcc."""

    def __init__(self, num_classes: int, ignore_index: int = 255, reduce_zero_label: bool = False) -> None:
        self.num_classes, self.ignore_index, self.reduce_zero_label = num_classes, ignore_index, reduce_zero_label
        self.intersect, self.union, self.predicted, self.labelled = (np.zeros(num_classes, np.float64) for _ in range(4))
        self.images = 0
        # Labels at or above num_classes (not ignore_index): left out, as mmseg leaves them, and counted to say so.
        self.beyond_pixels, self.beyond_images, self.largest_label = 0, 0, -1

    def add(self, prediction: np.ndarray, truth: np.ndarray, covered: np.ndarray | None = None) -> None:
        label = evaluated_labels(truth, self.reduce_zero_label)
        keep = label != self.ignore_index
        if covered is not None:
            keep &= covered
        prediction, label = prediction[keep].astype(np.int64), label[keep]
        if (beyond := int((label >= self.num_classes).sum())) > 0:
            self.beyond_pixels += beyond
            self.beyond_images += 1
            self.largest_label = max(self.largest_label, int(label.max()))
        area = self._histogram
        hit = area(prediction[prediction == label])
        predicted, labelled = area(prediction), area(label)
        self.intersect += hit
        self.union += predicted + labelled - hit
        self.predicted += predicted
        self.labelled += labelled
        self.images += 1

    def _histogram(self, values: np.ndarray) -> np.ndarray:
        inside = values[(values >= 0) & (values < self.num_classes)]
        return np.bincount(inside, minlength=self.num_classes).astype(np.float64)

    def result(self) -> dict[str, float | list[float]]:
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings(action="ignore", category=RuntimeWarning):
            iou = self.intersect / self.union
            accuracy = self.intersect / self.labelled
            return {
                "mIoU": float(np.nanmean(iou)),
                "mAcc": float(np.nanmean(accuracy)),
                "aAcc": float(self.intersect.sum() / self.labelled.sum()),
                "IoU": [float(v) for v in iou],
                "images": self.images,
            }

