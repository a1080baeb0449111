"""The one Pix2Seq-v2 token space shared by every sequence task, and the row layout.

Layout (Chen et al. 2022, "A Unified Sequence Interface for Vision Tasks", reference code):

    0                  PAD; the first PAD after a response is also the end of sequence (END)
    10 11 12 13        task prompts: detection, instance segmentation, keypoints, captioning
    30                 FAKE class (noise objects in detection training)
    40                 SEPARATOR (between the polygons of one object)
    41                 INVISIBLE (an unlabelled keypoint coordinate)
    100 + c            class c in [0, num_classes)
    coord_offset + q   coordinate bin q in [0, num_bins)
    text_offset + t    SentencePiece id t in [0, text_vocab_size)

`coord_offset` is 1000 as in the reference when the classes fit below it (num_classes <= 900),
else it follows the last class; with `layout="compact"` it always follows the last class, so a
dataset of a few classes has no ~900 ids that no row ever uses (every decoder step computes
and normalises a logit per id: on the scenes, V = 1151 -> 263 and a ~20% shorter training step,
README). `text_offset = coord_offset + num_bins`. A coordinate is a
(y, x) value normalized per axis by the true height and width of the image (or crop) it lives
in, so it keeps its meaning at the image's native aspect ratio; q = round(c * (num_bins - 1)).

A row is `label = prompt ++ response ++ [END] ++ [PAD ...]` of length T + 1;
`input_tokens = label[:-1]`, `target_tokens = label[1:]` (teacher forcing), both [T].
"""

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

