"""Multi-label classification targets: a multi-hot vector of the classes present in the image.

NaViT pretrains with sigmoid cross-entropy on multi-hot labels (JFT); on a detection-style
dataset the labels are the classes of the image's objects (`objects/label`).
"""

import ml_collections
import numpy as np


class ClassificationTask:
    """`targets/labels` float32 [num_classes]: 1 for every class with at least one object."""

    name = "classification"
    task_id = 0

    def __init__(self, config: ml_collections.ConfigDict):
        if config.get("num_classes", 0) <= 0:
            raise ValueError(
                f"data.task.num_classes={config.get('num_classes')}; set it to the dataset's "
                "number of classes (a positive integer)."
            )
        self.num_classes = int(config.num_classes)

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

    def target_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"labels": ((self.num_classes,), np.dtype(np.float32))}
