"""YOLOR implicit knowledge (Wang et al. 2021, "You Only Learn One Representation", arXiv
2105.04206): learned tensors that depend on no input, combined with the explicit features.

Operators: `ImplicitA` adds (starts N(0, 0.02)), `ImplicitM` multiplies (starts N(1, 0.02)),
`ImplicitConcat` appends channels (start N(0, 0.02)). Forms (`FORMS`) of the [count, width]
tensor, each starting at N(identity, 0.02) per element (identity: 0 to add or append, 1 to
multiply):
    "vector"      z              z [count, width]
    "network"     identity + zW  z [count, prior_dim] ~ N(0, 1), W [prior_dim, width]
    "factorised"  Zᵀc            Z [factors, width] (a basis), c [count, factors] = 1 / factors
                                 (so the rows of a per-task table start alike)
`count` is 1 (one tensor for every input) or one per task, each input reading the one its index
names. The paper's budget is under 1/10,000 of the parameters (`parameter_overhead`).

Placement in Pix2Seq (`model.implicit`, `default_implicit_config`; none without the section):
- `alignment`: combined with the decoder memory (what cross-attention reads) at real tokens;
- `refinement`: combined with the decoder output after its final LayerNorm, before the logits;
- `per_task`: the refinement holds one tensor per task id, and decoder row r of packed row b
  reads the one of its task, `task_id[b, row_slot[b, r]]` (docs/architecture.md §3, §9).
`navit_seq.export.fold_implicit` folds each into the layer next to it: the alignment into every
decoder layer's cross-attention key/value projection, the refinement into the final LayerNorm's
scale and bias, per task as a `TaskLayerNorm` (`task_final_norm`).
"""

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from navit_seq import tasks
from navit_seq.models.partitioning import param

FORMS = ("vector", "network", "factorised")
FORM_PARAMS = {
    "vector": ("vector",),
    "network": ("prior", "weights"),
    "factorised": ("basis", "coefficients"),
}
PRIOR_DIM, FACTORS = 8, 4  # the network form's prior length, the factorised form's basis rows
ALIGNMENTS = ("none", "add", "multiply", "concat")  # with the decoder memory
REFINEMENTS = ("none", "add", "multiply")  # with the decoder output, before the logits
INIT_STD = 0.02  # (paper)
# Implicit modules are attributes named implicit_*: how parameter_overhead and export find them.
PREFIX = "implicit_"


def default_implicit_config() -> ml_collections.ConfigDict:
    """`config.model.implicit`, everything off. A recipe that uses implicit knowledge adds it
    (`config.model.implicit = default_implicit_config()`, then sets it); recipes without the
    section, and config.json files saved before it existed, build the model they always did
    (and keep resuming: main refuses a workdir whose saved model config differs)."""
    return ml_collections.ConfigDict(
        {
            "alignment": "none",  # ALIGNMENTS
            "refinement": "none",  # REFINEMENTS
            "per_task": False,  # the refinement: one tensor per task id
            "num_tasks": tasks.NUM_TASK_IDS,  # rows of a per-task table: ids 0..num_tasks-1
            "form": "vector",  # FORMS
            "prior_dim": PRIOR_DIM,  # form "network": length of each prior z
            "factors": FACTORS,  # form "factorised": rows of the basis Z
            "concat_width": 8,  # alignment "concat": channels appended to the memory
            # One final-LayerNorm scale and bias per task: what export folds a per-task
            # refinement into (a model trained with it is a task-conditioned LayerNorm).
            "task_final_norm": False,
        }
    )


