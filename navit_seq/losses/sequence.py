"""Weighted token cross-entropy for Pix2Seq-style decoder rows (Chen et al. 2022, §3.3).

Logits `[B, R_max, T, V]` against `decoder_target [B, R_max, T]` with `decoder_weights
[B, R_max, T]` (prompt targets and PAD weigh 0, END 0.1, architecture.md §7). The loss is
sum(w * ce) / sum(w) over all tokens of the batch, so padding rows (weight 0) never count and a
batch without weight gives 0, not NaN. Label smoothing spreads `label_smoothing` of the target's
mass uniformly over the vocabulary. Per-task losses, for logging, use the
task of each row's image: `task_id[b, row_slot[b, r]]`.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax


def token_cross_entropy(
    logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-token cross-entropy [...] of logits [..., V] against integer targets [...].

    With smoothing, the target distribution is (1 - s) one_hot + s / V (optax.smooth_labels),
    computed without materializing the [..., V] one-hot: -(1 - s) log p_t - s mean(log p).
    """
    logits = logits.astype(jnp.float32)
    if label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    log_probs = jax.nn.log_softmax(logits, axis=-1)  # [..., V]
    target_log_probs = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return -(1.0 - label_smoothing) * target_log_probs - label_smoothing * log_probs.mean(-1)


def weighted_sums(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of w * ce, sum of w, per-token w * ce [B, R, T]) over every token.

    Sums (not the mean) let gradient accumulation and per-task logging divide exactly once.
    A token of weight 0 contributes exactly 0 even when its logits are not finite.
    """
    weights = weights.astype(jnp.float32)
    # Zero the logits of weightless tokens *before* the loss: a `where` after it alone would
    # still send NaN gradients back through whatever a padding row holds.
    logits = jnp.where(weights[..., None] > 0, logits, 0)
    per_token = token_cross_entropy(logits, targets, label_smoothing)  # [B, R, T]
    weighted = jnp.where(weights > 0, per_token * weights, 0.0)  # [B, R, T]
    return weighted.sum(), weights.sum(), weighted


def weighted_cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Scalar sum(w * ce) / sum(w); 0 when every weight is 0."""
    loss_sum, weight_sum, _ = weighted_sums(logits, targets, weights, label_smoothing)
    return loss_sum / jnp.maximum(weight_sum, 1e-9)


def row_task_ids(batch: Mapping[str, Any]) -> jax.Array:
    """[B, R_max] task id of each decoder row's image; -1 for padding rows."""
    row_slot = batch["row_slot"]  # [B, R_max]
    task_of_row = jnp.take_along_axis(batch["task_id"], jnp.maximum(row_slot, 0), axis=1)
    return jnp.where(row_slot >= 0, task_of_row, -1)


def per_task_sums(
    weighted_tokens: jax.Array,
    weights: jax.Array,
    batch: Mapping[str, Any],
    task_ids: Mapping[str, int],
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """name -> (sum of w * ce, sum of w) over the rows of that task (`task_ids`: name -> id).

    `weighted_tokens` is the per-token w * ce of `weighted_sums`; divide the two sums for a
    task's loss (skip tasks whose weight sum is 0: they had no row in the batch).
    """
    row_tasks = row_task_ids(batch)  # [B, R_max]
    row_loss = weighted_tokens.sum(-1)  # [B, R_max]
    row_weight = weights.astype(jnp.float32).sum(-1)  # [B, R_max]
    sums = {}
    for name, task_id in task_ids.items():
        of_task = row_tasks == task_id  # [B, R_max]
        sums[name] = (
            jnp.where(of_task, row_loss, 0.0).sum(),
            jnp.where(of_task, row_weight, 0.0).sum(),
        )
    return sums
