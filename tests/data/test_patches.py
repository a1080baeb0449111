"""Patchify layout, its inverse, and pixel standardization of unusual images."""

import numpy as np
import pytest

from navit_seq.data import patches

PATCH = 4


def test_patchify_matches_per_patch_slicing():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3 * PATCH, 5 * PATCH, 3), dtype=np.uint8)
    tokens, coords, grid = patches.patchify(image, PATCH)
    assert tokens.shape == (15, PATCH * PATCH * 3) and grid.tolist() == [3, 5]
    for token, (row, col) in zip(tokens, coords, strict=True):
        block = image[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH]
        np.testing.assert_array_equal(token, block.reshape(-1))  # (p_row, p_col, channel)
    assert coords.tolist() == [[r, c] for r in range(3) for c in range(5)]


def test_unpatchify_restores_any_subset_of_patches():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (2 * PATCH, 3 * PATCH, 3), dtype=np.uint8)
    tokens, coords, grid = patches.patchify(image, PATCH)
    np.testing.assert_array_equal(patches.unpatchify(tokens, coords, grid, PATCH), image)
    kept = [0, 4]
    partial = patches.unpatchify(tokens[kept], coords[kept], grid, PATCH)
    np.testing.assert_array_equal(partial[:PATCH, :PATCH], image[:PATCH, :PATCH])
    assert not partial[:PATCH, PATCH : 2 * PATCH].any()


def test_image_size_not_a_multiple_of_the_patch_raises():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patches.patchify(np.zeros((5, 8, 3), np.uint8), PATCH)


@pytest.mark.parametrize(
    ("image", "count"),
    [
        (np.full((6, 7), 9, np.uint8), "grayscale_to_rgb"),
        (np.full((6, 7, 1), 9, np.uint8), "grayscale_to_rgb"),
        (np.full((6, 7, 4), 9, np.uint8), "alpha_dropped"),
        (np.full((6, 7, 3), 9 * 256 + 200, np.uint16), "scaled_16bit"),
    ],
)
def test_unusual_images_become_rgb_uint8_and_are_counted(image, count):
    rgb, counts = patches.standardize_pixels(image, example_id=3)
    assert rgb.shape == (6, 7, 3) and rgb.dtype == np.uint8
    assert (rgb == 9).all()
    assert counts[count] == 1 and sum(counts.values()) == 1


def test_zero_size_image_raises_naming_the_example():
    with pytest.raises(ValueError, match="Example 12: image of zero size"):
        patches.standardize_pixels(np.zeros((0, 5, 3), np.uint8), example_id=12)


def test_float_image_raises_naming_dtype_and_fix():
    with pytest.raises(ValueError, match="float32 is not uint8 or uint16; convert"):
        patches.standardize_pixels(np.zeros((5, 5, 3), np.float32), example_id=0)


def test_unit_range_maps_uint8_pixels_to_minus_one_one_in_numpy_and_jax():
    import jax.numpy as jnp

    pixels = np.array([0, 64, 255], np.uint8)
    expected = [-1.0, 64 / 127.5 - 1.0, 1.0]
    np.testing.assert_allclose(patches.unit_range(pixels, np.float32), expected, rtol=1e-6)
    in_jax = patches.unit_range(jnp.asarray(pixels), jnp.bfloat16)
    assert in_jax.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(in_jax, np.float32), expected, atol=1e-2)
