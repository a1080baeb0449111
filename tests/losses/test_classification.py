"""Classification losses and top-1 against float64 numpy, padding examples excluded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from navit_seq.losses.classification import (
    get_loss,
    sigmoid_cross_entropy,
    softmax_cross_entropy,
    top1_correct,
)

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(2, 3, 4)).astype(np.float32) * 3
MULTI_HOT = (RNG.random((2, 3, 4)) < 0.4).astype(np.float32)
ONE_HOT = np.eye(4, dtype=np.float32)[RNG.integers(0, 4, (2, 3))]
EXAMPLE_VALID = np.array([[True, True, False], [True, False, False]])


def numpy_sigmoid_xent(logits, labels):
    x = logits.astype(np.float64)
    log_p, log_not_p = -np.logaddexp(0, -x), -np.logaddexp(0, x)
    return -(labels * log_p + (1 - labels) * log_not_p).sum(-1)


def numpy_softmax_xent(logits, labels):
    x = logits.astype(np.float64)
    log_softmax = x - x.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    return -(labels * log_softmax).sum(-1)


def test_sigmoid_cross_entropy_matches_numpy_mean_over_valid_examples():
    got = sigmoid_cross_entropy(LOGITS, MULTI_HOT, EXAMPLE_VALID)
    expected = numpy_sigmoid_xent(LOGITS, MULTI_HOT)[EXAMPLE_VALID].mean()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_softmax_cross_entropy_matches_numpy_mean_over_valid_examples():
    got = softmax_cross_entropy(LOGITS, ONE_HOT, EXAMPLE_VALID)
    expected = numpy_softmax_xent(LOGITS, ONE_HOT)[EXAMPLE_VALID].mean()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("name", ("sigmoid_xent", "softmax_xent"))
def test_padding_examples_get_zero_gradient_even_with_nan_logits(name):
    logits = LOGITS.copy()
    logits[~EXAMPLE_VALID] = np.nan  # whatever a padding slot holds must not leak in
    loss = lambda x: get_loss(name)(x, ONE_HOT, EXAMPLE_VALID)
    value, grads = jax.value_and_grad(loss)(jnp.asarray(logits))
    assert np.isfinite(value)
    assert not np.asarray(grads)[~EXAMPLE_VALID].any()
    assert np.abs(np.asarray(grads)[EXAMPLE_VALID]).sum() > 0


def test_batch_without_valid_examples_gives_zero_loss():
    no_valid = np.zeros_like(EXAMPLE_VALID)
    assert float(sigmoid_cross_entropy(LOGITS, MULTI_HOT, no_valid)) == 0.0


def test_top1_correct_when_argmax_is_a_positive_label():
    logits = np.array([[[0.1, 2.0, 0.3], [5.0, 0.0, 1.0]]])
    labels = np.array([[[0, 1, 1], [0, 0, 1]]], np.float32)
    np.testing.assert_array_equal(top1_correct(logits, labels), [[True, False]])


def test_unknown_loss_name_raises_listing_choices():
    with pytest.raises(ValueError, match="'hinge' is not one of"):
        get_loss("hinge")
