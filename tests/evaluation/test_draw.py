"""Drawing predictions and ground truth: pixels land where the normalized coordinates say."""

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from navit_seq.data import drawing
from navit_seq.evaluation import draw

NAMES = ("person", "circle")
HEIGHT, WIDTH = 80, 120  # not square: y scales by the height, x by the width


def black() -> np.ndarray:
    return np.zeros((HEIGHT, WIDTH, 3), np.uint8)


def rectangle_rle(y0: int, x0: int, y1: int, x1: int) -> dict:
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask_utils.encode(np.asfortranarray(mask))


def lit(picture: Image.Image, y: int, x: int) -> bool:
    return bool(np.asarray(picture)[y, x].any())


def test_box_outline_lands_on_the_box_edges_in_pixels_and_the_inside_stays_clear():
    prediction = {"boxes": np.array([[0.25, 0.5, 0.75, 0.75]]), "labels": [1], "scores": [0.9]}
    picture = draw.draw_prediction(black(), prediction, NAMES)
    assert picture.size == (WIDTH, HEIGHT)  # native resolution, no caption band
    # Box (y, x): rows 20..60, columns 60..90.
    assert lit(picture, 20, 75) and lit(picture, 60, 75)  # top and bottom edges
    assert lit(picture, 40, 60) and lit(picture, 40, 90)  # left and right edges
    assert not lit(picture, 40, 75)  # inside
    assert not lit(picture, 10, 30) and not lit(picture, 70, 100)  # outside


def test_mask_tints_exactly_its_pixels():
    prediction = {"masks": [rectangle_rle(10, 20, 30, 50), None]}  # None: not segmented
    pixels = np.asarray(draw.draw_prediction(black(), prediction, NAMES))
    tinted = pixels.any(-1)
    expected = np.zeros((HEIGHT, WIDTH), bool)
    expected[10:30, 20:50] = True
    np.testing.assert_array_equal(tinted, expected)


def test_mask_of_another_size_is_rejected_naming_both_sizes():
    rle = mask_utils.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))
    with pytest.raises(ValueError, match=r"masks\[0\] has size \[10, 10\] but the image is"):
        draw.draw_prediction(black(), {"masks": [rle]}, NAMES)


def test_keypoint_skeleton_joins_the_shoulders_and_skips_unfound_points():
    keypoints = np.zeros((1, 17, 3), np.float32)
    keypoints[0, 5] = (0.5, 0.25, 0.9)  # left shoulder at (40, 30)
    keypoints[0, 6] = (0.5, 0.75, 0.9)  # right shoulder at (40, 90); skeleton edge (6, 7)
    keypoints[0, 7] = (0.1, 0.1, 0.0)  # left elbow not found: no point, no edge
    picture = draw.draw_prediction(black(), {"keypoints": keypoints}, NAMES)
    assert lit(picture, 40, 30) and lit(picture, 40, 90) and lit(picture, 40, 60)
    assert not lit(picture, 8, 12)  # the elbow
    assert not lit(picture, 24, 21)  # halfway shoulder -> elbow


def test_objects_below_the_score_threshold_are_not_drawn():
    prediction = {"boxes": np.array([[0.25, 0.5, 0.75, 0.75]]), "labels": [0], "scores": [0.2]}
    picture = draw.draw_prediction(black(), prediction, NAMES, min_score=0.5)
    assert not np.asarray(picture).any()


def test_caption_is_written_in_a_band_below_the_image():
    picture = draw.draw_prediction(black(), {"caption": "a red circle"}, NAMES)
    pixels = np.asarray(picture)
    assert picture.width == WIDTH and picture.height > HEIGHT
    assert not pixels[:HEIGHT].any() and pixels[HEIGHT:].any()


def test_per_object_keys_of_different_lengths_are_rejected():
    with pytest.raises(ValueError, match="different lengths"):
        draw.draw_prediction(black(), {"boxes": np.zeros((2, 4)), "labels": [0]}, NAMES)


