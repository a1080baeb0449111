"""Weighted token cross-entropy vs a float64 numpy reference; per-task sums; padding safety."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from navit_seq.losses import sequence

B, R, T, V = 2, 3, 5, 11


def numpy_token_xent(logits, targets, smoothing=0.0):
    """float64 reference: cross-entropy against (1 - s) one_hot + s / V."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    labels = np.eye(logits.shape[-1])[targets] * (1 - smoothing) + smoothing / logits.shape[-1]
    return -(labels * log_probs).sum(-1)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (B, R, T, V)).astype(np.float32)
    targets = rng.integers(0, V, (B, R, T))
    weights = rng.choice([0.0, 0.1, 1.0], (B, R, T)).astype(np.float32)
    weights[1, 2] = 0.0  # a padding row
    batch = {
        "row_slot": np.array([[0, 1, 1], [0, 2, -1]], np.int32),
        "task_id": np.array([[1, 4, 0], [4, 0, 2]], np.int32),
    }
    return logits, targets, weights, batch


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_weighted_cross_entropy_matches_float64_numpy(inputs, smoothing):
    logits, targets, weights, _ = inputs
    per_token = numpy_token_xent(logits, targets, smoothing)
    expected = (per_token * weights).sum() / weights.sum()
    got = sequence.weighted_cross_entropy(logits, targets, weights, smoothing)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_per_task_sums_follow_the_task_of_each_rows_image(inputs):
    logits, targets, weights, batch = inputs
    _, _, weighted = sequence.weighted_sums(logits, targets, weights)
    sums = sequence.per_task_sums(
        weighted, weights, batch, {"detection": 1, "captioning": 4, "segmentation": 2}
    )
    per_token = numpy_token_xent(logits, targets) * weights
    # Rows by hand: (0,0) slot 0 -> task 1; (0,1), (0,2) slot 1 -> task 4; (1,0) slot 0 -> 4;
    # (1,1) slot 2 -> 2; (1,2) padding.
    rows = {"detection": [(0, 0)], "captioning": [(0, 1), (0, 2), (1, 0)], "segmentation": [(1, 1)]}
    for name, members in rows.items():
        loss_sum, weight_sum = sums[name]
        np.testing.assert_allclose(float(loss_sum), sum(per_token[m].sum() for m in members), 1e-5)
        np.testing.assert_allclose(float(weight_sum), sum(weights[m].sum() for m in members), 1e-6)
    np.testing.assert_array_equal(sequence.row_task_ids(batch), [[1, 4, 4], [4, 2, -1]])


def test_zero_weight_tokens_with_non_finite_logits_leave_loss_and_gradient_finite(inputs):
    logits, targets, weights, _ = inputs
    logits = logits.copy()
    logits[1, 2] = np.nan  # the padding row (weight 0) holds garbage
    loss, grads = jax.value_and_grad(sequence.weighted_cross_entropy)(
        jnp.asarray(logits), targets, weights
    )
    assert np.isfinite(float(loss))
    assert np.isfinite(np.asarray(grads)).all()
    assert not np.asarray(grads)[1, 2].any()
    per_token = numpy_token_xent(inputs[0], targets) * weights  # the finite original logits
    np.testing.assert_allclose(float(loss), per_token.sum() / weights.sum(), rtol=1e-5)


def test_batch_without_any_weight_gives_zero_not_nan(inputs):
    logits, targets, weights, _ = inputs
    loss = sequence.weighted_cross_entropy(logits, targets, np.zeros_like(weights))
    assert float(loss) == 0.0
