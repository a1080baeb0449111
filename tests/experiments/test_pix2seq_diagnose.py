"""experiments/pix2seq/diagnose.py on a tiny detection recipe: every measurement comes back."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "experiments" / "pix2seq"))
sys.path.insert(0, str(Path(__file__).parents[1]))
import diagnose  # noqa: E402
from test_inference import tiny_detection_run  # noqa: E402


@pytest.mark.slow  # compiles a train step, an eval step and the detection decoder (~40 s)
def test_diagnose_reports_real_and_grey_losses_gradients_and_ap(scenes_data_dir):
    config = tiny_detection_run(scenes_data_dir)
    result = diagnose.diagnose(config, eval_batches=1, ap_images=2)
    assert [step for step, _ in result["train_loss_history"]] == [1, 2]
    real, grey = result["eval_loss_real_images"], result["eval_loss_grey_images"]
    assert set(real) == set(grey) and "loss/detection" in real
    assert real["loss"] != grey["loss"]  # the grey control changed the images it was given
    shuffled = result["eval_loss_shuffled_images"]
    assert set(shuffled) == set(real) and real["loss"] != shuffled["loss"]
    fields = result["detection_field_loss_real_vs_grey"]
    assert "obj1/ymin" in fields and "obj1/class" in fields
    assert all(np.isfinite(real) and np.isfinite(grey) for real, grey in fields.values())
    assert set(result["grad_norm"]) == {"encoder", "memory", "decoder"}
    assert all(np.isfinite(v) and v > 0 for v in result["grad_norm"].values())
    assert result["split_metrics"]["num_images"] == 2
    assert 0 <= result["split_metrics"]["bbox_AP50"] <= 1
