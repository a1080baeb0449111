"""configs/pix2seq_coco_format.py: any COCO-format build is trained by naming it; its split
names and its tasks are read from the dataset's build report."""

import json
import sys
from pathlib import Path

import pytest

from navit_seq import config_utils
from navit_seq.data.builders import coco

sys.path.insert(0, str(Path(__file__).parent / "data"))
from test_coco_builder import write_coco_folder  # noqa: E402

RECIPE = "configs/pix2seq_coco_format.py"


def fake_report(data_dir: Path, name: str, splits: dict) -> None:
    """A build report as the COCO-format builder writes it, without building the dataset."""
    folder = data_dir / name / "1.0.0"
    folder.mkdir(parents=True)
    (folder / coco.REPORT_FILE).write_text(json.dumps({"name": name, "splits": splits}))


def split(*kinds: str, split_name: str, annotations: int = 3, captions: int = 0) -> dict:
    files = [f"/src/annotations/{kind}_{split_name}.json" for kind in kinds]
    return {"annotation_files": files, "annotations": annotations, "captions": captions}


def test_a_real_build_trains_every_task_its_annotations_support(tmp_path):
    data_dir = tmp_path / "data"
    coco.build(write_coco_folder(str(tmp_path / "export")), str(data_dir), name="tiny_coco")
    config = config_utils.load_config_file(f"{RECIPE}:data=tiny_coco,data_dir={data_dir}")
    assert (config.data.train_split, config.data.eval_split) == ("train", "val")
    # Its train split has instances, person keypoints and captions files.
    assert [name for name, _ in config.data.tasks] == [
        "detection", "segmentation", "keypoints", "captioning"
    ]  # fmt: skip
    assert config.data.name == "tiny_coco" and config.data.data_dir == str(data_dir)


def test_coco_split_names_are_found_and_absent_tasks_left_out_with_a_message(tmp_path, capsys):
    fake_report(
        tmp_path,
        "boxes",
        {
            "train2017": split("instances", split_name="train2017"),
            "val2017": split("instances", split_name="val2017"),
        },
    )
    config = config_utils.load_config_file(f"{RECIPE}:data=boxes,data_dir={tmp_path},steps=7")
    assert (config.data.train_split, config.data.eval_split) == ("train2017", "val2017")
    assert [name for name, _ in config.data.tasks] == ["detection", "segmentation"]
    assert config.num_train_steps == 7
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert "left out: keypoints (no person_keypoints_train2017.json annotations)" in message
    assert "captioning (no captions_train2017.json annotations)" in message


def test_split_and_task_arguments_override_what_the_report_says(tmp_path):
    fake_report(
        tmp_path,
        "mine",
        {
            "fit": split("instances", "captions", split_name="fit", captions=5),
            "holdout": split("instances", split_name="holdout"),
        },
    )
    config = config_utils.load_config_file(
        f"{RECIPE}:data=mine,data_dir={tmp_path},train_split=fit,eval_split=holdout,"
        "tasks=detection+captioning"
    )
    assert (config.data.train_split, config.data.eval_split) == ("fit", "holdout")
    assert [name for name, _ in config.data.tasks] == ["detection", "captioning"]


@pytest.mark.parametrize(
    "arg, match",
    [
        ("data_dir=/tmp", "needs the dataset's name"),
        ("data=nothing_here,data_dir={tmp}", r"has no built dataset.*navit_seq.data.build coco"),
        ("data=odd,data_dir={tmp}", r"cannot tell which split is train_split among a, b"),
        ("data=captionless,data_dir={tmp}", r"no annotations in split 'train' for any task"),
    ],
)
def test_bad_datasets_and_arguments_are_one_line_errors(tmp_path, arg, match):
    fake_report(tmp_path, "odd", {"a": split("instances", split_name="a"), "b": {}})
    fake_report(tmp_path, "captionless", {"train": {}, "val": {}})
    with pytest.raises(ValueError, match=match) as error:
        config_utils.load_config_file(f"{RECIPE}:{arg.format(tmp=tmp_path)}")
    assert "\n" not in str(error.value)
