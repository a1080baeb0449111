"""Logical axis names for parameters and activations (no-ops outside a mesh).

Parameters are annotated with `nnx.with_partitioning`; they are sharded eagerly only when a
mesh is active (`jax.set_mesh(mesh)` + `nnx.logical_axis_rules(rules)`), so the same model
builds on a laptop CPU, and a trainer can also shard later from `nnx.get_partition_spec`.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import meta
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

LogicalNames = Sequence[str | None]


def partitioned(initializer: Callable, names: LogicalNames) -> Callable:
    """`initializer` carrying logical axis `names` (one per parameter dimension)."""
    return nnx.with_partitioning(
        initializer, tuple(names), eager_sharding=meta.global_mesh_defined()
    )


def logical_to_mesh_spec(names: LogicalNames) -> PartitionSpec:
    """Maps logical names to mesh axes with the active rules; unmapped names are replicated.

    A mesh axis is used at most once per spec (first dimension wins), as GSPMD requires.
    """
    rules = dict(core_spmd.get_logical_axis_rules())
    used: set[str] = set()
    spec = []
    for name in names:
        mesh_axes = rules.get(name) if name is not None else None
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        if not axes or used.intersection(axes):
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
    """Annotates activation `x` with logical axis `names`; a no-op without a mesh and rules."""
    mesh = meta.get_global_mesh()
    if mesh is None or not core_spmd.get_logical_axis_rules():
        return x
    spec = logical_to_mesh_spec(names)
    if mesh.are_all_axes_explicit:
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)


def param(
    rngs: nnx.Rngs,
    initializer: Callable,
    names: LogicalNames,
    shape: Sequence[int],
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """A new parameter of `shape` with one logical axis name per dimension."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match parameter shape {shape}.")
    return nnx.Param(partitioned(initializer, names)(rngs.params(), tuple(shape), dtype))
