"""The four Pix2Seq-v2 codecs behind the pipeline's `Task` interface (`navit_seq.tasks.get_task`).

A codec's rows (`[R, T]`, architecture.md §7) become the image's `decoder_rows` ragged group,
which the packer packs into `decoder_input / decoder_target / decoder_weights [B, R_max, T]`
with `row_slot [B, R_max]` (architecture.md §3). Rows that see a crop of the image (keypoints:
`crop_box [R, 4]`) keep it in the group; the pipeline then packs one image per crop.
Codec stats are prefixed with the task name ("keypoints/no_keypoints") so several tasks can be
summed into one set of packer counters.

Config (`data.task`, shared by every sequence task of a run): `seq_len` (T), `num_classes`
(0: the dataset's), `num_bins`, `text_vocab_size` (0: the tokenizer's when one is found),
`vocab_layout` ("reference": coordinates from id 1000 as Pix2Seq; "compact": after the classes),
`tokenizer` (a SentencePiece .model path; "": the dataset's `sentencepiece.model`), any codec
field (`max_instances`, `end_weight`, ...), and per-task overrides in a sub-dict named after the
task (`data.task.keypoints.max_instances = 20`). `dataset` and `data_dir` are filled in by the
pipeline so a task can find the dataset's class names and tokenizer.

Each task declares what it learns from (`SequenceTask.annotations`): detection boxes of
non-crowd objects, segmentation polygons, keypoints person keypoints, captioning captions.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from navit_seq import tasks
from navit_seq.data import mixing
from navit_seq.data.packing import RaggedSpec
from navit_seq.tasks.captioning import CaptioningTask, _as_text
from navit_seq.tasks.detection import DetectionTask
from navit_seq.tasks.keypoints import KeypointTask
from navit_seq.tasks.segmentation import SegmentationTask
from navit_seq.tasks.vocab import Vocab

DECODER_ROWS = "decoder_rows"  # name of the ragged group (packing.RaggedSpec)
CROP_BOX = "crop_box"  # per-slot target [4]: the region of the example the image shows
WHOLE_IMAGE = np.array([0.0, 0.0, 1.0, 1.0], np.float32)
NO_INSTANCE = -1  # row_instance of rows that encode the whole image (detection, captioning)


def decoder_rows_spec(seq_len: int, max_rows_per_seq: int) -> RaggedSpec:
    """The packed decoder rows of architecture.md §3 (T = seq_len, R_max = max_rows_per_seq)."""
    tokens = ((seq_len,), np.dtype(np.int32))
    return RaggedSpec(
        name=DECODER_ROWS,
        capacity=max_rows_per_seq,
        fields={
            "decoder_input": tokens,
            "decoder_target": tokens,
            "decoder_weights": ((seq_len,), np.dtype(np.float32)),
            "decoder_prompt_length": ((), np.dtype(np.int32)),  # prompt tokens at the start
            "row_instance": ((), np.dtype(np.int32)),  # object index in the example, or -1
        },
        slot_key="row_slot",
        slot_offset=0,  # row_slot = slot index, -1 for padding rows
    )


def has_boxes(example: Mapping[str, Any]) -> bool:
    """An object that is not a crowd region (detection rows hold those)."""
    is_crowd = np.asarray(example["objects"]["is_crowd"], bool).reshape(-1)
    return bool((~is_crowd).any())


def has_polygons(example: Mapping[str, Any]) -> bool:
    """An object outlined by a polygon (segmentation encodes polygons, not RLE-only masks)."""
    return bool((np.asarray(example["objects"]["num_polygons"]).reshape(-1) > 0).any())


def has_keypoints(example: Mapping[str, Any]) -> bool:
    """An object with a labelled keypoint."""
    return bool((np.asarray(example["objects"]["num_keypoints"]).reshape(-1) > 0).any())


def has_caption(example: Mapping[str, Any]) -> bool:
    """A caption that is not blank."""
    captions = np.asarray(example["captions"], object).reshape(-1)
    return any(_as_text(caption).strip() for caption in captions)


BOXES = tasks.Annotations(
    "object boxes (objects/bbox of non-crowd objects; a COCO-format export's "
    "instances_<split>.json)",
    has_boxes,
)
POLYGONS = tasks.Annotations(
    "object polygons (objects/num_polygons > 0; the 'segmentation' polygons of a COCO-format "
    "export's instances_<split>.json, RLE-only crowd masks do not count)",
    has_polygons,
)
KEYPOINTS = tasks.Annotations(
    "person keypoints (objects/num_keypoints > 0; a COCO-format export's "
    "person_keypoints_<split>.json)",
    has_keypoints,
)
CAPTIONS = tasks.Annotations("captions (a COCO-format export's captions_<split>.json)", has_caption)


@dataclasses.dataclass(frozen=True)
class SequenceTask:
    """A Pix2Seq codec as a pipeline task: encode -> decoder rows + counts."""

    name: str
    task_id: int
    codec: Any  # DetectionTask | SegmentationTask | KeypointTask | CaptioningTask
    annotations: tasks.Annotations  # what an example needs to give the task a row

    @property
    def vocab(self) -> Vocab:
        return self.codec.vocab

    def encode(
        self, example: dict, *, training: bool, rng: np.random.Generator
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """({crop_box [4], decoder_rows: {...: [R, ...]}}, counts prefixed by the task name)."""
        rows, stats = self.codec.encode(example, training=training, rng=rng)
        num_rows = len(rows["input_tokens"])
        group = {
            "decoder_input": rows["input_tokens"],  # [R, T]
            "decoder_target": rows["target_tokens"],  # [R, T]
            "decoder_weights": rows["token_weights"],  # [R, T]
            "decoder_prompt_length": np.full(num_rows, self.codec.PROMPT_LENGTH, np.int32),
            "row_instance": rows.get("instance_index", np.full(num_rows, NO_INSTANCE, np.int32)),
        }
        if CROP_BOX in rows:
            group[CROP_BOX] = rows[CROP_BOX]  # [R, 4]: the pipeline packs one image per crop
        counts = {f"{self.name}/{key}": value for key, value in stats.items()}
        return {CROP_BOX: WHOLE_IMAGE, DECODER_ROWS: group}, counts

    def target_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {CROP_BOX: ((4,), np.dtype(np.float32))}

    def ragged_specs(self, data_config: ml_collections.ConfigDict) -> tuple[RaggedSpec, ...]:
        return (decoder_rows_spec(self.codec.seq_len, data_config.max_rows_per_seq),)


def task_options(config: ml_collections.ConfigDict, codec: type) -> dict[str, Any]:
    """The codec's dataclass fields found in `config`, then in `config[<task name>]`."""
    names = {field.name for field in dataclasses.fields(codec)} - {"vocab", "tokenizer"}
    options = {name: config[name] for name in names if name in config}
    overrides = config.get(config.name)
    if overrides is not None:
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(
                f"data.task.{config.name} has options {sorted(unknown)} that "
                f"{codec.__name__} does not take; it takes {sorted(names)}."
            )
        options.update(dict(overrides))
    if "seq_len" not in options:
        raise ValueError(
            f"data.task.seq_len is not set; sequence task {config.name!r} needs the decoder "
            "length T (e.g. 128; detection of 100 objects needs 5 * 100 + 1)."
        )
    return options