def implicit_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`model_config.implicit` over the defaults (a config.json saved before the section
    existed has none: all off), checked."""
    config = default_implicit_config()
    given = model_config.get("implicit")
    if given is not None:
        unknown = sorted(set(given) - set(config))
        if unknown:
            raise ValueError(
                f"model.implicit has unknown keys {unknown}; it takes {sorted(config)}."
            )
        config.update(dict(given))
    choices = {"alignment": ALIGNMENTS, "refinement": REFINEMENTS, "form": FORMS}
    for key, allowed in choices.items():
        if config[key] not in allowed:
            raise ValueError(f"model.implicit.{key}={config[key]!r} is not one of {allowed}.")
    if config.per_task and config.refinement == "none":
        raise ValueError(
            "model.implicit.per_task=True with refinement='none': per-task tensors refine the "
            "decoder output; set model.implicit.refinement to 'multiply' or 'add'."
        )
    for key in ("num_tasks", "prior_dim", "factors", "concat_width"):
        if config[key] < 1:
            raise ValueError(f"model.implicit.{key}={config[key]}: must be >= 1.")
    return config


def reads_row_task(config: ml_collections.ConfigDict) -> bool:
    """Whether the decoder holds anything per task (it then needs each row's task id)."""
    return bool(config.per_task or config.task_final_norm)


def implicit_tensor(form: str, identity: float, params: Mapping[str, Any]) -> jax.Array:
    """The [count, width] tensor of an implicit module's parameter values (name -> array)."""
    if form == "vector":
        return params["vector"]
    if form == "network":
        return identity + params["prior"] @ params["weights"]
    return params["coefficients"] @ params["basis"]


def _normal(mean: float, std: float):
    def init(key, shape, dtype=jnp.float32):
        return mean + std * jax.random.normal(key, shape, dtype)

    return init


class Implicit(nnx.Module):
    """`count` learned tensors of `width` in one of FORMS (module docstring); subclasses set
    the operator's IDENTITY and combine the tensor with an input."""

    IDENTITY: ClassVar[float]

    def __init__(
        self,
        width: int,
        *,
        count: int = 1,
        form: str = "vector",
        prior_dim: int = PRIOR_DIM,
        factors: int = FACTORS,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if form not in FORMS:
            raise ValueError(f"implicit form {form!r} is not one of {FORMS}.")
        self.form = form
        new = lambda init, names, shape: param(rngs, init, names, shape, param_dtype)
        if form == "vector":
            self.vector = new(_normal(self.IDENTITY, INIT_STD), (None, "embed"), (count, width))
        elif form == "network":
            self.prior = new(_normal(0.0, 1.0), (None, None), (count, prior_dim))
            weight_std = INIT_STD / math.sqrt(prior_dim)  # z W then has std 0.02
            self.weights = new(_normal(0.0, weight_std), (None, "embed"), (prior_dim, width))
        else:
            # The mean of `factors` rows of std 0.02 * sqrt(factors) has std 0.02.
            basis_init = _normal(self.IDENTITY, INIT_STD * math.sqrt(factors))
            self.basis = new(basis_init, (None, "embed"), (factors, width))
            self.coefficients = new(
                nnx.initializers.constant(1.0 / factors), (None, None), (count, factors)
            )

    def tensor(self) -> jax.Array:
        """[count, width]."""
        values = {name: getattr(self, name)[...] for name in FORM_PARAMS[self.form]}
        return implicit_tensor(self.form, self.IDENTITY, values)

    def select(self, index: jax.Array | None, ndim: int, dtype: jnp.dtype) -> jax.Array:
        """The tensor to combine with an input of `ndim` dims: [width] when shared (`index`
        None, count 1), else index [*lead] in [0, count) -> [*lead, 1, ..., 1, width]."""
        table = self.tensor().astype(dtype)  # [count, width]
        if index is None:
            if table.shape[0] != 1:
                raise ValueError(
                    f"this implicit holds {table.shape[0]} tensors; pass the index of each "
                    "input's (e.g. its rows' task ids)."
                )
            return table[0]
        chosen = jnp.take(table, index, axis=0)  # [*lead, width]
        return chosen.reshape(index.shape + (1,) * (ndim - index.ndim - 1) + table.shape[1:])


class ImplicitA(Implicit):
    """x [..., width] + the implicit tensor (YOLOR's ImplicitA)."""

    IDENTITY = 0.0

    def __call__(self, x: jax.Array, index: jax.Array | None = None) -> jax.Array:
        return x + self.select(index, x.ndim, x.dtype)


class ImplicitM(Implicit):
    """x [..., width] * the implicit tensor (YOLOR's ImplicitM)."""

    IDENTITY = 1.0

    def __call__(self, x: jax.Array, index: jax.Array | None = None) -> jax.Array:
        return x * self.select(index, x.ndim, x.dtype)


class ImplicitConcat(Implicit):
    """x [..., D] -> [..., D + width]: the implicit tensor appended to every position."""

    IDENTITY = 0.0

    def __call__(self, x: jax.Array, index: jax.Array | None = None) -> jax.Array:
        implicit = self.select(index, x.ndim, x.dtype)
        implicit = jnp.broadcast_to(implicit, x.shape[:-1] + implicit.shape[-1:])
        return jnp.concatenate([x, implicit], axis=-1)


IMPLICITS = {"add": ImplicitA, "multiply": ImplicitM, "concat": ImplicitConcat}


def _build(operator: str, config, width: int, count: int, param_dtype, rngs) -> Implicit:
    return IMPLICITS[operator](
        width, count=count, form=config.form, prior_dim=config.prior_dim,
        factors=config.factors, param_dtype=param_dtype, rngs=rngs,
    )  # fmt: skip


def alignment(
    config: ml_collections.ConfigDict, memory_width: int, *, param_dtype: jnp.dtype, rngs
) -> Implicit | None:
    """The implicit combined with the decoder memory [B, L, memory_width], or None."""
    if config.alignment == "none":
        return None
    width = config.concat_width if config.alignment == "concat" else memory_width
    return _build(config.alignment, config, width, 1, param_dtype, rngs)


def appended_width(config: ml_collections.ConfigDict) -> int:
    """Channels the alignment appends to the memory (0 unless it concatenates)."""
    return config.concat_width if config.alignment == "concat" else 0


def align(implicit: Implicit, memory: jax.Array, token_valid: jax.Array) -> jax.Array:
    """memory [B, L, D] -> [B, L, D (+ appended)] combined at real tokens (`token_valid`
    [B, L]); padding stays zero."""
    return jnp.where(token_valid[..., None], implicit(memory), 0)


def refinement(
    config: ml_collections.ConfigDict, width: int, *, param_dtype: jnp.dtype, rngs
) -> Implicit | None:
    """The implicit combined with the decoder output [N, S, width] (one per task id when
    `per_task`), or None."""
    if config.refinement == "none":
        return None
    count = config.num_tasks if config.per_task else 1
    return _build(config.refinement, config, width, count, param_dtype, rngs)


class TaskLayerNorm(nnx.Module):
    """LayerNorm with one scale and bias per task: x [N, S, D], task [N] -> [N, S, D]. What
    export folds the final norm and a per-task refinement into (module docstring)."""

    def __init__(
        self, num_tasks: int, width: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs
    ):
        self.normalize = nnx.LayerNorm(
            width, use_scale=False, use_bias=False, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )  # fmt: skip
        new = lambda init: param(rngs, init, (None, "embed"), (num_tasks, width), param_dtype)
        self.scale = new(nnx.initializers.ones)
        self.bias = new(nnx.initializers.zeros)

    def __call__(self, x: jax.Array, task: jax.Array) -> jax.Array:
        normalized = self.normalize(x)
        shape = task.shape + (1,) * (x.ndim - task.ndim - 1) + x.shape[-1:]
        scale = jnp.take(self.scale[...], task, axis=0).reshape(shape)  # [N, 1, D]
        bias = jnp.take(self.bias[...], task, axis=0).reshape(shape)
        return normalized * scale.astype(x.dtype) + bias.astype(x.dtype)


def parameter_overhead(params: nnx.State | Mapping) -> dict[str, float]:
    """{"implicit", "total", "share"}: the parameters of implicit modules (attributes named
    PREFIX*) against all parameters of a tree (nnx.State, a pure dict, or their shapes)."""
    if isinstance(params, nnx.State):
        params = params.to_pure_dict()
    implicit = total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        size = math.prod(leaf.shape)
        total += size
        if any(str(getattr(key, "key", "")).startswith(PREFIX) for key in path):
            implicit += size
    return {"implicit": implicit, "total": total, "share": implicit / max(total, 1)}
