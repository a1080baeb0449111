"""Instance segmentation as token sequences, one row per object (Pix2Seq v2).

Prompt [seg ymin xmin ymax xmax class]; response the object's polygons as (y x) coordinate
pairs joined by SEPARATOR, at most `max_points` points in all, then END (`end_weight`).
Objects with more points keep their largest polygons, each simplified (Visvalingam-Whyatt).
Rows are [R, T], R = objects encoded (0..max_instances); `instance_index [R]` names them.

The task unit (`Segmentation`, registered as "segmentation"): at inference it needs "boxes"
(detected, or the ground truth's with `evaluation.use_gt_boxes`); each of the first
`evaluation.max_instances` boxes gets `evaluation.segm_samples` decoder rows, all reading the
image once, sampled at `segmentation_top_p`; the sampled masks are averaged and pixels kept
where >= 50% agree (Pix2Seq v2). Feeds COCO segm AP.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np
from pycocotools import mask as mask_utils

from navit_seq import tasks
from navit_seq.tasks.sequence import BOXES, CodecTask, View, task_options, vocab_from_config
from navit_seq.tasks.vocab import END, Vocab, build_row, response_until_end, stack_rows

MIN_POLYGON_POINTS = 3


@dataclasses.dataclass(frozen=True)
class SegmentationTask:
    """Encodes object polygons into rows and decodes generated tokens back into polygons."""

    vocab: Vocab
    seq_len: int  # T, tokens per row
    max_points: int = 128  # points per object (all its polygons together)
    max_instances: int = 100  # rows per image
    end_weight: float = 0.1

    PROMPT_LENGTH: ClassVar[int] = 6  # [seg y0 x0 y1 x1 class]
    STAT_KEYS: ClassVar[tuple[str, ...]] = (
        "examples",
        "instances",  # rows encoded
        "no_instances",  # examples left with no row
        "instances_truncated",  # more objects than max_instances
        "unknown_class",
        "invalid_boxes",  # non-finite box (the prompt needs one)
        "no_polygon",  # crowd (RLE only) or no usable polygon
        "polygons_dropped",  # polygons with < 3 points or non-finite coordinates
        "instances_simplified",  # more points than fit: outlines simplified, small polygons dropped
    )

    def __post_init__(self):
        if self.point_budget < MIN_POLYGON_POINTS:
            raise ValueError(
                f"SegmentationTask seq_len={self.seq_len}, max_points={self.max_points} hold no "
                f"polygon: need max_points >= 3 and seq_len >= {self.PROMPT_LENGTH + 6}."
            )

    @property
    def point_budget(self) -> int:
        """Points one row holds with a single polygon (each extra polygon costs a SEP)."""
        return min(self.max_points, (self.seq_len - self.PROMPT_LENGTH) // 2)

    def grammar(self) -> np.ndarray:
        """Allowed tokens after the prompt, bool [1, V]: coordinate, SEPARATOR or END."""
        tokens = np.arange(self.vocab.size)
        allowed = self.vocab.is_coord(tokens) | (tokens == Vocab.SEPARATOR) | (tokens == END)
        return allowed[None]

    def prompt(self, box: np.ndarray, label: int) -> np.ndarray:
        """[seg y0 x0 y1 x1 class] for a box (normalized, [4]) and a class index."""
        return np.concatenate(
            [
                [Vocab.SEGMENTATION_PROMPT],
                self.vocab.coord_tokens(np.asarray(box)),
                self.vocab.class_tokens(np.asarray([label])),
            ]
        ).astype(np.int32)

    def encode(
        self, example: dict[str, Any], *, training: bool, rng: np.random.Generator | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Example -> ({prompt_tokens [R, 6], input_tokens, target_tokens, token_weights
        [R, T], instance_index [R]}, stats). Training picks which objects to keep at random."""
        if training and rng is None:
            raise ValueError("SegmentationTask.encode(training=True) needs rng.")
        stats = dict.fromkeys(self.STAT_KEYS, 0)
        stats["examples"] = 1
        objects = example["objects"]
        boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
        labels = np.asarray(objects["label"], np.int64).reshape(-1)
        per_object = _polygons_per_object(example)

        candidates = []  # (object index, polygons)
        for index, polygons in enumerate(per_object):
            if not 0 <= labels[index] < self.vocab.num_classes:
                stats["unknown_class"] += 1
                continue
            if not np.isfinite(boxes[index]).all():
                stats["invalid_boxes"] += 1
                continue
            usable = [p for p in polygons if len(p) >= MIN_POLYGON_POINTS and np.isfinite(p).all()]
            stats["polygons_dropped"] += len(polygons) - len(usable)
            if not usable:
                stats["no_polygon"] += 1
                continue
            candidates.append((index, usable))
        if training:
            candidates = [candidates[i] for i in rng.permutation(len(candidates))]
        stats["instances_truncated"] = max(0, len(candidates) - self.max_instances)
        candidates = candidates[: self.max_instances]

        rows = []
        for index, polygons in candidates:
            fitted = self._fit(polygons)
            stats["instances_simplified"] += int(fitted is not polygons)
            response = _serialize(fitted, self.vocab)
            prompt = self.prompt(np.clip(boxes[index], 0.0, 1.0), labels[index])
            weights = np.ones(len(response), np.float32)
            rows.append(
                (prompt, *build_row(prompt, response, weights, self.seq_len, self.end_weight))
            )
        stats["instances"] = len(rows)
        stats["no_instances"] = int(not rows)
        out = stack_rows(rows, self.seq_len, self.PROMPT_LENGTH)
        out["instance_index"] = np.array([index for index, _ in candidates], np.int32)  # [R]
        return out, stats

    def decode(self, tokens: np.ndarray) -> tuple[list[np.ndarray], dict[str, int]]:
        """Generated tokens after the prompt [T'] -> (polygons, each [K, 2] normalized (y, x)
        in the image, stats). Non-coordinate tokens, an unpaired coordinate and polygons
        with < 3 points are dropped and counted."""
        tokens = response_until_end(tokens)
        stats = {"polygons": 0, "malformed_tokens": 0, "polygons_too_few_points": 0}
        polygons = []
        for part in np.split(tokens, np.flatnonzero(tokens == Vocab.SEPARATOR)):
            part = part[part != Vocab.SEPARATOR]
            is_coord = self.vocab.is_coord(part)
            coords = part[is_coord]
            stats["malformed_tokens"] += int((~is_coord).sum()) + len(coords) % 2
            points = self.vocab.token_coords(coords[: len(coords) // 2 * 2]).reshape(-1, 2)
            if len(points) >= MIN_POLYGON_POINTS:
                polygons.append(points)
            elif len(part):
                stats["polygons_too_few_points"] += 1
        stats["polygons"] = len(polygons)
        return polygons, stats

    def _fit(self, polygons: list[np.ndarray]) -> list[np.ndarray]:
        """The polygons themselves if they fit the row, else the largest ones that can keep
        3 points each, simplified to vertex counts in proportion to their sizes."""
        sizes = np.array([len(p) for p in polygons])

        def budget(count: int) -> int:  # points that fit next to count - 1 separators
            return min(self.max_points, (self.seq_len - self.PROMPT_LENGTH - count + 1) // 2)

        if sizes.sum() <= budget(len(polygons)):
            return polygons
        count = len(polygons)
        while MIN_POLYGON_POINTS * count > budget(count):
            count -= 1
        largest = np.argsort([-_area(p) for p in polygons], kind="stable")[:count]
        kept = [polygons[i] for i in sorted(largest)]
        counts = _allocate(np.array([len(p) for p in kept]), budget(count))
        return [_simplify(p, k) for p, k in zip(kept, counts, strict=True)]


def polygons_to_rle(polygons: Sequence[np.ndarray], height: int, width: int) -> dict:
    """Normalized (y, x) polygons -> one COCO RLE of their union at height x width pixels."""
    if not polygons:
        return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order="F"))[0]
    # pycocotools takes flat (x, y) pixel coordinates.
    scale = np.array([height, width], np.float64)
    flat = [(np.asarray(p, np.float64) * scale)[:, ::-1].reshape(-1).tolist() for p in polygons]
    return mask_utils.merge(mask_utils.frPyObjects(flat, height, width))


def _polygons_per_object(example: dict[str, Any]) -> list[list[np.ndarray]]:
    """The flat polygon layout of features.py -> per object, a list of [K, 2] arrays."""
    num_polygons = np.asarray(example["objects"]["num_polygons"], np.int64).reshape(-1)
    sizes = np.asarray(example["polygon_sizes"], np.int64).reshape(-1)
    points = np.asarray(example["polygon_points"], np.float32).reshape(-1, 2)
    num_objects = len(np.asarray(example["objects"]["label"]).reshape(-1))
    if (
        len(num_polygons) != num_objects
        or num_polygons.sum() != len(sizes)
        or sizes.sum() != len(points)
    ):
        raise ValueError(
            f"example {example.get('image_id')}: {num_objects} objects, {len(num_polygons)} "
            f"objects/num_polygons (sum {num_polygons.sum()}), {len(sizes)} polygon_sizes "
            f"(sum {sizes.sum()}), {len(points)} polygon_points; each sum must equal the next "
            "count: rebuild the dataset with the layout of navit_seq/data/features.py."
        )
    polygons = np.split(points, np.cumsum(sizes)[:-1]) if len(sizes) else []
    bounds = np.concatenate([[0], np.cumsum(num_polygons)])
    return [polygons[start:stop] for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]


def _serialize(polygons: list[np.ndarray], vocab: Vocab) -> np.ndarray:
    """y x y x ... SEP y x ... (int32)."""
    parts = []
    for i, polygon in enumerate(polygons):
        if i:
            parts.append(np.array([Vocab.SEPARATOR], np.int32))
        parts.append(vocab.coord_tokens(polygon).reshape(-1))
    return np.concatenate(parts)


def _area(polygon: np.ndarray) -> float:
    """Shoelace area (normalized units)."""
    y, x = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _allocate(sizes: np.ndarray, budget: int) -> np.ndarray:
    """Points per polygon: proportional to its size, >= 3, <= its size, summing <= budget."""
    counts = np.floor(sizes * budget / sizes.sum()).astype(np.int64)
    counts = np.clip(counts, MIN_POLYGON_POINTS, sizes)
    while counts.sum() > budget:  # the >= 3 floor can overshoot by a few points
        counts[np.argmax(counts)] -= 1
    return counts


def _simplify(polygon: np.ndarray, count: int) -> np.ndarray:
    """The polygon cut to `count` vertices by Visvalingam-Whyatt: repeatedly drop the vertex
    whose triangle with its two neighbours has the least area, so thin parts (limbs) survive
    where evenly spaced vertices would cut them. Hand-written: no installed library
    simplifies to a vertex count."""
    size = len(polygon)
    before, after = np.roll(np.arange(size), 1), np.roll(np.arange(size), -1)
    edge_in, edge_out = polygon - polygon[before], polygon[after] - polygon  # [K, 2]
    areas = 0.5 * np.abs(edge_in[:, 0] * edge_out[:, 1] - edge_in[:, 1] * edge_out[:, 0])  # [K]
    points, before, after = polygon.tolist(), before.tolist(), after.tolist()

    def triangle_area(i: int) -> float:  # Python floats: ~10x faster than numpy scalars here
        (y0, x0), (y1, x1), (y2, x2) = points[before[i]], points[i], points[after[i]]
        return 0.5 * abs((y1 - y0) * (x2 - x1) - (x1 - x0) * (y2 - y1))

    for _ in range(size - count):
        drop = int(np.argmin(areas))
        areas[drop] = np.inf
        left, right = before[drop], after[drop]
        after[left], before[right] = right, left
        areas[left], areas[right] = triangle_area(left), triangle_area(right)
    return polygon[np.isfinite(areas)]


def has_polygons(example: Mapping[str, Any]) -> bool:
    """An object outlined by a polygon (segmentation encodes polygons, not RLE-only masks)."""
    return bool((np.asarray(example["objects"]["num_polygons"]).reshape(-1) > 0).any())


def average_masks(masks: np.ndarray) -> np.ndarray:
    """Sampled binary masks [N, H, W] -> bool [H, W]: pixels set in at least half of them."""
    return np.asarray(masks, np.float32).mean(axis=0) >= 0.5


@dataclasses.dataclass(frozen=True)
class Segmentation(CodecTask):
    """Segmentation as one unit (module docstring); `codec` is a `SegmentationTask`."""

    name: ClassVar[str] = "segmentation"
    task_id: ClassVar[int] = 2
    annotations: ClassVar[tasks.Annotations] = tasks.Annotations(
        "object polygons (objects/num_polygons > 0; the 'segmentation' polygons of a "
        "COCO-format export's instances_<split>.json, RLE-only crowd masks do not count)",
        has_polygons,
    )
    metric: ClassVar[str] = "segm"
    needs: ClassVar[tuple[str, ...]] = (BOXES,)

    def max_prompts(self, options: ml_collections.ConfigDict) -> int:
        return options.max_instances * options.segm_samples

    def prompts(self, example, image, given, options) -> list[View]:
        """One view, the image: `segm_samples` rows per box (box by box)."""
        del example
        count = min(len(given["labels"]), options.max_instances)
        prompts = [
            self.codec.prompt(box, label)
            for box, label in zip(given["boxes"][:count], given["labels"][:count], strict=True)
        ]
        rows = np.repeat(np.reshape(prompts, (count, self.prompt_length)), options.segm_samples, 0)
        return [View(image, rows.astype(np.int32), context=options.segm_samples)]

    def predictions(
        self,
        example: Mapping[str, Any],
        views: Sequence[View],
        tokens: Sequence[np.ndarray],
        probs: Sequence[np.ndarray],
        given: Mapping[str, Any],
    ) -> dict[str, Any]:
        """masks: one COCO RLE (stored size) per given box, None past max_instances."""
        del example, probs
        (view,) = views
        height, width = view.pixels.shape[:2]
        samples = view.context
        masks: list = [None] * len(given["labels"])
        for box in range(len(view.prompts) // samples):
            sampled = np.stack(
                [
                    mask_utils.decode(polygons_to_rle(self.codec.decode(row)[0], height, width))
                    for row in tokens[0][box * samples : (box + 1) * samples]
                ]
            )  # [samples, H, W]
            masks[box] = mask_utils.encode(np.asfortranarray(average_masks(sampled), np.uint8))
        return {"masks": masks}

    def problems(self, options: ml_collections.ConfigDict, class_names: Sequence[str]) -> list[str]:
        least = [f"evaluation.segm_samples={options.segm_samples}; use at least 1"]
        return (least if options.segm_samples < 1 else []) + super().problems(options, class_names)


@tasks.register("segmentation")
def from_config(config: ml_collections.ConfigDict) -> Segmentation:
    codec = SegmentationTask(vocab_from_config(config), **task_options(config, SegmentationTask))
    return Segmentation(codec)
