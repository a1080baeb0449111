"""The shared train step: mesh-independence, gradient accumulation, EMA, NaN guard."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from train.toy import toy_config, toy_objective

from navit_seq import sharding
from navit_seq.train import loop
from navit_seq.train import metrics as metrics_lib

NUM_STEPS = 4


def run_steps(config, num_steps=NUM_STEPS):
    """(per-step losses, final state, trainer) for `num_steps` steps of the toy objective."""
    objective = toy_objective(config)
    trainer = loop.Trainer(config, objective)
    state = trainer.init_state()
    batches = objective.train_iterator()
    losses = []
    for _ in range(num_steps):
        state, metrics = trainer.train_step(state, trainer.global_batch(next(batches)))
        losses.append(loop.compute_metrics(metrics)["loss"])
    return np.array(losses), state, trainer


@pytest.fixture(scope="module")
def single_device_losses():
    return run_steps(toy_config((1, 1, 1), num_devices=1))[0]


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_losses_on_a_mesh_equal_single_device_losses(mesh_shape, single_device_losses):
    losses, state, _ = run_steps(toy_config(mesh_shape))
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
    assert losses[-1] < losses[0]  # and it does learn
    if mesh_shape == (2, 2, 2):  # the updated state stays sharded as the rules say
        kernel = state.params["mlp"]["kernel"][...]
        assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")


def test_gradient_accumulation_equals_the_full_batch_step():
    config = toy_config((2, 2, 1), num_devices=4)
    config.model.dropout = 0.0  # micro-batches draw different dropout masks
    full_losses, full_state, _ = run_steps(config, 2)
    config.optimizer.grad_accum_steps = 2
    accum_losses, accum_state, _ = run_steps(config, 2)
    np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
    pairs = zip(
        jax.tree.leaves(accum_state.params), jax.tree.leaves(full_state.params), strict=True
    )
    for a, b in pairs:
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_batch_not_divisible_by_shards_times_accumulation_raises():
    config = toy_config((8, 1, 1))
    config.optimizer.grad_accum_steps = 2
    with pytest.raises(ValueError, match="config.data.batch_size=8 must be divisible"):
        loop.Trainer(config, toy_objective(config))


@pytest.fixture(scope="module")
def one_ema_step():
    """(config, initial params, the batch, state after one step, its scalars), EMA decay 0.5."""
    config = toy_config((-1, 1, 1))
    config.optimizer.ema_decay = 0.5
    objective = toy_objective(config)
    trainer = loop.Trainer(config, objective)
    state = trainer.init_state()
    initial = jax.tree.map(np.asarray, state.params)
    local = next(objective.train_iterator())
    state, metrics = trainer.train_step(state, trainer.global_batch(local))
    return config, initial, local, state, loop.compute_metrics(metrics)


def test_ema_tracks_parameters_with_the_configured_decay(one_ema_step):
    _, initial, _, state, _ = one_ema_step
    expected = jax.tree.map(lambda p0, p1: 0.5 * p0 + 0.5 * np.asarray(p1), initial, state.params)
    for e, got in zip(jax.tree.leaves(expected), jax.tree.leaves(state.ema_params), strict=True):
        np.testing.assert_allclose(np.asarray(got), e, rtol=1e-6)


def test_train_step_reports_padding_fraction_and_counts_of_the_batch(one_ema_step):
    config, _, local, _, scalars = one_ema_step
    assert scalars["padding_fraction"] == pytest.approx(np.mean(local["segment_ids"] == 0))
    assert scalars["images_per_step"] == local["example_valid"].sum()
    assert scalars["tokens_per_step"] == (local["segment_ids"] > 0).sum()
    assert scalars["learning_rate"] == pytest.approx(config.optimizer.learning_rate)  # step 0
    assert np.isfinite(scalars["grad_norm"]) and scalars["grad_norm"] > 0


def test_only_the_objectives_batch_keys_go_to_devices(one_ema_step):
    config, _, local, _, _ = one_ema_step
    trainer = loop.Trainer(config, toy_objective(config))
    assert "example_id" in local and "task_id" in local  # host-only here: the toy never reads them
    assert set(trainer.global_batch(local)) == set(toy_objective(config).batch_keys)


def test_a_batch_key_the_objective_reads_but_the_batch_lacks_is_an_error_naming_it():
    batch = {"patches": np.zeros((1, 2, 3)), "segment_ids": np.zeros((1, 2))}
    with pytest.raises(ValueError, match=r"objective 'toy' reads batch keys \['targets'\]"):
        loop.model_inputs(batch, ("patches", "targets"), reader="objective 'toy'")


def test_an_objective_without_the_steps_own_keys_is_refused_naming_them():
    import dataclasses

    config = toy_config((-1, 1, 1))
    objective = dataclasses.replace(toy_objective(config), batch_keys=("patches", "targets"))
    with pytest.raises(ValueError, match=r"lack \['segment_ids', 'example_valid'\]"):
        loop.Trainer(config, objective)


def test_non_finite_metrics_stop_with_the_last_good_checkpoint_named():
    with pytest.raises(metrics_lib.NonFiniteError, match="step 7.*last good checkpoint is /c/6"):
        metrics_lib.check_finite(7, {"loss": float("nan"), "grad_norm": 1.0}, "/c/6")
    metrics_lib.check_finite(7, {"loss": 0.5}, None)  # finite: no error


def test_mesh_shardings_and_batch_axis_come_from_config():
    config = toy_config((2, 2, 2))
    trainer = loop.Trainer(config, toy_objective(config))
    assert trainer.batch_sharding.spec == PartitionSpec(("data", "fsdp"))
    assert sharding.batch_axis_size(trainer.mesh, trainer.rules) == 4
