"""The train state (one pytree) and its creation directly in sharded form.

Created sharded: `nnx.eval_shape` gives abstract parameters with their logical axis names; the
rules turn them into NamedShardings; `jax.jit(init, out_shardings=...)` then materialises every
array on its own shard, so no device ever holds the full unsharded state.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from navit_seq import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; everything a checkpoint must hold (bar the data)."""

    step: jax.Array  # int32 [], optimizer updates done
    params: nnx.State  # nnx.Param variables
    model_state: nnx.State  # every other variable (dropout RNG streams, counters)
    opt_state: optax.OptState
    ema_params: nnx.State | None  # exponential moving average of params, or None


def model_shell(model_fn: Callable[[], nnx.Module], mesh: Mesh, rules: Any) -> nnx.GraphDef:
    """The model's graph definition (structure without arrays), built abstractly."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        abstract_model = nnx.eval_shape(model_fn)
    return nnx.split(abstract_model, nnx.Param, ...)[0]


def _init_state(
    model_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation, use_ema: bool
) -> TrainState:
    _, params, model_state = nnx.split(model_fn(), nnx.Param, ...)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
    )


def abstract_train_state(
    model_fn: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Any,
    use_ema: bool,
) -> tuple[TrainState, Any]:
    """(abstract state with shardings attached, sharding tree) without allocating anything."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        abstract = jax.eval_shape(lambda: _init_state(model_fn, tx, use_ema))
    shardings = sharding.state_shardings(abstract, mesh, rules)
    with_shardings = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return with_shardings, shardings


def create_train_state(
    model_fn: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Any,
    use_ema: bool = False,
) -> tuple[nnx.GraphDef, TrainState, Any]:
    """(graphdef, sharded initial state, state shardings); `model_fn` builds the model."""
    graphdef = model_shell(model_fn, mesh, rules)
    _, shardings = abstract_train_state(model_fn, tx, mesh, rules, use_ema)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        state = jax.jit(lambda: _init_state(model_fn, tx, use_ema), out_shardings=shardings)()
    return graphdef, state, shardings


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a small value every device holds whole (metrics, scalars)."""
    return NamedSharding(mesh, PartitionSpec())
