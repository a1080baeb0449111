"""Scene annotations checked against independent references (pycocotools rasterisation)."""

import dataclasses
import re

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from navit_seq.data import resolution, scene_render
from navit_seq.data.builders.scenes import SceneTextures
from navit_seq.data.scene_render import CLASS_NAMES, COLOUR_NAMES, SceneSpec

NUM_SCENES = 60
DEFAULT_SPEC = SceneSpec()


def _render(index: int, spec: SceneSpec = DEFAULT_SPEC, split: str = "train") -> dict:
    return scene_render.render_scene(scene_render.scene_rng(7, split, index), spec).example


@pytest.fixture(scope="module")
def scenes() -> list[dict]:
    return [_render(i) for i in range(NUM_SCENES)]


def _masks(example: dict) -> np.ndarray:
    height, width = example["image"].shape[:2]
    rles = [{"size": [height, width], "counts": c} for c in example["objects"]["mask_rle"]]
    return mask_utils.decode(rles).astype(bool).transpose(2, 0, 1)  # [N, H, W]


def _polygons_by_object(example: dict) -> list[list[np.ndarray]]:
    """Per object, its polygons in pixels (y, x)."""
    height, width = example["image"].shape[:2]
    ends = np.cumsum(example["polygon_sizes"])
    polygons = np.split(example["polygon_points"] * [height, width], ends[:-1])
    per_object = np.split(np.arange(len(ends)), np.cumsum(example["objects"]["num_polygons"]))
    return [[polygons[i] for i in indices] for indices in per_object[:-1]]


def _colour_and_label(phrase: str) -> tuple[int, int]:
    words = re.findall(r"[a-z]+", phrase)
    colour = next(COLOUR_NAMES.index(w) for w in words if w in COLOUR_NAMES)
    label = next(CLASS_NAMES.index(w) for w in words if w in CLASS_NAMES)
    return label, colour


def test_polygons_rasterised_by_pycocotools_match_the_stored_masks(scenes):
    ious = []
    for example in scenes:
        height, width = example["image"].shape[:2]
        for mask, polygons in zip(_masks(example), _polygons_by_object(example), strict=True):
            coco_polygons = [p[:, ::-1].ravel().tolist() for p in polygons]  # COCO: x, y
            drawn = mask_utils.decode(
                mask_utils.merge(mask_utils.frPyObjects(coco_polygons, height, width))
            ).astype(bool)
            ious.append((drawn & mask).sum() / (drawn | mask).sum())
    assert len(ious) > 100
    assert min(ious) > 0.9, sorted(ious)[:5]
    assert np.mean(ious) > 0.99


def test_trace_polygons_reproduces_a_mask_with_holes_and_two_parts():
    mask = np.zeros((40, 50), bool)
    yy, xx = np.mgrid[:40, :50]
    mask |= (yy - 18) ** 2 + (xx - 18) ** 2 < 15**2  # a disc ...
    mask &= ~((yy - 16) ** 2 + (xx - 20) ** 2 < 5**2)  # ... with a round hole
    mask[20:24, 9:13] = False  # and a square hole
    mask[5:30, 40:46] = True  # a second part
    polygons = scene_render.trace_polygons(mask)
    assert len(polygons) == 2
    coco_polygons = [p[:, ::-1].ravel().tolist() for p in polygons]
    drawn = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(coco_polygons, 40, 50)))
    assert (drawn.astype(bool) != mask).sum() <= 2


def test_boxes_are_the_tight_boxes_of_the_masks(scenes):
    for example in scenes:
        height, width = example["image"].shape[:2]
        for mask, box in zip(_masks(example), example["objects"]["bbox"], strict=True):
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            expected = [rows[0] / height, cols[0] / width, (rows[-1] + 1) / height,
                        (cols[-1] + 1) / width]  # fmt: skip
            np.testing.assert_allclose(box, expected, atol=1e-6)


