"""experiments/pix2seq/toy_detection.py on a handful of toy images: it runs and reports."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "experiments" / "pix2seq"))
sys.path.insert(0, str(Path(__file__).parents[1]))
import toy_detection  # noqa: E402
from test_inference import tiny_detection_run  # noqa: E402


def test_toy_boxes_are_the_painted_squares():
    for example in toy_detection.toy_examples(5, seed=3):
        image, objects = example["image"], example["objects"]
        height, width = image.shape[:2]
        last = len(objects["label"]) - 1  # drawn last: fully visible
        y0, x0, y1, x1 = np.rint(objects["bbox"][last] * [height, width, height, width]).astype(int)
        colour = list(toy_detection.COLOURS.values())[objects["label"][last]]
        assert (image[y0:y1, x0:x1] == colour).all()


@pytest.mark.slow  # compiles a train step, an eval step and the detection decoder (~40 s)
def test_toy_detection_reports_losses_and_ap(scenes_data_dir):
    config = tiny_detection_run(scenes_data_dir)
    result = toy_detection.toy_detection(config, train_images=16, heldout_images=8, ap_images=4)
    assert result["steps"] == 2 and np.isfinite(result["train_loss_last"])
    assert 0 <= result["bbox"]["bbox_AP50"] <= 1
    assert "obj1/ymin" in result["field_loss_real_vs_grey"]
