"""Caption tokens for image-text contrastive pretraining (NaViT §3.5; a text tower reads them).

Each image gets one caption (a random one when training, the first otherwise) as SentencePiece
ids, cut to `max_text_len` tokens (NaViT's contrastive runs use 24). The ids form the image's
`text` ragged group, which the packer packs with the captions of the other images of a row into
`text_tokens [B, L_text]` and `text_segment_ids [B, L_text]` (caption of slot e = e + 1, 0 =
padding), L_text = `data.text_seq_len`. An image without a usable caption gets no text and is
skipped by the packer (counted as `images_without_text`): it would have no positive pair.
"""

import dataclasses
from typing import Any, ClassVar

import ml_collections
import numpy as np

from navit_seq.data.packing import RaggedSpec
from navit_seq.tasks import Annotations, register, whole_image
from navit_seq.tasks.captioning import CAPTIONS, TextTokenizer, _as_text
from navit_seq.tasks.sequence import tokenizer_path

TEXT = "text"  # name of the ragged group (packing.RaggedSpec)


def text_spec(text_seq_len: int) -> RaggedSpec:
    """Packed caption tokens of architecture.md §3 (L_text = text_seq_len)."""
    return RaggedSpec(
        name=TEXT,
        capacity=text_seq_len,
        fields={"text_tokens": ((), np.dtype(np.int32))},
        slot_key="text_segment_ids",
        slot_offset=1,  # segment id = slot + 1, 0 = padding
    )


@dataclasses.dataclass(frozen=True)
class ImageTextTask:
    """Example -> the SentencePiece ids of one of its captions."""

    tokenizer: TextTokenizer
    max_text_len: int = 24

    name: ClassVar[str] = "image_text"
    task_id: ClassVar[int] = 5
    annotations: ClassVar[Annotations] = CAPTIONS
    STAT_KEYS: ClassVar[tuple[str, ...]] = (
        "examples",
        "no_caption",  # examples without a non-empty caption (the packer skips the image)
        "empty_captions",  # empty or whitespace-only captions left out
        "captions_truncated",  # captions longer than max_text_len, cut
    )

    def __post_init__(self):
        if self.max_text_len < 1:
            raise ValueError(f"data.task.max_text_len={self.max_text_len}; use at least 1.")

    def encode(
        self, example: dict[str, Any], *, training: bool, rng: np.random.Generator | None = None
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """({text: {text_tokens [n]}}, counts prefixed "image_text/"); n = 0 without a caption."""
        if training and rng is None:
            raise ValueError("ImageTextTask.encode(training=True) needs rng.")
        captions = [_as_text(c).strip() for c in np.asarray(example["captions"]).reshape(-1)]
        usable = [c for c in captions if c]
        stats = dict.fromkeys(self.STAT_KEYS, 0)
        stats.update(examples=1, no_caption=int(not usable))
        stats["empty_captions"] = len(captions) - len(usable)
        text_ids = np.zeros(0, np.int32)  # [n]
        if usable:
            caption = usable[int(rng.integers(len(usable)))] if training else usable[0]
            text_ids = np.asarray(self.tokenizer.encode(caption), np.int32)
            stats["captions_truncated"] = int(len(text_ids) > self.max_text_len)
            text_ids = text_ids[: self.max_text_len]
        counts = {f"{self.name}/{key}": value for key, value in stats.items()}
        return {TEXT: {"text_tokens": text_ids}}, counts

    def target_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {}

    def ragged_specs(self, data_config: ml_collections.ConfigDict) -> tuple[RaggedSpec, ...]:
        return (text_spec(data_config.text_seq_len),)

    def views(self, image: np.ndarray, targets: dict) -> list[tuple[np.ndarray, dict]]:
        return whole_image(image, targets)


@register("image_text")
def from_config(config: ml_collections.ConfigDict) -> ImageTextTask:
    """`data.task` fields: `tokenizer` (path; "": the dataset's), `max_text_len`."""
    from navit_seq.data.text import Tokenizer

    path = tokenizer_path(config)
    if path is None:
        raise ValueError(
            "image_text needs a tokenizer: set data.task.tokenizer to a SentencePiece .model "
            "file, or use a dataset built with one (its sentencepiece.model)."
        )
    return ImageTextTask(Tokenizer(path), max_text_len=int(config.get("max_text_len", 24)))
