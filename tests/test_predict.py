"""`python -m navit_seq.predict` on a workdir trained for 2 steps writes the PNG and the JSON."""

import json

import numpy as np
import pytest
from PIL import Image

from navit_seq import config_utils, predict
from navit_seq.data import drawing
from navit_seq.evaluation import draw
from navit_seq.train import loop, sequence


@pytest.fixture(scope="module")
def workdir(scenes_data_dir, tmp_path_factory):
    """The scenes recipe, shrunk, trained for 2 steps (config.json saved as navit_seq.main does)."""
    config = config_utils.load_config_file(
        f"configs/pix2seq_scenes.py:steps=2,data_dir={scenes_data_dir}"
    )
    config.data.update(num_workers=0, batch_size=8, max_rows_per_seq=8)
    config.model.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    config.model.decoder.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    config.eval_every_steps = 0  # no evaluation: the test is about predict
    config.mesh.shape, config.mesh.num_devices = (1, 1, 1), 1
    workdir = tmp_path_factory.mktemp("predict_workdir")
    loop.train_and_evaluate(config, workdir, sequence.objective(config))
    config_utils.save_config(config, workdir / "config.json")
    return workdir


@pytest.fixture(scope="module")
def jpeg(scenes_data_dir, tmp_path_factory):
    from navit_seq.data import sources

    image = sources.data_source("scenes", "validation", scenes_data_dir)[0]["image"]
    path = tmp_path_factory.mktemp("images") / "scene.jpg"
    Image.fromarray(image).save(path)
    return path, image.shape


@pytest.mark.slow  # trains 2 steps, then compiles the decoder for each task: > 30 s on 2 cores
def test_predict_command_writes_a_native_size_png_and_a_json_of_all_four_tasks(
    workdir, jpeg, tmp_path, capsys
):
    path, (height, width, _) = jpeg
    output = tmp_path / "out" / "scene"
    assert predict.main(["--workdir", str(workdir), "--image", str(path),
                         "--output", str(output)]) == 0  # fmt: skip
    picture = Image.open(f"{output}.png")
    assert picture.width == width and picture.height > height  # native size + caption band
    saved = json.loads((tmp_path / "out" / "scene.json").read_text())
    assert {"boxes", "labels", "scores", "masks", "keypoints", "caption"} <= set(saved)
    assert len(saved["boxes"]) == len(saved["scores"]) == len(saved["masks"])
    assert np.asarray(saved["keypoints"]).reshape(-1, 17, 3).shape[0] == len(saved["boxes"])
    assert f"{output}.png" in capsys.readouterr().out


def test_task_the_recipe_does_not_train_is_rejected_naming_the_trained_tasks():
    config = config_utils.load_config_file("configs/pix2seq_scenes.py")
    config.data.tasks = (("detection", 1.0),)
    example = predict.image_example(np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(ValueError, match=r"--task captioning: the recipe .* trains \['detection'"):
        predict.predict(None, config, example, "captioning")  # checked before any model call


def test_missing_workdir_config_is_rejected_naming_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"no config.json; train there first"):
        predict.restore_model(tmp_path)


@pytest.mark.slow  # shares the 2-step workdir; compiles the decoder for each task
def test_split_grid_shows_each_image_prediction_then_ground_truth(workdir, tmp_path):
    config, model = predict.restore_model(workdir)
    path = predict.save_split_grid(config, model, tmp_path / "grid.png", num_images=2)
    sheet = Image.open(path)
    # Two (prediction, ground truth) pairs side by side in one grid row, under the titles.
    assert sheet.width == 2 * draw.PAIRS_PER_ROW * drawing.GRID_CELL_SIDE
    assert sheet.height > drawing.TEXT_LINE_HEIGHT + drawing.GRID_CELL_SIDE // 3
