"""Pictures of predictions and ground truth at the image's native resolution (PIL).

A prediction (`navit_seq.inference`) is `{"image_id", "boxes" [N, 4] (ymin, xmin, ymax, xmax)
normalized, "labels" [N], "scores" [N], "masks" [N] COCO RLE dicts at the stored image size
(None: not segmented), "keypoints" [N, 17, 3] (y, x, score) normalized, "caption" str}`; any
key may be missing.
Ground truth is a decoded example (docs/architecture.md §1), drawn by
`navit_seq.data.drawing.draw_annotations` (also the builders' `--show` picture) plus its first
caption.
"""

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from navit_seq.data.drawing import (
    GRID_CELL_SIDE,
    TEXT_COLOUR,
    TEXT_LINE_HEIGHT,
    colour_of,
    draw_annotations,
    save_grid,
)
from navit_seq.data.features import KEYPOINT_SKELETON, NUM_KEYPOINTS

MASK_OPACITY = 0.45  # share of the instance colour in a masked pixel
KEYPOINT_RADIUS = 2  # pixels
SKELETON_COLOUR = (255, 255, 255)
KEYPOINT_COLOUR = (0, 255, 0)
TEXT_BAND_COLOUR = (0, 0, 0)
PER_OBJECT_KEYS = ("boxes", "labels", "scores", "masks", "keypoints")
PAIRS_PER_ROW = 2  # (prediction, ground truth) pairs side by side in a prediction grid


def _decode_mask(rle: Mapping[str, Any], height: int, width: int, index: int) -> np.ndarray:
    """A COCO RLE dict -> bool [H, W]; its size must be the image's stored size."""
    size = [int(s) for s in rle["size"]]
    if size != [height, width]:
        raise ValueError(
            f"prediction masks[{index}] has size {size} but the image is {[height, width]}; "
            "masks must be RLE at the image's stored resolution (as navit_seq.inference writes)."
        )
    counts = rle["counts"]
    counts = counts.encode() if isinstance(counts, str) else counts  # JSON stores str
    return mask_utils.decode({"size": size, "counts": counts}).astype(bool)


def _check_lengths(prediction: Mapping[str, Any]) -> int:
    """Number of objects N; every per-object key must have N entries."""
    lengths = {key: len(prediction[key]) for key in PER_OBJECT_KEYS if key in prediction}
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"prediction {prediction.get('image_id')!r} has per-object keys of different "
            f"lengths {lengths}; every one must hold one entry per object."
        )
    return next(iter(lengths.values()), 0)


