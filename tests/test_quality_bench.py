"""The quality bench's data and metrics, on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.quality import Probe, boundary_f, make_scene, mean_iou, rmse, rmse_log


def test_scenes_are_seeded_with_exact_masks_and_a_smooth_depth():
    a, b, c = make_scene(96, seed=3), make_scene(96, seed=3), make_scene(96, seed=4)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.mask, c.mask)
    assert 0.02 < a.mask.mean() < 0.9, "shapes and background both present"
    brightness = a.image.mean(axis=2)
    assert brightness[a.mask].min() > brightness[~a.mask].mean(), "every shape pixel is brighter than the background on average"
    assert (a.depth[a.mask] > 2).all() and (a.depth[~a.mask] <= 2).all() and a.depth.min() >= 1 and a.depth.max() <= 3
    # tanh(signed distance / (size/16)): slope at most 16/size per pixel, and the signed distance
    # steps by 2 across a boundary, so neighbouring pixels differ by at most 2 * 16 / size.
    assert np.abs(np.diff(a.depth, axis=0)).max() <= 2 * 16 / 96 + 1e-6, "depth is smooth"


def test_mean_iou_by_hand():
    predicted = np.array([[1, 1], [0, 0]], bool)
    truth = np.array([[1, 0], [0, 0]], bool)
    assert mean_iou(predicted, truth) == pytest.approx((1 / 2 + 2 / 3) / 2)  # shape 1/2, background 2/3
    assert mean_iou(truth, truth) == 1.0


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_boundary_f_by_hand():
    truth = square(40, 10, 10, 12)
    assert boundary_f(truth, truth) == 1.0
    assert boundary_f(square(40, 11, 11, 12), truth) == 1.0, "one pixel off is within the 2-pixel tolerance"
    assert boundary_f(square(40, 26, 26, 10), truth) == 0.0, "far apart: nothing matches"
    assert boundary_f(np.zeros((40, 40), bool), truth) == 0.0
    # A half-size square in the corner of the truth: its top and left edges (11 of 20 boundary pixels
    # minus the shared corner) match, and the truth's matching pixels are its top-left part.
    small = square(40, 10, 10, 6)
    f = boundary_f(small, truth)
    assert 0.0 < f < 1.0


def test_rmse_and_rmse_log_by_hand():
    predicted, truth = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 5.0])
    assert rmse(predicted, truth) == pytest.approx(math.sqrt(4 / 3))
    assert rmse_log(predicted, truth) == pytest.approx(math.sqrt(math.log(5 / 3) ** 2 / 3))


def test_ridge_probe_recovers_a_linear_target():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 5))
    targets = np.stack([x @ [1, -2, 0, 0, 3] + 4, x[:, 0]], axis=1)
    predicted = Probe.fit(x, targets)(x)
    assert np.abs(predicted - targets).max() < 0.2  # the ridge shrinks a little
