"""Token labels: the class of the object under each patch, a dense recognition target for the
encoder (after Jiang et al. 2021, "All Tokens Matter: Token Labeling for Training Better Vision
Transformers"), for recipes whose decoder alone teaches recognition too slowly.

Pix2Seq trains its encoder only through the decoder's tokens: one class token per object, read
through cross-attention that must itself be learned. A token label gives every patch of every
object a class target of its own (`loss.token_label_weight`, navit_seq.train.sequence).

The labels of one packed image are a per-slot target `token_label_grid [G, G]` int32 over the
patch grid (G = `data.max_grid_side`), not a per-token array: token dropping and packing move
tokens, but each keeps its `patch_coords`, so the label of a packed token is
`grid[slot, row, col]` on the device (navit_seq.losses.token_labels): the packer needs no new
field.

A cell holds 1 + the class of the smallest-area box containing the patch centre, 0 where no
box does (background), IGNORE outside the image's grid and for views that are not the whole
image (a keypoint crop: the boxes are in the example's frame). Boxes, not masks: a box corner
outside a round object is labelled with the object, but no mask has to be decoded per image in
the input pipeline; crowd regions and unknown classes label nothing.
"""

import numpy as np

TARGET_KEY = "token_label_grid"
IGNORE = -1


def target_spec(max_grid_side: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The per-slot target the pipeline adds when `data.token_labels` is on."""
    return {TARGET_KEY: ((max_grid_side, max_grid_side), np.dtype(np.int32))}


def label_grid(
    objects: dict, num_classes: int, rows: int, cols: int, max_grid_side: int
) -> np.ndarray:
    """Example objects (`bbox` [N, 4] normalized (y, x), `label` [N], optional `is_crowd`) and
    the image's patch grid (rows x cols) -> int32 [G, G] (module docstring)."""
    grid = np.full((max_grid_side, max_grid_side), IGNORE, np.int32)
    boxes = np.asarray(objects.get("bbox", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    labels = np.asarray(objects.get("label", np.zeros(0)), np.int64).reshape(-1)
    is_crowd = np.asarray(objects.get("is_crowd", np.zeros(len(labels), bool)), bool)
    keep = (labels >= 0) & (labels < num_classes) & ~is_crowd & np.isfinite(boxes).all(axis=1)
    boxes, labels = boxes[keep], labels[keep]
    centre_y = (np.arange(rows) + 0.5) / rows  # [rows]
    centre_x = (np.arange(cols) + 0.5) / cols  # [cols]
    inside = (  # [N, rows, cols]
        (boxes[:, 0, None, None] <= centre_y[None, :, None])
        & (centre_y[None, :, None] < boxes[:, 2, None, None])
        & (boxes[:, 1, None, None] <= centre_x[None, None, :])
        & (centre_x[None, None, :] < boxes[:, 3, None, None])
    )
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [N]
    cells = np.zeros((rows, cols), np.int32)  # background
    if len(labels):
        # The smallest box containing the centre wins: a small object drawn inside a larger one.
        area_where_inside = np.where(inside, area[:, None, None], np.inf)
        smallest = np.argmin(area_where_inside, axis=0)  # [rows, cols]
        covered = inside.any(axis=0)
        cells = np.where(covered, labels[smallest] + 1, 0).astype(np.int32)
    grid[:rows, :cols] = cells
    return grid


def ignored_grid(max_grid_side: int) -> np.ndarray:
    """The target of a view without token labels (every cell IGNORE)."""
    return np.full((max_grid_side, max_grid_side), IGNORE, np.int32)