def _draw_caption(picture: Image.Image, caption: str) -> Image.Image:
    """The picture with `caption` in a band below it (the band as wide as the picture)."""
    width = picture.width
    # Wrap by characters: the default font is ~6 px per character.
    per_line = max(1, width // 6)
    lines = [caption[i : i + per_line] for i in range(0, len(caption), per_line)] or [""]
    framed = Image.new("RGB", (width, picture.height + TEXT_LINE_HEIGHT * len(lines) + 2),
                       TEXT_BAND_COLOUR)  # fmt: skip
    framed.paste(picture, (0, 0))
    canvas = ImageDraw.Draw(framed)
    for i, line in enumerate(lines):
        canvas.text((2, picture.height + 1 + i * TEXT_LINE_HEIGHT), line, fill=TEXT_COLOUR)
    return framed


def _display_size(height: int, width: int, side: int | None) -> tuple[int, int]:
    """PIL (width, height) of an image shown with its long side at `side` (None: native)."""
    scale = 1.0 if side is None else side / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def draw_prediction(
    image: np.ndarray,
    prediction: Mapping[str, Any],
    class_names: Sequence[str],
    min_score: float = 0.0,
    min_keypoint_score: float = 0.0,
    side: int | None = None,
) -> Image.Image:
    """Image uint8 [H, W, 3] with the prediction drawn: masks tinted, boxes with "class score",
    keypoint skeletons, and the caption in a band below. `side`: the long side in pixels the
    image is shown at before anything is drawn on it, so labels keep their size (None: native)."""
    height, width = image.shape[:2]
    size = _display_size(height, width, side)
    num_objects = _check_lengths(prediction)
    scores = np.asarray(prediction.get("scores", np.ones(num_objects)), np.float32)
    shown = np.flatnonzero(scores >= min_score)
    shown_image = Image.fromarray(image).resize(size, Image.BILINEAR) if side else image
    tinted = np.asarray(shown_image, np.float32)  # [h, w, 3] at the display size
    for i in shown if "masks" in prediction else ():
        if prediction["masks"][i] is None:  # inference segments only the first boxes
            continue
        mask = _decode_mask(prediction["masks"][i], height, width, i)  # [H, W] stored size
        if side:
            mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
        colour = np.asarray(colour_of(i), np.float32)
        tinted[mask] = (1 - MASK_OPACITY) * tinted[mask] + MASK_OPACITY * colour
    picture = Image.fromarray(tinted.astype(np.uint8))
    canvas = ImageDraw.Draw(picture)
    to_xy = lambda yx: [(float(x * size[0]), float(y * size[1])) for y, x in yx]  # noqa: E731
    for i in shown if "keypoints" in prediction else ():
        keypoints = np.asarray(prediction["keypoints"][i], np.float32)  # [17, 3] (y, x, score)
        if keypoints.shape != (NUM_KEYPOINTS, 3):
            raise ValueError(
                f"prediction keypoints[{i}] has shape {keypoints.shape}; expected "
                f"({NUM_KEYPOINTS}, 3) (y, x, score) normalized."
            )
        found = keypoints[:, 2] > min_keypoint_score
        points = to_xy(keypoints[:, :2])
        for a, b in KEYPOINT_SKELETON:  # 1-based COCO indices
            if found[a - 1] and found[b - 1]:
                canvas.line([points[a - 1], points[b - 1]], fill=SKELETON_COLOUR, width=1)
        for k in np.flatnonzero(found):
            x, y = points[k]
            r = KEYPOINT_RADIUS
            canvas.ellipse((x - r, y - r, x + r, y + r), fill=KEYPOINT_COLOUR)
    for i in shown if "boxes" in prediction else ():
        colour = colour_of(i)
        (x0, y0), (x1, y1) = to_xy(np.asarray(prediction["boxes"][i], np.float32).reshape(2, 2))
        canvas.rectangle((x0, y0, x1, y1), outline=colour, width=2 if side else 1)
        label = ""
        if "labels" in prediction:
            label = class_names[int(prediction["labels"][i])]
        if "scores" in prediction:
            label = f"{label} {scores[i]:.2f}".strip()
        canvas.text((x0 + 2, y0 + 1), label, fill=colour)
    if "caption" in prediction:
        picture = _draw_caption(picture, str(prediction["caption"]))
    return picture


def draw_ground_truth(
    example: Mapping[str, Any], class_names: Sequence[str], side: int | None = None
) -> Image.Image:
    """A decoded example's annotations (long side at `side`, None: native), its first caption
    below."""
    picture = draw_annotations(dict(example), class_names, side=side)
    captions = example.get("captions", ())
    return _draw_caption(picture, str(captions[0])) if len(captions) else picture


def save_prediction_grid(
    examples: Sequence[Mapping[str, Any]],
    predictions: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    min_score: float = 0.0,
    pairs_per_row: int = PAIRS_PER_ROW,
) -> str:
    """A grid of (prediction, ground truth) pairs, `pairs_per_row` images per grid row, each
    drawn with its long side at GRID_CELL_SIDE so labels stay legible. Returns the path."""
    if len(examples) != len(predictions):
        raise ValueError(
            f"save_prediction_grid: {len(examples)} examples but {len(predictions)} predictions; "
            "give one prediction per example, in the same order."
        )
    side = GRID_CELL_SIDE
    cells = []
    for example, prediction in zip(examples, predictions, strict=True):
        cells.append(draw_prediction(example["image"], prediction, class_names, min_score,
                                     side=side))  # fmt: skip
        cells.append(draw_ground_truth(example, class_names, side=side))
    per_row = 2 * pairs_per_row
    rows = [cells[i : i + per_row] for i in range(0, len(cells), per_row)]
    titles = ["prediction", "ground truth"] * min(pairs_per_row, len(examples))
    return save_grid(rows, path, side, scale=False, column_titles=titles)
