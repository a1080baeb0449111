"""Device mesh, logical-axis rules and per-host -> global batch assembly.

Parameters and activations carry *logical* axis names (docs/architecture.md §5); the config maps
them to the mesh axes `data`, `fsdp`, `tensor` (`config.mesh.rules`). Everything here works the
same on one CPU, eight simulated CPU devices and a multi-host pod.
"""

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Every logical name the models use (architecture.md §5). Names a recipe's rules leave out are
# replicated: flax would otherwise pass an unmapped name through as if it were a mesh axis.
PARAM_AXES = ("embed", "mlp", "heads", "head_dim", "patch", "classes", "vocab", "posemb_len")
ACTIVATION_AXES = ("act_batch", "act_len", "act_emb", "act_mlp", "act_heads", "act_examples")
LogicalRules = tuple[tuple[str, Any], ...]


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Calls `jax.distributed.initialize` only for a configured or detected multi-host cluster.

    Configured: `config.distributed.coordinator_address` (with num_processes, process_id).
    Detected: the environment variables a TPU pod, SLURM or Open MPI launch sets. A single
    process on a laptop or one GPU needs none of this.
    """
    dist = config.get("distributed", ml_collections.ConfigDict())
    if dist.get("coordinator_address"):
        jax.distributed.initialize(
            coordinator_address=dist.coordinator_address,
            num_processes=dist.get("num_processes"),
            process_id=dist.get("process_id"),
        )
        return
    cluster_markers = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
    detected = [name for name in cluster_markers if int_or_hosts(os.environ.get(name)) > 1]
    if detected:
        logging.info("Multi-host cluster detected (%s): jax.distributed.initialize()", detected)
        jax.distributed.initialize()


def int_or_hosts(value: str | None) -> int:
    """Number of processes an environment variable announces (a count or a host list)."""
    if not value:
        return 0
    return int(value) if value.isdigit() else len(value.split(","))


def mesh_shape(
    axis_names: Sequence[str], sizes: Sequence[int], num_devices: int
) -> tuple[int, ...]:
    """Resolves one `-1` entry to "all remaining devices" and checks the product."""
    if len(axis_names) != len(sizes):
        raise ValueError(
            f"config.mesh.shape {tuple(sizes)} has {len(sizes)} entries but config.mesh.axis_names "
            f"{tuple(axis_names)} has {len(axis_names)}; give one size per axis."
        )
    sizes = [int(s) for s in sizes]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh.shape {tuple(sizes)}: at most one axis may be -1.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"config.mesh.shape {tuple(sizes)}: {num_devices} devices are not divisible by "
                f"the fixed axes' product {known}."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"config.mesh.shape {tuple(sizes)} needs {int(np.prod(sizes))} devices but "
            f"{num_devices} are available; use -1 for one axis to take the rest."
        )
    return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """The device mesh from `config.mesh` (axis_names, shape with -1 = the rest).

    `num_devices` (optional, -1 = all) restricts the mesh to the first N devices, e.g. to run
    single-device on a multi-device host. Axis types are Auto (GSPMD-style propagation from the
    partition rules); jax.make_mesh's default Explicit mode would reject matmuls over sharded
    contracting dimensions.
    """
    devices = list(jax.devices() if devices is None else devices)
    num_devices = mesh_config.get("num_devices", -1)
    if num_devices != -1:
        if not 0 < num_devices <= len(devices):
            raise ValueError(
                f"config.mesh.num_devices={num_devices} but {len(devices)} devices exist; use a "
                "value in [1, number of devices] or -1 for all."
            )
        devices = devices[:num_devices]
    axis_names = tuple(mesh_config.axis_names)
    shape = mesh_shape(axis_names, mesh_config.shape, len(devices))
    return jax.make_mesh(
        shape,
        axis_names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names),
        devices=devices,
    )


def logical_rules(mesh_config: ml_collections.ConfigDict) -> LogicalRules:
    """The config's logical -> mesh rules, completed with `None` (replicated) for the rest."""
    rules = tuple((str(name), _as_mesh_axes(target)) for name, target in mesh_config.rules)
    mapped = {name for name, _ in rules}
    unknown = mapped - set(PARAM_AXES) - set(ACTIVATION_AXES)
    if unknown:
        raise ValueError(
            f"config.mesh.rules names unknown logical axes {sorted(unknown)}; known: "
            f"{PARAM_AXES + ACTIVATION_AXES} (docs/architecture.md §5)."
        )
    mesh_axes = set(mesh_config.axis_names)
    for name, target in rules:
        targets = target if isinstance(target, tuple) else (target,)
        bad = [t for t in targets if t is not None and t not in mesh_axes]
        if bad:
            raise ValueError(
                f"config.mesh.rules maps {name!r} to {bad}, which are not mesh axes "
                f"{tuple(mesh_config.axis_names)}."
            )
    defaults = tuple((name, None) for name in PARAM_AXES + ACTIVATION_AXES if name not in mapped)
    return rules + defaults