PAD = 0
END = PAD  # as in the reference code: the model stops at its first PAD
LAYOUTS = ("reference", "compact")  # coordinates at 1000 (Pix2Seq) / right after the classes


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token ids of every kind; offsets derived from the class count, bins and text size."""

    num_classes: int
    num_bins: int = 1000
    text_vocab_size: int = 0
    layout: str = "reference"  # LAYOUTS

    DETECTION_PROMPT: ClassVar[int] = 10
    SEGMENTATION_PROMPT: ClassVar[int] = 11
    KEYPOINT_PROMPT: ClassVar[int] = 12
    CAPTION_PROMPT: ClassVar[int] = 13
    FAKE_CLASS: ClassVar[int] = 30
    SEPARATOR: ClassVar[int] = 40
    INVISIBLE: ClassVar[int] = 41
    CLASS_OFFSET: ClassVar[int] = 100
    REFERENCE_COORD_OFFSET: ClassVar[int] = 1000

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"Vocab num_classes={self.num_classes}: must be >= 1.")
        if self.num_bins < 2:
            raise ValueError(
                f"Vocab num_bins={self.num_bins}: need >= 2 coordinate bins (1000 in Pix2Seq)."
            )
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"Vocab layout={self.layout!r} (config: data.task.vocab_layout): choose one "
                f"of {LAYOUTS}."
            )
        if self.text_vocab_size < 0:
            raise ValueError(
                f"Vocab text_vocab_size={self.text_vocab_size}: must be >= 0 (0 = no text)."
            )

    @property
    def coord_offset(self) -> int:
        after_classes = self.CLASS_OFFSET + self.num_classes
        if self.layout == "compact":
            return after_classes
        return max(self.REFERENCE_COORD_OFFSET, after_classes)

    @property
    def text_offset(self) -> int:
        return self.coord_offset + self.num_bins

    @property
    def size(self) -> int:
        """Number of token ids (the decoder's output width)."""
        return self.text_offset + self.text_vocab_size

    # Coordinates.
    def coord_tokens(self, coords: np.ndarray) -> np.ndarray:
        """Normalized coordinates (any shape) -> coordinate tokens (int32, same shape)."""
        return (self.coord_offset + quantize(coords, self.num_bins)).astype(np.int32)

    def token_coords(self, tokens: np.ndarray) -> np.ndarray:
        """Coordinate tokens -> normalized coordinates at the bin centres (float32)."""
        return dequantize(np.asarray(tokens) - self.coord_offset, self.num_bins)

    def is_coord(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        return (tokens >= self.coord_offset) & (tokens < self.text_offset)

    # Classes.
    def class_tokens(self, labels: np.ndarray) -> np.ndarray:
        """Class indices in [0, num_classes) -> class tokens (int32)."""
        labels = np.asarray(labels)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"class labels {labels.tolist()} outside [0, {self.num_classes}): "
                "filter unknown classes before tokenizing, or raise Vocab num_classes."
            )
        return (self.CLASS_OFFSET + labels).astype(np.int32)

    def token_classes(self, tokens: np.ndarray) -> np.ndarray:
        return (np.asarray(tokens) - self.CLASS_OFFSET).astype(np.int64)

    def is_class(self, tokens: np.ndarray) -> np.ndarray:
        """True for the tokens of real classes (FAKE is not one)."""
        tokens = np.asarray(tokens)
        return (tokens >= self.CLASS_OFFSET) & (tokens < self.CLASS_OFFSET + self.num_classes)

    # Text.
    def text_tokens(self, text_ids: Sequence[int]) -> np.ndarray:
        """SentencePiece ids -> text tokens (int32)."""
        text_ids = np.asarray(text_ids, dtype=np.int64)
        if text_ids.size and (text_ids.min() < 0 or text_ids.max() >= self.text_vocab_size):
            raise ValueError(
                f"text ids up to {text_ids.max()} do not fit Vocab text_vocab_size="
                f"{self.text_vocab_size}: set it to the tokenizer's vocabulary size."
            )
        return (self.text_offset + text_ids).astype(np.int32)

    def token_text_ids(self, tokens: np.ndarray) -> np.ndarray:
        return (np.asarray(tokens) - self.text_offset).astype(np.int64)

    def is_text(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        return (tokens >= self.text_offset) & (tokens < self.size)


def quantize(coords: np.ndarray, num_bins: int) -> np.ndarray:
    """q = round(c * (num_bins - 1)), clipped to [0, num_bins - 1] (int64)."""
    coords = np.asarray(coords, dtype=np.float64)
    if not np.isfinite(coords).all():
        raise ValueError(
            f"quantize: {int((~np.isfinite(coords)).sum())} non-finite coordinates; the task "
            "must skip (and count) objects with NaN or infinite coordinates first."
        )
    scaled = np.round(coords * (num_bins - 1))
    return np.clip(scaled, 0, num_bins - 1).astype(np.int64)


def dequantize(bins: np.ndarray, num_bins: int) -> np.ndarray:
    """c = q / (num_bins - 1): within half a bin of every c that quantizes to q."""
    return (np.asarray(bins, dtype=np.float64) / (num_bins - 1)).astype(np.float32)


def response_until_end(tokens: np.ndarray) -> np.ndarray:
    """The generated tokens before the first END (all of them if there is none)."""
    tokens = np.asarray(tokens)
    ends = np.flatnonzero(tokens == END)
    return tokens[: ends[0]] if ends.size else tokens


def build_row(
    prompt: np.ndarray,
    response: np.ndarray,
    response_weights: np.ndarray,
    seq_len: int,
    end_weight: float,
    input_response: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_tokens [T], target_tokens [T], token_weights [T]) of one row.

    Targets that repeat the prompt weigh 0, the response its given weights, END `end_weight`,
    PAD 0. `input_response` (default: `response`) lets training corrupt the decoder's inputs.
    """
    prompt, response = np.asarray(prompt), np.asarray(response)
    input_response = response if input_response is None else np.asarray(input_response)
    used = len(prompt) + len(response) + 1  # label length with END
    if used > seq_len + 1:
        raise ValueError(
            f"prompt ({len(prompt)}) + response ({len(response)}) + END does not fit "
            f"seq_len={seq_len} + 1: truncate the response first (a task bug)."
        )
    label = np.full(seq_len + 1, PAD, np.int32)  # [T + 1]
    label[: len(prompt)] = prompt
    label[len(prompt) : used - 1] = response
    input_label = label.copy()
    input_label[len(prompt) : used - 1] = input_response
    weights = np.zeros(seq_len + 1, np.float32)  # indexed like label; target i is label i+1
    weights[len(prompt) : used - 1] = response_weights
    weights[used - 1] = end_weight
    return input_label[:-1], label[1:], weights[1:]


def stack_rows(
    rows: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    seq_len: int,
    prompt_length: int,
) -> dict[str, np.ndarray]:
    """Rows of (prompt, input, target, weights) -> arrays [R, ...], R may be 0."""
    num_rows = len(rows)
    out = {
        "prompt_tokens": np.zeros((num_rows, prompt_length), np.int32),  # [R, P]
        "input_tokens": np.zeros((num_rows, seq_len), np.int32),  # [R, T]
        "target_tokens": np.zeros((num_rows, seq_len), np.int32),  # [R, T]
        "token_weights": np.zeros((num_rows, seq_len), np.float32),  # [R, T]
    }
    for r, (prompt, inputs, targets, weights) in enumerate(rows):
        out["prompt_tokens"][r] = prompt
        out["input_tokens"][r] = inputs
        out["target_tokens"][r] = targets
        out["token_weights"][r] = weights
    return out
