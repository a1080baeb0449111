"""Person keypoints as token sequences on a crop around each person (Pix2Seq v2).

Each person with at least one labelled keypoint gets a crop: its box scaled by `crop_scale`
(2x by default) about its centre, clipped to the image and aligned to whole pixels. In that
crop's normalized coordinates: prompt [kp y0 x0 y1 x1 class], response 17 (y x) pairs in COCO
order, an unlabelled point (v = 0) as INVISIBLE INVISIBLE weighing `invisible_weight`, then END
(`end_weight`). Rows are [R, T] with `crop_box [R, 4]` (normalized in the image) telling the
pipeline which pixels each row sees; decode maps points back to image coordinates.

The task unit (`Keypoints`, registered as "keypoints") makes those crops itself (`views`): in
training one packed image per person with its row; at inference it needs "boxes" and gives
each of the first `evaluation.max_instances` boxes of a class in `evaluation.keypoint_classes`
one crop and one row, 17 coordinate pairs decoded with INVISIBLE masked out (the model's best
coordinate guess). Feeds COCO keypoints AP.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np

from navit_seq import tasks
from navit_seq.tasks.sequence import (
    BOXES,
    CROP_BOX,
    DECODER_ROWS,
    CodecTask,
    DecodeSettings,
    View,
    decoder_rows,
    task_options,
    vocab_from_config,
)
from navit_seq.tasks.vocab import Vocab, build_row, response_until_end, stack_rows

NUM_KEYPOINTS = 17  # COCO person keypoints (navit_seq.data.features.KEYPOINT_NAMES)
RESPONSE_LENGTH = 2 * NUM_KEYPOINTS
PIXEL_TOLERANCE = 1e-3  # float32 rounding of normalized coordinates, in pixels
DECODED_VISIBILITY = 2  # a generated coordinate pair is reported as COCO "visible"


@dataclasses.dataclass(frozen=True)
class KeypointTask:
    """Encodes persons' keypoints into per-person rows and decodes them back."""

    vocab: Vocab
    seq_len: int  # T, tokens per row
    crop_scale: float = 2.0  # crop side / box side (Pix2Seq v2: ~9 AP over near-full images)
    max_instances: int = 100  # rows per image
    invisible_weight: float = 0.1
    end_weight: float = 0.1

    PROMPT_LENGTH: ClassVar[int] = 6  # [kp y0 x0 y1 x1 class]
    STAT_KEYS: ClassVar[tuple[str, ...]] = (
        "examples",
        "instances",  # rows encoded
        "no_instances",  # examples left with no row
        "instances_truncated",  # more persons than max_instances
        "unknown_class",
        "no_keypoints",  # objects whose keypoints are all unlabelled (v = 0)
        "invalid_boxes",  # non-finite box
        "keypoints_clipped",  # labelled points outside the crop, moved onto its border
        "invalid_keypoints",  # labelled points with non-finite coordinates, made unlabelled
    )

    def __post_init__(self):
        needed = self.PROMPT_LENGTH + RESPONSE_LENGTH
        if self.seq_len < needed:
            raise ValueError(f"KeypointTask seq_len={self.seq_len}: need >= {needed}.")
        if self.crop_scale < 1.0:
            raise ValueError(
                f"KeypointTask crop_scale={self.crop_scale}: must be >= 1 (the crop holds "
                "the box; 2.0 in Pix2Seq v2)."
            )

    def crop_box(self, box: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """The crop [4] (normalized (y0, x0, y1, x1) in the image, whole pixels, >= 1 pixel)
        around a normalized box, scaled by `crop_scale` about its centre, clipped to the image."""
        size = np.tile(np.asarray(image_size, np.float64), 2)  # [H, W, H, W]
        box = np.asarray(box, np.float64)
        centre, half = (box[:2] + box[2:]) / 2, (box[2:] - box[:2]) * self.crop_scale / 2
        # Rounded outwards to whole pixels; edges within PIXEL_TOLERANCE of one stay on it.
        low = np.floor((centre - half) * size[:2] + PIXEL_TOLERANCE)
        high = np.ceil((centre + half) * size[:2] - PIXEL_TOLERANCE)
        low = np.clip(low, 0, size[:2] - 1)
        high = np.clip(np.maximum(high, low + 1), 1, size[:2])
        return (np.concatenate([low, high]) / size).astype(np.float32)

    def grammar(self) -> np.ndarray:
        """Allowed tokens after the prompt, bool [1, V]: coordinates only. Decoding exactly
        17 pairs under it replaces INVISIBLE by the model's best coordinate guess (Pix2Seq v2)."""
        return self.vocab.is_coord(np.arange(self.vocab.size))[None]

    def prompt(self, box: np.ndarray, label: int, crop_box: np.ndarray) -> np.ndarray:
        """[kp y0 x0 y1 x1 class] for a box (normalized in the image) seen in crop_box."""
        return np.concatenate(
            [
                [Vocab.KEYPOINT_PROMPT],
                self.vocab.coord_tokens(_to_crop(np.asarray(box).reshape(2, 2), crop_box)).reshape(
                    -1
                ),
                self.vocab.class_tokens(np.asarray([label])),
            ]
        ).astype(np.int32)

    def encode(
        self, example: dict[str, Any], *, training: bool, rng: np.random.Generator | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Example -> ({prompt_tokens [R, 6], input_tokens, target_tokens, token_weights
        [R, T], crop_box [R, 4], instance_index [R]}, stats). Training picks which persons
        to keep at random."""
        if training and rng is None:
            raise ValueError("KeypointTask.encode(training=True) needs rng.")
        stats = dict.fromkeys(self.STAT_KEYS, 0)
        stats["examples"] = 1
        objects = example["objects"]
        boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
        labels = np.asarray(objects["label"], np.int64).reshape(-1)
        keypoints = np.asarray(objects["keypoints"], np.float32).reshape(-1, NUM_KEYPOINTS, 3)
        image = np.asarray(example["image"])
        if image.ndim != 3:
            raise ValueError(
                f"KeypointTask: example image has shape {image.shape}; crops need the decoded "
                "[H, W, C] pixels (decode the image before task encoding)."
            )
        image_size = image.shape[:2]

        finite_points = np.isfinite(keypoints[:, :, :2]).all(axis=2)  # [N, 17]
        stats["invalid_keypoints"] = int(((keypoints[:, :, 2] > 0) & ~finite_points).sum())
        labelled = (keypoints[:, :, 2] > 0) & finite_points  # [N, 17]
        keypoints = np.where(labelled[..., None], keypoints, 0.0)
        known = (labels >= 0) & (labels < self.vocab.num_classes)
        finite = np.isfinite(boxes).all(axis=1)
        has_points = labelled.any(axis=1)
        stats["unknown_class"] = int((~known).sum())
        stats["no_keypoints"] = int((known & ~has_points).sum())
        stats["invalid_boxes"] = int((known & has_points & ~finite).sum())
        candidates = np.flatnonzero(known & has_points & finite)
        if training:
            candidates = rng.permutation(candidates)
        stats["instances_truncated"] = max(0, len(candidates) - self.max_instances)
        candidates = candidates[: self.max_instances]

        rows, crops = [], []
        for index in candidates:
            crop = self.crop_box(boxes[index], image_size)
            points = _to_crop(keypoints[index, :, :2], crop)  # [17, 2]
            inside = (points >= 0) & (points <= 1)
            stats["keypoints_clipped"] += int((labelled[index] & ~inside.all(axis=1)).sum())
            response = np.where(
                labelled[index][:, None], self.vocab.coord_tokens(points), Vocab.INVISIBLE
            ).reshape(-1)  # [34]
            weights = np.where(response == Vocab.INVISIBLE, self.invisible_weight, 1.0)
            prompt = self.prompt(boxes[index], labels[index], crop)
            rows.append(
                (prompt, *build_row(prompt, response, weights, self.seq_len, self.end_weight))
            )
            crops.append(crop)
        stats["instances"] = len(rows)
        stats["no_instances"] = int(not rows)
        out = stack_rows(rows, self.seq_len, self.PROMPT_LENGTH)
        out["crop_box"] = np.array(crops, np.float32).reshape(-1, 4)  # [R, 4]
        out["instance_index"] = candidates.astype(np.int32)  # [R]
        return out, stats

    def decode(self, tokens: np.ndarray, crop_box: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
        """Generated tokens after the prompt [T'] of a row with crop_box [4] -> (keypoints
        [17, 3] as (y, x, v) normalized in the image, stats).

        A coordinate pair gives v = 2; an INVISIBLE, malformed or missing pair gives v = 0
        at the crop's centre (the reference puts unseen points at the box centre).
        """
        tokens = response_until_end(tokens)[:RESPONSE_LENGTH]
        pairs = np.full(RESPONSE_LENGTH, Vocab.INVISIBLE, np.int64)
        pairs[: len(tokens)] = tokens
        pairs = pairs.reshape(NUM_KEYPOINTS, 2)
        is_point = self.vocab.is_coord(pairs).all(axis=1)  # [17]
        is_invisible = (pairs == Vocab.INVISIBLE).all(axis=1)
        stats = {
            "visible": int(is_point.sum()),
            "invisible": int(is_invisible.sum()),
            "malformed": int((~is_point & ~is_invisible).sum()),
        }
        crop_box = np.asarray(crop_box, np.float32)
        in_crop = np.where(is_point[:, None], self.vocab.token_coords(pairs), 0.5)  # [17, 2]
        points = crop_box[:2] + in_crop * (crop_box[2:] - crop_box[:2])
        visibility = np.where(is_point, DECODED_VISIBILITY, 0)[:, None]
        return np.concatenate([points, visibility], axis=1).astype(np.float32), stats


def crop_image(image: np.ndarray, crop_box: np.ndarray) -> np.ndarray:
    """The pixels [h, w, C] of a crop box made by KeypointTask.crop_box."""
    height, width = image.shape[:2]
    pixels = np.asarray(crop_box, np.float64) * np.array([height, width, height, width])
    y0, x0, y1, x1 = np.round(pixels).astype(int)
    return image[y0:y1, x0:x1]


def _to_crop(points: np.ndarray, crop_box: np.ndarray) -> np.ndarray:
    """(y, x) points [..., 2] normalized in the image -> normalized in the crop."""
    crop_box = np.asarray(crop_box, np.float64)
    return (np.asarray(points, np.float64) - crop_box[:2]) / (crop_box[2:] - crop_box[:2])


def has_keypoints(example: Mapping[str, Any]) -> bool:
    """An object with a labelled keypoint."""
    return bool((np.asarray(example["objects"]["num_keypoints"]).reshape(-1) > 0).any())


@dataclasses.dataclass(frozen=True)
class Keypoints(CodecTask):
    """Keypoints as one unit (module docstring); `codec` is a `KeypointTask`."""

    class_names: tuple[str, ...] = ()  # the dataset's (for evaluation.keypoint_classes)

    name: ClassVar[str] = "keypoints"
    task_id: ClassVar[int] = 3
    annotations: ClassVar[tasks.Annotations] = tasks.Annotations(
        "person keypoints (objects/num_keypoints > 0; a COCO-format export's "
        "person_keypoints_<split>.json)",
        has_keypoints,
    )
    metric: ClassVar[str] = "keypoints"
    needs: ClassVar[tuple[str, ...]] = (BOXES,)

    def encode(
        self, example: dict, *, training: bool, rng: np.random.Generator
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """Like every codec task, plus each row's crop box [R, 4] for `views`."""
        rows, stats = self.codec.encode(example, training=training, rng=rng)
        group = {**decoder_rows(rows, self.prompt_length), CROP_BOX: rows["crop_box"]}
        counts = {f"{self.name}/{key}": value for key, value in stats.items()}
        return {DECODER_ROWS: group}, counts

    def views(self, image: np.ndarray, targets: dict[str, Any]) -> list[tuple[np.ndarray, dict]]:
        """One crop per row, holding that row; no row gives no image."""
        group = dict(targets[DECODER_ROWS])
        crops = group.pop(CROP_BOX)  # [R, 4]
        return [
            (
                crop_image(image, crop),
                {
                    **targets,
                    CROP_BOX: np.asarray(crop, np.float32),
                    DECODER_ROWS: {key: value[row : row + 1] for key, value in group.items()},
                },
            )
            for row, crop in enumerate(crops)
        ]

    def decode_settings(self, options: ml_collections.ConfigDict) -> DecodeSettings:
        return DecodeSettings(RESPONSE_LENGTH, float(options.get("keypoints_top_p", 0.0)))

    def prompts(self, example, image, given, options) -> list[View]:
        """One view per box of a keypoint class: its crop, one row."""
        del example
        wanted = {
            self.class_names.index(n) for n in options.keypoint_classes if n in self.class_names
        }
        views = []
        for index in range(min(len(given["labels"]), options.max_instances)):
            box, label = given["boxes"][index], int(given["labels"][index])
            if label in wanted:
                crop = self.codec.crop_box(box, image.shape[:2])
                prompt = self.codec.prompt(box, label, crop)[None]  # [1, 6]
                views.append(View(crop_image(image, crop), prompt, context=(index, crop)))
        return views

    def predictions(
        self,
        example: Mapping[str, Any],
        views: Sequence[View],
        tokens: Sequence[np.ndarray],
        probs: Sequence[np.ndarray],
        given: Mapping[str, Any],
    ) -> dict[str, Any]:
        """keypoints [N, 17, 3] (y, x, v) normalized per given box, zero where not predicted."""
        del example, probs
        keypoints = np.zeros((len(given["labels"]), NUM_KEYPOINTS, 3), np.float32)
        for view, rows in zip(views, tokens, strict=True):
            index, crop = view.context
            keypoints[index] = self.codec.decode(rows[0], crop)[0]
        return {"keypoints": keypoints}

    def problems(self, options: ml_collections.ConfigDict, class_names: Sequence[str]) -> list[str]:
        problems = super().problems(options, class_names)
        if not set(options.keypoint_classes) & set(class_names):
            problems.append(
                f"evaluation.keypoint_classes={tuple(options.keypoint_classes)} names none of "
                f"the classes of the dataset ({', '.join(class_names)}), so no keypoints would "
                "be predicted; name the class(es) annotated with keypoints"
            )
        return problems


@tasks.register("keypoints")
def from_config(config: ml_collections.ConfigDict) -> Keypoints:
    codec = KeypointTask(vocab_from_config(config), **task_options(config, KeypointTask))
    return Keypoints(codec, tuple(tasks.class_names(config)))
