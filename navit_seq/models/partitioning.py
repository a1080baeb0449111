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

from navit_seq.sharding import logical_to_mesh_spec

LogicalNames = Sequence[str | None]


def partitioned(initializer: Callable, names: LogicalNames) -> Callable:
    """`initializer` carrying logical axis `names` (one per parameter dimension)."""
    return nnx.with_partitioning(
        initializer, tuple(names), eager_sharding=meta.global_mesh_defined()
    )


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
    """Annotates activation `x` with logical axis `names`; a no-op without a mesh and rules.

    Unmapped names and mesh axes that do not divide a dimension leave it replicated.
    """
    mesh = meta.get_global_mesh()
    if mesh is None or not core_spmd.get_logical_axis_rules():
        return x
    spec = logical_to_mesh_spec(names, core_spmd.get_logical_axis_rules(), x.shape, mesh)
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


def layer_norm(
    size: int,
    axis_name: str,
    *,
    use_bias: bool,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> nnx.LayerNorm:
    """LayerNorm over a last dimension of `size`; scale (and bias) carry logical `axis_name`."""
    return nnx.LayerNorm(
        size, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        scale_init=partitioned(nnx.initializers.ones, (axis_name,)),
        bias_init=partitioned(nnx.initializers.zeros, (axis_name,)),
        rngs=rngs,
    )  # fmt: skip
