"""Task encoders: each turns a decoded example into fixed-shape per-example targets.

The pipeline, model and trainers only ever call `get_task(config)` and the `Task` interface, so
adding a task is one module plus one line in `_TASKS`; nothing else branches on a task name.
"""

import importlib
from typing import Protocol

import ml_collections
import numpy as np

# name -> (module, class). Imported lazily so a task's dependencies load only when it is used.
_TASKS = {
    "classification": ("navit_seq.tasks.classification", "ClassificationTask"),
}


class Task(Protocol):
    """What the input pipeline needs from a task."""

    name: str
    task_id: int  # unique per task; the packed batch's `task_id` holds it per example

    def encode(
        self, example: dict, *, training: bool, rng: np.random.Generator
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """(targets, stats): targets of the fixed shapes of `target_spec`; stats are counts
        with fixed keys (bad input skipped and counted, architecture.md §7), summed by the packer.
        """

    def target_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (shape, dtype) of every target `encode` returns."""


def get_task(config: ml_collections.ConfigDict) -> Task:
    """The task named `config.name`, built from the rest of `config` (its options)."""
    if config.name not in _TASKS:
        raise ValueError(f"data.task.name={config.name!r}; registered tasks: {sorted(_TASKS)}.")
    module_name, class_name = _TASKS[config.name]
    return getattr(importlib.import_module(module_name), class_name)(config)