def test_area_is_the_mask_pixel_count_and_masks_do_not_overlap(scenes):
    for example in scenes:
        masks = _masks(example)
        np.testing.assert_array_equal(example["objects"]["area"], masks.sum((1, 2)))
        assert masks.sum(0).max() <= 1  # each pixel shows one object at most


def test_visible_keypoints_lie_on_their_figure_and_occluded_ones_under_a_later_object(scenes):
    checked_visible = checked_occluded = 0
    for example in scenes:
        height, width = example["image"].shape[:2]
        masks = _masks(example)
        for index, keypoints in enumerate(example["objects"]["keypoints"]):
            for y, x, visibility in keypoints:
                if visibility == 0:
                    continue
                row, col = int(y * height), int(x * width)
                if visibility == 2:
                    assert masks[index, row, col]
                    checked_visible += 1
                else:
                    assert not masks[index, row, col]
                    assert masks[index + 1 :, row, col].any()
                    checked_occluded += 1
    assert checked_visible > 50 and checked_occluded > 3


def test_keypoints_of_a_lone_figure_are_all_on_it_or_outside_the_image():
    lone = SceneSpec(min_objects=1, max_objects=1)
    figures = 0
    for index in range(80):
        example = _render(index, lone)
        objects = example["objects"]
        if len(objects["label"]) == 0 or objects["label"][0] != 0:
            continue
        figures += 1
        mask = _masks(example)[0]
        height, width = mask.shape
        for y, x, visibility in objects["keypoints"][0]:
            assert visibility in (0, 2)  # nothing can occlude a lone figure
            if visibility == 2:
                assert mask[int(y * height), int(x * width)]
    assert figures >= 5


def test_unlabelled_keypoints_are_zero_and_labelled_ones_inside_the_image(scenes):
    seen_unlabelled_person_point = False
    for example in scenes:
        objects = example["objects"]
        keypoints = objects["keypoints"]
        labelled = keypoints[..., 2] > 0
        np.testing.assert_array_equal(keypoints[~labelled], 0)
        assert np.all((keypoints[labelled][:, :2] >= 0) & (keypoints[labelled][:, :2] < 1))
        np.testing.assert_array_equal(objects["num_keypoints"], labelled.sum(1))
        assert not labelled[objects["label"] != 0].any()  # only persons have keypoints
        seen_unlabelled_person_point |= (~labelled[objects["label"] == 0]).any()
    assert seen_unlabelled_person_point  # some figures leave the picture


def test_every_caption_names_every_annotated_class(scenes):
    for example in scenes:
        for caption in example["captions"]:
            for label in set(example["objects"]["label"]):
                names = {CLASS_NAMES[label], scene_render.noun(label, 2)}
                assert any(re.search(rf"\b{n}\b", caption) for n in names), (caption, names)


def test_captions_vary_in_wording(scenes):
    for example in scenes:
        assert len(set(example["captions"])) == len(example["captions"]) == 5


def test_phrases_name_each_object_class(scenes):
    for example in scenes:
        for label, phrase in zip(
            example["objects"]["label"], example["objects"]["phrase"], strict=True
        ):
            assert _colour_and_label(phrase)[0] == label


def test_heldout_spec_draws_only_heldout_combinations_and_seen_spec_none():
    heldout = {(label, scene_render.heldout_colour(label)) for label in range(len(CLASS_NAMES))}
    assert len({colour for _, colour in heldout}) == len(COLOUR_NAMES)  # every colour used
    for index in range(30):
        for split, spec in (("train", SceneSpec()), ("heldout", SceneSpec(combos="heldout"))):
            example = _render(index, spec, split)
            combos = {_colour_and_label(p) for p in example["objects"]["phrase"]}
            assert (combos <= heldout) if split == "heldout" else not (combos & heldout)


