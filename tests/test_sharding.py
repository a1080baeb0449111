"""Mesh construction, logical-axis rules and batch assembly (8 simulated CPU devices)."""

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from train.toy import ToyClassifier, synthetic_batch

from navit_seq import config_common, sharding
from navit_seq.train import optimizer as optimizer_lib
from navit_seq.train import state as state_lib


def mesh_config(shape, rules=None):
    config = config_common.default_mesh_config()
    config.shape = shape
    if rules is not None:
        config.rules = rules
    return config


@pytest.mark.parametrize(
    "sizes, expected", [((-1, 1, 1), (8, 1, 1)), ((2, -1, 1), (2, 4, 1)), ((2, 2, 2), (2, 2, 2))]
)
def test_mesh_shape_resolves_minus_one_to_remaining_devices(sizes, expected):
    assert sharding.mesh_shape(("data", "fsdp", "tensor"), sizes, 8) == expected


@pytest.mark.parametrize(
    "sizes, message",
    [((3, -1, 1), "not divisible"), ((2, 2, 1), "needs 4 devices"), ((-1, -1, 1), "at most one")],
)
def test_mesh_shape_rejects_impossible_shapes_with_named_field(sizes, message):
    with pytest.raises(ValueError, match=message) as error:
        sharding.mesh_shape(("data", "fsdp", "tensor"), sizes, 8)
    assert "config.mesh.shape" in str(error.value)


def test_make_mesh_has_named_auto_axes_of_configured_sizes():
    mesh = sharding.make_mesh(mesh_config((2, 2, 2)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_num_devices_restricts_mesh_to_first_devices():
    config = mesh_config((-1, 1, 1))
    config.num_devices = 1
    mesh = sharding.make_mesh(config)
    assert mesh.devices.size == 1 and mesh.devices.flat[0] == jax.devices()[0]


def test_rules_naming_unknown_logical_or_mesh_axis_raise():
    with pytest.raises(ValueError, match="unknown logical axes"):
        sharding.logical_rules(mesh_config((-1, 1, 1), (("embedding", "fsdp"),)))
    with pytest.raises(ValueError, match="not mesh axes"):
        sharding.logical_rules(mesh_config((-1, 1, 1), (("embed", "model"),)))


def test_logical_to_mesh_spec_uses_each_mesh_axis_once_and_replicates_indivisible_dims():
    mesh = sharding.make_mesh(mesh_config((2, 2, 2)))
    rules = sharding.logical_rules(mesh_config((2, 2, 2)))
    # [embed, embed]: fsdp only on the first dimension.
    assert sharding.logical_to_mesh_spec(("embed", "embed"), rules, (8, 8), mesh) == PartitionSpec(
        "fsdp", None
    )
    # 5 classes do not divide over tensor=2: replicated rather than a compile error.
    assert sharding.logical_to_mesh_spec(("embed", "classes"), rules, (8, 5), mesh) == (
        PartitionSpec("fsdp", None)
    )


def test_parameters_and_optimizer_state_are_created_sharded_as_the_rules_say():
    config = mesh_config((2, 2, 2))
    mesh, rules = sharding.make_mesh(config), sharding.logical_rules(config)
    tx, _ = optimizer_lib.make_optimizer(config_common.default_optimizer_config())
    _, state, _ = state_lib.create_train_state(
        lambda: ToyClassifier(rngs=nnx.Rngs(0)), tx, mesh, rules
    )
    specs = sharding.describe_shardings(state)
    assert specs["params/embed/kernel"] == str(PartitionSpec(None, "fsdp"))  # (patch, embed)
    assert specs["params/mlp/kernel"] == str(PartitionSpec("fsdp", "tensor"))  # (embed, mlp)
    assert specs["params/out/kernel"] == str(PartitionSpec("tensor", "fsdp"))  # (mlp, embed)
    assert specs["params/head/kernel"] == str(PartitionSpec("fsdp", "tensor"))  # (embed, classes)
    mu = [k for k in specs if k.endswith("mu/mlp/kernel")]
    assert mu and all(specs[k] == str(PartitionSpec("fsdp", "tensor")) for k in mu)
    # Really distributed: each device holds a quarter of the (embed, mlp) kernel.
    kernel = state.params["mlp"]["kernel"][...]
    assert {s.data.shape for s in kernel.addressable_shards} == {(8, 16)}


def test_global_batch_splits_rows_over_data_and_fsdp_axes():
    config = mesh_config((2, 2, 2))
    mesh, rules = sharding.make_mesh(config), sharding.logical_rules(config)
    local = synthetic_batch(np.random.default_rng(0), batch_size=8)
    batch = sharding.global_batch(local, sharding.batch_sharding(mesh, rules))
    assert batch["patches"].sharding.spec == PartitionSpec(("data", "fsdp"))
    assert {s.data.shape[0] for s in batch["segment_ids"].addressable_shards} == {2}
    np.testing.assert_array_equal(
        np.asarray(batch["targets"]["labels"]), local["targets"]["labels"]
    )
    assert sharding.batch_axis_size(mesh, rules) == 4


def test_distributed_init_is_skipped_on_a_single_process(monkeypatch):
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append(1))
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    sharding.maybe_initialize_distributed(ml_collections.ConfigDict())
    assert not called
    monkeypatch.setenv("SLURM_NTASKS", "4")
    sharding.maybe_initialize_distributed(ml_collections.ConfigDict())
    assert called
