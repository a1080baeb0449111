"""The classification objective (NaViT's pretraining): sigmoid cross-entropy on pooled examples.

Plugs into the shared loop (`navit_seq.train.loop`): the model, the loss and eval metrics over
packed batches, and the grain iterators. Padding examples (`example_valid` False) are excluded
from the loss and from every metric.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from clu import metrics as clu_metrics
from flax import nnx

from navit_seq import pipeline
from navit_seq.losses import classification as losses
from navit_seq.train.loop import IMAGE_KEYS, MetricDict, Objective

# What the classifier and its loss read: the packed images and their multi-hot labels.
BATCH_KEYS = (*IMAGE_KEYS, "targets")


def per_example_losses(config: ml_collections.ConfigDict):
    """The recipe's per-example loss [B, E, C] -> [B, E] (`config.loss`: sigmoid or softmax)."""
    per_example = {
        "sigmoid_xent": losses.per_example_sigmoid_xent,
        "softmax_xent": losses.per_example_softmax_xent,
    }
    name = config.get("loss", "sigmoid_xent")
    if name not in per_example:
        raise ValueError(f"config.loss={name!r} is not one of {tuple(per_example)}.")
    return per_example[name]


def _metrics(per_example: jax.Array, logits: jax.Array, batch: Mapping[str, Any]) -> MetricDict:
    valid = batch["example_valid"]  # [B, E]
    labels = batch["targets"]["labels"]  # [B, E, C]
    # precision@1: the top-scoring class is one of the image's classes (big_vision's metric).
    precision_at_1 = losses.top1_correct(logits, labels).astype(jnp.float32)  # [B, E]
    # accuracy: fraction of (example, class) yes/no decisions right at probability 0.5.
    accuracy = ((logits > 0) == (labels > 0.5)).mean(axis=-1)  # [B, E]
    return {
        "loss": clu_metrics.Average.from_model_output(per_example, mask=valid),
        "precision_at_1": clu_metrics.Average.from_model_output(precision_at_1, mask=valid),
        "accuracy": clu_metrics.Average.from_model_output(accuracy, mask=valid),
    }


def make_loss(config: ml_collections.ConfigDict):
    """loss(model, batch, deterministic) -> (summed loss over valid examples, #valid, metrics)."""
    per_example_fn = per_example_losses(config)

    def loss(
        model: nnx.Module, batch: Mapping[str, Any], deterministic: bool
    ) -> tuple[jax.Array, jax.Array, MetricDict]:
        logits = model(batch, deterministic=deterministic)["logits"]  # [B, E, C] float32
        valid = batch["example_valid"]  # [B, E]
        per_example = per_example_fn(logits, batch["targets"]["labels"])  # [B, E]
        loss_sum = jnp.sum(jnp.where(valid, per_example, 0.0))
        return loss_sum, jnp.sum(valid).astype(jnp.float32), _metrics(per_example, logits, batch)

    return loss


def make_eval_metrics(config: ml_collections.ConfigDict):
    """Loss, precision@1 and accuracy over a batch's valid examples (no dropout)."""
    per_example_fn = per_example_losses(config)

    def eval_metrics(model: nnx.Module, batch: Mapping[str, Any]) -> MetricDict:
        logits = model(batch, deterministic=True)["logits"]
        per_example = per_example_fn(logits, batch["targets"]["labels"])
        return _metrics(per_example, logits, batch)

    return eval_metrics


def resolve_num_classes(config: ml_collections.ConfigDict) -> None:
    """Fills data.task.num_classes (0 = from the dataset) and checks the model agrees."""
    task = config.data.task
    if not task.get("num_classes"):
        from navit_seq.data import sources  # TFDS import only when a dataset is read

        with config.unlocked():
            names = sources.class_names(config.data.name, data_dir=config.data.data_dir)
            task.num_classes = len(names)
    if not config.model.get("num_classes") or config.model.num_classes <= 0:
        with config.unlocked():
            config.model.num_classes = task.num_classes
    if config.model.num_classes != task.num_classes:
        raise ValueError(
            f"config.model.num_classes={config.model.num_classes} but the dataset's "
            f"data.task.num_classes={task.num_classes}; make them equal (or set the model's to 0)."
        )
    pipeline.check_model_patch_size(config.model.patch_size, config.data, "config.model.patch_size")


def model_fn(config: ml_collections.ConfigDict):
    """Builds the classifier of `config.model` with parameters from `config.seed`."""
    from navit_seq.models.classifier import Classifier

    return lambda: Classifier(config.model, rngs=nnx.Rngs(config.seed))


def objective(config: ml_collections.ConfigDict) -> Objective:
    """The classification objective of a recipe (`config.trainer = "classification"`)."""
    resolve_num_classes(config)
    return Objective(
        batch_keys=BATCH_KEYS,
        model_fn=model_fn(config),
        loss=make_loss(config),
        eval_metrics=make_eval_metrics(config),
        train_iterator=lambda: pipeline.train_batches(config.data),
        eval_iterator=lambda: pipeline.eval_batches(config.data),
    )
