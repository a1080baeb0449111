"""Multi-task mixing (Pix2Seq v2 §3.3): which task encodes which example, sampled by task weight.

`data.tasks = (("detection", 0.18), ("segmentation", 0.71), ...)` (empty: the single
`data.task`); weights are normalized to probabilities. Every task reads the same source (every
builder yields every annotation kind, architecture.md §1). Two modes (`data.mixing`):

- "batch": each batch comes from one task (the paper's batch mixing). One packed pipeline per
  task; batch n is taken from task k ~ weights, drawn by a generator seeded by (seed, n) with
  the same `data.seed` on every host, so a global batch is one task across hosts.
- "data": tasks mix inside a packed batch. Example i of the stream is encoded by task
  k ~ weights, drawn by a generator seeded by (seed, i).

Both draws depend only on (seed, position), so they are exact after a restore: the state is
the position plus the parents' states. Evaluation with several tasks encodes every example once
by each task (`EachTask`), in order.
"""

from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

MIXING_MODES = ("batch", "data")


def task_weights(config: ml_collections.ConfigDict) -> list[tuple[str, float]]:
    """(task name, probability) of `data.tasks`, or [(data.task.name, 1.0)] when it is empty."""
    pairs = [tuple(pair) for pair in config.get("tasks") or ()]
    if not pairs:
        return [(config.task.name, 1.0)]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(
            f"data.tasks={config.tasks}; give (task name, weight) pairs, e.g. "
            '(("detection", 0.2), ("captioning", 0.8)).'
        )
    names = [name for name, _ in pairs]
    weights = np.array([weight for _, weight in pairs], np.float64)
    if len(set(names)) != len(names):
        raise ValueError(f"data.tasks names {names} repeat a task; list each task once.")
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(
            f"data.tasks weights {weights.tolist()}; every weight must be a positive number "
            "(leave a task out instead of giving it weight 0)."
        )
    return list(zip(names, (weights / weights.sum()).tolist(), strict=True))


def validate_mixing_config(config: ml_collections.ConfigDict) -> None:
    """Raise a ValueError naming the field and the fix for an unusable mixing setting."""
    task_weights(config)
    if config.mixing not in MIXING_MODES:
        raise ValueError(f"data.mixing={config.mixing!r}; use one of {MIXING_MODES}.")


def draw_task(probabilities: Sequence[float], seed: int, position: int) -> int:
    """The task index at `position` (a batch or stream index): reproducible from the pair."""
    return int(np.random.default_rng([seed, position]).choice(len(probabilities), p=probabilities))


class SampleTask(grain.transforms.MapWithIndex):
    """Data mixing: stream element i gets `task_index` ~ probabilities, drawn from (seed, i)."""

    def __init__(self, probabilities: Sequence[float], seed: int):
        self.probabilities = list(probabilities)
        self.seed = seed

    def map_with_index(self, index: int, element: dict) -> dict:
        return {**element, "task_index": draw_task(self.probabilities, self.seed, index)}


class EachTask(grain.MapDataset):
    """Evaluation: element i is record i // K encoded by task i % K (every record by each task)."""

    def __init__(self, parent: grain.MapDataset, num_tasks: int):
        super().__init__(parent)
        self.num_tasks = num_tasks

    def __len__(self) -> int:
        return len(self._parent) * self.num_tasks

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        record, task_index = divmod(int(index), self.num_tasks)
        return {**self._parent[record], "task_index": task_index}

    def __str__(self) -> str:
        return f"EachTask(num_tasks={self.num_tasks})"


class BatchMixIterDataset(grain.IterDataset):
    """Batch mixing over one packed dataset per task (same batch keys and shapes for all)."""

    def __init__(
        self, parents: Sequence[grain.IterDataset], probabilities: Sequence[float], seed: int
    ):
        super().__init__(list(parents))
        self.probabilities = list(probabilities)
        self.seed = seed

    def __iter__(self) -> "BatchMixIterator":
        return BatchMixIterator([iter(parent) for parent in self.parents], self)

    def __str__(self) -> str:
        return f"BatchMixIterDataset(probabilities={self.probabilities})"


class BatchMixIterator(grain.DatasetIterator):
    """Batch n from task `draw_task(probabilities, seed, n)`; `stats` sums the tasks' packers."""

    def __init__(self, parents: list[grain.DatasetIterator], spec: BatchMixIterDataset):
        super().__init__(parents)
        self._spec = spec
        self._batches_emitted = 0

    def __next__(self) -> dict[str, Any]:
        task_index = draw_task(self._spec.probabilities, self._spec.seed, self._batches_emitted)
        batch = next(self._parents[task_index])  # a finite task ends the mixture
        self._batches_emitted += 1
        return batch

    @property
    def stats(self) -> dict[str, int]:
        """Packing counters summed over the tasks' packers (extremes for min/max)."""
        total: dict[str, int] = {}
        for parent in self._parents:
            for key, value in parent.stats.items():
                if key == "images_per_seq_min":
                    total[key] = min(total.get(key, value), value)
                elif key == "images_per_seq_max":
                    total[key] = max(total.get(key, value), value)
                else:
                    total[key] = total.get(key, 0) + value
        return total

    @property
    def num_buffered(self) -> int:
        return sum(parent.num_buffered for parent in self._parents)

    def get_state(self) -> dict[str, Any]:
        return {
            "batches_emitted": self._batches_emitted,
            "parents": [parent.get_state() for parent in self._parents],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._batches_emitted = state["batches_emitted"]
        for parent, parent_state in zip(self._parents, state["parents"], strict=True):
            parent.set_state(parent_state)

    def __str__(self) -> str:
        return f"BatchMixIterator({self._spec})"
