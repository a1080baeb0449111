"""Per-image predictions of a Pix2Seq model for every sequence task of its recipe (Pix2Seq v2).

A task-agnostic driver over the `navit_seq.tasks.sequence.SequenceTask` protocol: it names no
task. Per task, in the order the tasks' `needs` / `provides` give (segmentation and keypoints
after detection, whose boxes prompt them, or after the ground truth's boxes with
`evaluation.use_gt_boxes`):
1. the task turns each example into views (the image, or crops) with their prompt rows;
2. the views are tokenized by the pipeline's own `image_tokens` at the eval resolution and
   packed by the trainer's own `packing.RowPacker` / `packing.assemble`: several images per
   packed row, every prompt one decoder row reading its image's slot, `images_per_batch`
   packed rows per decoder call, so the encoder runs once per packed row and per-instance
   prompts (and segmentation's samples) are extra rows of the same call;
3. the task reads its rows back into prediction keys, which later tasks may read.
Output per image: {"image_id", then each task's keys}: detection "boxes" [N, 4] normalized
(ymin, xmin, ymax, xmax), "labels" [N], "scores" [N]; segmentation "masks" (N COCO RLE dicts
at the stored size, None past `max_instances`); keypoints "keypoints" [N, 17, 3] (y, x, v)
normalized (all zero where not predicted); captioning "caption" str. Keys of tasks the
recipe does not train are absent.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from navit_seq import cli, decode, pipeline
from navit_seq import tasks as tasks_lib
from navit_seq.data import mixing, packing, patches, sources
from navit_seq.evaluation import metrics as metric_families
from navit_seq.tasks import sequence
from navit_seq.tasks.sequence import SequenceTask


def default_evaluation_config() -> ml_collections.ConfigDict:
    """`config.evaluation`: whole-split inference + COCO/caption metrics (Pix2Seq v2 §4)."""
    return ml_collections.ConfigDict(
        {
            "every_steps": 0,  # during training: 0 = at every eval (eval_every_steps); -1 never
            "split": "",  # "": data.eval_split
            "num_images": 64,  # first images of the split scored (0 = all)
            "images_per_batch": 4,  # packed rows per decoder call
            # Decoder rows per packed row (at most; a task needing fewer uses fewer): several
            # images' prompts, each box's rows, segmentation's samples.
            "rows_per_seq": 64,
            "max_instances": 16,  # boxes per image prompted for masks / keypoints
            "segm_samples": 8,  # masks sampled per box, averaged, thresholded at 50% (paper)
            "use_gt_boxes": False,  # prompt segmentation/keypoints with ground-truth boxes
            "detection_top_p": 0.0,  # 0 = greedy; the paper samples with top_p 0.4
            "segmentation_top_p": 0.8,  # (paper)
            "keypoints_top_p": 0.0,  # 0 = greedy (the paper: 0.1, nearly greedy)
            "keypoint_classes": ("person",),  # class names whose boxes get keypoint rows
            "seed": 0,
            # eval_predictions.png draws the objects scoring at least this (the metrics score
            # every prediction); an image's 12 decoded groups at once hide what it found.
            "picture_min_score": 0.3,
        }
    )


def evaluation_options(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.evaluation` over the defaults (a recipe or config.json saved before a key
    existed, e.g. `rows_per_seq`, reads its default)."""
    options = default_evaluation_config()
    options.update(config.get("evaluation", {}))
    return options


