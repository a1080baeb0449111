import numpy as np
import pytest
from pycocotools import mask as mask_utils

from navit_seq.data.scene_render import CLASS_NAMES, render_scene, scene_rng
from navit_seq.tasks.segmentation import SegmentationTask, polygons_to_rle
from navit_seq.tasks.vocab import Vocab

NUM_BINS = 1000
HALF_BIN = 0.5 / (NUM_BINS - 1)
VOCAB = Vocab(num_classes=10, num_bins=NUM_BINS)
PROMPT = SegmentationTask.PROMPT_LENGTH


def star_polygon(rng, centre, radius, num_points) -> np.ndarray:
    """A random star-shaped polygon [K, 2] (y, x) in pixels."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, num_points))
    radii = radius * rng.uniform(0.6, 1.0, num_points)
    return np.stack([centre[0] + radii * np.sin(angles), centre[1] + radii * np.cos(angles)], 1)


def smooth_polygon(centre, radius, num_points) -> np.ndarray:
    """A dense, smooth blob [K, 2] (y, x) in pixels, like a finely traced COCO outline."""
    angles = np.linspace(0, 2 * np.pi, num_points, endpoint=False)
    radii = radius * (1 + 0.2 * np.sin(3 * angles))
    return np.stack([centre[0] + radii * np.sin(angles), centre[1] + radii * np.cos(angles)], 1)


def make_example(objects: list[list[np.ndarray]], labels, image_size, crowd=()) -> dict:
    """Flat features.py layout from per-object lists of normalized [K, 2] polygons."""
    polygons = [p for obj in objects for p in obj]
    points = np.concatenate(polygons) if polygons else np.zeros((0, 2))
    boxes = [
        np.concatenate([np.concatenate(obj).min(0), np.concatenate(obj).max(0)])
        if obj
        else np.array([0.1, 0.1, 0.2, 0.2])
        for obj in objects
    ]
    return {
        "image": np.zeros((*image_size, 3), np.uint8),
        "image_id": 7,
        "objects": {
            "bbox": np.array(boxes, np.float32).reshape(-1, 4),
            "label": np.asarray(labels, np.int64),
            "is_crowd": np.isin(np.arange(len(objects)), crowd),
            "num_polygons": np.array([len(obj) for obj in objects], np.int32),
        },
        "polygon_points": points.astype(np.float32),
        "polygon_sizes": np.array([len(p) for p in polygons], np.int32),
    }


def random_scene(image_size, num_objects, seed, points=(8, 40)):
    """Objects of 1-2 star polygons, >= 12 px across, normalized by the image size."""
    rng = np.random.default_rng(seed)
    height, width = image_size
    objects = []
    for _ in range(num_objects):
        radius = rng.uniform(12, min(height, width) / 4)
        obj = []
        for _ in range(rng.integers(1, 3)):
            centre = rng.uniform(radius, [height - radius, width - radius])
            polygon = star_polygon(rng, centre, radius, rng.integers(*points))
            obj.append((polygon / [height, width]).astype(np.float32))
        objects.append(obj)
    return make_example(objects, rng.integers(0, 10, num_objects), image_size)


def reference_rle(polygons, height, width):
    """pycocotools' own rasterisation of the annotation's polygons, in pixels."""
    flat = [(p * [height, width])[:, ::-1].reshape(-1).tolist() for p in polygons]
    return mask_utils.merge(mask_utils.frPyObjects(flat, height, width))


def responses(rows):
    return rows["target_tokens"][:, PROMPT - 1 :]


@pytest.fixture(scope="module")
def task():
    return SegmentationTask(VOCAB, seq_len=300, max_points=128)


@pytest.mark.parametrize("image_size", [(64, 96), (480, 640), (1024, 683)])
def test_round_trip_polygons_rasterise_to_the_annotation_masks(task, image_size):
    example = random_scene(image_size, num_objects=5, seed=sum(image_size))
    rows, stats = task.encode(example, training=False)
    assert stats["instances"] == 5 and stats["instances_simplified"] == 0
    per_object = np.split(
        example["polygon_points"], np.cumsum(example["polygon_sizes"])[:-1]
    )  # every polygon, in object order
    first = np.concatenate([[0], np.cumsum(example["objects"]["num_polygons"])])
    for row, index in enumerate(rows["instance_index"]):
        truth = per_object[first[index] : first[index + 1]]
        decoded, decode_stats = task.decode(responses(rows)[row])
        assert decode_stats["malformed_tokens"] == 0 and len(decoded) == len(truth)
        for got, want in zip(decoded, truth, strict=True):
            assert np.abs(got - want).max() <= HALF_BIN + 1e-6
        iou = mask_utils.iou(
            [polygons_to_rle(decoded, *image_size)], [reference_rle(truth, *image_size)], [0]
        )[0, 0]
        assert iou > 0.9, (image_size, index, iou)


def test_prompt_is_box_and_class_and_weighs_zero(task):
    example = random_scene((200, 300), num_objects=1, seed=1)
    rows, _ = task.encode(example, training=False)
    box, label = example["objects"]["bbox"][0], example["objects"]["label"][0]
    np.testing.assert_array_equal(
        rows["prompt_tokens"][0],
        [Vocab.SEGMENTATION_PROMPT, *VOCAB.coord_tokens(box), VOCAB.class_tokens([label])[0]],
    )
    np.testing.assert_array_equal(rows["input_tokens"][0, :PROMPT], rows["prompt_tokens"][0])
    assert (rows["token_weights"][0, : PROMPT - 1] == 0).all()


def test_response_is_yx_pairs_joined_by_separators_then_end():
    square = np.array([[0.1, 0.1], [0.1, 0.2], [0.2, 0.2], [0.2, 0.1]], np.float32)
    triangle = np.array([[0.5, 0.5], [0.9, 0.5], [0.9, 0.9]], np.float32)
    example = make_example([[square, triangle]], [4], (100, 100))
    rows, _ = SegmentationTask(VOCAB, seq_len=30).encode(example, training=False)
    expected = [*VOCAB.coord_tokens(square).reshape(-1), Vocab.SEPARATOR]
    expected += [*VOCAB.coord_tokens(triangle).reshape(-1), 0]
    np.testing.assert_array_equal(responses(rows)[0, : len(expected)], expected)
    weights = rows["token_weights"][0, PROMPT - 1 :]
    np.testing.assert_allclose(weights[: len(expected)], [1.0] * 15 + [0.1])
    assert (weights[len(expected) :] == 0).all()


def test_objects_with_more_points_than_max_points_are_subsampled_and_still_match():
    task = SegmentationTask(VOCAB, seq_len=300, max_points=64)
    circle = smooth_polygon((240, 320), 150, 500) / [480, 640]
    small = smooth_polygon((60, 60), 30, 100) / [480, 640]
    example = make_example([[circle, small]], [2], (480, 640))
    rows, stats = task.encode(example, training=False)
    decoded, _ = task.decode(responses(rows)[0])
    assert stats["instances_simplified"] == 1
    assert sum(len(p) for p in decoded) <= 64 and len(decoded) == 2
    got, want = polygons_to_rle(decoded, 480, 640), reference_rle([circle, small], 480, 640)
    assert mask_utils.iou([got], [want], [0])[0, 0] > 0.9


def test_simplification_keeps_thin_parts_such_as_limbs():
    task = SegmentationTask(VOCAB, seq_len=300, max_points=24)
    blob = smooth_polygon((100, 100), 40, 300)  # dense outline, counter-clockwise from +x
    arm = np.array([[99, 140], [99.5, 180], [100.5, 180], [101, 140]])  # 2 px wide, 40 long
    outline = np.concatenate([blob[:1], arm, blob[1:]]) / 200
    rows, _ = task.encode(make_example([[outline]], [1], (200, 200)), training=False)
    decoded, _ = task.decode(responses(rows)[0])
    assert len(decoded[0]) == 24
    assert np.abs(decoded[0] * 200 - [100, 180]).sum(axis=1).min() < 1.5  # the arm's tip


def test_when_three_points_each_do_not_fit_the_largest_polygons_are_kept():
    task = SegmentationTask(VOCAB, seq_len=PROMPT + 20, max_points=128)  # <= 3 triangles
    radii = [5, 40, 10, 30, 20]
    polygons = [smooth_polygon((100, 100), r, 6) / 200 for r in radii]
    rows, stats = task.encode(make_example([polygons], [1], (200, 200)), training=False)
    decoded, _ = task.decode(responses(rows)[0])
    assert stats["instances_simplified"] == 1 and len(decoded) == 3
    kept_radii = [np.linalg.norm(p - 0.5, axis=1).mean() * 200 for p in decoded]
    np.testing.assert_allclose(kept_radii, [40, 30, 20], rtol=0.25)  # in the original order


def test_polygons_with_fewer_than_three_points_are_dropped_and_counted(task):
    line = np.array([[0.1, 0.1], [0.3, 0.3]], np.float32)
    triangle = np.array([[0.5, 0.5], [0.9, 0.5], [0.9, 0.9]], np.float32)
    example = make_example([[line, triangle], [line]], [1, 2], (100, 100))
    rows, stats = task.encode(example, training=False)
    assert stats["polygons_dropped"] == 2 and stats["no_polygon"] == 1
    np.testing.assert_array_equal(rows["instance_index"], [0])
    assert len(task.decode(responses(rows)[0])[0]) == 1


def test_crowd_objects_without_polygons_and_unknown_classes_are_skipped_and_counted(task):
    triangle = np.array([[0.5, 0.5], [0.9, 0.5], [0.9, 0.9]], np.float32)
    example = make_example([[], [triangle], [triangle]], [1, 10, 3], (100, 100), crowd=[0])
    rows, stats = task.encode(example, training=False)
    assert (stats["no_polygon"], stats["unknown_class"], stats["instances"]) == (1, 1, 1)
    np.testing.assert_array_equal(rows["instance_index"], [2])


def test_non_finite_boxes_and_polygons_are_skipped_and_counted(task):
    triangle = np.array([[0.5, 0.5], [0.9, 0.5], [0.9, 0.9]], np.float32)
    broken = triangle.copy()
    broken[1, 0] = np.nan
    example = make_example([[triangle], [broken, triangle], [triangle]], [1, 2, 3], (100, 100))
    example["objects"]["bbox"][0, 2] = np.inf
    example["objects"]["bbox"][1] = [0.5, 0.5, 0.9, 0.9]  # not the NaN of the broken polygon
    rows, stats = task.encode(example, training=False)
    assert (stats["invalid_boxes"], stats["polygons_dropped"], stats["instances"]) == (1, 1, 2)
    np.testing.assert_array_equal(rows["instance_index"], [1, 2])


def test_no_objects_give_zero_rows_and_are_counted(task):
    rows, stats = task.encode(make_example([], [], (50, 50)), training=False)
    assert rows["input_tokens"].shape == (0, 300) and rows["prompt_tokens"].shape == (0, 6)
    assert stats["no_instances"] == 1


def test_more_objects_than_max_instances_are_truncated_counted_and_sampled_in_training():
    task = SegmentationTask(VOCAB, seq_len=200, max_instances=3)
    example = random_scene((300, 300), num_objects=8, seed=5)
    rows, stats = task.encode(example, training=False)
    assert stats["instances_truncated"] == 5
    np.testing.assert_array_equal(rows["instance_index"], [0, 1, 2])
    picks = {
        tuple(
            task.encode(example, training=True, rng=np.random.default_rng(s))[0]["instance_index"]
        )
        for s in range(5)
    }
    assert len(picks) > 1


def test_inconsistent_polygon_layout_is_refused_with_the_fix():
    example = random_scene((100, 100), num_objects=2, seed=6)
    example["polygon_sizes"] = example["polygon_sizes"][:-1]
    with pytest.raises(ValueError, match="example 7: .*features.py"):
        SegmentationTask(VOCAB, seq_len=100).encode(example, training=False)


def test_decode_drops_malformed_tokens_and_short_polygons(task):
    triangle = list(VOCAB.coord_tokens(np.array([0.5, 0.5, 0.9, 0.5, 0.9, 0.9])))
    tokens = [*triangle[:3], 105, *triangle[3:], 1500, Vocab.SEPARATOR, 1100, 1200, 1300]
    polygons, stats = task.decode(np.array([*tokens, 0, 1100]))
    assert len(polygons) == 1 and len(polygons[0]) == 3
    # the class token, then the unpaired 1500, then the odd 1300 of the short polygon.
    assert stats == {"polygons": 1, "malformed_tokens": 3, "polygons_too_few_points": 1}


@pytest.fixture(scope="module")
def scenes():
    """Scenes of the package's own dataset, at its resolutions (48..640 px, any aspect)."""
    return [render_scene(scene_rng(0, "test", i), image_id=i).example for i in range(16)]


