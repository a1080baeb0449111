"""Training augmentations that move the pixels and every annotation with them.

`flip_left_right` mirrors an example of the `features.py` structure: the image, boxes, polygon
vertices, RLE masks and keypoints (whose left and right joints also swap names, as COCO's
flip does), so a flipped example is exactly the example of the mirrored scene. Resolution
sampling (`resolution.py`) is the scale augmentation; an aspect-preserving resize moves no
normalized annotation.

Pixel (i, j) covers [j, j + 1) in x (features.py), so the mirror maps x to W - x, and a
normalized x to 1 - x (flipping twice gives back the example, up to float32 rounding of
the coordinates; pixels and masks exactly).
"""

import ml_collections
import numpy as np
from pycocotools import mask as mask_utils

from navit_seq.data.features import KEYPOINT_NAMES

# The COCO keypoint that each keypoint becomes in the mirror image (left <-> right).
MIRRORED_KEYPOINTS = np.array(
    [
        KEYPOINT_NAMES.index(
            name.replace("left_", "@").replace("right_", "left_").replace("@", "right_")
        )
        for name in KEYPOINT_NAMES
    ]
)


def default_augment_config() -> ml_collections.ConfigDict:
    """`data.augment`: off by default (NaViT pretraining uses none; Pix2Seq flips)."""
    return ml_collections.ConfigDict({"flip_left_right": 0.0})  # probability per example


def validate_augment_config(config: ml_collections.ConfigDict) -> None:
    if not 0.0 <= config.flip_left_right <= 1.0:
        raise ValueError(
            f"data.augment.flip_left_right={config.flip_left_right}; use a probability in [0, 1]."
        )


def _flip_rle(counts: bytes, height: int, width: int) -> bytes:
    if not counts:  # no mask (detection-only data)
        return counts
    mask = mask_utils.decode({"size": [height, width], "counts": counts})  # [H, W] uint8
    return mask_utils.encode(np.asfortranarray(mask[:, ::-1]))["counts"]


def flip_left_right(example: dict) -> dict:
    """The mirror image of `example` (module docstring); other fields are kept as they are."""
    image = np.asarray(example["image"])
    height, width = image.shape[:2]
    flipped = {**example, "image": np.ascontiguousarray(image[:, ::-1])}
    objects = example.get("objects")
    if objects is not None:
        objects = dict(objects)
        if "bbox" in objects:
            box = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)  # [N, 4]
            objects["bbox"] = np.stack(
                [box[:, 0], 1.0 - box[:, 3], box[:, 2], 1.0 - box[:, 1]], axis=1
            )
        if "mask_rle" in objects:
            rles = np.empty(len(objects["mask_rle"]), dtype=object)
            rles[:] = [_flip_rle(bytes(c), height, width) for c in objects["mask_rle"]]
            objects["mask_rle"] = rles
        if "keypoints" in objects:
            points = np.asarray(objects["keypoints"], np.float32)  # [N, 17, 3] (y, x, v)
            points = points[:, MIRRORED_KEYPOINTS].copy()
            labelled = points[..., 2] > 0
            points[..., 1] = np.where(labelled, 1.0 - points[..., 1], points[..., 1])
            objects["keypoints"] = points
        flipped["objects"] = objects
    if "polygon_points" in example:
        points = np.asarray(example["polygon_points"], np.float32).reshape(-1, 2)  # [P, (y, x)]
        flipped["polygon_points"] = np.stack([points[:, 0], 1.0 - points[:, 1]], axis=1)
    return flipped
