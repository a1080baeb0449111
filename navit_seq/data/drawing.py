"""Annotated pictures of decoded examples and PNG grids (PIL): the builders' `--show` picture
and the ground-truth half of `navit_seq.evaluation.draw`'s prediction grids."""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from navit_seq.data.features import KEYPOINT_SKELETON

# Distinct outline colours for annotations (not the scene palette, so they stand out).
ANNOTATION_COLOURS = (
    (255, 255, 255), (0, 0, 0), (255, 0, 255), (0, 255, 0), (255, 128, 0), (0, 160, 255),
    (255, 255, 0), (128, 0, 255), (0, 255, 200), (255, 0, 0),
)  # fmt: skip
GRID_CELL_SIDE = 320  # pictures of a grid are drawn or scaled to this long side
GRID_BACKGROUND = (32, 32, 32)
TEXT_COLOUR = (255, 255, 255)
TEXT_LINE_HEIGHT = 12  # PIL's default bitmap font is ~11 px tall


def colour_of(index: int) -> tuple[int, int, int]:
    return ANNOTATION_COLOURS[index % len(ANNOTATION_COLOURS)]


def draw_annotations(
    example: dict[str, Any], names: Sequence[str], side: int | None = GRID_CELL_SIDE
) -> Image.Image:
    """The image with masks tinted, polygons, boxes, class names and keypoints drawn, its long
    side scaled to `side` pixels (None: the native resolution)."""
    image = example["image"]
    height, width = image.shape[:2]
    scale = 1.0 if side is None else side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL (w, h)
    objects = example["objects"]
    tinted = image.astype(np.float32)
    for i, counts in enumerate(objects["mask_rle"]):
        if counts:
            mask = mask_utils.decode({"size": [height, width], "counts": counts}).astype(bool)
            colour = np.asarray(colour_of(i), np.float32)
            tinted[mask] = 0.55 * tinted[mask] + 0.45 * colour
    picture = Image.fromarray(tinted.astype(np.uint8)).resize(size, Image.NEAREST)
    canvas = ImageDraw.Draw(picture)
    to_xy = lambda yx: [(float(x * size[0]), float(y * size[1])) for y, x in yx]
    start = 0
    polygon_owner = np.repeat(np.arange(len(objects["label"])), objects["num_polygons"])
    for owner, count in zip(polygon_owner, example["polygon_sizes"], strict=True):
        points = to_xy(example["polygon_points"][start : start + count])
        colour = colour_of(owner)
        canvas.line([*points, points[0]], fill=colour, width=1)
        start += count
    for i, label in enumerate(objects["label"]):
        colour = colour_of(i)
        (x0, y0), (x1, y1) = to_xy(objects["bbox"][i].reshape(2, 2))
        canvas.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        canvas.text((x0 + 2, y0 + 1), names[label], fill=colour)
        keypoints = objects["keypoints"][i]
        labelled = keypoints[:, 2] > 0
        points = to_xy(keypoints[:, :2])
        for a, b in KEYPOINT_SKELETON:  # 1-based COCO indices
            if labelled[a - 1] and labelled[b - 1]:
                canvas.line([points[a - 1], points[b - 1]], fill=(255, 255, 255), width=1)
        for k in np.flatnonzero(labelled):
            x, y = points[k]
            fill = (0, 255, 0) if keypoints[k, 2] == 2 else (255, 0, 0)  # visible / occluded
            canvas.ellipse((x - 3, y - 3, x + 3, y + 3), fill=fill, outline=(0, 0, 0))
    return picture


def save_grid(
    rows: Sequence[Sequence[Image.Image]],
    path: str | os.PathLike,
    cell_side: int = GRID_CELL_SIDE,
    *,
    scale: bool = True,
    column_titles: Sequence[str] = (),
) -> str:
    """Saves pictures as a PNG grid (`rows` of pictures), columns `cell_side` wide. `scale`:
    each picture is scaled so its long side is `cell_side` (every row `cell_side` tall);
    False: pasted as they are (drawn at that size already), each row as tall as its tallest.
    `column_titles` are written in a band above the first row. Returns the path."""
    if not rows or not all(rows):
        raise ValueError(f"save_grid: got {len(rows)} rows, some empty; give at least one picture.")
    if scale:
        rows = [[_scaled(picture, cell_side) for picture in row] for row in rows]
    columns = max(len(row) for row in rows)
    heights = [max(cell_side if scale else 0, *(p.height for p in row)) for row in rows]
    top = TEXT_LINE_HEIGHT + 4 if column_titles else 0
    sheet = Image.new("RGB", (columns * cell_side, top + sum(heights)), GRID_BACKGROUND)
    canvas = ImageDraw.Draw(sheet)
    for c, title in enumerate(column_titles):
        canvas.text((c * cell_side + 4, 2), title, fill=TEXT_COLOUR)
    y = top
    for row, height in zip(rows, heights, strict=True):
        for c, picture in enumerate(row):
            sheet.paste(picture, (c * cell_side, y))
        y += height
    path = os.fspath(path)
    sheet.save(path)
    return path


def _scaled(picture: Image.Image, side: int) -> Image.Image:
    factor = side / max(picture.size)
    size = (max(1, round(picture.width * factor)), max(1, round(picture.height * factor)))
    return picture.resize(size, Image.NEAREST)
