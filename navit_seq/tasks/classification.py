"""Multi-label classification targets: a multi-hot vector of the classes present in the image.

NaViT pretrains with sigmoid cross-entropy on multi-hot labels (JFT); on a detection-style
dataset the labels are the classes of the image's objects (`objects/label`).
"""

from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from navit_seq.tasks import Annotations, num_classes, register, whole_image


def has_labels(example: Mapping[str, Any]) -> bool:
    """Whether the example has an object, i.e. a class to learn."""
    return len(np.asarray(example["objects"]["label"]).reshape(-1)) > 0


@register("classification")
class ClassificationTask:
    """`targets/labels` float32 [num_classes]: 1 for every class with at least one object."""

    name = "classification"
    task_id = 0
    annotations = Annotations(
        "object labels (objects/label; a COCO-format export's instances_<split>.json)", has_labels
    )

    def __init__(self, config: ml_collections.ConfigDict):
        self.num_classes = num_classes(config)  # 0: the dataset's
        if self.num_classes <= 0:
            raise ValueError(
                f"data.task.num_classes={config.get('num_classes')}; set it to the dataset's "
                "number of classes (a positive integer)."
            )

    def encode(
        self, example: dict, *, training: bool = False, rng: np.random.Generator | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Multi-hot labels of the example's objects; raises on a label outside the classes
        (a wrong `num_classes`, not bad data). Deterministic: `training` and `rng` are unused.
        """
        labels = np.asarray(example["objects"]["label"], np.int64).reshape(-1)  # [N]
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"Example {example.get('example_id')}: object labels {sorted(set(labels))} are "
                f"outside [0, {self.num_classes}); set data.task.num_classes to the dataset's "
                "number of classes."
            )
        multi_hot = np.zeros(self.num_classes, np.float32)  # [num_classes]
        multi_hot[labels] = 1.0
        return {"labels": multi_hot}, {"examples_without_labels": int(labels.size == 0)}

    def ragged_specs(self, data_config: ml_collections.ConfigDict) -> tuple:
        del data_config
        return ()  # fixed-shape targets only

    def views(self, image: np.ndarray, targets: dict) -> list[tuple[np.ndarray, dict]]:
        return whole_image(image, targets)

    def target_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"labels": ((self.num_classes,), np.dtype(np.float32))}