def evaluation_problems(
    config: ml_collections.ConfigDict,
    class_names: Sequence[str],
    task_list: Sequence[SequenceTask] | None = None,
) -> list[str]:
    """What in `config.evaluation` cannot work with the recipe's tasks (`task_list`, None:
    built from the recipe, leaving out those that cannot be built, which
    `pipeline.dataset_problems` names) and its dataset's classes, one item per problem naming
    the key ([] = none). Checked by every Predictor and, before training, by the commands
    (`navit_seq.main.check_data`)."""
    options = evaluation_options(config)
    least = {"images_per_batch": 1, "rows_per_seq": 1, "max_instances": 1, "num_images": 0}
    problems = [
        f"evaluation.{key}={options[key]}; use at least {value}"
        for key, value in least.items()
        if options[key] < value
    ]
    if task_list is None:
        task_list = []
        for name, _ in mixing.task_weights(config.data):
            try:
                task_list.append(tasks_lib.get_task(tasks_lib.task_config(config.data, name)))
            except (ValueError, OSError):
                continue
    for task in task_list:
        problems += task.problems(options, class_names)
    try:
        sequence.run_order(task_list, ground_truth_keys(options))
    except ValueError as error:
        problems.append(str(error))
    return problems


def ground_truth_keys(options: ml_collections.ConfigDict) -> tuple[str, ...]:
    """What the ground truth gives the tasks instead of a task (`use_gt_boxes`: boxes)."""
    return (sequence.BOXES,) if options.use_gt_boxes else ()


# Token masks are static arguments of the jitted decoder (a new function recompiles): one per
# grammar for the whole process, so every Predictor (each evaluation in training) reuses them.
_TOKEN_MASKS: dict[tuple, decode.TokenMask] = {}


def _token_mask(grammar: np.ndarray, prompt_length: int) -> decode.TokenMask:
    key = (grammar.shape, grammar.tobytes(), prompt_length)
    if key not in _TOKEN_MASKS:
        _TOKEN_MASKS[key] = decode.cyclic_token_mask(grammar, prompt_length)
    return _TOKEN_MASKS[key]


def _padded(grammar: np.ndarray, vocab_size: int) -> np.ndarray:
    """The grammar [G, V_tasks] with False columns up to the model's `vocab_size` outputs."""
    missing = max(vocab_size - grammar.shape[1], 0)
    return np.pad(grammar, ((0, 0), (0, missing)), constant_values=False)


def decode_config(settings: sequence.DecodeSettings) -> decode.DecodeConfig:
    """A task's decode settings as the decoder's configuration (top_p 0: greedy)."""
    if settings.top_p > 0:
        return decode.DecodeConfig(max_len=settings.max_len, method="sample", top_p=settings.top_p)
    return decode.DecodeConfig(max_len=settings.max_len)


PROMPTS = "prompts"  # ragged group of the inference batch: one decoder row per prompt


def prompt_spec(prompt_length: int, rows_per_seq: int) -> packing.RaggedSpec:
    """Inference's decoder rows as a ragged group: `prompt [B, R, P]`, `row_slot [B, R]`."""
    return packing.RaggedSpec(
        name=PROMPTS,
        capacity=rows_per_seq,
        fields={"prompt": ((prompt_length,), np.dtype(np.int32))},
        slot_key="row_slot",
        slot_offset=0,  # row_slot = slot index, -1 for padding rows (as in training)
    )


@dataclasses.dataclass
class _Piece:
    """Up to `rows_per_seq` prompt rows of one view, packed as one image."""

    view: int  # index into the task's list of (example index, view)
    first_row: int  # of the view's prompts
    element: dict  # the per-image element packed (tokens + the prompts group)


