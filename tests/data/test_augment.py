"""The left-right flip moves every annotation with the pixels, checked against references:
boxes against the flipped masks' pycocotools boxes, polygons against the flipped masks by
rasterisation, keypoints against the original person's mirrored joints."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from navit_seq.data import augment, scene_render
from navit_seq.data.features import KEYPOINT_NAMES
from navit_seq.data.scene_render import SceneSpec


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    spec = SceneSpec(max_side=200)
    return [
        scene_render.render_scene(scene_render.scene_rng(3, "train", i), spec).example
        for i in range(12)
    ]


def _masks(example: dict) -> np.ndarray:
    height, width = example["image"].shape[:2]
    rles = [{"size": [height, width], "counts": c} for c in example["objects"]["mask_rle"]]
    return mask_utils.decode(rles).transpose(2, 0, 1)  # [N, H, W] uint8


def test_pixels_and_masks_are_mirrored_exactly(scenes):
    for example in scenes:
        flipped = augment.flip_left_right(example)
        np.testing.assert_array_equal(flipped["image"], example["image"][:, ::-1])
        np.testing.assert_array_equal(_masks(flipped), _masks(example)[:, :, ::-1])


def _mask_boxes(example: dict) -> np.ndarray:
    """pycocotools' boxes of the example's masks, normalized (ymin, xmin, ymax, xmax) [N, 4]."""
    height, width = example["image"].shape[:2]
    rles = [{"size": [height, width], "counts": c} for c in example["objects"]["mask_rle"]]
    x, y, w, h = mask_utils.toBbox(rles).T  # pixels
    return np.stack([y / height, x / width, (y + h) / height, (x + w) / width], axis=1)


def test_boxes_are_the_boxes_of_the_flipped_masks(scenes):
    for example in scenes:
        # The stored boxes are their masks' boxes; so must the flipped ones be.
        np.testing.assert_allclose(example["objects"]["bbox"], _mask_boxes(example), atol=1e-6)
        flipped = augment.flip_left_right(example)
        np.testing.assert_allclose(flipped["objects"]["bbox"], _mask_boxes(flipped), atol=1e-6)


def test_polygons_rasterise_to_the_flipped_masks(scenes):
    example = scenes[0]
    flipped = augment.flip_left_right(example)
    height, width = example["image"].shape[:2]
    ends = np.cumsum(flipped["polygon_sizes"])
    polygons = np.split(flipped["polygon_points"] * [height, width], ends[:-1])
    first = polygons[: example["objects"]["num_polygons"][0]]  # object 0's polygons
    rle = mask_utils.merge(
        mask_utils.frPyObjects([p[:, ::-1].reshape(-1).tolist() for p in first], height, width)
    )
    drawn = mask_utils.decode(rle).astype(bool)
    mask = _masks(flipped)[0].astype(bool)
    iou = (drawn & mask).sum() / (drawn | mask).sum()
    assert iou > 0.9


def test_keypoints_mirror_x_and_swap_left_and_right():
    points = np.zeros((1, 17, 3), np.float32)
    left_wrist = KEYPOINT_NAMES.index("left_wrist")
    right_wrist = KEYPOINT_NAMES.index("right_wrist")
    points[0, left_wrist] = (0.3, 0.2, 2)
    points[0, 0] = (0.1, 0.4, 1)  # nose: its own mirror
    example = {"image": np.zeros((4, 8, 3), np.uint8), "objects": {"keypoints": points}}
    flipped = augment.flip_left_right(example)["objects"]["keypoints"][0]
    np.testing.assert_allclose(flipped[right_wrist], (0.3, 0.8, 2))
    np.testing.assert_allclose(flipped[0], (0.1, 0.6, 1))
    assert not flipped[left_wrist].any()  # unlabelled stays all zero


def test_flipping_twice_gives_the_example_back(scenes):
    example = scenes[1]
    twice = augment.flip_left_right(augment.flip_left_right(example))
    np.testing.assert_array_equal(twice["image"], example["image"])
    assert list(twice["objects"]["mask_rle"]) == list(example["objects"]["mask_rle"])
    for key in ("bbox", "keypoints"):
        np.testing.assert_allclose(twice["objects"][key], example["objects"][key], atol=1e-6)
    np.testing.assert_allclose(twice["polygon_points"], example["polygon_points"], atol=1e-6)


def test_a_probability_outside_zero_one_is_refused():
    config = augment.default_augment_config()
    config.flip_left_right = 1.5
    with pytest.raises(ValueError, match="flip_left_right=1.5"):
        augment.validate_augment_config(config)
