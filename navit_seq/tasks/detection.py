"""Object detection as a token sequence: [det] then (ymin xmin ymax xmax class) per object.

The task unit (`Detection`, registered as "detection"): the codec below for training rows; at
inference one [det] row per image, decoded to its full length under the codec's grammar, every
group a box scored by its class token's probability (Pix2Seq's reference inference), sorted by
score. Provides "boxes" (what segmentation and keypoints are prompted with); feeds COCO bbox AP.

Training follows Pix2Seq (Chen et al. 2022): objects in `object_order` (random by default);
the sequence is filled up to `max_objects` with noise objects labelled FAKE (jittered
duplicates of real boxes, real boxes shifted to a random centre, random boxes) whose
coordinates weigh 0 and whose class weighs `noise_class_weight`; the decoder's input class
tokens are corrupted. END weighs `end_weight`. One row per image: arrays [1, T].
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np

from navit_seq import tasks
from navit_seq.tasks.sequence import BOXES, CodecTask, View, task_options, vocab_from_config
from navit_seq.tasks.vocab import Vocab, build_row, response_until_end, stack_rows

TOKENS_PER_OBJECT = 5  # ymin xmin ymax xmax class
DUPLICATE_JITTER = 0.1  # max jitter of noisy duplicates, relative to box size (reference)
RANDOM_BOX_MAX_SIZE = 1.0  # random noise boxes: |N(0, max/2)| sized, truncated at 2 sigma
CLASS_CORRUPTIONS = (
    "none",  # decoder inputs keep the true class
    "rand_cls",  # a random real class
    "real_n_fake_cls",  # the true class or FAKE, 50/50
    "rand_n_fake_cls",  # a random class or FAKE, 50/50 (Pix2Seq's default)
    "real_n_rand_n_fake_cls",  # true 50%, else random or FAKE 50/50
)
# The order of the real objects in a row. Pix2Seq (Chen et al. 2021) ablates random, area and
# dist2ori ordering and keeps random for long training; a fixed order gives each position one
# right answer. Fixed orders apply to evaluation rows too (their loss is then comparable).
OBJECT_ORDERS = (
    "random",  # a fresh permutation per example (Pix2Seq's default)
    "area",  # largest box first
    "dist2ori",  # nearest top-left corner (ymin, xmin) to the image origin first
)


@dataclasses.dataclass(frozen=True)
class DetectionTask:
    """Encodes boxes into one token row and decodes generated tokens back into boxes."""

    vocab: Vocab
    seq_len: int  # T, tokens per row
    max_objects: int = 100  # real + noise objects per row (also capped by seq_len)
    noise_objects: bool = True  # fill with noise objects when training
    noise_class_weight: float = 1.0
    end_weight: float = 0.1
    class_corruption: str = "rand_n_fake_cls"
    object_order: str = "random"  # OBJECT_ORDERS

    PROMPT_LENGTH: ClassVar[int] = 1
    STAT_KEYS: ClassVar[tuple[str, ...]] = (
        "examples",
        "objects",  # real objects encoded
        "noise_objects",
        "no_objects",  # examples left with no object (row = [det] END)
        "objects_truncated",  # more objects than the row holds
        "unknown_class",
        "crowd_skipped",  # COCO crowd regions are not objects to detect
        "invalid_boxes",  # non-finite or empty after clipping to [0, 1]
    )

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError(
                f"DetectionTask seq_len={self.seq_len}, max_objects={self.max_objects} hold "
                f"no object: need seq_len >= {self.PROMPT_LENGTH + TOKENS_PER_OBJECT}."
            )
        if self.class_corruption not in CLASS_CORRUPTIONS:
            raise ValueError(
                f"DetectionTask class_corruption={self.class_corruption!r}: "
                f"choose one of {CLASS_CORRUPTIONS}."
            )
        if self.object_order not in OBJECT_ORDERS:
            raise ValueError(
                f"DetectionTask object_order={self.object_order!r}: choose one of {OBJECT_ORDERS}."
            )

    @property
    def capacity(self) -> int:
        """Objects one row holds: the prompt, 5 tokens per object and END fit in T + 1."""
        return min(self.max_objects, (self.seq_len - self.PROMPT_LENGTH) // TOKENS_PER_OBJECT)

    def grammar(self) -> np.ndarray:
        """Allowed tokens per position of an object group, bool [5, V] (inference's token
        mask, `decode.cyclic_token_mask`): 4 coordinates, then a real class.

        As in Pix2Seq's reference inference, a row is decoded to its full length (no END) and
        every group is kept: its class is the argmax over the real classes and its score that
        class's probability under the unconstrained distribution (`decode.generate`'s
        `model_log_probs`), so groups the model would call FAKE or END rank low instead of
        being dropped (an undertrained model calls most groups FAKE)."""
        tokens = np.arange(self.vocab.size)
        coord = self.vocab.is_coord(tokens)
        return np.stack([coord, coord, coord, coord, self.vocab.is_class(tokens)])

    def encode(
        self, example: dict[str, Any], *, training: bool, rng: np.random.Generator | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Example -> ({prompt_tokens [1, 1], input_tokens, target_tokens, token_weights
        [1, T]}, stats). Training shuffles, adds noise and corrupts classes with `rng`."""
        if training and rng is None:
            raise ValueError("DetectionTask.encode(training=True) needs rng (a numpy Generator).")
        stats = dict.fromkeys(self.STAT_KEYS, 0)
        stats["examples"] = 1
        boxes, labels = self._valid_objects(example["objects"], stats)  # [N, 4], [N]
        order = self._object_order(boxes, training, rng)
        boxes, labels = boxes[order], labels[order]
        if len(labels) > self.capacity:
            stats["objects_truncated"] = len(labels) - self.capacity
            boxes, labels = boxes[: self.capacity], labels[: self.capacity]
        stats["objects"] = len(labels)
        stats["no_objects"] = int(len(labels) == 0)

        class_tokens = self.vocab.class_tokens(labels)  # [N]
        coord_weights = np.ones(len(labels), np.float32)
        class_weights = np.ones(len(labels), np.float32)
        if training and self.noise_objects:
            noise = _noise_boxes(boxes, self.capacity - len(labels), rng)  # [M, 4]
            stats["noise_objects"] = len(noise)
            boxes = np.concatenate([boxes, noise])
            class_tokens = np.concatenate(
                [class_tokens, np.full(len(noise), Vocab.FAKE_CLASS, np.int32)]
            )
            coord_weights = np.concatenate([coord_weights, np.zeros(len(noise), np.float32)])
            class_weights = np.concatenate(
                [class_weights, np.full(len(noise), self.noise_class_weight, np.float32)]
            )
        input_class_tokens = self._corrupt_classes(class_tokens, rng) if training else class_tokens

        coords = self.vocab.coord_tokens(boxes)  # [M, 4]
        response = np.column_stack([coords, class_tokens]).reshape(-1)  # [5M]
        input_response = np.column_stack([coords, input_class_tokens]).reshape(-1)  # [5M]
        weights = np.column_stack([np.repeat(coord_weights[:, None], 4, 1), class_weights])
        prompt = np.array([Vocab.DETECTION_PROMPT], np.int32)
        row = build_row(
            prompt,
            response,
            weights.reshape(-1),
            self.seq_len,
            self.end_weight,
            input_response=input_response,
        )
        return stack_rows([(prompt, *row)], self.seq_len, self.PROMPT_LENGTH), stats

    def decode(
        self, tokens: np.ndarray, token_scores: np.ndarray | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Generated tokens after the prompt [T'] -> ({bbox [K, 4] normalized (y, x),
        label [K], score [K]}, stats).

        Reads groups of 5 up to END (generated rows have none: `grammar`); a group that is not
        4 coordinates + a real class is dropped and counted (FAKE groups of training rows
        separately). A box's score is its class token's probability from `token_scores` [T']
        (1 without it); min/max are sorted per axis.
        """
        tokens = response_until_end(tokens)
        num_groups = len(tokens) // TOKENS_PER_OBJECT
        stats = {"decoded": 0, "fake": 0, "malformed": int(len(tokens) % TOKENS_PER_OBJECT > 0)}
        groups = tokens[: num_groups * TOKENS_PER_OBJECT].reshape(num_groups, TOKENS_PER_OBJECT)
        scores = (
            np.ones(len(tokens), np.float32)
            if token_scores is None
            else np.asarray(token_scores, np.float32)[: len(tokens)]
        )
        group_scores = scores[: num_groups * TOKENS_PER_OBJECT].reshape(
            num_groups, TOKENS_PER_OBJECT
        )[:, 4]
        is_fake = groups[:, 4] == Vocab.FAKE_CLASS
        well_formed = self.vocab.is_coord(groups[:, :4]).all(axis=1) & (
            self.vocab.is_class(groups[:, 4]) | is_fake
        )
        keep = well_formed & ~is_fake
        stats["fake"] = int((well_formed & is_fake).sum())
        stats["malformed"] += int((~well_formed).sum())
        stats["decoded"] = int(keep.sum())
        coords = self.vocab.token_coords(groups[keep, :4]).reshape(-1, 2, 2)  # [K, corner, yx]
        boxes = np.concatenate([coords.min(axis=1), coords.max(axis=1)], axis=1)  # [K, 4]
        return {
            "bbox": boxes.astype(np.float32),
            "label": self.vocab.token_classes(groups[keep, 4]),
            "score": group_scores[keep],
        }, stats

    def _valid_objects(
        self, objects: dict[str, Any], stats: dict[str, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Boxes [N, 4] clipped to [0, 1] and labels [N] of the objects a row may hold."""
        boxes = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
        labels = np.asarray(objects["label"], np.int64).reshape(-1)
        is_crowd = np.asarray(objects.get("is_crowd", np.zeros(len(labels), bool)), bool)
        known = (labels >= 0) & (labels < self.vocab.num_classes)
        finite = np.isfinite(boxes).all(axis=1)
        boxes = np.clip(np.where(finite[:, None], boxes, 0.0), 0.0, 1.0)
        nonempty = finite & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        stats["unknown_class"] = int((~known).sum())
        stats["crowd_skipped"] = int((known & is_crowd).sum())
        stats["invalid_boxes"] = int((known & ~is_crowd & ~nonempty).sum())
        keep = known & ~is_crowd & nonempty
        return boxes[keep], labels[keep]

    def _object_order(
        self, boxes: np.ndarray, training: bool, rng: np.random.Generator | None
    ) -> np.ndarray:
        """Indices [N] putting the objects in `object_order` (random only when training;
        evaluation rows keep the dataset's order). Ties keep the dataset's order."""
        if self.object_order == "area":
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            return np.argsort(-area, kind="stable")
        if self.object_order == "dist2ori":
            return np.argsort(np.hypot(boxes[:, 0], boxes[:, 1]), kind="stable")
        return rng.permutation(len(boxes)) if training else np.arange(len(boxes))

    def _corrupt_classes(self, class_tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Decoder-input classes per `class_corruption` (targets keep the true ones)."""
        count = len(class_tokens)
        random_cls = self.vocab.class_tokens(rng.integers(0, self.vocab.num_classes, count))
        fake = np.full(count, Vocab.FAKE_CLASS, np.int32)
        rand_or_fake = np.where(rng.random(count) < 0.5, random_cls, fake)
        choices = {
            "none": class_tokens,
            "rand_cls": random_cls,
            "real_n_fake_cls": np.where(rng.random(count) < 0.5, class_tokens, fake),
            "rand_n_fake_cls": rand_or_fake,
            "real_n_rand_n_fake_cls": np.where(rng.random(count) < 0.5, class_tokens, rand_or_fake),
        }
        return choices[self.class_corruption].astype(np.int32)


def _noise_boxes(real_boxes: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` noise boxes [count, 4] in [0, 1], as Pix2Seq's reference draws them: a random
    number are jittered duplicates of real boxes, the rest are real boxes moved to a random
    centre or fully random boxes (50/50), all shuffled."""
    num_real = len(real_boxes)
    num_duplicates = int(rng.integers(0, count + 1)) if num_real else 0
    num_bad = count - num_duplicates
    sizes = np.abs(_truncated_normal(rng, (num_bad, 2), RANDOM_BOX_MAX_SIZE / 2))  # [B, 2]
    if num_real:
        source = real_boxes[rng.integers(0, num_real, num_bad)]
        shifted = rng.random(num_bad) < 0.5
        sizes[shifted] = source[shifted, 2:] - source[shifted, :2]
    centres = rng.random((num_bad, 2))  # [B, 2] (y, x)
    bad = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)  # [B, 4]

    duplicates = real_boxes[rng.integers(0, num_real, num_duplicates)] if num_real else bad[:0]
    size = duplicates[:, 2:] - duplicates[:, :2]  # [D, 2]
    jitter = _truncated_normal(rng, (num_duplicates, 4), DUPLICATE_JITTER / 2)
    duplicates = duplicates + jitter * np.tile(size, 2)  # [D, 4]

    noise = np.concatenate([bad, duplicates])[rng.permutation(count)]
    return np.clip(noise, 0.0, 1.0).astype(np.float32)


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    """N(0, std) redrawn outside +-2 std (as tf.random.truncated_normal)."""
    values = rng.normal(0.0, std, shape)
    outside = np.abs(values) > 2 * std
    while outside.any():
        values[outside] = rng.normal(0.0, std, int(outside.sum()))
        outside = np.abs(values) > 2 * std
    return values


def has_boxes(example: Mapping[str, Any]) -> bool:
    """An object that is not a crowd region (detection rows hold those)."""
    is_crowd = np.asarray(example["objects"]["is_crowd"], bool).reshape(-1)
    return bool((~is_crowd).any())


@dataclasses.dataclass(frozen=True)
class Detection(CodecTask):
    """Detection as one unit (module docstring); `codec` is a `DetectionTask`."""

    name: ClassVar[str] = "detection"
    task_id: ClassVar[int] = 1
    annotations: ClassVar[tasks.Annotations] = tasks.Annotations(
        "object boxes (objects/bbox of non-crowd objects; a COCO-format export's "
        "instances_<split>.json)",
        has_boxes,
    )
    metric: ClassVar[str] = "bbox"
    provides: ClassVar[tuple[str, ...]] = (BOXES,)

    def prompts(self, example, image, given, options) -> list[View]:
        del example, given, options
        return [View(image, np.array([[Vocab.DETECTION_PROMPT]], np.int32))]

    def predictions(
        self,
        example: Mapping[str, Any],
        views: Sequence[View],
        tokens: Sequence[np.ndarray],
        probs: Sequence[np.ndarray],
        given: Mapping[str, Any],
    ) -> dict[str, Any]:
        """boxes [N, 4], labels [N], scores [N] (class-token probability), best first."""
        del example, views, given
        decoded, _ = self.codec.decode(tokens[0][0], probs[0][0])
        order = np.argsort(-decoded["score"], kind="stable")
        return {
            "boxes": decoded["bbox"][order],
            "labels": decoded["label"][order],
            "scores": decoded["score"][order],
        }


@tasks.register("detection")
def from_config(config: ml_collections.ConfigDict) -> Detection:
    return Detection(
        DetectionTask(vocab_from_config(config), **task_options(config, DetectionTask))
    )