def tokenizer_path(config: ml_collections.ConfigDict) -> str | None:
    """`config.tokenizer`, else the dataset's SentencePiece model, else None."""
    if config.get("tokenizer"):
        return str(config.tokenizer)
    if not config.get("dataset"):
        return None
    from navit_seq.data import sources

    try:
        return sources.sentencepiece_model(config.dataset, config.data_dir)
    except FileNotFoundError:
        return None


def vocab_from_config(config: ml_collections.ConfigDict) -> Vocab:
    """One vocabulary for every sequence task of a run (the decoder's output width).

    The text range is always sized from the tokenizer when one is found, so detection-only and
    multi-task runs on one dataset share token ids and output width.
    """
    text_vocab_size = int(config.get("text_vocab_size", 0))
    if not text_vocab_size:
        path = tokenizer_path(config)
        if path is not None:
            from navit_seq.data.text import Tokenizer

            text_vocab_size = Tokenizer(path).vocab_size
    return Vocab(
        num_classes=tasks.num_classes(config),
        num_bins=int(config.get("num_bins", 1000)),
        text_vocab_size=text_vocab_size,
        layout=str(config.get("vocab_layout", "reference")),
    )


def detection(config: ml_collections.ConfigDict) -> SequenceTask:
    codec = DetectionTask(vocab_from_config(config), **task_options(config, DetectionTask))
    return SequenceTask("detection", 1, codec, BOXES)


def segmentation(config: ml_collections.ConfigDict) -> SequenceTask:
    codec = SegmentationTask(vocab_from_config(config), **task_options(config, SegmentationTask))
    return SequenceTask("segmentation", 2, codec, POLYGONS)


def keypoints(config: ml_collections.ConfigDict) -> SequenceTask:
    codec = KeypointTask(vocab_from_config(config), **task_options(config, KeypointTask))
    return SequenceTask("keypoints", 3, codec, KEYPOINTS)


def captioning(config: ml_collections.ConfigDict) -> SequenceTask:
    from navit_seq.data.text import Tokenizer

    path = tokenizer_path(config)
    if path is None:
        raise ValueError(
            "captioning needs a tokenizer: set data.task.tokenizer to a SentencePiece .model "
            "file, or use a dataset built with one (its sentencepiece.model)."
        )
    codec = CaptioningTask(
        vocab_from_config(config), Tokenizer(path), **task_options(config, CaptioningTask)
    )
    return SequenceTask("captioning", 4, codec, CAPTIONS)


def sequence_tasks(data_config: ml_collections.ConfigDict) -> list[SequenceTask]:
    """The recipe's tasks (`data.task` / `data.tasks`), each checked to be a sequence task."""
    built = []
    for name, _ in mixing.task_weights(data_config):
        task = tasks.get_task(tasks.task_config(data_config, name))
        if not isinstance(task, SequenceTask):
            raise ValueError(
                f"data task {name!r} is not a sequence task; the sequence trainer takes "
                "detection, segmentation, keypoints and captioning."
            )
        built.append(task)
    return built
