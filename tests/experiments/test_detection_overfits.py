"""The sanity check a detector that learns must pass: the quickstart's detection recipe overfits
32 training images, and reads them (its loss is far lower with the right images).

Had this test existed, it would have caught a decoder that ignores its images (AP 0.000 in the
first quickstart): on 32 images seen hundreds of times each, only a model that reads the pixels
scores boxes on them.
"""

import sys
from pathlib import Path

import pytest

from navit_seq.data.build import build_scenes

sys.path.insert(0, str(Path(__file__).parents[2] / "experiments" / "pix2seq"))
sys.path.insert(0, str(Path(__file__).parents[2] / "configs"))
import diagnose  # noqa: E402
import pix2seq_scenes  # noqa: E402

TRAIN_IMAGES = 32
# 150 steps of ~100 images each: every training image ~470 times. Measured 2026-12-03 on the
# 4000-image build's train[:32]: bbox AP50 0.955 on those images after 100 steps.
STEPS = 150


@pytest.mark.slow  # ~2 min on 2 cores: 150 training steps, then 32 images decoded
def test_detection_recipe_overfits_32_training_images_and_reads_them(tmp_path):
    data_dir = tmp_path / "data"
    build_scenes(
        data_dir,
        num_workers=1,
        variant="scenes_easy",
        train_size=TRAIN_IMAGES,
        validation_size=4,
        heldout_size=4,
    )
    config = pix2seq_scenes.get_config(f"data=scenes_easy,tasks=detection,steps={STEPS}")
    config.data.data_dir = str(data_dir)
    config.data.eval_split = "train"  # losses and AP on the training images themselves
    config.evaluation.split = "train"
    config.evaluation.num_images = TRAIN_IMAGES
    config.mesh.shape, config.mesh.num_devices = (1, 1, 1), 1
    config.log_every_steps = 50

    result = diagnose.diagnose(config, eval_batches=2, ap_images=TRAIN_IMAGES)

    assert result["split_metrics"]["bbox_AP50"] >= 0.9, result["split_metrics"]
    real = result["eval_loss_real_images"]["loss"]
    # Mid-grey pixels or pixels of other images: the memorised boxes cannot be read off them.
    assert result["eval_loss_grey_images"]["loss"] > real + 1.0, result
    assert result["eval_loss_shuffled_images"]["loss"] > real + 1.0, result