class Predictor:
    """Runs the recipe's sequence tasks on decoded examples (see the module docstring)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        model: Any,
        task_list: Sequence[SequenceTask] | None = None,
    ):
        """`task_list`: the recipe's tasks when the caller built them (the objective does,
        once per run); None builds them from `config.data`."""
        self.model = model
        self.data = config.data
        self.options = evaluation_options(config)
        if self.data.eval_max_tokens > self.data.seq_len:
            raise ValueError(
                f"data.eval_max_tokens={self.data.eval_max_tokens} > data.seq_len="
                f"{self.data.seq_len}: an image must fit one packed row; lower eval_max_tokens."
            )
        self.tasks = (
            list(task_list) if task_list is not None else sequence.sequence_tasks(self.data)
        )
        class_names = sources.class_names(self.data.name, data_dir=self.data.data_dir)
        problems = evaluation_problems(config, class_names, self.tasks)
        if problems:
            raise ValueError("; ".join(problems) + ".")
        self.order = sequence.run_order(self.tasks, ground_truth_keys(self.options))
        # A decoder may have more outputs than the tasks' vocabulary (model.decoder.vocab_size
        # set larger by hand): those ids are never allowed.
        width = config.model.decoder.get("vocab_size") or 0
        self.masks = {
            task.name: _token_mask(_padded(task.grammar(), width), task.prompt_length)
            for task in self.tasks
        }
        self.rng = jax.random.key(self.options.seed)
        self.calls = 0

    def predict(self, examples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Decoded examples (navit_seq.data.sources) -> one prediction dict per example."""
        images = [patches.standardize_pixels(e["image"], int(e["image_id"]))[0] for e in examples]
        given = [{} for _ in examples]  # per example: prediction keys made so far
        if self.options.use_gt_boxes:
            for found, example in zip(given, examples, strict=True):
                found.update(sequence.ground_truth_boxes(example))
        for task in self.order:
            views = [
                (index, view)
                for index, (example, image) in enumerate(zip(examples, images, strict=True))
                for view in task.prompts(example, image, given[index], self.options)
            ]
            tokens, probs = self.generate(task, [view for _, view in views])
            for index, example in enumerate(examples):
                mine = [v for v, (owner, _) in enumerate(views) if owner == index]
                given[index].update(
                    task.predictions(
                        example,
                        [views[v][1] for v in mine],
                        [tokens[v] for v in mine],
                        [probs[v] for v in mine],
                        given[index],
                    )
                )
        return [{"image_id": int(e["image_id"]), **g} for e, g in zip(examples, given, strict=True)]

    def rows_per_seq(self, task: SequenceTask) -> int:
        """R of the task's batches: what `max_examples_per_seq` views ask for at most, up to
        `evaluation.rows_per_seq`; fixed per task, so nothing recompiles between calls."""
        most = self.data.max_examples_per_seq * task.max_prompts(self.options)
        return max(1, min(self.options.rows_per_seq, most))

    def generate(
        self, task: SequenceTask, views: Sequence[sequence.View]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Every view's rows decoded: (tokens, model probabilities), one [r, max_len] array per
        view. Views are packed several per packed row (`RowPacker`); a view with more rows than
        a packed row holds is split into pieces (its image packed once per piece)."""
        settings = decode_config(task.decode_settings(self.options))
        capacity = self.rows_per_seq(task)
        spec = prompt_spec(task.prompt_length, capacity)
        tokens = [np.zeros((len(v.prompts), settings.max_len), np.int32) for v in views]
        probs = [np.zeros((len(v.prompts), settings.max_len), np.float64) for v in views]
        pending = self._pieces(task, views, spec)
        progress = cli.Progress(f"predict {task.name}", total=len(pending), unit="images")
        done = 0
        while pending:
            packer = packing.RowPacker(
                self.options.images_per_batch,
                self.data.seq_len,
                self.data.max_examples_per_seq,
                (spec,),
            )
            pending = [
                piece
                for piece in pending
                if not packer.place(
                    piece.element, piece.element["patches"], piece.element["patch_coords"]
                )
            ]
            out_tokens, out_probs = self._decode(task, packer.placements, spec, settings)
            self.last_rows = []  # (view, its row, packed row b, decoder row r): for inspection
            for placed in packer.placements:
                piece = placed.element["piece"]
                start = placed.ragged_offsets[PROMPTS]
                count = len(placed.element["ragged"][PROMPTS]["prompt"])
                rows = slice(piece.first_row, piece.first_row + count)
                tokens[piece.view][rows] = out_tokens[placed.row, start : start + count]
                probs[piece.view][rows] = out_probs[placed.row, start : start + count]
                self.last_rows += [
                    (piece.view, piece.first_row + k, placed.row, start + k) for k in range(count)
                ]
            done += len(packer.placements)
            progress.update(done)
        progress.close()
        return tokens, probs

    def _pieces(self, task, views, spec) -> list[_Piece]:
        """Each view's image tokens (at the eval resolution) with its prompts in pieces of at
        most `spec.capacity` rows; views without prompts are not packed."""
        resolution_config = pipeline.eval_resolution_config(self.data)
        pieces = []
        for index, view in enumerate(views):
            if not len(view.prompts):
                continue
            tokens = pipeline.image_tokens(
                view.pixels,
                resolution_config,
                self.data.patch_size,
                self.data.eval_max_tokens,
                self.data.max_grid_side,
                np.random.default_rng(0),  # the eval samplers draw nothing
                {},
            )
            for first in range(0, len(view.prompts), spec.capacity):
                piece = _Piece(index, first, {})
                piece.element.update(
                    tokens,
                    example_id=np.int64(index),
                    task_id=np.int32(task.task_id),
                    targets={},
                    ragged={PROMPTS: {"prompt": view.prompts[first : first + spec.capacity]}},
                    piece=piece,
                )
                pieces.append(piece)
        return pieces

    def _decode(self, task, placements, spec, settings) -> tuple[np.ndarray, np.ndarray]:
        """One decoder call over the packed batch of `placements`: tokens and model
        probabilities [B, R, max_len]."""
        batch = packing.assemble(
            placements,
            batch_size=self.options.images_per_batch,
            seq_len=self.data.seq_len,
            max_examples_per_seq=self.data.max_examples_per_seq,
            patch_dim=self.data.patch_size**2 * patches.NUM_CHANNELS,
            target_spec={},
            ragged_specs=(spec,),
        )
        prompt = batch.pop("prompt")  # [B, R, P]
        del batch["targets"], batch["example_id"]  # not model inputs
        self.last_batch = {key: jnp.asarray(value) for key, value in batch.items()}
        rng = jax.random.fold_in(self.rng, self.calls)
        self.calls += 1
        out = decode.generate(
            self.model, self.last_batch, jnp.asarray(prompt), rng, settings, self.masks[task.name]
        )
        # Scores are model probabilities (FAKE and END keep their mass): DetectionTask.grammar.
        return np.asarray(out["tokens"]), np.exp(np.asarray(out["model_log_probs"], np.float64))


def evaluation_examples(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The first `evaluation.num_images` decoded examples (0 = all) of the evaluation split."""
    options = evaluation_options(config)
    split = options.split or config.data.eval_split
    source = sources.data_source(config.data.name, split, data_dir=config.data.data_dir)
    count = len(source) if not options.num_images else min(options.num_images, len(source))
    return [source[i] for i in range(count)]


def evaluate_split(
    config: ml_collections.ConfigDict,
    model: Any,
    task_list: Sequence[SequenceTask] | None = None,
) -> dict[str, float]:
    """Predictions on the evaluation split scored by the metric family of each task
    (`SequenceTask.metric`, `navit_seq.evaluation.score`): bbox_AP, bbox_AP50, segm_AP,
    keypoints_AP, caption_BLEU4, caption_CIDEr (+ counts) for the four Pix2Seq tasks; families
    of tasks the recipe does not train are absent."""
    examples = evaluation_examples(config)
    predictor = Predictor(config, model, task_list)
    predictions = predictor.predict(examples)
    class_names = sources.class_names(config.data.name, data_dir=config.data.data_dir)
    families = list(dict.fromkeys(task.metric for task in predictor.tasks))
    metrics = metric_families.score(families, examples, predictions, class_names)
    metrics["num_images"] = float(len(examples))
    return metrics