def _as_mesh_axes(target: Any) -> Any:
    if target is None or isinstance(target, str):
        return target
    return tuple(target)


def logical_to_mesh_spec(
    logical_axes: Sequence[str | None], rules: LogicalRules, shape: Sequence[int], mesh: Mesh
) -> PartitionSpec:
    """Maps one array's logical axis names to a PartitionSpec.

    A mesh axis is used at most once per array (first dimension wins) and only where it divides
    the dimension; otherwise that dimension is replicated and we log why (never a silent
    surprise, never a compile error from deep inside XLA).
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, logical_axes, strict=True):
        target = table.get(name) if name is not None else None
        targets = () if target is None else (target if isinstance(target, tuple) else (target,))
        targets = tuple(t for t in targets if t not in used and mesh.shape[t] > 1)
        size = int(np.prod([mesh.shape[t] for t in targets])) if targets else 1
        if targets and dim % size:
            logging.warning(
                "Logical axis %r (size %d) is not divisible by mesh axes %s (size %d): replicated.",
                name,
                dim,
                targets,
                size,
            )
            targets = ()
        used.update(targets)
        spec.append(None if not targets else targets[0] if len(targets) == 1 else targets)
    return PartitionSpec(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for an abstract nnx.State (or any tree of nnx.Variables) via the rules."""

    def one(variable: Any) -> Any:
        if not isinstance(variable, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        shape = getattr(variable.get_value(), "shape", None)
        if shape is None:  # an empty placeholder (optax's MaskedNode for frozen parameters)
            return variable
        logical = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
        spec = logical_to_mesh_spec(logical, rules, shape, mesh)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: LogicalRules) -> NamedSharding:
    """Sharding of the leading (global batch) dimension: the mesh axes `act_batch` maps to."""
    target = dict(rules).get("act_batch")
    return NamedSharding(mesh, PartitionSpec(target))


def batch_axis_size(mesh: Mesh, rules: LogicalRules) -> int:
    """How many shards the global batch is split into."""
    target = dict(rules).get("act_batch")
    targets = () if target is None else (target if isinstance(target, tuple) else (target,))
    return int(np.prod([mesh.shape[t] for t in targets])) if targets else 1


def global_batch(local_batch: Mapping[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this host's rows of the batch into global jax.Arrays (one per key).

    Each host's pipeline yields B / process_count rows (`process_index::process_count` of the
    data); the global array has B rows split over the batch sharding.
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
        dict(local_batch),
    )


def path_str(path: Sequence[Any]) -> str:
    """`encoder/blocks/0/kernel` from a jax tree path (nnx.Variable's `.value` step dropped)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
            continue
        parts.append(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))))
    return "/".join(parts)


def describe_shardings(tree: Any) -> dict[str, str]:
    """`{"params/encoder/kernel": "P('fsdp', 'tensor')", ...}` for logs and tests."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        path_str(path): str(leaf.sharding.spec) for path, leaf in flat if hasattr(leaf, "sharding")
    }
