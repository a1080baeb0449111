"""Fail fast: the commands check the dataset against the recipe before step 1 and stop with one
line listing every problem with the config key to change (`navit_seq.main.check_data`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from navit_seq import config_utils, inference, main, pipeline
from navit_seq.data.builders import coco

REPO = Path(__file__).resolve().parent.parent
RECIPE = "configs/pix2seq_scenes.py"


@pytest.fixture(scope="module")
def boxes_only_data_dir(tmp_path_factory) -> str:
    """Dataset "boxes_only": a COCO-format export with boxes and nothing else (no polygons,
    keypoints or captions), splits `train` and `val` as many annotation tools name them."""
    root = tmp_path_factory.mktemp("boxes_only")
    (root / "annotations").mkdir()
    for split, count in (("train", 3), ("val", 2)):
        (root / split).mkdir()
        images, annotations = [], []
        for index in range(count):
            image_id = 10 * (split == "val") + index + 1
            Image.new("RGB", (40, 30), (90, 90, 90)).save(root / split / f"{image_id}.png")
            images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 30,
                           "width": 40})  # fmt: skip
            annotations.append({"id": image_id, "image_id": image_id, "category_id": 1,
                                "bbox": [5, 5, 10, 12], "iscrowd": 0})  # fmt: skip
        records = {"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "square"}]}  # fmt: skip
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(records))
    data_dir = str(tmp_path_factory.mktemp("boxes_only_tfds"))
    coco.build(str(root), data_dir, name="boxes_only")
    return data_dir


def recipe(data_dir: str, name: str = "scenes", **data):
    """The scenes recipe reading dataset `name` in `data_dir`, with data fields overridden."""
    config = config_utils.load_config_file(f"{RECIPE}:data_dir={data_dir}")
    config.data.name = name
    config.data.update(data)
    return config


def problems(config, splits=None) -> list[str]:
    return pipeline.dataset_problems(config.data, splits or main.training_splits(config))


def test_a_recipe_that_fits_its_dataset_has_no_problems(scenes_data_dir):
    config = recipe(scenes_data_dir)
    assert problems(config) == []
    assert main.check_data(config, main.training_splits) is None


def test_a_split_the_dataset_lacks_is_named_with_the_splits_it_has(scenes_data_dir):
    config = recipe(scenes_data_dir, eval_split="val")
    assert problems(config) == [
        "data.eval_split='val' is not a split of the dataset (it has heldout, train, "
        "validation); set data.eval_split to one of them"
    ]


def test_an_empty_split_slice_is_a_problem(scenes_data_dir):
    config = recipe(scenes_data_dir, train_split="train[:0]")
    (problem,) = problems(config)
    assert problem.startswith("data.train_split='train[:0]' selects no examples (")
    assert problem.endswith("select some, e.g. 'train' or 'train[:32]'")


def test_the_evaluation_split_is_read_only_by_runs_that_evaluate(scenes_data_dir):
    config = recipe(scenes_data_dir, eval_split="val")
    config.eval_every_steps = 0
    assert main.training_splits(config) == {"data.train_split": "train"}
    config.evaluation.split = "heldout"
    assert main.evaluation_splits(config) == {"data.eval_split": "val",
                                              "evaluation.split": "heldout"}  # fmt: skip


@pytest.mark.parametrize(
    "task, needs",
    [
        ("segmentation", "object polygons (objects/num_polygons > 0"),
        ("keypoints", "person keypoints (objects/num_keypoints > 0"),
        ("captioning", "captions (a COCO-format export's captions_<split>.json)"),
    ],
)
def test_a_task_whose_annotations_no_example_has_is_named_with_the_key(
    boxes_only_data_dir, task, needs
):
    config = recipe(boxes_only_data_dir, "boxes_only", eval_split="val")
    config.data.tasks = (("detection", 0.5), (task, 0.5))
    (message,) = problems(config)
    assert message.startswith(f"task {task!r} (data.tasks) learns from {needs}")
    assert (
        "found in none of the examples read from 'train' (data.train_split, 3 read) and 'val' "
        "(data.eval_split, 2 read); "
    ) in message
    assert message.endswith("drop it from data.tasks or use a dataset that has them")


def test_detection_alone_fits_a_dataset_of_boxes(boxes_only_data_dir):
    config = recipe(boxes_only_data_dir, "boxes_only", eval_split="val")
    config.data.tasks = (("detection", 1.0),)
    assert problems(config) == []


def test_a_missing_tokenizer_is_named_with_its_key(scenes_data_dir, tmp_path):
    config = recipe(scenes_data_dir)
    config.data.task.tokenizer = str(tmp_path / "missing.model")
    listed = problems(config)
    assert listed and all(f"no SentencePiece model at '{tmp_path}/missing.model'" in p
                          for p in listed)  # fmt: skip


def test_eval_sizes_that_cannot_work_are_named_with_their_keys(scenes_data_dir):
    config = recipe(scenes_data_dir, eval_max_tokens=400)  # > data.seq_len = 192
    config.evaluation.update(images_per_batch=0, segmentation_top_p=1.5)
    assert problems(config) == ["data.eval_max_tokens=400; use 1..seq_len=192."]
    assert inference.evaluation_problems(config, ["person", "star"]) == [
        "evaluation.images_per_batch=0; use at least 1",
        "evaluation.segmentation_top_p=1.5; use 0 (greedy) up to 1",
    ]


def test_keypoint_classes_the_dataset_does_not_have_are_a_problem(scenes_data_dir):
    config = recipe(scenes_data_dir)
    (problem,) = inference.evaluation_problems(config, ["square", "disc"])
    assert problem.startswith("evaluation.keypoint_classes=('person',) names none of the classes")


def test_every_problem_is_listed_in_one_error(boxes_only_data_dir):
    config = recipe(boxes_only_data_dir, "boxes_only")  # the four tasks; no split "validation"
    with pytest.raises(ValueError) as error:
        main.check_data(config, main.training_splits)
    message = str(error.value)
    assert message.startswith(f"the recipe does not fit dataset 'boxes_only' in "
                              f"'{boxes_only_data_dir}'")  # fmt: skip
    for number, text in enumerate(("data.eval_split='validation'", "task 'segmentation'",
                                   "task 'keypoints'", "task 'captioning'",
                                   "evaluation.keypoint_classes"), 1):  # fmt: skip
        assert f"({number}) {text}" in message


def test_training_command_stops_before_step_1_with_one_line(boxes_only_data_dir, tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "navit_seq.main", "--config",
         f"{RECIPE}:steps=2,data_dir={boxes_only_data_dir}", "--config.data.name=boxes_only",
         "--workdir", str(workdir)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "data.eval_split='validation'" in errors[0], result.stderr[-3000:]
    assert "task 'keypoints' (data.tasks)" in errors[0]
    assert "step 1" not in result.stdout and not workdir.exists()  # nothing trained or written


@pytest.mark.parametrize("spec", ["configs/quickstart.py", "configs/contrastive.py", RECIPE])
def test_the_bundled_recipes_fit_the_bundled_scenes(scenes_data_dir, spec):
    config = config_utils.load_config_file(spec)
    config.data.data_dir = scenes_data_dir
    main.check_data(config, main.training_splits)
