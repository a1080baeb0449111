"""Aspect-preserving resize to a sampled resolution (NaViT §3.1) or to a token budget (eval).

A resolution is chosen as a patch grid (rows, cols); the image is resized to exactly
(rows * P, cols * P) pixels. "Side" means the LONGER side. Grid sides are the scaled sides
rounded to whole patches, so the aspect ratio is kept up to half a patch per side; a side that
would round to zero patches is stretched to one patch (counted as `thin_images_stretched`, e.g. a
1 x 4000 image). Annotations are (y, x) normalized by the image's own size (see
`features.py`), so resizing the whole image leaves them unchanged: they follow the pixels exactly.

Samplers (`config.kind`):
- `uniform_side` / `truncnorm_side`: longer side ~ U(min_side, max_side) / N(mean, std)
  truncated to [min_side, max_side], in pixels.
- `uniform_area` / `truncnorm_area`: area ~ U(min_side^2, max_side^2) / N(mean, std) truncated to
  the same range; `mean` and `std` are then in pixels^2.
- `token_budget`: the largest grid with rows * cols <= max_tokens (evaluation).
- `native`: the stored size, rounded to whole patches.
Any grid with more than `max_tokens` patches, or a side longer than `max_grid_side` patches (the
model's position table), is shrunk to fit (counted as `examples_resized`): no image is ever too
large for an empty sequence or for the position embedding.
"""

import ml_collections
import numpy as np
from PIL import Image

from navit_seq.data.token_drop import truncated_normal

SAMPLERS = (
    "uniform_side",
    "truncnorm_side",
    "uniform_area",
    "truncnorm_area",
    "token_budget",
    "native",
)


def default_resolution_config() -> ml_collections.ConfigDict:
    """NaViT's classification pretraining sampler: longer side ~ U(64, 256)."""
    return ml_collections.ConfigDict(
        {
            "kind": "uniform_side",
            "min_side": 64,
            "max_side": 256,
            "mean": 128.0,  # truncnorm_*: pixels for side, pixels^2 for area
            "std": 64.0,
        }
    )


def validate_resolution_config(config: ml_collections.ConfigDict) -> None:
    """Raise a ValueError naming the field and the fix for an unusable sampler."""
    if config.kind not in SAMPLERS:
        raise ValueError(f"data.resolution.kind={config.kind!r}; use one of {SAMPLERS}.")
    if not 0 < config.min_side <= config.max_side:
        raise ValueError(
            f"data.resolution min_side={config.min_side}, max_side={config.max_side}; "
            "need 0 < min_side <= max_side."
        )
    if config.kind.startswith("truncnorm") and config.std <= 0:
        raise ValueError(f"data.resolution.std={config.std}; use a positive value.")


def grid_for_scale(
    height: int, width: int, scale: np.ndarray | float, patch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of an image scaled by `scale`, rounded to whole patches (at least one)."""
    rows = np.maximum(1, np.rint(height * np.asarray(scale) / patch_size)).astype(np.int64)
    cols = np.maximum(1, np.rint(width * np.asarray(scale) / patch_size)).astype(np.int64)
    return rows, cols


def fit_to_token_budget(
    height: int, width: int, patch_size: int, max_tokens: int, max_grid_side: int = 0
) -> tuple[int, int]:
    """The largest aspect-preserving grid with rows * cols <= max_tokens and both sides at most
    `max_grid_side` patches (0: no limit)."""
    longer = max(height, width)
    # Candidate scales put the longer side at g patches, g = max..1; rows * cols grows with g,
    # so the first that fits is the largest.
    largest = min(max_tokens, max_grid_side) if max_grid_side > 0 else max_tokens
    longer_patches = np.arange(largest, 0, -1)  # [largest]
    rows, cols = grid_for_scale(height, width, longer_patches * patch_size / longer, patch_size)
    fits = np.flatnonzero(rows * cols <= max_tokens)
    return int(rows[fits[0]]), int(cols[fits[0]])


def sample_grid(
    config: ml_collections.ConfigDict,
    height: int,
    width: int,
    patch_size: int,
    max_tokens: int,
    rng: np.random.Generator,
    max_grid_side: int = 0,
) -> tuple[int, int, dict[str, int]]:
    """The patch grid an image of (height, width) is resized to, and what had to be adjusted.

    `max_grid_side` > 0 caps each side in patches (e.g. at the learned position table's size).
    """
    kind = config.kind
    lo, hi = float(config.min_side), float(config.max_side)
    counts = {"examples_resized": 0, "thin_images_stretched": 0}
    if kind == "token_budget":
        rows, cols = fit_to_token_budget(height, width, patch_size, max_tokens, max_grid_side)
    elif kind == "native":
        scale = 1.0
    elif kind == "uniform_side":
        scale = rng.uniform(lo, hi) / max(height, width)
    elif kind == "truncnorm_side":
        scale = truncated_normal(rng, config.mean, config.std, lo, hi) / max(height, width)
    elif kind == "uniform_area":
        scale = np.sqrt(rng.uniform(lo * lo, hi * hi) / (height * width))
    elif kind == "truncnorm_area":
        area = truncated_normal(rng, config.mean, config.std, lo * lo, hi * hi)
        scale = np.sqrt(area / (height * width))
    else:
        raise ValueError(f"data.resolution.kind={kind!r}; use one of {SAMPLERS}.")
    if kind != "token_budget":
        rows, cols = (int(x) for x in grid_for_scale(height, width, scale, patch_size))
        too_long = max_grid_side > 0 and max(rows, cols) > max_grid_side
        if rows * cols > max_tokens or too_long:
            rows, cols = fit_to_token_budget(height, width, patch_size, max_tokens, max_grid_side)
            counts["examples_resized"] = 1
    # The shorter side would have rounded to zero patches at this scale: stretched to one.
    counts["thin_images_stretched"] = int(
        min(height, width) * max(rows, cols) < 0.5 * max(height, width)
    )
    return rows, cols, counts


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize uint8 [H, W, 3] to [height, width, 3]; bilinear, antialiased when shrinking."""
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), resample=Image.Resampling.BILINEAR)
    return np.asarray(resized)  # [height, width, 3]


def clip_annotations(example: dict) -> tuple[dict, int]:
    """Clip normalized boxes and polygon vertices into the image, returning how many moved.

    Keypoints are left as they are: `features.py` allows labelled keypoints outside [0, 1].
    """
    num_clipped = 0
    objects = example.get("objects")
    if objects is not None and "bbox" in objects and len(objects["bbox"]):
        bbox = np.asarray(objects["bbox"], np.float32)  # [N, 4]
        clipped = np.clip(bbox, 0.0, 1.0)
        num_clipped += int(np.any(clipped != bbox, axis=-1).sum())
        example["objects"] = {**objects, "bbox": clipped}
    points = example.get("polygon_points")
    if points is not None and len(points):
        points = np.asarray(points, np.float32)  # [P, 2]
        clipped = np.clip(points, 0.0, 1.0)
        num_clipped += int(np.any(clipped != points, axis=-1).sum())
        example["polygon_points"] = clipped
    return example, num_clipped
