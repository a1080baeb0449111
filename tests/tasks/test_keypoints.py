import numpy as np
import pytest

from navit_seq.data.scene_render import CLASS_NAMES, render_scene, scene_rng
from navit_seq.tasks.keypoints import KeypointTask, crop_image
from navit_seq.tasks.vocab import Vocab

NUM_BINS = 1000
HALF_BIN = 0.5 / (NUM_BINS - 1)
VOCAB = Vocab(num_classes=3, num_bins=NUM_BINS)
PERSON = 1
PROMPT = KeypointTask.PROMPT_LENGTH
SEQ_LEN = PROMPT + 34 + 4


def make_example(boxes, keypoints, labels=None, image_size=(120, 200)) -> dict:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    return {
        "image": np.zeros((*image_size, 3), np.uint8),
        "objects": {
            "bbox": boxes,
            "label": np.full(len(boxes), PERSON) if labels is None else np.asarray(labels),
            "keypoints": np.asarray(keypoints, np.float32).reshape(-1, 17, 3),
        },
    }


def random_persons(num_persons, seed, image_size=(120, 200)):
    """Persons whose labelled keypoints lie in their boxes; about a third unlabelled."""
    rng = np.random.default_rng(seed)
    corners = np.sort(rng.random((num_persons, 2, 2)), axis=1)  # [N, (min, max), (y, x)]
    boxes = corners.reshape(num_persons, 4)
    low, high = corners[:, None, 0], corners[:, None, 1]
    points = low + rng.random((num_persons, 17, 2)) * (high - low)  # [N, 17, 2]
    visibility = rng.choice([0, 1, 2], size=(num_persons, 17), p=[0.3, 0.2, 0.5])
    visibility[:, 0] = 2  # every person has a labelled point
    points[visibility == 0] = 0.0  # COCO stores unlabelled points as (0, 0, 0)
    return make_example(
        boxes, np.concatenate([points, visibility[..., None]], -1), None, image_size
    )


def responses(rows):
    return rows["target_tokens"][:, PROMPT - 1 :]


@pytest.fixture(scope="module")
def task():
    return KeypointTask(VOCAB, seq_len=SEQ_LEN)


@pytest.mark.parametrize("image_size", [(120, 200), (480, 640), (1024, 683)])
def test_round_trip_recovers_labelled_keypoints_within_half_a_bin(task, image_size):
    example = random_persons(6, seed=image_size[0], image_size=image_size)
    rows, stats = task.encode(example, training=False)
    assert stats["instances"] == 6 and stats["keypoints_clipped"] == 0
    for row, index in enumerate(rows["instance_index"]):
        decoded, decode_stats = task.decode(responses(rows)[row], rows["crop_box"][row])
        truth = example["objects"]["keypoints"][index]
        labelled = truth[:, 2] > 0
        np.testing.assert_array_equal(decoded[:, 2] > 0, labelled)
        error = np.abs(decoded[labelled, :2] - truth[labelled, :2])
        crop_size = rows["crop_box"][row, 2:] - rows["crop_box"][row, :2]
        assert (error <= HALF_BIN * crop_size + 1e-6).all()  # half a bin of the crop
        assert decode_stats["malformed"] == 0


def test_crop_is_the_box_scaled_about_its_centre_in_whole_pixels(task):
    # box y 30..50 px, x 50..100 px of a 100 x 200 image; 2x -> y 20..60, x 25..125.
    crop = task.crop_box(np.array([0.3, 0.25, 0.5, 0.5]), (100, 200))
    np.testing.assert_allclose(crop * [100, 200, 100, 200], [20, 25, 60, 125], atol=1e-4)


def test_crop_is_clipped_to_the_image_and_rounded_outwards(task):
    crop = task.crop_box(np.array([0.02, 0.9, 0.335, 0.99]), (100, 200))
    np.testing.assert_allclose(crop * [100, 200, 100, 200], [0, 171, 50, 200], atol=1e-4)


def test_crop_scale_is_configurable():
    crop = KeypointTask(VOCAB, SEQ_LEN, crop_scale=1.0).crop_box(
        np.array([0.3, 0.25, 0.5, 0.5]), (100, 200)
    )
    np.testing.assert_allclose(crop * [100, 200, 100, 200], [30, 50, 50, 100], atol=1e-4)


def test_crop_image_returns_the_pixels_of_the_crop(task):
    image = np.arange(100 * 200 * 3).reshape(100, 200, 3)
    crop = task.crop_box(np.array([0.3, 0.25, 0.5, 0.5]), (100, 200))
    np.testing.assert_array_equal(crop_image(image, crop), image[20:60, 25:125])


def test_prompt_is_the_box_in_crop_coordinates_and_its_class(task):
    keypoints = np.zeros((17, 3))
    keypoints[0] = [0.44, 0.3, 2]
    rows, _ = task.encode(
        make_example([[0.3, 0.25, 0.5, 0.5]], keypoints, image_size=(100, 200)), training=False
    )
    np.testing.assert_array_equal(
        rows["prompt_tokens"][0],
        [Vocab.KEYPOINT_PROMPT, *VOCAB.coord_tokens([0.25, 0.25, 0.75, 0.75]), 100 + PERSON],
    )
    np.testing.assert_array_equal(rows["input_tokens"][0, :PROMPT], rows["prompt_tokens"][0])
    # the nose at (44, 60) px sits at ((44 - 20) / 40, (60 - 25) / 100) of the crop.
    np.testing.assert_array_equal(responses(rows)[0, :2], VOCAB.coord_tokens([0.6, 0.35]))


