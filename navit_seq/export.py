"""Export an inference checkpoint: parameters only (optionally cast) plus the config.

`python -m navit_seq.export --config ... --workdir DIR [--dtype bfloat16] [--ema]` writes
DIR/export/{params (Orbax), config.json}. `load(DIR/export)` rebuilds the model from the config
and restores the parameters on one device: no optimizer state, no training loop needed.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import flags
from flax import nnx

from navit_seq import cli, config_utils, sharding
from navit_seq.train import checkpoint as checkpoint_lib

DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                          "Cast floating parameters to this dtype (default: keep).")  # fmt: skip
EMA = flags.DEFINE_bool("ema", False, "Export the EMA parameters (the recipe must keep them).")
OUTPUT = flags.DEFINE_string("output", None, "Export directory (default: WORKDIR/export).")
# absl's --help lists only the key flags of the command's own module.
flags.adopt_module_key_flags(config_utils)
flags.adopt_module_key_flags(cli)


def cast_floating(params: nnx.State, dtype: str | None) -> nnx.State:
    """Casts floating-point leaves to `dtype`; integer leaves stay as they are."""
    if dtype is None:
        return params
    target = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


def export(params: nnx.State, config: ml_collections.ConfigDict, output: Path, step: int) -> None:
    """Writes `params` with Orbax and the config (+ step) as JSON next to them."""
    output = output.absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(output / "params", params.to_pure_dict(), force=True)
        checkpointer.wait_until_finished()
    config_utils.save_config(config, output / "config.json")
    (output / "export_info.json").write_text(json.dumps({"step": step}) + "\n")


def load(export_dir: str | Path) -> tuple[ml_collections.ConfigDict, nnx.Module]:
    """(config, model with the exported parameters) from an export directory."""
    from navit_seq.main import objective_for

    export_dir = Path(export_dir).absolute()
    config = ml_collections.ConfigDict(json.loads((export_dir / "config.json").read_text()))
    model_fn = objective_for(config).model_fn
    mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))  # fmt: skip
    rules = tuple((name, None) for name in sharding.PARAM_AXES + sharding.ACTIVATION_AXES)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        abstract_model = nnx.eval_shape(model_fn)
    graphdef, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore(export_dir / "params")  # nested dict, saved dtypes
    nnx.replace_by_pure_dict(abstract_params, saved)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        # Non-parameter state (RNG streams) is rebuilt; XLA drops the unused param init.
        other = jax.jit(lambda: nnx.split(model_fn(), nnx.Param, ...)[2])()
    model = nnx.merge(graphdef, abstract_params, other)
    return config, model


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; see --help.")
    from navit_seq.main import objective_for
    from navit_seq.train import loop

    config = config_utils.validated_config()
    workdir = config_utils.required_workdir()
    trainer = loop.Trainer(config, objective_for(config))
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", every_steps=0)
    step, state = checkpointer.restore_state(config_utils.STEP.value, trainer.abstract_state)
    checkpointer.close()
    if EMA.value and state.ema_params is None:
        raise ValueError(
            "--ema: this run kept no EMA parameters (config.optimizer.ema_decay is 0); export "
            "without --ema, or train with --config.optimizer.ema_decay=0.999."
        )
    params = cast_floating(state.ema_params if EMA.value else state.params, DTYPE.value)
    output = Path(OUTPUT.value) if OUTPUT.value else workdir / "export"
    export(params, config, output, step)
    print(f"Exported step {step} parameters ({DTYPE.value or 'as trained'}) to {output}")


if __name__ == "__main__":
    config_utils.run(main)
