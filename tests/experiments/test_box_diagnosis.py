"""experiments/pix2seq/box_diagnosis.py: its box IoU and per-object outcomes, by hand."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "experiments" / "pix2seq"))
import box_diagnosis  # noqa: E402


def test_box_iou_matches_hand_computed_overlaps():
    boxes = np.array([[0.0, 0.0, 0.5, 0.5]])
    others = np.array([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 1.0], [0.6, 0.6, 1.0, 1.0]])
    np.testing.assert_allclose(box_diagnosis.box_iou(boxes, others), [[1.0, 0.5, 0.0]])
    assert box_diagnosis.box_iou(boxes, others[:0]).shape == (1, 0)


def test_outcomes_separate_localisation_from_class_and_score_the_largest_object():
    gt_boxes = [[0.0, 0.0, 0.2, 0.2], [0.2, 0.2, 1.0, 1.0]]  # the second is the largest
    gt_labels = [3, 5]
    boxes = [[0.2, 0.2, 1.0, 1.0], [0.0, 0.0, 0.2, 0.4]]  # exact (wrong class), half overlap
    outcome = box_diagnosis.image_outcomes(gt_boxes, gt_labels, boxes, [4, 3], [0.9, 0.1])
    np.testing.assert_allclose(outcome["best_iou"], [0.5, 1.0])
    assert outcome["best_class"] == [True, False]
    assert outcome["top_iou"] == [pytest.approx(1.0)] and outcome["top_class"] == [False]


def test_an_image_without_predictions_misses_each_object_and_summary_counts_it():
    missed = box_diagnosis.image_outcomes([[0, 0, 1, 1], [0, 0, 0.5, 0.5]], [1, 2], [], [], [])
    assert missed["best_iou"] == [0.0, 0.0] and missed["top_class"] == [False]
    found = box_diagnosis.image_outcomes([[0, 0, 1, 1]], [1], [[0, 0, 1, 1]], [1], [0.5])
    summary = box_diagnosis.summarize([missed, found], images_without_objects=2)
    assert summary["objects"] == 3 and summary["images"] == 2
    assert summary["images_without_objects"] == 2
    assert summary["recall_iou50_any_class"] == pytest.approx(1 / 3)
    assert summary["class_accuracy_of_best_box"] == pytest.approx(1 / 3)
    assert summary["top_box_vs_largest_iou50"] == pytest.approx(0.5)
