"""The classification task encoder and the task registry."""

import ml_collections
import numpy as np
import pytest

from navit_seq import tasks


def classification(num_classes: int = 5):
    return tasks.get_task(
        ml_collections.ConfigDict({"name": "classification", "num_classes": num_classes})
    )


def test_labels_are_multi_hot_of_the_classes_present():
    targets = classification().encode({"objects": {"label": np.array([3, 0, 3])}})[0]
    np.testing.assert_array_equal(targets["labels"], [1, 0, 0, 1, 0])
    assert targets["labels"].dtype == np.float32


def test_image_without_objects_has_no_labels():
    targets, stats = classification().encode({"objects": {"label": np.zeros((0,), np.int64)}})
    assert targets["labels"].shape == (5,) and not targets["labels"].any()
    assert stats == {"examples_without_labels": 1}


def test_target_spec_matches_encoded_targets():
    task = classification(7)
    targets, _ = task.encode({"objects": {"label": np.array([6])}})
    for name, (shape, dtype) in task.target_spec().items():
        assert targets[name].shape == shape and targets[name].dtype == dtype


def test_label_outside_the_classes_raises_with_the_fix():
    with pytest.raises(ValueError, match="set data.task.num_classes"):
        classification(3).encode({"example_id": 4, "objects": {"label": np.array([3])}})


def test_missing_num_classes_raises():
    with pytest.raises(ValueError, match="num_classes=0"):
        classification(0)


def test_unknown_task_name_lists_the_registered_tasks():
    with pytest.raises(ValueError, match="registered tasks: \\['classification'"):
        tasks.get_task(ml_collections.ConfigDict({"name": "nope"}))
