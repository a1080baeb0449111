"""What every Pix2Seq-v2 sequence task is (`SequenceTask`), and what they share.

A sequence task is one unit in its own module (`detection`, `segmentation`, `keypoints`,
`captioning`): its codec (training rows, de-tokenisation), the views of an example it reads
(keypoints: one crop per person), its inference prompts and decode settings, and the metric
family its predictions feed. The pipeline, the model, `navit_seq.inference`, `predict` and
evaluation only call the `SequenceTask` protocol, so a new task is a module in `tasks/` that
calls `tasks.register` plus a recipe naming it.

A codec's rows (`[R, T]`, architecture.md §7) become the image's `decoder_rows` ragged group,
which the packer packs into `decoder_input / decoder_target / decoder_weights [B, R_max, T]`
with `row_slot [B, R_max]` (architecture.md §3). Codec stats are prefixed with the task name
("keypoints/no_keypoints") so several tasks can be summed into one set of packer counters.

Dependent prompting is data passed between units: a task `needs` what other tasks `provide`
(segmentation and keypoints need "boxes", detection provides them, or the ground truth does
with `evaluation.use_gt_boxes`); the inference driver runs the tasks in that order.

Config (`data.task`, shared by every sequence task of a run): `seq_len` (T), `num_classes`
(0: the dataset's), `num_bins`, `text_vocab_size` (0: the tokenizer's when one is found),
`vocab_layout` ("reference": coordinates from id 1000 as Pix2Seq; "compact": after the classes),
`tokenizer` (a SentencePiece .model path; "": the dataset's `sentencepiece.model`), any codec
field (`max_instances`, `end_weight`, ...), and per-task overrides in a sub-dict named after the
task (`data.task.keypoints.max_instances = 20`). `dataset` and `data_dir` are filled in by the
pipeline so a task can find the dataset's class names and tokenizer.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import ml_collections
import numpy as np

from navit_seq import tasks
from navit_seq.data import mixing
from navit_seq.data.packing import RaggedSpec
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


# What tasks provide and need (`SequenceTask.provides` / `needs`). "boxes" are the prediction
# keys "boxes" [N, 4] normalized yxyx, "labels" [N], "scores" [N].
BOXES = "boxes"


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How a task's rows are generated (`navit_seq.decode.DecodeConfig` of the driver)."""

    max_len: int  # tokens generated after the prompt
    top_p: float = 0.0  # 0: greedy; else nucleus sampling with this top_p


@dataclasses.dataclass(frozen=True)
class View:
    """Pixels one packed image shows at inference and the decoder rows that read them."""

    pixels: np.ndarray  # [h, w, 3] uint8: the example's image or a crop of it
    prompts: np.ndarray  # [r, P] int32, one decoder row each (r may be 0)
    context: Any = None  # what the task needs back to read the rows (e.g. the crop box)