def test_ground_truth_is_drawn_at_native_resolution_with_its_box():
    example = {
        "image": black(),
        "objects": {
            "bbox": np.array([[0.25, 0.5, 0.75, 0.75]], np.float32),
            "label": np.array([1]),
            "mask_rle": np.array([b""], object),
            "num_polygons": np.array([0]),
            "keypoints": np.zeros((1, 17, 3), np.float32),
        },
        "polygon_points": np.zeros((0, 2), np.float32),
        "polygon_sizes": np.zeros((0,), np.int32),
        "captions": np.array(["one circle"], object),
    }
    picture = draw.draw_ground_truth(example, NAMES)
    assert picture.width == WIDTH and picture.height > HEIGHT  # caption band
    assert lit(picture, 20, 75) and lit(picture, 40, 60) and not lit(picture, 40, 75)


def test_prediction_drawn_at_a_display_side_scales_the_picture_not_the_labels():
    prediction = {"boxes": np.array([[0.25, 0.5, 0.75, 0.75]]), "labels": [1], "scores": [0.9]}
    picture = draw.draw_prediction(black(), prediction, NAMES, side=2 * max(HEIGHT, WIDTH))
    assert picture.size == (2 * WIDTH, 2 * HEIGHT)
    pixels = np.asarray(picture)
    assert pixels[2 * HEIGHT // 2, round(2 * WIDTH * 0.5)].any()  # the box edge, scaled
    assert not pixels[2 * HEIGHT // 2, round(2 * WIDTH * 0.6)].any()  # inside the box


def test_grid_puts_each_picture_in_its_cell(tmp_path):
    red = Image.new("RGB", (40, 20), (255, 0, 0))
    blue = Image.new("RGB", (20, 40), (0, 0, 255))
    path = drawing.save_grid([[red, blue], [blue]], tmp_path / "grid.png", cell_side=64)
    sheet = np.asarray(Image.open(path))
    assert sheet.shape == (128, 128, 3)
    assert tuple(sheet[10, 10]) == (255, 0, 0)  # red, scaled to 64 x 32
    assert tuple(sheet[10, 70]) == (0, 0, 255)  # blue, scaled to 32 x 64
    assert tuple(sheet[100, 70]) == drawing.GRID_BACKGROUND  # row 2 has one picture


def test_prediction_grid_shows_prediction_then_ground_truth_per_image(tmp_path):
    example = {
        "image": np.full((HEIGHT, WIDTH, 3), 200, np.uint8),
        "objects": {
            "bbox": np.zeros((0, 4), np.float32),
            "label": np.zeros((0,), np.int64),
            "mask_rle": np.zeros((0,), object),
            "num_polygons": np.zeros((0,), np.int32),
            "keypoints": np.zeros((0, 17, 3), np.float32),
        },
        "polygon_points": np.zeros((0, 2)),
        "polygon_sizes": np.zeros((0,), np.int32),
        "captions": np.array([], object),
    }
    path = draw.save_prediction_grid(
        [example] * 3, [{}, {}, {}], NAMES, tmp_path / "grid.png", pairs_per_row=2
    )
    sheet = np.asarray(Image.open(path))
    cell, top = drawing.GRID_CELL_SIDE, drawing.TEXT_LINE_HEIGHT + 4  # the column titles' band
    shown_height = round(cell * min(HEIGHT, WIDTH) / max(HEIGHT, WIDTH))
    # Two pairs in the first grid row, one in the second; pictures drawn at the cell size.
    assert sheet.shape == (top + 2 * shown_height, 4 * cell, 3)
    for y, x in ((top + 5, 5), (top + 5, cell + 5), (top + 5, 3 * cell + 5), (-5, cell + 5)):
        assert tuple(sheet[y, x]) == (200, 200, 200)
    assert tuple(sheet[-5, 2 * cell + 5]) == drawing.GRID_BACKGROUND  # no third pair
    assert tuple(sheet[top // 2, 3 * cell - 5]) == drawing.GRID_BACKGROUND  # title band
    with pytest.raises(ValueError, match="2 examples but 1 predictions"):
        draw.save_prediction_grid([example] * 2, [{}], NAMES, tmp_path / "bad.png")
