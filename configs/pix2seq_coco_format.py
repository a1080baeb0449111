"""Pix2Seq-v2 on any COCO-format dataset built with `python -m navit_seq.data.build coco`.

    python -m navit_seq.data.build coco --coco-dir my_export --data-dir datasets --name my_data
    python -m navit_seq.main --config configs/pix2seq_coco_format.py:data=my_data \
        --workdir workdirs/my_data
    python -m navit_seq.evaluate --config configs/pix2seq_coco_format.py:data=my_data \
        --workdir workdirs/my_data

Arguments: `data` (required) the dataset's name, `data_dir` where it was built (default
`datasets`), `train_split` / `eval_split` (default: read from the dataset: `train`, else the
split whose name starts with "train", e.g. `train2017`; `validation`, `val`, else the split
starting with "val", e.g. `val2017`), `tasks` a `+`-joined subset of the four (default: every
task the dataset's annotations support, read from its build report: detection and
segmentation from `instances_<split>.json`, keypoints from `person_keypoints_<split>.json`,
captioning from `captions_<split>.json`; tasks left out are named in one line on stderr),
`steps`. The model, sizes and schedule are configs/pix2seq_scenes.py's (a CPU recipe: images
of 48-160 px, 100 tokens at evaluation); for real photos raise the sizes named in the README
("Bring your own data").
"""

import json
import pathlib
import sys

import ml_collections

from navit_seq import config_common

SCENES_RECIPE = pathlib.Path(__file__).with_name("pix2seq_scenes.py")
REPORT_FILE = "build_report.json"  # navit_seq/data/builders/common.py writes it with the data
# What each task learns from, by the annotation file the COCO-format builder read it from.
TASK_FILES = {
    "detection": "instances",
    "segmentation": "instances",
    "keypoints": "person_keypoints",
    "captioning": "captions",
}


def build_report(name: str, data_dir: str) -> dict:
    """The build report of dataset `name` in `data_dir` (its newest version's folder)."""
    versions = sorted(pathlib.Path(data_dir, name).glob(f"*/{REPORT_FILE}"))
    if not versions:
        raise ValueError(
            f"configs/pix2seq_coco_format.py: data={name!r} has no built dataset in "
            f"data_dir={data_dir!r} ({name}/<version>/{REPORT_FILE}); build it with `python -m "
            f"navit_seq.data.build coco --coco-dir SRC --data-dir {data_dir} --name {name}`."
        )
    return json.loads(versions[-1].read_text())


def pick_split(splits: list[str], exact: tuple[str, ...], prefix: str, option: str) -> str:
    """The first of `exact` among `splits`, else the one split starting with `prefix`."""
    for name in exact:
        if name in splits:
            return name
    starting = [s for s in splits if s.startswith(prefix)]
    if len(starting) == 1:
        return starting[0]
    raise ValueError(
        f"configs/pix2seq_coco_format.py: cannot tell which split is {option} among "
        f"{', '.join(splits)}; name it with the recipe argument {option}=SPLIT."
    )


def supported_tasks(report: dict, train_split: str) -> dict[str, str]:
    """{task: ""} for the tasks the training split has annotations for, and {task: reason} for
    the others."""
    split = report["splits"].get(train_split, {})
    suffix = f"_{train_split}.json"  # annotations/<kind>_<split>.json
    files = {pathlib.Path(f).name.removesuffix(suffix) for f in split.get("annotation_files", [])}
    found = {
        "instances": split.get("annotations", 0) > 0 and "instances" in files,
        "person_keypoints": "person_keypoints" in files,
        "captions": split.get("captions", 0) > 0,
    }
    return {
        task: "" if found[kind] else f"no {kind}_{train_split}.json annotations"
        for task, kind in TASK_FILES.items()
    }


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    options = config_common.recipe_options(
        arg, known=("data", "data_dir", "train_split", "eval_split", "tasks", "steps")
    )
    if not options.get("data"):
        raise ValueError(
            "configs/pix2seq_coco_format.py needs the dataset's name: "
            "configs/pix2seq_coco_format.py:data=NAME,data_dir=DIR."
        )
    name, data_dir = options["data"], options.get("data_dir", "datasets")
    report = build_report(name, data_dir)
    splits = sorted(report["splits"])
    train_split = options.get("train_split") or pick_split(
        splits, ("train",), "train", "train_split"
    )
    eval_split = options.get("eval_split") or pick_split(
        splits, ("validation", "val"), "val", "eval_split"
    )
    if "tasks" in options:
        tasks = options["tasks"]  # the run's data checks refuse a task without annotations
    else:
        support = supported_tasks(report, train_split)
        kept = [task for task, reason in support.items() if not reason]
        if not kept:
            raise ValueError(
                f"configs/pix2seq_coco_format.py: dataset {name!r} has no annotations in split "
                f"{train_split!r} for any task ({'; '.join(support.values())}); build it from "
                "a folder with instances_<split>.json or captions_<split>.json."
            )
        left_out = [f"{task} ({reason})" for task, reason in support.items() if reason]
        if left_out:
            print(
                f"configs/pix2seq_coco_format.py: dataset {name!r} trains "
                f"{'+'.join(kept)}; left out: {', '.join(left_out)}.",
                file=sys.stderr,
            )
        tasks = "+".join(kept)
    scenes = config_common.load_recipe(SCENES_RECIPE)
    recipe_arg = f"data={name},data_dir={data_dir},tasks={tasks}"
    if "steps" in options:
        recipe_arg += f",steps={options['steps']}"
    config = scenes.get_config(recipe_arg)
    config.data.train_split = train_split
    config.data.eval_split = eval_split
    return config
