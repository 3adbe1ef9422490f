"""Depth, segmentation and object-discovery scores against hand-computed cases that tell the
benchmarks' code apart from plausible alternatives (pooled RMSE, per-image mIoU, IoU without eps)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.tasks.discovery import box_iou, box_to_original, discover, localized, lost, mask_box
from pipeline.tasks.probes.metrics import DepthScores, SegmentationScores, depth_errors
from pipeline.tasks.shared.ground_truth import voc_boxes

# ---------------------------------------------------------------------------- depth


def test_each_depth_metric_by_hand():
    truth, prediction = np.array([1, 2, 4], np.float32), np.array([1, 2, 2], np.float32)
    errors = depth_errors(truth, prediction)
    assert errors["a1"] == errors["a2"] == errors["a3"] == pytest.approx(2 / 3)  # ratio 2 > 1.25^3 = 1.95
    assert errors["abs_rel"] == pytest.approx(1 / 6)
    assert errors["sq_rel"] == pytest.approx(1 / 3)
    assert errors["rmse"] == pytest.approx(math.sqrt(4 / 3))
    assert errors["rmse_log"] == pytest.approx(math.log(2) / math.sqrt(3), rel=1e-6)
    assert errors["log_10"] == pytest.approx(math.log10(2) / 3, rel=1e-6)
    # SILog: 100 x the standard deviation of the log error over pixels
    log_error = np.log([1, 1, 0.5])
    assert errors["silog"] == pytest.approx(100 * log_error.std(), rel=1e-5)


def test_the_delta_thresholds_are_strict():
    errors = depth_errors(np.array([1.0, 1.0]), np.array([1.25, 1.25**2]))
    assert (errors["a1"], errors["a2"], errors["a3"]) == (0.0, 0.5, 1.0)


def test_depth_metrics_are_means_over_images_not_over_pixels():
    scores = DepthScores(1e-3, 10, eigen_crop=False)
    scores.add(np.full((2, 2), 2.0), np.full((2, 2), 1.0, np.float32))  # RMSE 1 over 4 pixels
    scores.add(np.full((1, 1), 1.0), np.full((1, 1), 1.0, np.float32))  # RMSE 0 over 1 pixel
    assert scores.result()["rmse"] == pytest.approx(0.5)  # pooled over the 5 pixels it would be 0.894


def test_invalid_truth_is_left_out_and_predictions_are_clamped():
    truth = np.array([[0.0, 12.0, 2.0, 2.0]], np.float32)  # missing, beyond --max-depth, two valid
    prediction = np.array([[5.0, 5.0, 0.0, 20.0]])  # clamped to 1e-3 and 10
    result = DepthScores(1e-3, 10, eigen_crop=False)
    result.add(prediction, truth)
    expected = depth_errors(np.array([2.0, 2.0], np.float32), np.array([1e-3, 10.0], np.float32))
    assert result.result()["rmse"] == pytest.approx(expected["rmse"])
    assert math.isfinite(result.result()["rmse_log"])


def test_an_image_without_valid_pixels_is_left_out_of_the_means():
    scores = DepthScores(1e-3, 10, eigen_crop=False)
    scores.add(np.full((2, 2), 3.0), np.zeros((2, 2), np.float32))
    scores.add(np.full((2, 2), 2.0), np.full((2, 2), 1.0, np.float32))
    result = scores.result()
    assert result["rmse"] == pytest.approx(1.0) and result["images"] == 2


def test_eigen_crop_scores_only_rows_45_to_471_and_columns_41_to_601():
    truth = np.full((480, 640), 2.0, np.float32)
    prediction = truth.copy()
    prediction[:45] = 4.0  # wrong only above the crop
    prediction[:, 601:] = 4.0  # and right of it
    cropped, whole = DepthScores(1e-3, 10, eigen_crop=True), DepthScores(1e-3, 10, eigen_crop=False)
    cropped.add(prediction, truth)
    whole.add(prediction, truth)
    assert cropped.result()["rmse"] == 0.0 and whole.result()["rmse"] > 0.5
    prediction[470, 600] = 4.0  # the last pixel inside the crop
    cropped = DepthScores(1e-3, 10, eigen_crop=True)
    cropped.add(prediction, truth)
    assert cropped.result()["rmse"] > 0


# ---------------------------------------------------------------------------- segmentation


def test_miou_with_reduce_zero_label_by_hand():
    truth = np.array([[0, 1], [2, 2]], np.uint8)  # -> ignored, 0 / 1, 1
    prediction = np.array([[1, 0], [1, 0]])
    scores = SegmentationScores(num_classes=2, reduce_zero_label=True)
    scores.add(prediction, truth)
    result = scores.result()
    # class 0: hit 1, predicted 2 (the ignored pixel's prediction is dropped), labelled 1 -> 1/2
    # class 1: hit 1, predicted 1, labelled 2 -> 1/2
    assert result["IoU"] == [0.5, 0.5] and result["mIoU"] == 0.5
    assert result["aAcc"] == pytest.approx(2 / 3) and result["mAcc"] == pytest.approx(0.75)


def test_a_class_absent_from_both_is_left_out_but_a_predicted_only_class_counts_zero():
    truth, prediction = np.array([[0, 0, 1, 1]]), np.array([[0, 0, 1, 1]])
    absent = SegmentationScores(num_classes=3)
    absent.add(prediction, truth)
    assert absent.result()["mIoU"] == 1.0 and math.isnan(absent.result()["IoU"][2])
    predicted_only = SegmentationScores(num_classes=3)
    predicted_only.add(np.array([[0, 0, 1, 2]]), truth)
    assert predicted_only.result()["IoU"] == [1.0, 0.5, 0.0]
    assert predicted_only.result()["mIoU"] == pytest.approx(0.5)


def test_areas_are_summed_over_the_set_before_dividing():
    scores = SegmentationScores(num_classes=2)
    scores.add(np.array([[0]]), np.array([[0]]))  # one right pixel of class 0
    scores.add(np.ones((1, 9), int), np.zeros((1, 9), int))  # nine wrong pixels of class 0
    result = scores.result()
    assert result["IoU"][0] == pytest.approx(1 / 10)  # a mean of per-image IoUs would give 0.5
    assert result["IoU"][1] == 0.0 and result["aAcc"] == pytest.approx(0.1)


def test_ignore_index_and_out_of_range_labels_count_nowhere():
    truth = np.array([[255, 7, 0, 1]])
    scores = SegmentationScores(num_classes=2, ignore_index=255)
    scores.add(np.array([[1, 1, 0, 1]]), truth)
    result = scores.result()
    assert result["IoU"] == [1.0, 0.5]  # class 1 predicted twice (on 7 and on 1), labelled once
    assert result["aAcc"] == 1.0  # 2 hits of 2 labelled in-range pixels


# ---------------------------------------------------------------------------- boxes and CorLoc


def test_box_iou_as_lost_computes_it():
    assert box_iou(np.array([0, 0, 10, 10]), np.array([[5, 0, 15, 10]]))[0] == pytest.approx(1 / 3)
    assert box_iou(np.array([0, 0, 10, 10]), np.array([[20, 20, 30, 30]]))[0] == 0.0


def lost_bbox_iou(box1, box2, eps=1e-7):
    """LOST's `bbox_iou` (valeoai/LOST networks.py, from ultralytics/yolov5), x1y1x2y2 path, as
    `main_lost.py` calls it on ViT runs: integer numpy boxes made tensors."""
    import torch

    box1, box2 = torch.from_numpy(box1), torch.from_numpy(box2).T
    b1_x1, b1_y1, b1_x2, b1_y2 = box1[0], box1[1], box1[2], box1[3]
    b2_x1, b2_y1, b2_x2, b2_y2 = box2[0], box2[1], box2[2], box2[3]
    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * (torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)).clamp(0)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    return (inter / union).numpy()


@pytest.mark.parametrize(
    ("box", "truth"),
    [
        ([0, 0, 16, 16], [[0, 0, 32, 16]]),  # half of the truth: exactly 0.5 in float32, where the eps terms vanish
        ([0, 0, 10, 10], [[0, 0, 10, 20], [50, 50, 60, 60]]),
        ([3, 5, 200, 120], [[0, 0, 197, 115], [3, 5, 200, 120]]),
        ([0, 0, 1, 1], [[0, 0, 2, 1]]),  # a one-pixel box: eps still vanishes at 1
        ([0, 0, 16, 16], [[100, 100, 132, 116]]),  # no overlap
    ],
)
def test_box_iou_is_losts_on_integer_boxes_bit_for_bit(box, truth):
    box, truth = np.array(box, dtype=np.int64), np.array(truth, dtype=np.int64)
    np.testing.assert_array_equal(box_iou(box, truth), lost_bbox_iou(box, truth))


def test_corloc_counts_iou_of_at_least_half_as_lost_on_vit_runs():
    assert localized((0.0, 0.0, 16.0, 16.0), np.array([[0, 0, 32, 16]]))  # IoU 0.5 in float32 (0.4999999952 in float64)
    assert localized((0.0, 0.0, 10.0, 10.0), np.array([[0, 0, 10, 20]]))
    assert not localized((0.0, 0.0, 10.0, 9.9), np.array([[0, 0, 10, 20]]))
    assert localized((0.0, 0.0, 10.0, 10.0), np.array([[50, 50, 60, 60], [0, 0, 10, 10]]))  # any box
    assert not localized(None, np.array([[0, 0, 10, 20]])) and not localized((0.0, 0.0, 10.0, 10.0), np.zeros((0, 4)))


def test_voc_boxes_are_read_as_lost_reads_them():
    xml = b"""<annotation><filename>000005.jpg</filename>
      <object><name>chair</name><truncated>0</truncated><difficult>0</difficult>
        <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>
      <object><name>chair</name><truncated>1</truncated><difficult>0</difficult>
        <bndbox><xmin>5</xmin><ymin>5</ymin><xmax>9</xmax><ymax>9</ymax></bndbox></object>
      <object><name>chair</name><truncated>0</truncated><difficult>1</difficult>
        <bndbox><xmin>7</xmin><ymin>7</ymin><xmax>8</xmax><ymax>8</ymax></bndbox></object></annotation>"""
    assert voc_boxes(xml).tolist() == [[0, 1, 30, 40], [4, 4, 9, 9], [6, 6, 8, 8]]
    assert voc_boxes(xml, no_hard=True).tolist() == [[0, 1, 30, 40]]


def two_cluster_map(h: int, w: int, rows: slice, columns: slice) -> np.ndarray:
    features = np.zeros((2, h, w), np.float32)
    features[0] = 1
    features[:, rows, columns] = np.array([0, 1], np.float32)[:, None, None]
    return features


def test_lost_seeds_in_the_smaller_region_and_expands_to_its_box():
    features = two_cluster_map(4, 4, slice(1, 3), slice(2, 4))
    found = lost(features)
    assert found.seed == (1, 2)  # the first of the lowest-degree cells
    assert mask_box(found.mask) == (2, 1, 4, 3)


def test_tokencut_finds_the_same_object():
    features = two_cluster_map(6, 6, slice(1, 3), slice(2, 5)) + np.random.default_rng(0).normal(0, 0.01, (2, 6, 6)).astype(np.float32)
    assert mask_box(discover(features, "tokencut").mask) == (2, 1, 5, 3)


def test_cell_boxes_map_through_the_region_and_are_clipped():
    # a 32 x 32 input showing a 64 x 64 original at stride 8: a cell is 16 original pixels
    assert box_to_original((2, 1, 4, 3), stride=8, input_size=(32, 32), region=(0, 0, 64, 64), height=64, width=64) == (32, 16, 64, 48)
    # a padded input whose region reaches past a 50 x 60 image
    assert box_to_original((0, 0, 4, 4), stride=8, input_size=(32, 32), region=(-7, -2, 57, 62), height=50, width=60) == (0.0, 0.0, 60.0, 50.0)
