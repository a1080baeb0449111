"""Pixels to patch tokens: channel/dtype standardization, patchify, its inverse, and the
model's pixel scale (`unit_range`).

Patch pixel layout: (p_row, p_col, channel) row-major, uint8, so a patch reshapes back to
[P, P, 3]. Each patch keeps its (row, col) in the image's grid and the image keeps its (rows,
cols), so the model can compute absolute and fractional positions alike.
"""

import numpy as np

NUM_CHANNELS = 3
PIXEL_MAX = 255  # uint8 patches: 0 .. PIXEL_MAX


def unit_range(patches, dtype):
    """uint8 pixels (a numpy or JAX array) -> `dtype` values in [-1, 1]: 0 -> -1, 255 -> 1.

    The one place the data's pixel scale meets the model (NaViT's patch embedding calls it).
    """
    return patches.astype(dtype) / (PIXEL_MAX / 2) - 1.0


def standardize_pixels(image: np.ndarray, example_id: int) -> tuple[np.ndarray, dict[str, int]]:
    """Any supported image as uint8 [H, W, 3], and counts of the conversions made.

    Grayscale ([H, W] or [H, W, 1]) is repeated to 3 channels, RGBA drops alpha, 16-bit is
    scaled to 8 bits (value >> 8). Anything else, or a zero-sized image, raises a ValueError
    naming the example.
    """
    image = np.asarray(image)
    counts = {"grayscale_to_rgb": 0, "alpha_dropped": 0, "scaled_16bit": 0}
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"Example {example_id}: image shape {image.shape} is not [H, W] or [H, W, C] with "
            "C in (1, 3, 4); re-encode it as RGB."
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(
            f"Example {example_id}: image of zero size {image.shape[:2]}; remove the record or "
            "fix its image."
        )
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
        counts["scaled_16bit"] = 1
    elif image.dtype != np.uint8:
        raise ValueError(
            f"Example {example_id}: image dtype {image.dtype} is not uint8 or uint16; convert "
            "it to uint8 when building the dataset."
        )
    if image.shape[-1] == 1:
        image = np.repeat(image, NUM_CHANNELS, axis=-1)
        counts["grayscale_to_rgb"] = 1
    elif image.shape[-1] == 4:
        image = image[:, :, :NUM_CHANNELS]
        counts["alpha_dropped"] = 1
    return np.ascontiguousarray(image), counts


def patchify(image: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 [rows*P, cols*P, C] -> patches [rows*cols, P*P*C], coords [rows*cols, 2], grid [2]."""
    height, width, channels = image.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Image size {(height, width)} is not a multiple of patch_size={patch_size}; resize "
            "it with navit_seq.data.resolution first."
        )
    rows, cols = height // patch_size, width // patch_size
    patches = image.reshape(rows, patch_size, cols, patch_size, channels)
    patches = patches.transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)  # [N, P*P*C]
    patch_coords = np.stack(np.divmod(np.arange(rows * cols, dtype=np.int32), cols), -1)  # [N, 2]
    return patches, patch_coords, np.array([rows, cols], np.int32)


def unpatchify(
    patches: np.ndarray, patch_coords: np.ndarray, image_grid: np.ndarray, patch_size: int
) -> np.ndarray:
    """Inverse of `patchify` for any subset of patches; missing patches are zero."""
    rows, cols = (int(x) for x in image_grid)
    grid = np.zeros((rows, cols, patch_size, patch_size, NUM_CHANNELS), patches.dtype)
    grid[patch_coords[:, 0], patch_coords[:, 1]] = patches.reshape(
        -1, patch_size, patch_size, NUM_CHANNELS
    )
    return grid.transpose(0, 2, 1, 3, 4).reshape(rows * patch_size, cols * patch_size, -1)
