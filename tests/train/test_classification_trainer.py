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


@pytest.fixture(scope="module")
def scenes_recipe(scenes_data_dir):
    """The quickstart recipe, 3 steps, on the session's tiny scene dataset (no grain workers)."""
    from navit_seq import config_utils

    config = config_utils.load_config_file("configs/quickstart.py:steps=3")
    config.data.data_dir = scenes_data_dir
    config.data.num_workers = 0
    config.data.batch_size = 8
    config.log_every_steps = 1
    config.eval_every_steps = 3
    config.checkpoint_every_steps = 3
    return config


def logged_losses(workdir, split):
    import json

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == split]


def train_scenes(recipe, workdir, mesh_shape, num_devices):
    """(train losses, eval losses) of the recipe trained in-process on `mesh_shape`."""
    config = ml_collections.ConfigDict(recipe.to_dict())
    config.mesh.shape, config.mesh.num_devices = mesh_shape, num_devices
    loop.train_and_evaluate(config, workdir, classification.objective(config))
    return logged_losses(workdir, "train"), logged_losses(workdir, "eval")


@pytest.fixture(scope="module")
def single_device_scenes_run(scenes_recipe, tmp_path_factory):
    return train_scenes(scenes_recipe, tmp_path_factory.mktemp("scenes"), (1, 1, 1), 1)


def test_quickstart_recipe_trains_and_evaluates_on_the_scene_dataset(single_device_scenes_run):
    train_losses, eval_losses = single_device_scenes_run
    assert len(train_losses) == 3 and len(eval_losses) == 1
    assert np.all(np.isfinite(train_losses + eval_losses))


@pytest.mark.slow
def test_quickstart_on_scenes_gives_equal_losses_on_one_device_and_a_2x2x2_mesh(
    scenes_recipe, single_device_scenes_run, tmp_path
):
    train_losses, eval_losses = train_scenes(scenes_recipe, tmp_path, (2, 2, 2), -1)
    np.testing.assert_allclose(train_losses, single_device_scenes_run[0], rtol=1e-5)
    np.testing.assert_allclose(eval_losses, single_device_scenes_run[1], rtol=1e-5)


@pytest.mark.slow
def test_fused_cpu_attention_on_a_2x2x2_mesh_trains_like_xla_on_one_device(
    scenes_recipe, single_device_scenes_run, tmp_path
):
    recipe = ml_collections.ConfigDict(scenes_recipe.to_dict())
    recipe.model.attention_impl = "fused_cpu"
    recipe.optimizer.grad_accum_steps = 2  # the kernel inside the accumulation scan as well
    train_losses, eval_losses = train_scenes(recipe, tmp_path, (2, 2, 2), -1)
    np.testing.assert_allclose(train_losses, single_device_scenes_run[0], rtol=1e-4)
    np.testing.assert_allclose(eval_losses, single_device_scenes_run[1], rtol=1e-4)
