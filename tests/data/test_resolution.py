"""Resolution sampling, token-budget fit, resize and annotation handling."""

import ml_collections
import numpy as np
import pytest

from navit_seq.data import resolution

PATCH = 16


def sampler(kind: str, **overrides) -> ml_collections.ConfigDict:
    config = resolution.default_resolution_config()
    config.kind = kind
    config.update(overrides)
    return config


@pytest.mark.parametrize("kind", ["uniform_side", "truncnorm_side"])
def test_side_samplers_keep_longer_side_in_bounds_and_aspect_ratio(kind):
    rng = np.random.default_rng(0)
    config = sampler(kind)
    for _ in range(300):
        height, width = rng.integers(20, 1200, size=2)
        rows, cols, _ = resolution.sample_grid(config, height, width, PATCH, 10_000, rng)
        longer = max(rows, cols) * PATCH
        assert config.min_side - PATCH / 2 <= longer <= config.max_side + PATCH / 2
        # One scale s explains both sides: each is side * s / P rounded to whole patches.
        low = max((rows - 0.5) * PATCH / height, (cols - 0.5) * PATCH / width)
        high = min((rows + 0.5) * PATCH / height, (cols + 0.5) * PATCH / width)
        assert low <= high + 1e-9 or min(rows, cols) == 1  # 1: a thin side stretched


def test_uniform_side_longer_side_is_uniform_between_bounds():
    rng = np.random.default_rng(1)
    config = sampler("uniform_side")
    longer = [
        max(resolution.sample_grid(config, 1600, 1600, PATCH, 10_000, rng)[:2]) * PATCH
        for _ in range(4000)
    ]
    # U(64, 256) rounded to multiples of 16: mean 160, std 96 / sqrt(3) ~ 55.4 (plus rounding).
    assert np.mean(longer) == pytest.approx(160, abs=3)
    assert np.std(longer) == pytest.approx(55.4, abs=3)


def test_uniform_area_samples_area_uniformly():
    rng = np.random.default_rng(2)
    config = sampler("uniform_area")
    areas = []
    for _ in range(4000):
        rows, cols, _ = resolution.sample_grid(config, 1600, 1600, PATCH, 10_000, rng)
        areas.append(rows * cols * PATCH * PATCH)
    assert np.mean(areas) == pytest.approx((64**2 + 256**2) / 2, rel=0.03)


def test_token_budget_is_the_largest_grid_that_fits():
    for height, width in [(480, 640), (100, 3000), (333, 333), (1, 4000), (1000, 17)]:
        rows, cols = resolution.fit_to_token_budget(height, width, PATCH, 256)
        # Independent reference: scan scales finely, keep the biggest grid within the budget.
        scales = np.linspace(1e-4, 300 * PATCH / max(height, width), 200_000)
        ref_rows, ref_cols = resolution.grid_for_scale(height, width, scales, PATCH)
        tokens = ref_rows * ref_cols
        assert rows * cols <= 256
        assert rows * cols == tokens[tokens <= 256].max()


def test_grid_larger_than_budget_is_shrunk_and_counted():
    rng = np.random.default_rng(0)
    rows, cols, counts = resolution.sample_grid(sampler("native"), 3000, 4000, PATCH, 256, rng)
    assert rows * cols <= 256 and (rows, cols) == resolution.fit_to_token_budget(
        3000, 4000, PATCH, 256
    )
    assert counts["examples_resized"] == 1


def test_thin_image_is_stretched_to_one_patch_and_counted():
    rng = np.random.default_rng(0)
    rows, cols, counts = resolution.sample_grid(sampler("uniform_side"), 1, 4000, PATCH, 256, rng)
    assert rows == 1 and 4 <= cols <= 16
    assert counts["thin_images_stretched"] == 1


def test_resize_keeps_a_box_at_the_same_normalized_coordinates():
    height, width = 300, 500
    box = np.array([0.2, 0.3, 0.6, 0.9])  # (ymin, xmin, ymax, xmax) normalized
    image = np.zeros((height, width, 3), np.uint8)
    y0, x0, y1, x1 = (box * [height, width, height, width]).astype(int)
    image[y0:y1, x0:x1] = 255
    rng = np.random.default_rng(0)
    rows, cols, _ = resolution.sample_grid(sampler("uniform_side"), height, width, PATCH, 256, rng)
    resized = resolution.resize_image(image, rows * PATCH, cols * PATCH)
    bright_y, bright_x = np.nonzero(resized[..., 0] > 127)
    found = np.array(
        [
            bright_y.min() / resized.shape[0],
            bright_x.min() / resized.shape[1],
            (bright_y.max() + 1) / resized.shape[0],
            (bright_x.max() + 1) / resized.shape[1],
        ]
    )
    # Within one output pixel of where the normalized annotation says.
    tolerance = 1.0 / min(resized.shape[:2]) + 1e-6
    np.testing.assert_allclose(found, box, atol=tolerance)


def test_annotations_outside_the_image_are_clipped_and_counted():
    example = {
        "objects": {"bbox": np.array([[-0.1, 0.2, 0.5, 1.3], [0.1, 0.1, 0.2, 0.2]], np.float32)},
        "polygon_points": np.array([[0.5, 0.5], [1.2, 0.4]], np.float32),
    }
    example, num_clipped = resolution.clip_annotations(example)
    assert num_clipped == 2  # one box, one vertex
    np.testing.assert_allclose(example["objects"]["bbox"][0], [0.0, 0.2, 0.5, 1.0])
    np.testing.assert_allclose(example["polygon_points"][1], [1.0, 0.4])


def test_unknown_sampler_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="uniform_side"):
        resolution.validate_resolution_config(sampler("bogus"))


@pytest.mark.parametrize("kind", ["token_budget", "native"])
def test_long_side_is_capped_at_max_grid_side_and_counted(kind):
    rng = np.random.default_rng(0)
    rows, cols, counts = resolution.sample_grid(
        sampler(kind), 48, 640, PATCH, 64, rng, max_grid_side=16
    )
    assert (rows, cols) == (1, 16)
    assert counts["examples_resized"] == (kind == "native")
