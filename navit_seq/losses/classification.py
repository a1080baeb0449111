"""Classification losses and top-1 metric on per-example logits [B, E_max, C].

Labels are [B, E_max, C]: multi-hot for sigmoid cross-entropy, a distribution (one-hot or
smoothed) for softmax cross-entropy. Padding examples (`example_valid` False) are excluded
from every loss and metric; a batch with no valid example gives 0, not NaN.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax


def per_example_sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Sigmoid cross-entropy summed over classes: [B, E, C] -> [B, E] (big_vision style)."""
    losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)
    return losses.sum(-1)


def per_example_softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy against a label distribution: [B, E, C] -> [B, E]."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)


def masked_mean(values: jax.Array, example_valid: jax.Array) -> jax.Array:
    """Mean of `values` [B, E] over valid examples; 0 when there are none."""
    total = jnp.where(example_valid, values, 0).sum()
    return total / jnp.maximum(example_valid.sum(), 1)


def _valid_logits(logits: jax.Array, example_valid: jax.Array) -> jax.Array:
    """Zeros the logits of padding examples *before* the loss: a `where` after it would still
    send NaN gradients through whatever a padding slot holds."""
    return jnp.where(example_valid[..., None], logits, 0)


def sigmoid_cross_entropy(
    logits: jax.Array, labels: jax.Array, example_valid: jax.Array
) -> jax.Array:
    """Scalar: mean over valid examples of the per-example sigmoid cross-entropy."""
    logits = _valid_logits(logits, example_valid)
    return masked_mean(per_example_sigmoid_xent(logits, labels), example_valid)


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, example_valid: jax.Array
) -> jax.Array:
    """Scalar: mean over valid examples of the per-example softmax cross-entropy."""
    logits = _valid_logits(logits, example_valid)
    return masked_mean(per_example_softmax_xent(logits, labels), example_valid)


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """[B, E] bool: the highest-scoring class is a positive label (precision@1)."""
    predicted = jnp.argmax(logits, axis=-1)  # [B, E]
    return jnp.take_along_axis(labels, predicted[..., None], axis=-1)[..., 0] > 0


LOSSES: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "sigmoid_xent": sigmoid_cross_entropy,
    "softmax_xent": softmax_cross_entropy,
}


def get_loss(name: str) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """The loss `name` ("sigmoid_xent" or "softmax_xent") with a clear error otherwise."""
    if name not in LOSSES:
        raise ValueError(f"classification loss {name!r} is not one of {tuple(LOSSES)}.")
    return LOSSES[name]