@pytest.mark.parametrize("fill", ["colour", "texture"])
def test_same_seed_split_and_index_give_identical_scenes(fill):
    spec = DEFAULT_SPEC if fill == "colour" else SceneSpec(**SceneTextures.SPEC)
    first, again = _render(3, spec), _render(3, spec)
    assert first["image"].tobytes() == again["image"].tobytes()
    assert list(first["objects"]["mask_rle"]) == list(again["objects"]["mask_rle"])
    assert first["captions"] == again["captions"]
    other = _render(4, spec)
    assert first["image"].shape != other["image"].shape or not np.array_equal(
        first["image"], other["image"]
    )


def test_image_sides_and_aspect_ratios_stay_within_the_spec(scenes):
    spec = SceneSpec()
    sides = np.array([example["image"].shape[:2] for example in scenes])  # [S, 2] (H, W)
    assert sides.min() >= spec.min_side and sides.max() <= spec.max_side
    ratio = sides[:, 0] / sides[:, 1]
    assert ratio.max() <= spec.max_aspect_ratio * 1.02 and ratio.min() >= 1 / 3.06
    assert ratio.max() > 2 and ratio.min() < 0.5  # both orientations, far from square
    narrow = SceneSpec(min_side=60, max_side=80)
    for index in range(20):
        height, width = _render(index, narrow)["image"].shape[:2]
        assert 60 <= min(height, width) and max(height, width) <= 80


def test_objects_per_scene_follow_the_spec(scenes):
    counts = [len(example["objects"]["label"]) for example in scenes]
    assert max(counts) <= 10 and min(counts) >= 1
    assert max(counts) >= 7  # busy scenes occur


@pytest.mark.parametrize(
    "options, message",
    [
        ({"min_side": 100, "max_side": 50}, "min_side"),
        ({"max_aspect_ratio": 0.5}, "max_aspect_ratio"),
        ({"min_objects": 0}, "min_objects"),
        ({"combos": "unseen"}, "combos"),
    ],
)
def test_bad_scene_spec_is_refused_naming_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        SceneSpec(**options)


def test_backgrounds_and_person_share_follow_the_spec():
    plain_only = SceneSpec(backgrounds=("plain",), person_probability=0.0, max_objects=1)
    for index in range(20):
        example = _render(index, plain_only)
        assert 0 not in example["objects"]["label"]
        image = example["image"].reshape(-1, 3)
        owner_free = ~_masks(example).any(0).reshape(-1)  # background pixels
        assert len(np.unique(image[owner_free], axis=0)) == 1  # plain: one colour
    with pytest.raises(ValueError, match="backgrounds"):
        SceneSpec(backgrounds=("woodgrain",))
    with pytest.raises(ValueError, match="person_probability"):
        SceneSpec(person_probability=1.5)


# ----------------------------------------------------------------------------- textures

# The scene_textures variant as built for its recipe (--min-side 128 --max-side 256).
TEXTURE_SPEC = SceneSpec(min_side=128, max_side=256, **SceneTextures.SPEC)
FFT_SIDE = 1024  # zero-padded transform: peaks located to 1/1024 cycle per pixel
# Periods per longer image side, and the line angles (degrees anticlockwise from horizontal, as
# seen) of the waves whose fundamentals each class's spectrum must show, read off the class
# names: an axis-aligned checkerboard is the sum of two diagonal waves (cos a cos b), one turned
# by 45 degrees (diamonds) of a horizontal and a vertical one, hexagonal dots of three.
PERIODS_PER_SIDE = {"fine": 32, "coarse": 8}
EXPECTED_LINE_ANGLES = {
    "fine_horizontal_stripes": (0,),
    "fine_rising_stripes": (45,),
    "fine_vertical_stripes": (90,),
    "fine_falling_stripes": (135,),
    "fine_checks": (45, 135),
    "fine_diamonds": (0, 90),
    "coarse_shallow_rising_stripes": (22.5,),
    "coarse_steep_rising_stripes": (67.5,),
    "coarse_steep_falling_stripes": (112.5,),
    "coarse_shallow_falling_stripes": (157.5,),
    "coarse_light_dots": (0, 60, 120),
    "coarse_dark_dots": (0, 60, 120),
}
ALL_LINE_ANGLES = sorted({a for angles in EXPECTED_LINE_ANGLES.values() for a in angles})


