"""Classifier head: logits from pooled vectors, empty slots, and padding-free training signal."""

import jax
import numpy as np
import pytest
from flax import nnx

from navit_seq.losses.classification import sigmoid_cross_entropy
from navit_seq.models.classifier import Classifier
from navit_seq.models.navit import default_model_config

NUM_CLASSES, PATCH_DIM = 5, 12


def tiny_config(**overrides):
    config = default_model_config()
    config.update(dict(width=32, depth=1, num_heads=4, mlp_dim=64, patch_size=2))
    config.update(dict(num_classes=NUM_CLASSES, pooling="mean", head_bias_init=-2.0))
    config.posemb.update(dict(embedding="sinusoidal"))
    config.update(overrides)
    return config


def small_batch() -> dict[str, np.ndarray]:
    """Row 0: images of 3 and 2 tokens + padding; row 1: one image of 4 tokens, empty slot."""
    rng = np.random.default_rng(0)
    segment_ids = np.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]], np.int32)
    return {
        "patches": rng.integers(0, 256, (2, 6, PATCH_DIM), dtype=np.uint8),
        "segment_ids": segment_ids,
        "patch_coords": np.array([[[0, 0], [0, 1], [0, 2], [0, 0], [1, 0], [0, 0]],
                                  [[0, 0], [0, 1], [1, 0], [1, 1], [0, 0], [0, 0]]], np.int32),
        "image_grid": np.array([[[1, 3], [2, 1]], [[2, 2], [0, 0]]], np.int32),
        "example_valid": np.array([[True, True], [True, False]]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    model = Classifier(tiny_config(), rngs=nnx.Rngs(0))
    # Zero-initialised kernel: give it values so the test can see the matmul.
    kernel = np.random.default_rng(1).normal(size=model.head.kernel[...].shape)
    model.head.kernel[...] = kernel.astype(np.float32)
    return model


def test_logits_are_head_of_pooled_vectors_and_zero_for_empty_slots(classifier):
    outputs = classifier(small_batch(), deterministic=True)
    pooled, logits = np.asarray(outputs["pooled"], np.float64), np.asarray(outputs["logits"])
    kernel, bias = (np.asarray(p[...], np.float64) for p in (classifier.head.kernel,
                                                             classifier.head.bias))  # fmt: skip
    assert logits.shape == (2, 2, NUM_CLASSES)
    valid = small_batch()["example_valid"]
    np.testing.assert_allclose(logits[valid], pooled[valid] @ kernel + bias, rtol=1e-5)
    assert not logits[~valid].any()
    np.testing.assert_allclose(bias, -2.0)


def test_labels_of_padding_examples_have_no_effect_on_loss_or_gradients(classifier):
    batch = small_batch()
    graphdef, params, rest = nnx.split(classifier, nnx.Param, ...)

    def loss(params, labels):
        logits = nnx.merge(graphdef, params, rest)(batch, deterministic=True)["logits"]
        return sigmoid_cross_entropy(logits, labels, batch["example_valid"])

    labels = np.zeros((2, 2, NUM_CLASSES), np.float32)
    labels[0, 0, 1] = labels[0, 1, 3] = labels[1, 0, 0] = 1
    noisy = labels.copy()
    noisy[1, 1] = 1  # labels on the empty slot
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    (clean_loss, clean_grads), (noisy_loss, noisy_grads) = (
        value_and_grad(params, labels), value_and_grad(params, noisy)
    )  # fmt: skip
    assert clean_loss == noisy_loss
    for clean, noisy in zip(
        jax.tree.leaves(clean_grads), jax.tree.leaves(noisy_grads), strict=True
    ):
        np.testing.assert_array_equal(clean, noisy)


def test_pooling_none_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="model.pooling='none'"):
        Classifier(tiny_config(pooling="none"), rngs=nnx.Rngs(0))
