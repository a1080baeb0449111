"""Task encoders: each turns a decoded example into per-example targets (and ragged groups).

The pipeline, model, trainers and inference only ever call `get_task(config)` and the `Task`
interface (sequence tasks: `navit_seq.tasks.sequence.SequenceTask`), so adding a task is one
module that calls `register` plus a recipe naming it; nothing else branches on a task name.
Each task also declares the annotations it learns from (`Task.annotations`), so the commands
can check a dataset against a recipe before training (`navit_seq.pipeline.dataset_problems`).
Task ids: 0 classification, 1 detection, 2 segmentation, 3 keypoints, 4 captioning (the
Pix2Seq-v2 tasks, `navit_seq.tasks.sequence`), 5 image_text (contrastive captions).
"""

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import ml_collections
import numpy as np

# Task ids are 0..NUM_TASK_IDS-1 (the list above): the rows of a per-task model table
# (navit_seq.models.implicit). Raise it with a new task's id; a saved model keeps its own count.
NUM_TASK_IDS = 6

# The built-in tasks' modules, imported on first use so a task's dependencies (pycocotools,
# SentencePiece) load only when a recipe names it; importing one registers its task.
_BUILT_IN = {
    "classification": "navit_seq.tasks.classification",
    "detection": "navit_seq.tasks.detection",
    "segmentation": "navit_seq.tasks.segmentation",
    "keypoints": "navit_seq.tasks.keypoints",
    "captioning": "navit_seq.tasks.captioning",
    "image_text": "navit_seq.tasks.image_text",
}
_FACTORIES: dict[str, Callable[[ml_collections.ConfigDict], "Task"]] = {}


def register(name: str):
    """Decorator: `factory(config) -> Task` builds the task `name` from `data.task` (its
    options). A module in `tasks/` (or a test) registers its task; recipes then name it."""

    def decorate(factory: Callable[[ml_collections.ConfigDict], "Task"]):
        _FACTORIES[name] = factory
        return factory

    return decorate


@dataclasses.dataclass(frozen=True)
class Annotations:
    """What a task learns from. `present(example)` says whether one decoded example holds any
    (it reads annotation fields only, never the pixels); `description` names them in errors,
    with where a COCO-format export keeps them. `present` must be a module-level function:
    tasks travel to grain worker processes by pickle."""

    description: str  # e.g. "person keypoints (objects/num_keypoints > 0; person_keypoints_*)"
    present: Callable[[Mapping[str, Any]], bool]


class Task(Protocol):
    """What the input pipeline needs from a task."""

    name: str
    task_id: int  # unique per task; the packed batch's `task_id` holds it per example
    annotations: Annotations  # what an example must hold for `encode` to make targets of it

    def encode(
        self, example: dict, *, training: bool, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """(targets, stats): targets of the fixed shapes of `target_spec`; stats are counts
        with fixed keys (bad input skipped and counted, architecture.md §7), summed by the packer.
        """

    def target_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (shape, dtype) of every fixed-shape target `encode` returns."""

    def ragged_specs(self, data_config: ml_collections.ConfigDict) -> tuple:
        """The `packing.RaggedSpec`s of targets with a variable first axis (decoder rows,
        caption tokens), returned by `encode` under each spec's name; () when there are none.
        Capacities come from `data_config` (e.g. `max_rows_per_seq`)."""

    def views(self, image: np.ndarray, targets: dict) -> list[tuple[np.ndarray, dict]]:
        """The packed images an encoded example becomes: (pixels [h, w, C], their targets)
        each. Most tasks show the whole image with all targets (`whole_image`); keypoints
        show one crop per person with that person's row; none: the example gives no image.
        A whole-image view returns `image` itself (the pipeline's token labels, in the
        example's frame, are given only to such views)."""


def whole_image(image: np.ndarray, targets: dict) -> list[tuple[np.ndarray, dict]]:
    """`Task.views` of a task that reads the whole image."""
    return [(image, targets)]


def get_task(config: ml_collections.ConfigDict) -> Task:
    """The task named `config.name`, built from the rest of `config` (its options; the sequence
    tasks' fields are listed in `navit_seq.tasks.sequence`)."""
    if config.name not in _FACTORIES and config.name in _BUILT_IN:
        importlib.import_module(_BUILT_IN[config.name])  # registers it
    if config.name not in _FACTORIES:
        names = list(dict.fromkeys([*_BUILT_IN, *_FACTORIES]))
        raise ValueError(f"data.task.name={config.name!r}; registered tasks: {names}.")
    return _FACTORIES[config.name](config)


def task_config(data_config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """`data.task` with `name`, plus where the dataset lives (class names, tokenizer)."""
    task = ml_collections.ConfigDict(data_config.task.to_dict())
    task.name = name
    task.dataset = data_config.name
    task.data_dir = data_config.data_dir
    return task


def num_classes(config: ml_collections.ConfigDict) -> int:
    """`config.num_classes`, or (0 / unset) the number of class names of the dataset."""
    if config.get("num_classes"):
        return int(config.num_classes)
    if not config.get("dataset"):
        raise ValueError(
            f"data.task.num_classes={config.get('num_classes')} and no dataset to read the "
            "classes from; set data.task.num_classes."
        )
    return len(class_names(config))


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    """The class names of the dataset `config.dataset` ([] when the config names none)."""
    if not config.get("dataset"):
        return []
    from navit_seq.data import sources  # TFDS import only when a dataset is read

    return sources.class_names(config.dataset, data_dir=config.data_dir)
