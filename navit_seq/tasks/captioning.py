"""Captioning as a token sequence: [cap] then the caption's SentencePiece tokens then END.

Text ids t become tokens `vocab.text_offset + t`; END weighs `end_weight` (0.1 in Pix2Seq v2).
One row per image, [1, T]: a random caption when training, the first one otherwise; an image
without a usable caption gives no row ([0, T]) and is counted.

The task unit (`Captioning`, registered as "captioning"): at inference one [cap] row per image,
greedy (`evaluation.captioning_top_p`, absent: 0); feeds BLEU-4 and CIDEr.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

import ml_collections
import numpy as np

from navit_seq import tasks
from navit_seq.tasks.sequence import (
    CodecTask,
    View,
    task_options,
    tokenizer_path,
    vocab_from_config,
)
from navit_seq.tasks.vocab import END, Vocab, build_row, response_until_end, stack_rows


class TextTokenizer(Protocol):
    """What captioning needs from a tokenizer (navit_seq.data.text.Tokenizer has it)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""

    def decode(self, ids: list[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class CaptioningTask:
    """Encodes a caption into one token row and decodes generated tokens back into text."""

    vocab: Vocab  # text_vocab_size must cover the tokenizer's ids
    tokenizer: TextTokenizer
    seq_len: int  # T, tokens per row
    end_weight: float = 0.1

    PROMPT_LENGTH: ClassVar[int] = 1
    STAT_KEYS: ClassVar[tuple[str, ...]] = (
        "examples",
        "captions",  # rows encoded
        "no_caption",  # examples without a non-empty caption (no row)
        "empty_captions",  # empty or whitespace-only captions skipped
        "captions_truncated",  # more tokens than the row holds; the tail is cut
    )

    def __post_init__(self):
        if self.vocab.text_vocab_size == 0:
            raise ValueError(
                "CaptioningTask needs a Vocab with text_vocab_size = the tokenizer's vocabulary "
                "size (it is 0)."
            )
        if self.seq_len < self.PROMPT_LENGTH + 1:
            raise ValueError(f"CaptioningTask seq_len={self.seq_len}: need >= 2.")

    @property
    def max_text_tokens(self) -> int:
        """Text tokens one row holds next to the prompt and END."""
        return self.seq_len - self.PROMPT_LENGTH

    def grammar(self) -> np.ndarray:
        """Allowed tokens after the prompt, bool [1, V]: text or END."""
        tokens = np.arange(self.vocab.size)
        return (self.vocab.is_text(tokens) | (tokens == END))[None]

    def encode(
        self, example: dict[str, Any], *, training: bool, rng: np.random.Generator | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Example -> ({prompt_tokens [R, 1], input_tokens, target_tokens, token_weights
        [R, T]}, stats) with R = 1, or 0 without a caption."""
        if training and rng is None:
            raise ValueError("CaptioningTask.encode(training=True) needs rng.")
        stats = dict.fromkeys(self.STAT_KEYS, 0)
        stats["examples"] = 1
        captions = [_as_text(c).strip() for c in np.asarray(example["captions"]).reshape(-1)]
        usable = [c for c in captions if c]
        stats["empty_captions"] = len(captions) - len(usable)
        rows = []
        if usable:
            caption = usable[int(rng.integers(len(usable)))] if training else usable[0]
            text_ids = list(self.tokenizer.encode(caption))
            stats["captions_truncated"] = int(len(text_ids) > self.max_text_tokens)
            response = self.vocab.text_tokens(text_ids[: self.max_text_tokens])
            prompt = np.array([Vocab.CAPTION_PROMPT], np.int32)
            weights = np.ones(len(response), np.float32)
            rows.append(
                (prompt, *build_row(prompt, response, weights, self.seq_len, self.end_weight))
            )
        stats["captions"] = len(rows)
        stats["no_caption"] = int(not rows)
        return stack_rows(rows, self.seq_len, self.PROMPT_LENGTH), stats

    def decode(self, tokens: np.ndarray) -> tuple[str, dict[str, int]]:
        """Generated tokens after the prompt [T'] -> (caption, stats); tokens up to END that
        are not text are dropped and counted."""
        tokens = response_until_end(tokens)
        is_text = self.vocab.is_text(tokens)
        text_ids = self.vocab.token_text_ids(tokens[is_text])
        return self.tokenizer.decode([int(i) for i in text_ids]), {
            "malformed_tokens": int((~is_text).sum())
        }


def _as_text(caption: str | bytes) -> str:
    """TFDS gives Text features as bytes; tests and users may pass str."""
    return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


def has_caption(example: Mapping[str, Any]) -> bool:
    """A caption that is not blank."""
    captions = np.asarray(example["captions"], object).reshape(-1)
    return any(_as_text(caption).strip() for caption in captions)


CAPTIONS = tasks.Annotations("captions (a COCO-format export's captions_<split>.json)", has_caption)


@dataclasses.dataclass(frozen=True)
class Captioning(CodecTask):
    """Captioning as one unit (module docstring); `codec` is a `CaptioningTask`."""

    name: ClassVar[str] = "captioning"
    task_id: ClassVar[int] = 4
    annotations: ClassVar[tasks.Annotations] = CAPTIONS
    metric: ClassVar[str] = "caption"

    def prompts(self, example, image, given, options) -> list[View]:
        del example, given, options
        return [View(image, np.array([[Vocab.CAPTION_PROMPT]], np.int32))]

    def predictions(
        self,
        example: Mapping[str, Any],
        views: Sequence[View],
        tokens: Sequence[np.ndarray],
        probs: Sequence[np.ndarray],
        given: Mapping[str, Any],
    ) -> dict[str, Any]:
        del example, views, probs, given
        return {"caption": self.codec.decode(tokens[0][0])[0]}


@tasks.register("captioning")
def from_config(config: ml_collections.ConfigDict) -> Captioning:
    from navit_seq.data.text import Tokenizer  # SentencePiece loads only for text tasks

    path = tokenizer_path(config)
    if path is None:
        raise ValueError(
            "captioning needs a tokenizer: set data.task.tokenizer to a SentencePiece .model "
            "file, or use a dataset built with one (its sentencepiece.model)."
        )
    codec = CaptioningTask(
        vocab_from_config(config), Tokenizer(path), **task_options(config, CaptioningTask)
    )
    return Captioning(codec)
