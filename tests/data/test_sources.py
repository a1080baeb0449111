"""Numpy data sources over prepared TFDS datasets (the session's tiny scene dataset)."""

import logging
import pickle

import grain
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from navit_seq.data import scene_render, sources

EXPECTED_OBJECT_FIELDS = {  # name: (dtype, shape after the object axis)
    "bbox": (np.float32, (4,)),
    "label": (np.int64, ()),
    "category_id": (np.int64, ()),
    "id": (np.int64, ()),
    "is_crowd": (np.bool_, ()),
    "area": (np.float32, ()),
    "num_polygons": (np.int32, ()),
    "keypoints": (np.float32, (17, 3)),
    "num_keypoints": (np.int32, ()),
    "mask_rle": (np.object_, ()),
    "phrase": (np.object_, ()),
}


@pytest.fixture(scope="module")
def train(scenes_data_dir) -> sources.NumpySource:
    return sources.data_source("scenes", "train", scenes_data_dir)


def _check_structure(example: dict) -> None:
    assert example["image"].dtype == np.uint8 and example["image"].ndim == 3
    assert example["image"].shape[2] == 3
    assert isinstance(example["image_id"], np.int64)
    objects = example["objects"]
    assert set(objects) == set(EXPECTED_OBJECT_FIELDS)
    num = len(objects["label"])
    for name, (dtype, shape) in EXPECTED_OBJECT_FIELDS.items():
        assert isinstance(objects[name], np.ndarray), name
        assert objects[name].dtype == dtype, name
        assert objects[name].shape == (num, *shape), name
    assert all(isinstance(p, str) for p in objects["phrase"])
    assert all(isinstance(r, bytes) for r in objects["mask_rle"])
    assert example["polygon_points"].dtype == np.float32
    assert example["polygon_points"].shape[1:] == (2,)
    assert example["polygon_sizes"].dtype == np.int32
    assert example["polygon_sizes"].sum() == len(example["polygon_points"])
    assert example["captions"].dtype == np.object_
    assert all(isinstance(c, str) for c in example["captions"])


def test_every_record_is_numpy_with_fixed_dtypes_and_shapes(train):
    for index in range(len(train)):
        _check_structure(train[index])


def test_masks_decode_with_pycocotools_at_the_image_size(train):
    example = train[0]
    height, width = example["image"].shape[:2]
    rles = [{"size": [height, width], "counts": c} for c in example["objects"]["mask_rle"]]
    masks = mask_utils.decode(rles)  # [H, W, N]
    np.testing.assert_array_equal(masks.sum((0, 1)), example["objects"]["area"])


def test_a_record_without_objects_still_has_typed_empty_arrays():
    record = {  # what tfds.data_source returns for an image without objects
        "image": np.zeros((5, 7, 3), np.uint8),
        "image_id": 3,
        "objects": {name: [] for name in [*sources.OBJECT_ARRAYS, "mask_rle", "phrase"]},
        "polygon_points": np.zeros((0, 2), np.float32),
        "polygon_sizes": np.zeros((0,), np.int32),
        "captions": [b"an empty plain background."],
    }
    example = sources.to_numpy(record)
    _check_structure(example)
    assert example["objects"]["bbox"].shape == (0, 4)
    assert example["objects"]["keypoints"].shape == (0, 17, 3)
    assert list(example["captions"]) == ["an empty plain background."]


def test_source_pickles_and_feeds_a_grain_dataset(train):
    copy = pickle.loads(pickle.dumps(train))
    assert len(copy) == len(train) == 24
    first = grain.MapDataset.source(copy)[0]
    np.testing.assert_array_equal(first["image"], train[0]["image"])


def test_class_names_are_the_scene_classes(scenes_data_dir):
    assert sources.class_names("scenes", scenes_data_dir) == list(scene_render.CLASS_NAMES)


def test_out_of_range_index_raises_index_error(train):
    with pytest.raises(IndexError, match="out of range for 24"):
        train[24]
    assert train[-1]["image_id"] == train[23]["image_id"]


def test_unknown_split_is_refused_listing_the_splits(scenes_data_dir):
    with pytest.raises(ValueError, match=r"split='test'.*\['heldout', 'train', 'validation'\]"):
        sources.data_source("scenes", "test", scenes_data_dir)


def test_missing_dataset_is_refused_with_the_build_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m navit_seq.data.build"):
        sources.data_source("no_such_dataset", "train", tmp_path)


def test_tfds_opencv_warning_is_dropped_and_other_absl_warnings_kept():
    absl_logger = logging.getLogger("absl")
    record = lambda message: absl_logger.makeRecord(
        "absl", logging.WARNING, "f", 1, message, (), None
    )
    opencv = "OpenCV is not installed. We recommend using OpenCV because it is faster ..."
    assert not absl_logger.filter(record(opencv))
    assert absl_logger.filter(record("Checkpoint 7 unreadable"))