@pytest.fixture(scope="module")
def textured() -> list[dict]:
    return [_render(i, TEXTURE_SPEC) for i in range(72)]  # six of each class on average


def _texture_class(example: dict) -> str:
    (label,) = example["objects"]["label"]
    return scene_render.TEXTURE_NAMES[label]


def _grey(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def _angle_gap(a, b):
    """Distance between line angles in degrees, modulo 180."""
    return np.abs((np.asarray(a) - b + 90) % 180 - 90)


def _object_spectrum(image: np.ndarray, mask: np.ndarray):
    """(|FFT|, frequency in cycles/px, line angle as seen in degrees) of the grey pixels of
    `image` under `mask`, their mean removed and zero elsewhere, zero-padded to FFT_SIDE."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    window = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    grey = _grey(image)[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    signal = np.where(window, grey - grey[window].mean(), 0.0)
    magnitude = np.abs(np.fft.fft2(signal, s=(FFT_SIDE, FFT_SIDE)))
    fy = np.fft.fftfreq(FFT_SIDE)[:, None]  # rows: y points down
    fx = np.fft.fftfreq(FFT_SIDE)[None, :]
    # A wave along (fy, fx) has its lines across it: as seen (y up), at atan2(-fy, fx) + 90.
    line_angle = (np.degrees(np.arctan2(-fy, fx)) + 90) % 180
    return magnitude, np.hypot(fy, fx), line_angle


def test_texture_spectrum_peaks_at_the_class_period_and_line_angles(textured):
    seen = set()
    for example in textured:
        name = _texture_class(example)
        seen.add(name)
        magnitude, frequency, line_angle = _object_spectrum(example["image"], _masks(example)[0])
        period = max(example["image"].shape[:2]) / PERIODS_PER_SIDE[name.split("_")[0]]
        magnitude[frequency < 0.01] = 0  # below any class's frequency: the object's outline
        peak = np.unravel_index(np.argmax(magnitude), magnitude.shape)
        # The dominant frequency is the class's: its period within the 0.9-1.1 jitter, give or
        # take 3% (a coarse texture spans only a few periods: broad peaks).
        assert 0.87 * period <= 1 / frequency[peak] <= 1.13 * period, (name, 1 / frequency[peak])
        assert _angle_gap(EXPECTED_LINE_ANGLES[name], line_angle[peak]).min() < 3, name
        ring = np.abs(frequency - frequency[peak]) < 0.15 * frequency[peak]
        for angle in ALL_LINE_ANGLES:
            near = ring & (_angle_gap(line_angle, angle) < 3)
            strength = magnitude[near].max() / magnitude[peak]
            if angle in EXPECTED_LINE_ANGLES[name]:
                assert strength > 0.7, (name, angle, strength)  # each of its waves is there
            elif _angle_gap(EXPECTED_LINE_ANGLES[name], angle).min() >= 30:
                assert strength < 0.35, (name, angle, strength)  # and no other
    assert seen == set(scene_render.TEXTURE_NAMES)


def _interior(example: dict, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The image resized (as the pipeline does) to longer side `side`, and its pixels wholly
    inside the object, one pixel in from the outline."""
    height, width = example["image"].shape[:2]
    size = (round(height * side / max(height, width)), round(width * side / max(height, width)))
    image = resolution.resize_image(example["image"], *size)
    mask = Image.fromarray(_masks(example)[0].astype(np.uint8) * 255)
    inside = np.asarray(mask.resize(size[::-1], Image.Resampling.BILINEAR)) == 255
    inside[1:-1, 1:-1] &= (
        inside[:-2, 1:-1] & inside[2:, 1:-1] & inside[1:-1, :-2] & inside[1:-1, 2:]
    )
    return image, inside


def test_fine_textures_average_to_the_midtone_at_a_quarter_of_the_test_side_coarse_ones_stay(
    textured,
):
    for example in textured:
        name = _texture_class(example)
        full, inside_full = _interior(example, 128)
        quarter, inside_quarter = _interior(example, 32)
        grey_full, grey_quarter = _grey(full)[inside_full], _grey(quarter)[inside_quarter]
        dark, light = np.percentile(grey_full, [2, 98])
        contrast = grey_quarter.std() / grey_full.std()
        if name.startswith("fine"):
            assert contrast < 0.2, (name, contrast)  # the pattern is gone ...
            # ... to halfway between its tones: the same for every fine texture of a colour.
            assert abs(grey_quarter.mean() - (dark + light) / 2) < 0.06 * (light - dark), name
        else:
            assert contrast > 0.5, (name, contrast)


def test_light_dots_cover_a_quarter_of_the_object_dark_dots_three_quarters(textured):
    for example in textured:
        name = _texture_class(example)
        grey = _grey(example["image"])[_masks(example)[0]]
        light_share = (grey > (grey.min() + grey.max()) / 2).mean()
        expected = {"coarse_light_dots": (0.15, 0.35), "coarse_dark_dots": (0.65, 0.85)}
        low, high = expected.get(name, (0.4, 0.6))  # stripes, checks, diamonds: half and half
        assert low < light_share < high, (name, light_share)


def test_texture_classes_are_equally_likely():
    small = dataclasses.replace(TEXTURE_SPEC, min_side=32, max_side=40)
    labels = [_render(i, small)["objects"]["label"][0] for i in range(1200)]
    counts = np.bincount(labels, minlength=len(scene_render.TEXTURE_NAMES))
    assert len(counts) == 12 and 70 <= counts.min() and counts.max() <= 130, counts  # 100 each


def test_texture_scenes_hold_one_annotated_object_named_by_its_texture(textured):
    for example in textured:
        objects = example["objects"]
        assert len(objects["label"]) == 1 and not objects["keypoints"].any()
        words = _texture_class(example).replace("_", " ")
        assert objects["phrase"][0].endswith(f" with {words}")
        assert all(words in caption for caption in example["captions"]), example["captions"]
        (mask,) = _masks(example)
        height, width = mask.shape
        ymin, xmin, ymax, xmax = objects["bbox"][0] * [height, width, height, width]
        # Large: 0.6-0.95 of the short side across (its circumscribed circle), and a box's
        # longer side is at least 1/sqrt(2) of the longest chord (>= 0.95 of that, pentagons).
        assert max(ymax - ymin, xmax - xmin) > 0.4 * min(height, width)
        background = example["image"][~mask]
        assert len(np.unique(background, axis=0)) == 1  # plain: one colour


def test_unknown_fill_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="SceneSpec.fill='paint'"):
        SceneSpec(fill="paint")


def test_a_left_right_flip_turns_rising_stripes_into_falling_ones(textured):
    """Why configs/navit_textures.py does not flip: a flip changes the class."""
    flipped = 0
    for example in textured:
        name = _texture_class(example)
        if name in ("fine_rising_stripes", "coarse_steep_rising_stripes"):
            mirror = _object_spectrum(example["image"][:, ::-1], _masks(example)[0][:, ::-1])
            magnitude, frequency, line_angle = mirror
            magnitude[frequency < 0.01] = 0
            (rising,) = EXPECTED_LINE_ANGLES[name]
            falling = {45: "fine_falling_stripes", 67.5: "coarse_steep_falling_stripes"}[rising]
            assert EXPECTED_LINE_ANGLES[falling] == (180 - rising,)
            assert _angle_gap(line_angle.flat[np.argmax(magnitude)], 180 - rising) < 3, name
            flipped += 1
    assert flipped >= 4
