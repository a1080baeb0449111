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


def _assert_same_example(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_example(a[key], b[key])
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class CountingSource:
    """`source` that records which indices it was asked to decode."""

    def __init__(self, source):
        self.source, self.reads = source, []

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        self.reads.append(index)
        return self.source[index]


def test_cached_source_returns_what_the_source_decodes_and_decodes_each_example_once(train):
    counting = CountingSource(train)
    cached = sources.CachedSource(counting, max_bytes=64 * 2**20)
    assert len(cached) == len(train)
    for _ in range(2):  # two epochs
        for index in (3, 0, 5, 3):
            _check_structure(cached[index])
            _assert_same_example(cached[index], train[index])
    assert counting.reads == [3, 0, 5]  # each decoded once, on its first read
    assert cached.cached_bytes > 0


def test_data_source_with_cache_mb_is_a_cached_source(scenes_data_dir):
    cached = sources.data_source("scenes", "train", scenes_data_dir, cache_mb=64)
    assert isinstance(cached, sources.CachedSource) and cached.max_bytes == 64 * 2**20
    assert isinstance(sources.data_source("scenes", "train", scenes_data_dir), sources.NumpySource)


def test_cached_examples_are_read_only_and_callers_get_fresh_dicts(scenes_data_dir):
    cached = sources.data_source("scenes", "train", scenes_data_dir, cache_mb=64)
    first = cached[0]
    with pytest.raises(ValueError, match="read-only"):
        first["image"][0, 0, 0] = 0
    first["image"] = None  # replacing a key changes only this caller's dict
    first["objects"]["label"] = None
    assert cached[0]["image"] is not None and cached[0]["objects"]["label"] is not None


def test_cached_source_stops_caching_at_its_budget_and_pickles_empty(scenes_data_dir, train):
    one_example = sources._nbytes(train[0])
    cached = sources.CachedSource(train, max_bytes=one_example)
    cached[0], cached[1]
    assert list(cached._cache) == [0] and cached.cached_bytes == one_example
    _assert_same_example(cached[1], train[1])  # past the budget: decoded, not cached
    copy = pickle.loads(pickle.dumps(cached))
    assert copy.cached_bytes == 0 and not copy._cache and len(copy) == len(train)
    _assert_same_example(copy[2], train[2])