def test_weights_are_zero_on_prompt_one_on_points_a_tenth_on_invisible_and_end(task):
    example = random_persons(1, seed=3)
    rows, _ = task.encode(example, training=False)
    labelled = example["objects"]["keypoints"][0, :, 2] > 0
    point_weights = np.where(labelled, 1.0, 0.1).repeat(2)  # (y, x) per keypoint
    expected = np.concatenate([np.zeros(PROMPT - 1), point_weights, [0.1], np.zeros(4)])
    np.testing.assert_allclose(rows["token_weights"][0], expected)
    invisible = responses(rows)[0, :34].reshape(17, 2) == Vocab.INVISIBLE
    np.testing.assert_array_equal(invisible.all(axis=1), ~labelled)
    np.testing.assert_array_equal(invisible.any(axis=1), ~labelled)


def test_persons_without_labelled_points_and_unknown_classes_are_skipped_and_counted(task):
    example = random_persons(4, seed=4)
    example["objects"]["keypoints"][1] = 0.0  # all unlabelled
    example["objects"]["label"][2] = 3  # == num_classes
    rows, stats = task.encode(example, training=False)
    assert (stats["no_keypoints"], stats["unknown_class"], stats["instances"]) == (1, 1, 2)
    np.testing.assert_array_equal(rows["instance_index"], [0, 3])
    assert rows["crop_box"].shape == (2, 4)


def test_non_finite_points_are_made_unlabelled_and_counted(task):
    example = random_persons(2, seed=7)
    example["objects"]["keypoints"][0, 3] = [np.nan, 0.5, 2]  # labelled: counted
    example["objects"]["keypoints"][1, 4] = [np.inf, np.nan, 0]  # unlabelled: ignored
    rows, stats = task.encode(example, training=False)
    assert stats["invalid_keypoints"] == 1 and stats["instances"] == 2
    np.testing.assert_array_equal(responses(rows)[0, 6:8], [Vocab.INVISIBLE] * 2)


def test_an_image_without_persons_gives_zero_rows_and_is_counted(task):
    rows, stats = task.encode(make_example(np.zeros((0, 4)), np.zeros((0, 17, 3))), training=False)
    assert rows["target_tokens"].shape == (0, SEQ_LEN) and rows["crop_box"].shape == (0, 4)
    assert stats["no_instances"] == 1


def test_labelled_points_outside_the_crop_are_clipped_to_its_border_and_counted(task):
    keypoints = np.zeros((17, 3))
    keypoints[0] = [0.4, 0.3, 2]
    keypoints[1] = [0.95, 0.3, 1]  # far below the box's 2x crop (y 0.2..0.6)
    rows, stats = task.encode(
        make_example([[0.3, 0.25, 0.5, 0.5]], keypoints, image_size=(100, 200)), training=False
    )
    assert stats["keypoints_clipped"] == 1
    decoded, _ = task.decode(responses(rows)[0], rows["crop_box"][0])
    np.testing.assert_allclose(decoded[1], [0.6, 0.3, 2], atol=HALF_BIN)


def test_more_persons_than_max_instances_are_truncated_and_counted():
    task = KeypointTask(VOCAB, SEQ_LEN, max_instances=2)
    rows, stats = task.encode(
        random_persons(5, seed=5), training=True, rng=np.random.default_rng(0)
    )
    assert stats["instances_truncated"] == 3 and len(rows["instance_index"]) == 2


def test_decode_marks_invisible_malformed_and_missing_pairs_unseen_at_the_crop_centre(task):
    crop = np.array([0.2, 0.1, 0.6, 0.5], np.float32)
    tokens = [1500, 1250, Vocab.INVISIBLE, Vocab.INVISIBLE, 1500, 105]  # point, invisible, bad
    decoded, stats = task.decode(np.array([*tokens, 0, 1100]), crop)
    np.testing.assert_allclose(decoded[0], [0.2 + 0.4 * 500 / 999, 0.1 + 0.4 * 250 / 999, 2])
    np.testing.assert_allclose(decoded[1:], np.tile([0.4, 0.3, 0.0], (16, 1)))
    assert stats == {"visible": 1, "invisible": 15, "malformed": 1}  # 14 pairs were missing


def test_an_undecoded_image_is_refused_with_the_fix(task):
    example = random_persons(1, seed=6)
    example["image"] = np.array(b"jpeg bytes")
    with pytest.raises(ValueError, match="decode the image before task encoding"):
        task.encode(example, training=False)


def test_too_short_rows_and_crops_smaller_than_the_box_are_refused():
    with pytest.raises(ValueError, match="seq_len=30: need >= 40"):
        KeypointTask(VOCAB, seq_len=30)
    with pytest.raises(ValueError, match="crop_scale=0.5"):
        KeypointTask(VOCAB, seq_len=SEQ_LEN, crop_scale=0.5)


def test_round_trip_on_rendered_scenes_recovers_every_point_inside_its_crop():
    """Persons of the package's own scene dataset, at its resolutions."""
    scenes = [render_scene(scene_rng(1, "test", i), image_id=i).example for i in range(20)]
    task = KeypointTask(Vocab(num_classes=len(CLASS_NAMES)), seq_len=SEQ_LEN)
    checked = 0
    for example in scenes:
        rows, _ = task.encode(example, training=False)
        for row, index in enumerate(rows["instance_index"]):
            crop = rows["crop_box"][row]
            decoded, _ = task.decode(responses(rows)[row], crop)
            truth = example["objects"]["keypoints"][index]
            inside = ((truth[:, :2] >= crop[:2]) & (truth[:, :2] <= crop[2:])).all(axis=1)
            check = (truth[:, 2] > 0) & inside
            np.testing.assert_array_equal(decoded[:, 2] > 0, truth[:, 2] > 0)
            error = np.abs(decoded[check, :2] - truth[check, :2])
            assert (error <= HALF_BIN * (crop[2:] - crop[:2]) + 1e-6).all()
            checked += int(check.sum())
    assert checked > 100
