"""The classification objective (NaViT's pretraining): sigmoid cross-entropy on pooled examples.

Plugs into the shared loop (`navit_seq.train.loop`): the model, the loss and eval metrics over
packed batches, and the grain iterators. Padding examples (`example_valid` False) are excluded
from the loss and from every metric.
"""

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics
from flax import nnx

from navit_seq.train.loop import MetricDict, Objective


def per_example_losses(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Sigmoid cross-entropy summed over classes: [B, E, C] -> [B, E]."""
    return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)


def _metrics(per_example: jax.Array, logits: jax.Array, batch: Mapping[str, Any]) -> MetricDict:
    valid = batch["example_valid"]  # [B, E]
    labels = batch["targets"]["labels"]  # [B, E, C]
    top1 = jnp.argmax(logits, axis=-1)  # [B, E]
    # precision@1: the top-scoring class is one of the image's classes (big_vision's metric).
    precision_at_1 = jnp.take_along_axis(labels, top1[..., None], axis=-1)[..., 0]
    # accuracy: fraction of (example, class) decisions right at threshold 0.5.
    accuracy = ((logits > 0) == (labels > 0.5)).mean(axis=-1)
    return {
        "loss": clu_metrics.Average.from_model_output(per_example, mask=valid),
        "precision_at_1": clu_metrics.Average.from_model_output(precision_at_1, mask=valid),
        "accuracy": clu_metrics.Average.from_model_output(accuracy, mask=valid),
    }


def loss(
    model: nnx.Module, batch: Mapping[str, Any], deterministic: bool
) -> tuple[jax.Array, jax.Array, MetricDict]:
    """(summed loss over valid examples, number of valid examples, metrics)."""
    logits = model(batch, deterministic=deterministic)["logits"].astype(jnp.float32)  # [B, E, C]
    valid = batch["example_valid"]  # [B, E]
    per_example = per_example_losses(logits, batch["targets"]["labels"])  # [B, E]
    loss_sum = jnp.sum(jnp.where(valid, per_example, 0.0))
    return loss_sum, jnp.sum(valid).astype(jnp.float32), _metrics(per_example, logits, batch)


def eval_metrics(model: nnx.Module, batch: Mapping[str, Any]) -> MetricDict:
    """Loss, precision@1 and accuracy over the batch's valid examples (no dropout)."""
    logits = model(batch, deterministic=True)["logits"].astype(jnp.float32)
    per_example = per_example_losses(logits, batch["targets"]["labels"])
    return _metrics(per_example, logits, batch)


def model_fn(config: ml_collections.ConfigDict):
    """Builds the classifier of `config.model` with parameters from `config.seed`."""
    from navit_seq.models.classifier import Classifier

    return lambda: Classifier(config.model, rngs=nnx.Rngs(config.seed))


def train_iterator(config: ml_collections.ConfigDict) -> Iterator:
    """This host's checkpointable iterator over packed training batches."""
    from navit_seq.data import pipeline

    return iter(pipeline.make_train_dataset(config.data, seed=config.seed))


def eval_iterator(config: ml_collections.ConfigDict) -> Iterable:
    from navit_seq.data import pipeline

    return pipeline.make_eval_dataset(config.data)


def objective(config: ml_collections.ConfigDict) -> Objective:
    """The classification objective of a recipe (`config.trainer = "classification"`)."""
    return Objective(
        model_fn=model_fn(config),
        loss=loss,
        eval_metrics=eval_metrics,
        train_iterator=lambda: train_iterator(config),
        eval_iterator=lambda: eval_iterator(config),
    )