@runtime_checkable
class SequenceTask(tasks.Task, Protocol):
    """A Pix2Seq-v2 task: the pipeline's `tasks.Task` plus inference and scoring."""

    vocab: Vocab
    prompt_length: int  # P, tokens before the response (every row of the task)
    metric: str  # metric family its predictions feed (navit_seq.evaluation.metrics)
    needs: tuple[str, ...]  # what its prompts read from other tasks' predictions ("boxes")
    provides: tuple[str, ...]  # what its predictions give other tasks ("boxes")

    def grammar(self) -> np.ndarray:
        """bool [period, V]: tokens allowed at each response position (cyclic)."""

    def decode_settings(self, options: ml_collections.ConfigDict) -> DecodeSettings:
        """Decoding of this task's rows under `config.evaluation` (`options`)."""

    def max_prompts(self, options: ml_collections.ConfigDict) -> int:
        """The most decoder rows one view asks for (sizes the driver's rows per packed row)."""

    def prompts(
        self,
        example: Mapping[str, Any],
        image: np.ndarray,
        given: Mapping[str, Any],
        options: ml_collections.ConfigDict,
    ) -> list[View]:
        """The views to decode for one example (`image`: its standardized pixels [H, W, 3];
        `given`: the predictions made so far, holding every key of `needs`)."""

    def predictions(
        self,
        example: Mapping[str, Any],
        views: Sequence[View],
        tokens: Sequence[np.ndarray],
        probs: Sequence[np.ndarray],
        given: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Prediction keys of one example from its views' generated rows: `tokens[v]` and
        `probs[v]` are [r_v, max_len] (token ids after the prompt; model probabilities)."""

    def problems(self, options: ml_collections.ConfigDict, class_names: Sequence[str]) -> list[str]:
        """What in `config.evaluation` this task cannot work with, one item per problem."""


@dataclasses.dataclass(frozen=True)
class CodecTask:
    """The half that detection, segmentation, keypoints and captioning share: a codec's rows
    as the pipeline's targets, the whole image as the one view, greedy or nucleus decoding of
    the row's remaining length. Each task module subclasses it with its prompts and readout."""

    codec: Any  # the task's codec: encode -> rows (§7), decode -> annotations

    name: ClassVar[str]
    task_id: ClassVar[int]
    annotations: ClassVar[tasks.Annotations]
    metric: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()

    @property
    def vocab(self) -> Vocab:
        return self.codec.vocab

    @property
    def prompt_length(self) -> int:
        return self.codec.PROMPT_LENGTH

    def encode(
        self, example: dict, *, training: bool, rng: np.random.Generator
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """({decoder_rows: {...: [R, ...]}}, counts prefixed by the task name)."""
        rows, stats = self.codec.encode(example, training=training, rng=rng)
        counts = {f"{self.name}/{key}": value for key, value in stats.items()}
        return {DECODER_ROWS: decoder_rows(rows, self.prompt_length)}, counts

    def views(self, image: np.ndarray, targets: dict[str, Any]) -> list[tuple[np.ndarray, dict]]:
        """Training: the whole image, showing every row."""
        return [(image, {**targets, CROP_BOX: WHOLE_IMAGE})]

    def target_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {CROP_BOX: ((4,), np.dtype(np.float32))}

    def ragged_specs(self, data_config: ml_collections.ConfigDict) -> tuple[RaggedSpec, ...]:
        return (decoder_rows_spec(self.codec.seq_len, data_config.max_rows_per_seq),)

    def grammar(self) -> np.ndarray:
        return self.codec.grammar()

    def decode_settings(self, options: ml_collections.ConfigDict) -> DecodeSettings:
        """The rest of the row, at `evaluation.<name>_top_p` (absent: greedy)."""
        top_p = float(options.get(f"{self.name}_top_p", 0.0))
        return DecodeSettings(self.codec.seq_len - self.prompt_length, top_p)

    def max_prompts(self, options: ml_collections.ConfigDict) -> int:
        del options
        return 1

    def problems(self, options: ml_collections.ConfigDict, class_names: Sequence[str]) -> list[str]:
        del class_names
        key = f"{self.name}_top_p"
        if key in options and not 0 <= options[key] <= 1:
            return [f"evaluation.{key}={options[key]}; use 0 (greedy) up to 1"]
        return []


def decoder_rows(rows: Mapping[str, np.ndarray], prompt_length: int) -> dict[str, np.ndarray]:
    """A codec's rows (§7) as the `decoder_rows` group of `decoder_rows_spec`."""
    num_rows = len(rows["input_tokens"])
    return {
        "decoder_input": rows["input_tokens"],  # [R, T]
        "decoder_target": rows["target_tokens"],  # [R, T]
        "decoder_weights": rows["token_weights"],  # [R, T]
        "decoder_prompt_length": np.full(num_rows, prompt_length, np.int32),
        "row_instance": rows.get("instance_index", np.full(num_rows, NO_INSTANCE, np.int32)),
    }


def ground_truth_boxes(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The example's non-crowd boxes as "boxes" predictions (score 1): what
    `evaluation.use_gt_boxes` gives the tasks that need boxes instead of detection."""
    objects = example["objects"]
    keep = ~np.asarray(objects["is_crowd"], bool).reshape(-1)
    boxes = np.clip(np.asarray(objects["bbox"], np.float32).reshape(-1, 4)[keep], 0, 1)
    labels = np.asarray(objects["label"], np.int64).reshape(-1)[keep]
    return {"boxes": boxes, "labels": labels, "scores": np.ones(len(labels), np.float32)}


def run_order(task_list: Sequence[SequenceTask], given: Sequence[str]) -> list[SequenceTask]:
    """The tasks in an order where each runs after the tasks providing what it needs (recipe
    order otherwise); tasks whose every `provides` is in `given` (ground truth) are left out."""
    available, pending, order = set(given), list(task_list), []
    pending = [t for t in pending if not t.provides or not set(t.provides) <= available]
    while pending:
        ready = [t for t in pending if set(t.needs) <= available]
        if not ready:
            missing = {n for t in pending for n in t.needs} - available
            raise ValueError(
                f"tasks {[t.name for t in pending]} need {sorted(missing)}, which no task of "
                "the recipe provides; add a task that provides them (detection: boxes) or set "
                "evaluation.use_gt_boxes=True"
            )
        order.append(ready[0])
        available |= set(ready[0].provides)
        pending.remove(ready[0])
    return order


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


def sequence_tasks(data_config: ml_collections.ConfigDict) -> list[SequenceTask]:
    """The recipe's tasks (`data.task` / `data.tasks`), each checked to be a sequence task."""
    built = []
    for name, _ in mixing.task_weights(data_config):
        task = tasks.get_task(tasks.task_config(data_config, name))
        if not isinstance(task, SequenceTask):  # the protocol's members, all required
            raise ValueError(
                f"data task {name!r} is not a sequence task; the sequence trainer takes "
                "detection, segmentation, keypoints and captioning."
            )
        built.append(task)
    return built
