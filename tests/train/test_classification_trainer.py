"""The classification objective's loss and metrics against float64 numpy."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from navit_seq.train import classification, loop


class FixedLogits:
    """A stand-in model returning given logits (the objective only reads `logits`)."""

    def __init__(self, logits):
        self.logits = jnp.asarray(logits)

    def __call__(self, batch, deterministic):
        return {"logits": self.logits}


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)) * 3
    labels = (rng.random((2, 3, 5)) < 0.4).astype(np.float32)
    valid = np.array([[True, True, False], [True, False, False]])
    logits[~valid] = 1e4  # garbage in empty slots must not leak into anything
    batch = {"example_valid": jnp.asarray(valid), "targets": {"labels": jnp.asarray(labels)},
             "segment_ids": jnp.zeros((2, 4), jnp.int32)}  # fmt: skip
    return logits, labels, valid, batch


def numpy_sigmoid_xent(logits, labels):
    logits = logits.astype(np.float64)
    log_p, log_not_p = -np.logaddexp(0, -logits), -np.logaddexp(0, logits)
    return -(labels * log_p + (1 - labels) * log_not_p).sum(-1)  # [B, E]


def test_loss_sum_and_weight_match_numpy_over_valid_examples_only(case):
    logits, labels, valid, batch = case
    config = ml_collections.ConfigDict({"loss": "sigmoid_xent"})
    loss_sum, weight, metrics = classification.make_loss(config)(FixedLogits(logits), batch, False)
    expected = numpy_sigmoid_xent(logits, labels)[valid]
    np.testing.assert_allclose(float(loss_sum), expected.sum(), rtol=1e-5)
    assert float(weight) == valid.sum()
    scalars = loop.compute_metrics(metrics)
    np.testing.assert_allclose(scalars["loss"], expected.mean(), rtol=1e-5)


def test_precision_at_1_and_accuracy_match_numpy(case):
    logits, labels, valid, batch = case
    config = ml_collections.ConfigDict({"loss": "sigmoid_xent"})
    scalars = loop.compute_metrics(
        classification.make_eval_metrics(config)(FixedLogits(logits), batch)
    )
    top1 = logits.argmax(-1)
    hit = np.take_along_axis(labels, top1[..., None], -1)[..., 0]
    accuracy = ((logits > 0) == (labels > 0.5)).mean(-1)
    np.testing.assert_allclose(scalars["precision_at_1"], hit[valid].mean(), rtol=1e-6)
    np.testing.assert_allclose(scalars["accuracy"], accuracy[valid].mean(), rtol=1e-6)


def test_unknown_loss_name_is_rejected_naming_the_field():
    with pytest.raises(ValueError, match="config.loss='hinge'"):
        classification.make_loss(ml_collections.ConfigDict({"loss": "hinge"}))


def test_model_and_dataset_class_counts_must_agree():
    config = ml_collections.ConfigDict(
        {"data": {"task": {"num_classes": 12}, "patch_size": 16},
         "model": {"num_classes": 10, "patch_size": 16}}
    )  # fmt: skip
    with pytest.raises(ValueError, match="model.num_classes=10 but the dataset's"):
        classification.resolve_num_classes(config)