def test_round_trip_on_rendered_scenes_rasterises_every_instance_with_iou_above_0_9(scenes):
    task = SegmentationTask(Vocab(num_classes=len(CLASS_NAMES)), seq_len=300, max_points=128)
    ious, simplified = [], 0
    for example in scenes:
        height, width = example["image"].shape[:2]
        rows, stats = task.encode(example, training=False)
        simplified += stats["instances_simplified"]
        polygons = np.split(example["polygon_points"], np.cumsum(example["polygon_sizes"])[:-1])
        first = np.concatenate([[0], np.cumsum(example["objects"]["num_polygons"])])
        for row, index in enumerate(rows["instance_index"]):
            decoded, _ = task.decode(responses(rows)[row])
            truth = reference_rle(polygons[first[index] : first[index + 1]], height, width)
            ious.append(mask_utils.iou([polygons_to_rle(decoded, height, width)], [truth], [0]))
    assert len(ious) > 50 and simplified > 5  # the point budget was exercised
    assert min(ious) > 0.9


def test_average_masks_keeps_pixels_set_in_at_least_half_the_samples():
    """(Moved from tests/test_inference.py with the averaging, now the segmentation task's.)"""
    from navit_seq.tasks.segmentation import average_masks

    rng = np.random.default_rng(0)
    masks = rng.random((8, 5, 7)) < 0.5
    expected = masks.sum(axis=0) * 2 >= 8
    np.testing.assert_array_equal(average_masks(masks), expected)
    assert average_masks(masks[:1]).sum() == masks[0].sum()
