"""Orbax checkpoints: state + grain iterator together, fallback, other meshes, retention."""

import logging

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec
from train.toy import toy_config, toy_objective

from navit_seq.train import checkpoint as checkpoint_lib
from navit_seq.train import loop


@pytest.fixture(scope="module")
def trained():
    """(trainer, state after 2 steps, the data iterator after 2 batches) on an (8, 1, 1) mesh."""
    config = toy_config((8, 1, 1))
    objective = toy_objective(config)
    trainer = loop.Trainer(config, objective)
    state, batches = trainer.init_state(), objective.train_iterator()
    for _ in range(2):
        state, _ = trainer.train_step(state, trainer.global_batch(next(batches)))
    return trainer, state, batches


def leaves(tree):
    """Host copies of every array (PRNG keys as their raw key data)."""
    as_numpy = lambda x: np.asarray(
        jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    )
    return [as_numpy(x) for x in jax.tree.leaves(tree)]


def fresh_iterator(trainer):
    return trainer.objective.train_iterator()


def test_restore_gives_the_same_state_and_the_next_batch(trained, tmp_path):
    trainer, state, batches = trained
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, every_steps=1)
    checkpointer.save(2, state, batches)
    checkpointer.wait()
    restored_iterator = fresh_iterator(trainer)
    step, restored = checkpointer.restore_latest(trainer.abstract_state, restored_iterator)
    checkpointer.close()
    assert step == 2
    for a, b in zip(leaves(restored), leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    # The third batch of an uninterrupted stream.
    uninterrupted = fresh_iterator(trainer)
    for _ in range(2):
        next(uninterrupted)
    expected_next = next(uninterrupted)
    got_next = next(restored_iterator)
    np.testing.assert_array_equal(got_next["patches"], expected_next["patches"])
    np.testing.assert_array_equal(got_next["segment_ids"], expected_next["segment_ids"])


def test_corrupted_latest_checkpoint_falls_back_to_previous_with_warning(trained, tmp_path, caplog):
    trainer, state, batches = trained
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, every_steps=1, asynchronous=False)
    checkpointer.save(1, state, batches)
    checkpointer.save(2, state, batches)
    checkpointer.wait()
    for path in (tmp_path / "2" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")  # a torn write: every file of step 2 is damaged
    with caplog.at_level(logging.WARNING):
        step, _ = checkpointer.restore_latest(trainer.abstract_state, fresh_iterator(trainer))
    checkpointer.close()
    assert step == 1
    assert any("2" in r.getMessage() and "could not be restored" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_half_written_checkpoint_is_ignored(trained, tmp_path):
    trainer, state, batches = trained
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, every_steps=1, asynchronous=False)
    checkpointer.save(1, state, batches)
    checkpointer.wait()
    # What a crash mid-save leaves: Orbax's temporary directory, never renamed to "2".
    (tmp_path / "2.orbax-checkpoint-tmp-123" / "state").mkdir(parents=True)
    reopened = checkpoint_lib.Checkpointer(tmp_path, every_steps=1)
    step, _ = reopened.restore_latest(trainer.abstract_state, fresh_iterator(trainer))
    reopened.close()
    checkpointer.close()
    assert step == 1


def test_restore_onto_a_different_mesh_reshards_to_the_new_rules(trained, tmp_path):
    trainer, state, batches = trained
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, every_steps=1)
    checkpointer.save(2, state, batches)
    checkpointer.close()
    config = toy_config((2, 2, 2))
    other = loop.Trainer(config, toy_objective(config))
    step, restored = checkpoint_lib.Checkpointer(tmp_path, every_steps=1).restore_latest(
        other.abstract_state, fresh_iterator(other)
    )
    kernel = restored.params["mlp"]["kernel"][...]
    assert kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert dict(kernel.sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    for a, b in zip(leaves(restored), leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_keeps_last_n_plus_every_kth_checkpoint(trained, tmp_path):
    trainer, state, batches = trained
    checkpointer = checkpoint_lib.Checkpointer(
        tmp_path, every_steps=1, keep=2, keep_every_steps=3, asynchronous=False
    )
    for step in range(1, 8):
        checkpointer.save(step, state, batches)
    checkpointer.close()
    assert sorted(checkpointer.manager.all_steps()) == [3, 6, 7]


def test_no_checkpoint_means_start_from_scratch(trained, tmp_path):
    trainer, *_ = trained
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, every_steps=1)
    assert checkpointer.restore_latest(trainer.abstract_state, fresh_iterator(trainer)) is None
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        checkpointer.restore_state(None, trainer.abstract_state)
    checkpointer.close()


def test_restoring_a_step_that_was_not_saved_names_the_saved_steps(trained, tmp_path):
    trainer, state, batches = trained
    checkpointer = checkpoint_lib.Checkpointer(tmp_path, every_steps=1, asynchronous=False)
    checkpointer.save(2, state, batches)
    with pytest.raises(FileNotFoundError, match=r"--step 5: no checkpoint .* holds steps \[2\]"):
        checkpointer.restore_state(5, trainer.abstract_state)
    checkpointer.close()


def test_initialised_from_takes_parameters_but_starts_at_step_zero_with_fresh_moments(
    trained, tmp_path
):
    trainer, state, batches = trained
    checkpointer = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", every_steps=1)
    checkpointer.save(2, state, batches)
    checkpointer.close()
    started = loop.initialized_from(trainer, tmp_path)
    fresh = trainer.init_state()
    assert int(started.step) == 0
    for a, b in zip(leaves(started.params), leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(leaves(started.opt_state), leaves(fresh.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_initialising_from_a_workdir_without_checkpoints_names_init_from(trained, tmp_path):
    trainer, *_ = trained
    with pytest.raises(
        FileNotFoundError, match=r"config.init_from=.*No checkpoint in .*init_from=''"
    ):
        loop.initialized_from(trainer, tmp_path)
