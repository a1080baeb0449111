"""COCO AP via pycocotools: ground truth fed back as predictions scores 1.0; perturbed < 1."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from navit_seq.evaluation import coco


def ground_truth_as_predictions(examples):
    """The inference format (navit_seq.inference) filled with each example's own annotations."""
    predictions = []
    for example in examples:
        objects = example["objects"]
        height, width = example["image"].shape[:2]
        predictions.append(
            {
                "image_id": example["image_id"],
                "boxes": objects["bbox"],
                "labels": objects["label"],
                "scores": np.ones(len(objects["label"])),
                "masks": [{"size": [height, width], "counts": r} for r in objects["mask_rle"]],
                "keypoints": objects["keypoints"],
            }
        )
    return predictions


@pytest.fixture(scope="module")
def scene_examples(scenes_data_dir):
    from navit_seq.data import sources

    source = sources.data_source("scenes", "validation", scenes_data_dir)
    names = sources.class_names("scenes", scenes_data_dir)
    return [source[i] for i in range(len(source))], names


def hand_made_examples():
    """Two images: a person with keypoints and a crowd-free square; masks as RLE."""
    height, width = 40, 60
    mask = np.zeros((height, width, 1), np.uint8, order="F")
    mask[10:30, 6:30] = 1
    square = mask_utils.encode(mask)[0]["counts"]
    mask[:] = 0
    mask[4:36, 30:54] = 1
    person = mask_utils.encode(mask)[0]["counts"]
    keypoints = np.zeros((2, 17, 3), np.float32)
    rng = np.random.default_rng(0)
    keypoints[1, :, 0] = rng.uniform(4, 36, 17) / height
    keypoints[1, :, 1] = rng.uniform(30, 54, 17) / width
    keypoints[1, :, 2] = 2
    keypoints[1, 3, 2] = 0  # one unlabelled point
    objects = {
        "bbox": np.array([[10 / 40, 6 / 60, 30 / 40, 30 / 60], [4 / 40, 30 / 60, 36 / 40, 54 / 60]],
                         np.float32),
        "label": np.array([3, 0]),
        "category_id": np.array([7, 1]),
        "is_crowd": np.array([False, False]),
        "area": np.array([480.0, 768.0], np.float32),
        "mask_rle": np.array([square, person], dtype=object),
        "keypoints": keypoints,
    }  # fmt: skip
    image = np.zeros((height, width, 3), np.uint8)
    first_object = {k: v[:1] for k, v in objects.items()}
    return [
        {"image_id": 5, "image": image, "objects": objects},
        {"image_id": 9, "image": image, "objects": first_object},
    ]


def test_ground_truth_fed_back_scores_ap_one_on_the_scene_dataset(scene_examples):
    examples, names = scene_examples
    metrics = coco.coco_metrics(examples, ground_truth_as_predictions(examples), names)
    assert metrics["keypoints_num_gt"] > 0  # the split has persons
    for kind in coco.IOU_TYPES:
        assert metrics[f"{kind}_AP"] == pytest.approx(1.0), kind
        assert metrics[f"{kind}_AP50"] == pytest.approx(1.0), kind


def test_ground_truth_fed_back_scores_ap_one_on_a_hand_made_case():
    examples = hand_made_examples()
    metrics = coco.coco_metrics(examples, ground_truth_as_predictions(examples))
    assert metrics["bbox_num_gt"] == 3 and metrics["keypoints_num_gt"] == 1
    assert metrics["keypoints_num_predictions"] == 1  # boxes without keypoints are not listed
    for kind in coco.IOU_TYPES:
        assert metrics[f"{kind}_AP"] == pytest.approx(1.0), kind


def test_ground_truth_is_converted_to_coco_pixels_and_category_ids():
    gt, category_of, _ = coco.ground_truth(hand_made_examples())
    assert category_of == {3: 7, 0: 1}
    first = gt.loadAnns(gt.getAnnIds(imgIds=[5]))
    np.testing.assert_allclose(first[0]["bbox"], [6, 10, 24, 20], atol=1e-4)  # x y w h
    assert first[1]["num_keypoints"] == 16
    np.testing.assert_allclose(
        first[1]["keypoints"][:3],
        [hand_made_examples()[0]["objects"]["keypoints"][1, 0, 1] * 60,
         hand_made_examples()[0]["objects"]["keypoints"][1, 0, 0] * 40, 2], rtol=1e-5)  # fmt: skip
    assert mask_utils.area(gt.annToRLE(first[0])) == 480


def test_perturbed_predictions_score_below_one():
    examples = hand_made_examples()
    predictions = ground_truth_as_predictions(examples)
    shifted = predictions[0]
    shifted["boxes"] = shifted["boxes"] + np.array([0.2, 0.2, 0.2, 0.2], np.float32)
    shifted["keypoints"] = shifted["keypoints"] + np.array([0.1, 0.1, 0.0], np.float32)
    blank = np.zeros((40, 60, 1), np.uint8, order="F")
    blank[0:5, 0:5] = 1
    shifted["masks"] = [mask_utils.encode(blank)[0]] * 2
    metrics = coco.coco_metrics(examples, predictions)
    for kind in coco.IOU_TYPES:
        assert metrics[f"{kind}_AP"] < 0.9, kind


def test_no_predictions_give_zero_not_nan():
    examples = hand_made_examples()
    empty = [{"image_id": 5, "boxes": np.zeros((0, 4)), "labels": [], "scores": []}]
    metrics = coco.coco_metrics(examples, empty)
    for kind in coco.IOU_TYPES:
        assert metrics[f"{kind}_AP"] == 0.0 and metrics[f"{kind}_num_predictions"] == 0


def test_prediction_for_an_unknown_image_raises_naming_it():
    with pytest.raises(ValueError, match="image_id 123"):
        coco.coco_metrics(hand_made_examples(), [{"image_id": 123, "boxes": [], "labels": [],
                                                  "scores": []}])  # fmt: skip


def test_caption_only_predictions_count_as_no_predictions():
    metrics = coco.coco_metrics(hand_made_examples(), [{"image_id": 5, "caption": "a square"}])
    assert metrics["bbox_AP"] == 0.0 and metrics["bbox_num_predictions"] == 0


def test_objects_without_masks_get_their_box_as_the_mask_and_bbox_ap_one():
    """Detection-only data (no mask_rle, no area): the ground truth still converts."""
    examples = hand_made_examples()
    for example in examples:
        objects = example["objects"]
        example["objects"] = {k: objects[k] for k in ("bbox", "label", "category_id", "is_crowd")}
    gt, _, _ = coco.ground_truth(examples)
    first = gt.loadAnns(gt.getAnnIds(imgIds=[5]))
    assert mask_utils.area(gt.annToRLE(first[0])) == 24 * 20  # the 24 x 20 px box
    predictions = [
        {"image_id": e["image_id"], "boxes": e["objects"]["bbox"], "labels": e["objects"]["label"],
         "scores": np.ones(len(e["objects"]["label"]), np.float32)}
        for e in examples
    ]  # fmt: skip
    assert coco.coco_metrics(examples, predictions)["bbox_AP"] == pytest.approx(1.0)
