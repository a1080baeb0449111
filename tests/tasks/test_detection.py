import numpy as np
import pytest

from navit_seq.data.scene_render import CLASS_NAMES, render_scene, scene_rng
from navit_seq.tasks.detection import DetectionTask
from navit_seq.tasks.vocab import Vocab

NUM_BINS = 1000
HALF_BIN = 0.5 / (NUM_BINS - 1)
VOCAB = Vocab(num_classes=20, num_bins=NUM_BINS)


def make_example(num_objects: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    corners = rng.random((num_objects, 2, 2))  # [N, corner, (y, x)]
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
    return {
        "objects": {
            "bbox": boxes.astype(np.float32),
            "label": rng.integers(0, VOCAB.num_classes, num_objects),
            "is_crowd": np.zeros(num_objects, bool),
        }
    }


def response(rows: dict) -> np.ndarray:
    """The response part of the one target row (the prompt is 1 token)."""
    return rows["target_tokens"][0, DetectionTask.PROMPT_LENGTH - 1 :]


def sort_objects(boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    table = np.concatenate([boxes, labels[:, None].astype(np.float64)], axis=1)
    return table[np.lexsort(table.T[::-1])]


@pytest.fixture(scope="module")
def task():
    return DetectionTask(VOCAB, seq_len=128, max_objects=20)


def test_eval_round_trip_recovers_boxes_within_half_a_bin_in_order(task):
    example = make_example(12)
    rows, stats = task.encode(example, training=False)
    decoded, decode_stats = task.decode(response(rows))
    np.testing.assert_array_equal(decoded["label"], example["objects"]["label"])
    assert np.abs(decoded["bbox"] - example["objects"]["bbox"]).max() <= HALF_BIN + 1e-6
    assert stats["objects"] == 12 and stats["noise_objects"] == 0
    assert decode_stats == {"decoded": 12, "fake": 0, "malformed": 0}


def test_training_round_trip_recovers_real_objects_and_drops_noise(task):
    example = make_example(7, seed=1)
    rows, stats = task.encode(example, training=True, rng=np.random.default_rng(0))
    decoded, decode_stats = task.decode(response(rows))
    expected = sort_objects(example["objects"]["bbox"], example["objects"]["label"])
    got = sort_objects(decoded["bbox"], decoded["label"])
    np.testing.assert_array_equal(got[:, 4], expected[:, 4])
    assert np.abs(got[:, :4] - expected[:, :4]).max() <= HALF_BIN + 1e-6
    assert decode_stats["fake"] == stats["noise_objects"] == 20 - 7


def test_training_fills_the_row_with_fake_objects_up_to_max_objects(task):
    rows, _ = task.encode(make_example(3), training=True, rng=np.random.default_rng(2))
    classes = response(rows)[4 : 5 * 20 : 5]  # the class token of each of 20 objects
    assert (classes == Vocab.FAKE_CLASS).sum() == 17
    assert response(rows)[5 * 20] == 0  # END right after the 20th object


def test_token_weights_are_one_for_real_zero_for_noise_coordinates_and_tenth_for_end(task):
    rows, _ = task.encode(make_example(5), training=True, rng=np.random.default_rng(3))
    targets, weights = rows["target_tokens"][0], rows["token_weights"][0]
    objects = targets[:100].reshape(20, 5)
    expected = np.where(objects[:, 4:] == Vocab.FAKE_CLASS, [0, 0, 0, 0, 1], [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(weights[:100], expected.reshape(-1))
    assert weights[100] == pytest.approx(0.1)  # END
    assert (weights[101:] == 0).all()  # PAD


def test_noise_class_weight_is_configurable():
    task = DetectionTask(VOCAB, seq_len=64, max_objects=10, noise_class_weight=0.25)
    rows, _ = task.encode(make_example(2), training=True, rng=np.random.default_rng(0))
    objects = rows["token_weights"][0, :50].reshape(10, 5)
    is_fake = rows["target_tokens"][0, 4:50:5] == Vocab.FAKE_CLASS
    np.testing.assert_allclose(objects[is_fake, 4], 0.25)


def test_noise_boxes_lie_in_the_image(task):
    rows, _ = task.encode(make_example(4), training=True, rng=np.random.default_rng(4))
    objects = response(rows)[:100].reshape(20, 5)
    assert VOCAB.is_coord(objects[:, :4]).all()


def test_training_corrupts_input_classes_but_keeps_coordinates_and_targets(task):
    example = make_example(20, seed=5)
    rows, _ = task.encode(example, training=True, rng=np.random.default_rng(5))
    inputs, targets = rows["input_tokens"][0], rows["target_tokens"][0]
    # input[i + 1] is the decoder's view of target[i].
    seen, true = inputs[1:101].reshape(20, 5), targets[:100].reshape(20, 5)
    np.testing.assert_array_equal(seen[:, :4], true[:, :4])
    assert (seen[:, 4] != true[:, 4]).sum() >= 5  # rand_n_fake_cls: mostly wrong classes
    assert (VOCAB.is_class(seen[:, 4]) | (seen[:, 4] == Vocab.FAKE_CLASS)).all()
    assert VOCAB.is_class(true[:, 4]).all()


def test_eval_inputs_are_the_targets_shifted_by_one(task):
    rows, _ = task.encode(make_example(6), training=False)
    np.testing.assert_array_equal(rows["input_tokens"][0, 1:], rows["target_tokens"][0, :-1])
    assert rows["input_tokens"][0, 0] == Vocab.DETECTION_PROMPT


def test_object_order_is_random_but_reproducible_from_the_generator(task):
    example = make_example(10, seed=6)

    def first_labels(seed):
        rows, _ = task.encode(example, training=True, rng=np.random.default_rng(seed))
        return response(rows)[4:50:5].tolist()

    assert first_labels(0) == first_labels(0)
    assert len({tuple(first_labels(seed)) for seed in range(5)}) > 1


@pytest.mark.parametrize("order", ["area", "dist2ori"])
def test_fixed_object_orders_sort_the_real_objects_in_training_and_evaluation(order):
    task = DetectionTask(VOCAB, seq_len=128, max_objects=20, object_order=order)
    example = make_example(9, seed=7)
    boxes = example["objects"]["bbox"].astype(np.float64)
    if order == "area":
        key = -(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    else:
        key = np.sqrt(boxes[:, 0] ** 2 + boxes[:, 1] ** 2)
    expected = example["objects"]["label"][np.argsort(key)]
    for training in (False, True):
        rows, _ = task.encode(example, training=training, rng=np.random.default_rng(3))
        np.testing.assert_array_equal(task.decode(response(rows))[0]["label"], expected)


def test_an_unknown_object_order_is_refused():
    with pytest.raises(ValueError, match="object_order='raster'.*random"):
        DetectionTask(VOCAB, seq_len=128, object_order="raster")


def test_no_objects_gives_prompt_then_end_and_is_counted(task):
    rows, stats = task.encode(make_example(0), training=False)
    assert rows["input_tokens"].shape == (1, 128)
    assert response(rows)[0] == 0 and rows["token_weights"][0, 0] == pytest.approx(0.1)
    assert stats["no_objects"] == 1


def test_no_objects_in_training_gives_random_noise_boxes(task):
    rows, stats = task.encode(make_example(0), training=True, rng=np.random.default_rng(0))
    assert stats["no_objects"] == 1 and stats["noise_objects"] == 20
    assert task.decode(response(rows))[0]["label"].size == 0


def test_more_objects_than_the_row_holds_are_truncated_and_counted():
    task = DetectionTask(VOCAB, seq_len=23, max_objects=100)  # (23 - 1) // 5 = 4 objects
    example = make_example(9)
    rows, stats = task.encode(example, training=False)
    assert stats["objects"] == 4 and stats["objects_truncated"] == 5
    decoded, _ = task.decode(response(rows))
    assert np.abs(decoded["bbox"] - example["objects"]["bbox"][:4]).max() <= HALF_BIN + 1e-6


def test_unknown_classes_crowds_and_invalid_boxes_are_skipped_and_counted(task):
    example = make_example(6)
    example["objects"]["label"][0] = 20  # == num_classes
    example["objects"]["label"][1] = -1
    example["objects"]["is_crowd"][2] = True
    example["objects"]["bbox"][3] = [np.nan, 0.1, 0.2, 0.3]
    example["objects"]["bbox"][4] = [0.5, 0.5, 0.5, 0.7]  # zero height
    rows, stats = task.encode(example, training=False)
    assert (stats["unknown_class"], stats["crowd_skipped"], stats["invalid_boxes"]) == (2, 1, 2)
    decoded, _ = task.decode(response(rows))
    np.testing.assert_array_equal(decoded["label"], example["objects"]["label"][5:])


def test_decode_drops_malformed_groups_and_counts_them(task):
    good = list(VOCAB.coord_tokens([0.1, 0.2, 0.3, 0.4])) + [VOCAB.class_tokens([3])[0]]
    bad_class = list(VOCAB.coord_tokens([0.1, 0.2, 0.3, 0.4])) + [1500]
    bad_coord = [1100, 1200, 7, 1300, 103]
    fake = list(VOCAB.coord_tokens([0.1, 0.2, 0.3, 0.4])) + [Vocab.FAKE_CLASS]
    tokens = np.array(good + bad_class + bad_coord + fake + good + [1100, 1200, 0, 5])
    decoded, stats = task.decode(tokens)
    np.testing.assert_array_equal(decoded["label"], [3, 3])
    assert stats == {"decoded": 2, "fake": 1, "malformed": 3}  # 2 bad groups + a partial one


def test_decode_scores_are_class_token_probabilities_and_boxes_are_ordered(task):
    tokens = np.array([1500, 1600, 1100, 1200, 104, 0])  # corners given max-first
    scores = np.array([0.9, 0.9, 0.9, 0.9, 0.37, 0.8])
    decoded, _ = task.decode(tokens, scores)
    np.testing.assert_allclose(decoded["score"], [0.37])
    np.testing.assert_allclose(decoded["bbox"], [[100 / 999, 200 / 999, 500 / 999, 600 / 999]])


def test_training_without_a_generator_is_refused(task):
    with pytest.raises(ValueError, match="needs rng"):
        task.encode(make_example(1), training=True)


def test_a_row_too_short_for_one_object_is_refused():
    with pytest.raises(ValueError, match="need seq_len >= 6"):
        DetectionTask(VOCAB, seq_len=5)


def test_round_trip_on_rendered_scenes_recovers_every_box_within_half_a_bin():
    """Boxes of the package's own scene dataset, at its resolutions."""
    task = DetectionTask(Vocab(num_classes=len(CLASS_NAMES)), seq_len=64, max_objects=12)
    for i in range(20):
        example = render_scene(scene_rng(2, "test", i), image_id=i).example
        rows, stats = task.encode(example, training=False)
        decoded, _ = task.decode(response(rows))
        np.testing.assert_array_equal(decoded["label"], example["objects"]["label"])
        assert np.abs(decoded["bbox"] - example["objects"]["bbox"]).max() <= HALF_BIN + 1e-6
