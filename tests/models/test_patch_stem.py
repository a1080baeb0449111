"""The convolutional patch stem (model.patch_embedding='conv'): each patch's output equals a
float64 numpy convolution of that patch's pixels cut from the image (so the patch layout and
the stem's reshape agree), packed forward equals each image alone, bad patch sizes refused."""

import jax
import numpy as np
import pytest
from flax import nnx

from navit_seq.data.patches import patchify
from navit_seq.models.navit import ConvPatchStem, NaViT, default_model_config

PATCH, WIDTH = 8, 16


def numpy_conv_same_stride2(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x [H, W, C_in], kernel [3, 3, C_in, C_out] -> [H/2, W/2, C_out]; 'SAME' padding at
    stride 2 on an even side pads one row/column after (XLA's convention)."""
    height, width, _ = x.shape
    padded = np.pad(x, ((0, 1), (0, 1), (0, 0)))
    out = np.zeros((height // 2, width // 2, kernel.shape[-1]))
    for i in range(height // 2):
        for j in range(width // 2):
            window = padded[2 * i : 2 * i + 3, 2 * j : 2 * j + 3]  # [3, 3, C_in]
            out[i, j] = np.einsum("hwc,hwco->o", window, kernel) + bias
    return out


def gelu(x: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.gelu(x.astype(np.float64)))


def test_each_patch_is_the_numpy_convolution_of_its_pixels():
    stem = ConvPatchStem(PATCH, 3, WIDTH, dtype=np.float32, param_dtype=np.float32,
                         rngs=nnx.Rngs(0))  # fmt: skip
    image = np.random.default_rng(0).integers(0, 256, (2 * PATCH, 3 * PATCH, 3), np.uint8)
    patches, coords, _ = patchify(image, PATCH)  # [6, P*P*3], [6, 2]
    pixels = patches.astype(np.float32) / 127.5 - 1.0
    got = np.asarray(stem(pixels))  # [6, WIDTH]
    for patch_index, (row, col) in enumerate(coords):
        x = image[row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] / 127.5 - 1
        for conv in stem.convs:
            x = gelu(numpy_conv_same_stride2(x, np.asarray(conv.kernel[...], np.float64),
                                             np.asarray(conv.bias[...], np.float64)))  # fmt: skip
        want = x.reshape(-1) @ np.asarray(stem.output.kernel[...], np.float64) + np.asarray(
            stem.output.bias[...], np.float64
        )
        np.testing.assert_allclose(got[patch_index], want, rtol=1e-4, atol=1e-5)


def test_packed_forward_with_the_conv_stem_matches_each_image_alone():
    config = default_model_config()
    config.update(dict(width=WIDTH, depth=1, num_heads=2, mlp_dim=32, patch_size=PATCH,
                       patch_embedding="conv", pooling="mean"))  # fmt: skip
    config.posemb.max_len = 4
    model = NaViT(config, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    grids = [(2, 3), (3, 2)]
    images = [rng.integers(0, 256, (r * c, PATCH * PATCH * 3), np.uint8) for r, c in grids]

    def batch_of(parts, length=16):
        batch = {
            "patches": np.zeros((1, length, PATCH * PATCH * 3), np.uint8),
            "segment_ids": np.zeros((1, length), np.int32),
            "patch_coords": np.zeros((1, length, 2), np.int32),
            "image_grid": np.zeros((1, 2, 2), np.int32),
            "example_valid": np.zeros((1, 2), bool),
        }
        start = 0
        for slot, (patches, (rows, cols)) in enumerate(parts):
            n = rows * cols
            yx = np.stack(np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij"), -1)
            batch["patches"][0, start : start + n] = patches
            batch["segment_ids"][0, start : start + n] = slot + 1
            batch["patch_coords"][0, start : start + n] = yx.reshape(n, 2)
            batch["image_grid"][0, slot] = (rows, cols)
            batch["example_valid"][0, slot] = True
            start += n
        return batch

    packed = model(batch_of(list(zip(images, grids, strict=True))), deterministic=True)
    start = 0
    for slot, (patches, grid) in enumerate(zip(images, grids, strict=True)):
        alone = model(batch_of([(patches, grid)]), deterministic=True)
        n = len(patches)
        np.testing.assert_allclose(
            packed["tokens"][0, start : start + n], alone["tokens"][0, :n], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(packed["pooled"][0, slot], alone["pooled"][0, 0], atol=1e-5)
        start += n


@pytest.mark.parametrize("patch_size", [2, 6, 12])
def test_patch_sizes_that_are_not_powers_of_two_from_four_are_refused(patch_size):
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        ConvPatchStem(patch_size, 3, WIDTH, dtype=np.float32, param_dtype=np.float32,
                      rngs=nnx.Rngs(0))  # fmt: skip


def test_unknown_patch_embedding_is_refused():
    config = default_model_config()
    config.update(dict(width=WIDTH, depth=1, num_heads=2, mlp_dim=32, patch_size=PATCH,
                       patch_embedding="mlp"))  # fmt: skip
    with pytest.raises(ValueError, match="model.patch_embedding='mlp'"):
        NaViT(config, rngs=nnx.Rngs(0))
