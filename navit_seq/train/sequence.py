"""The sequence objective (Pix2Seq v2): NaViT encoder + decoder over packed decoder rows.

Plugs into the shared loop (`navit_seq.train.loop`) like `classification`: the model
(`navit_seq.models.pix2seq.Pix2Seq`), the weighted token cross-entropy of
`navit_seq.losses.sequence` (sum(w * ce) / sum(w) over the global batch, optional
`config.loss.label_smoothing`), per-task losses for logging, and grain iterators over the
sequence tasks of `data.task` / `data.tasks` (mixed per batch or per example, `data.mixing`).

Logged per task (by the task of each row's image): `loss/<task>` (left out of a window
without that task, never a false 0 or NaN) and `weight_share/<task>`, the task's share of the
loss weight (0 in such a window).

Token labels (`loss.token_label_weight` > 0, with `data.token_labels` and `model.token_labels`,
navit_seq.data.token_labels): each labelled encoder token adds `weight * ce` of its class
logits to the loss sum, before the one division by the decoder rows' total weight; logged as
`loss/token_labels` (mean over labelled tokens) and `token_label_accuracy`.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metrics as clu_metrics
from flax import nnx

from navit_seq import inference, pipeline
from navit_seq.data.token_labels import TARGET_KEY as TOKEN_LABELS
from navit_seq.losses import sequence as losses
from navit_seq.losses import token_labels as token_label_losses
from navit_seq.tasks.sequence import SequenceTask, sequence_tasks
from navit_seq.train.loop import MetricDict, Objective


def default_loss_config() -> ml_collections.ConfigDict:
    """`config.loss`: label smoothing 0 (Pix2Seq's reference trains without it); no token
    labels (Pix2Seq trains the encoder through the decoder alone)."""
    return ml_collections.ConfigDict({"label_smoothing": 0.0, "token_label_weight": 0.0})


@flax.struct.dataclass
class WeightedAverage(clu_metrics.Average):
    """total / count with a float count (token weights); 0 when nothing was counted."""

    def compute(self) -> jax.Array:
        return jnp.where(self.count > 0, self.total / jnp.maximum(self.count, 1e-9), 0.0)


@flax.struct.dataclass
class TaskAverage(WeightedAverage):
    """A per-task average: None (left out of the logged window, `loop.compute_metrics`) when
    the window held none of the task's tokens, so its curve has a gap, not a false 0."""

    def compute(self) -> jax.Array | None:
        if float(np.asarray(self.count)) <= 0:
            return None
        return super().compute()


def task_ids(
    config: ml_collections.ConfigDict, task_list: Sequence[SequenceTask] | None = None
) -> dict[str, int]:
    """name -> task id of the recipe's tasks (for per-task losses)."""
    task_list = sequence_tasks(config.data) if task_list is None else task_list
    return {task.name: task.task_id for task in task_list}


def resolve_config(
    config: ml_collections.ConfigDict, task_list: Sequence[SequenceTask] | None = None
) -> None:
    """Fills the decoder's vocabulary size and coordinate range from the tasks' shared
    vocabulary (`task_list`, None: built from the recipe); checks lengths."""
    task_list = sequence_tasks(config.data) if task_list is None else task_list
    vocab = max((task.vocab for task in task_list), key=lambda v: v.size)
    vocab_size = vocab.size
    decoder = config.model.decoder
    with config.unlocked():
        if not decoder.get("vocab_size"):
            decoder.vocab_size = vocab_size
        if decoder.get("coord_offset") is None:
            decoder.coord_offset = vocab.coord_offset
        if not decoder.get("num_bins"):
            decoder.num_bins = vocab.num_bins
        if config.model.get("token_labels", False) and not config.model.get("num_classes"):
            config.model.num_classes = vocab.num_classes
    _check_token_labels(config, vocab.num_classes)
    if decoder.vocab_size < vocab_size:
        raise ValueError(
            f"config.model.decoder.vocab_size={decoder.vocab_size} < the tasks' vocabulary "
            f"size {vocab_size} (classes, coordinate bins, text); set it to {vocab_size} or 0."
        )
    if decoder.max_len < config.data.task.seq_len:
        raise ValueError(
            f"config.model.decoder.max_len={decoder.max_len} < data.task.seq_len="
            f"{config.data.task.seq_len}; the decoder's position table must cover every row."
        )
    pipeline.check_model_patch_size(config.model.patch_size, config.data, "config.model.patch_size")


def token_label_weight(config: ml_collections.ConfigDict) -> float:
    """`loss.token_label_weight` (0 when the recipe's loss section has none)."""
    return float(config.get("loss", default_loss_config()).get("token_label_weight", 0.0))


def _check_token_labels(config: ml_collections.ConfigDict, num_classes: int) -> None:
    """The three token-label fields agree (module docstring)."""
    weight = token_label_weight(config)
    on = {
        "data.token_labels": bool(config.data.get("token_labels", False)),
        "model.token_labels": bool(config.model.get("token_labels", False)),
    }
    if weight < 0:
        raise ValueError(f"loss.token_label_weight={weight}; use 0 (off) or a positive weight.")
    if weight > 0 and not all(on.values()):
        off = [name for name, value in on.items() if not value]
        raise ValueError(
            f"loss.token_label_weight={weight} needs token labels, but {off} is False; set "
            "data.token_labels=True and model.token_labels=True (or the weight to 0)."
        )
    if on["model.token_labels"] and config.model.num_classes != num_classes:
        raise ValueError(
            f"model.num_classes={config.model.num_classes} but the tasks have {num_classes} "
            "classes; set model.num_classes=0 to take the tasks'."
        )


def model_fn(config: ml_collections.ConfigDict):
    """Builds Pix2Seq of `config.model` with parameters from `config.seed`."""
    from navit_seq.models.pix2seq import Pix2Seq

    return lambda: Pix2Seq(config.model, rngs=nnx.Rngs(config.seed))


def _metrics(
    loss_sum: jax.Array,
    weight_sum: jax.Array,
    weighted: jax.Array,
    batch: Mapping[str, Any],
    ids: Mapping[str, int],
) -> MetricDict:
    metrics: MetricDict = {"loss": WeightedAverage(total=loss_sum, count=weight_sum)}
    per_task = losses.per_task_sums(weighted, batch["decoder_weights"], batch, ids)
    for name, (task_loss, task_weight) in per_task.items():
        metrics[f"loss/{name}"] = TaskAverage(total=task_loss, count=task_weight)
        metrics[f"weight_share/{name}"] = WeightedAverage(total=task_weight, count=weight_sum)
    return metrics


def _token_label_metrics(outputs: Mapping[str, jax.Array], batch: Mapping[str, Any]):
    """(sum of token-label ce, its metrics)."""
    ce_sum, count, right = token_label_losses.token_label_sums(outputs["token_logits"], batch)
    metrics = {
        "loss/token_labels": WeightedAverage(total=ce_sum, count=count),
        "token_label_accuracy": WeightedAverage(total=right, count=count),
    }
    return ce_sum, metrics


def make_loss(config: ml_collections.ConfigDict, ids: Mapping[str, int]):
    """loss(model, batch, deterministic) -> (sum of w * ce [+ token-label sum], sum of w,
    metrics)."""
    smoothing = config.get("loss", default_loss_config()).get("label_smoothing", 0.0)
    label_weight = token_label_weight(config)

    def loss(
        model: nnx.Module, batch: Mapping[str, Any], deterministic: bool
    ) -> tuple[jax.Array, jax.Array, MetricDict]:
        outputs = model(batch, deterministic=deterministic)
        loss_sum, weight_sum, weighted = losses.weighted_sums(
            outputs["logits"], batch["decoder_target"], batch["decoder_weights"], smoothing
        )  # logits [B, R, T, V]
        metrics = _metrics(loss_sum, weight_sum, weighted, batch, ids)
        if label_weight > 0:
            label_sum, label_metrics = _token_label_metrics(outputs, batch)
            loss_sum = loss_sum + label_weight * label_sum
            metrics.update(label_metrics)
        return loss_sum, weight_sum, metrics

    return loss


def make_eval_metrics(config: ml_collections.ConfigDict, ids: Mapping[str, int]):
    """Teacher-forced token loss, overall and per task (no dropout, no label smoothing), and
    the token-label loss when the model has the head and the batch the labels."""
    del config  # what the model and the batch hold decides what is reported

    def eval_metrics(model: nnx.Module, batch: Mapping[str, Any]) -> MetricDict:
        outputs = model(batch, deterministic=True)
        loss_sum, weight_sum, weighted = losses.weighted_sums(
            outputs["logits"], batch["decoder_target"], batch["decoder_weights"]
        )
        metrics = _metrics(loss_sum, weight_sum, weighted, batch, ids)
        # Token labels are reported beside the decoder's loss, never added to it.
        if "token_logits" in outputs and TOKEN_LABELS in batch.get("targets", {}):
            metrics.update(_token_label_metrics(outputs, batch)[1])
        return metrics

    return eval_metrics


def objective(config: ml_collections.ConfigDict) -> Objective:
    """The sequence objective of a recipe (`config.trainer = "sequence"`). The recipe's tasks
    are built here, once per run (each reads the dataset's class names and tokenizer), and
    handed to the pipeline and to inference."""
    task_list = sequence_tasks(config.data)
    resolve_config(config, task_list)
    ids = task_ids(config, task_list)
    return Objective(
        # The packed images (loop.IMAGE_KEYS), each slot's task (per-task losses), the rows.
        batch_keys=(
            "patches",
            "segment_ids",
            "patch_coords",
            "image_grid",
            "example_valid",
            "task_id",
            "row_slot",
            "decoder_input",
            "decoder_target",
            "decoder_weights",
            # The token-label grids ride in the per-slot targets.
            *(("targets",) if token_label_weight(config) > 0 else ()),
        ),
        model_fn=model_fn(config),
        loss=make_loss(config, ids),
        eval_metrics=make_eval_metrics(config, ids),
        train_iterator=lambda: pipeline.train_batches(config.data, task_list),
        eval_iterator=lambda: pipeline.eval_batches(config.data, task_list),
        evaluate_split=split_evaluation(config, task_list) if "evaluation" in config else None,
    )


def split_evaluation(
    config: ml_collections.ConfigDict, task_list: Sequence[SequenceTask] | None = None
):
    """(model, step) -> COCO AP and caption metrics of `config.evaluation` (navit_seq.inference)."""

    def evaluate_split(model: nnx.Module, step: int) -> dict[str, float]:
        del step  # the same images every time, so values compare across steps
        return inference.evaluate_split(config, model, task_list)

    return evaluate_split
