"""Export an inference checkpoint: parameters only (optionally cast) plus the config.

`python -m navit_seq.export --config ... --workdir DIR [--dtype bfloat16] [--ema]` writes
DIR/export/{params (Orbax), config.json}. `load(DIR/export)` rebuilds the model from the config
and restores the parameters on one device: no optimizer state, no training loop needed.
Implicit knowledge (`model.implicit`) is folded into the layers next to it (`fold_implicit`).
"""

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from flax import nnx

from navit_seq import cli, config_utils, sharding
from navit_seq.models import implicit as implicit_lib
from navit_seq.train import checkpoint as checkpoint_lib

DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                          "Cast floating parameters to this dtype (default: keep).")  # fmt: skip
EMA = flags.DEFINE_bool("ema", False, "Export the EMA parameters (the recipe must keep them).")
OUTPUT = flags.DEFINE_string("output", None, "Export directory (default: WORKDIR/export).")
# absl's --help lists only the key flags of the command's own module.
flags.adopt_module_key_flags(config_utils)
flags.adopt_module_key_flags(cli)


def cast_floating(params: Mapping, dtype: str | None) -> Mapping:
    """Casts floating-point leaves to `dtype`; integer leaves stay as they are."""
    if dtype is None:
        return params
    target = jnp.dtype(dtype)
    return jax.tree.map(
        lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


def _float64(value: Any) -> np.ndarray:
    return np.asarray(value, np.float64)


def _implicit_tensor(params: Mapping[str, Any], operator: str, form: str) -> np.ndarray:
    """[count, width] float64: the tensor of an implicit module's parameters."""
    values = {name: _float64(value) for name, value in params.items()}
    return implicit_lib.implicit_tensor(form, implicit_lib.IMPLICITS[operator].IDENTITY, values)


def _fold_alignment(cross_attention: Mapping, tensor: np.ndarray, operator: str) -> dict:
    """A cross-attention's key/value kernel W [D (+ C), 2, H, Dh] and bias b [2, H, Dh], now
    reading the memory as it is before the alignment's `tensor` [D or C] is combined with it."""
    kernel, dtype = _float64(cross_attention["kv_kernel"]), cross_attention["kv_kernel"].dtype
    if operator == "multiply":  # (x m) W = x (m W)
        kernel = tensor[:, None, None, None] * kernel
        return {**cross_attention, "kv_kernel": kernel.astype(dtype)}
    if "kv_bias" not in cross_attention:
        raise ValueError(
            f"model.implicit.alignment={operator!r} folds into the decoder's cross-attention "
            "key/value bias and model.decoder.use_bias=False has none; train with use_bias=True "
            "or alignment='multiply'."
        )
    bias = _float64(cross_attention["kv_bias"])
    if operator == "concat":  # [x, c] W = x W_x + c W_c
        kernel, appended = kernel[: -len(tensor)], kernel[-len(tensor) :]
        bias = bias + np.einsum("c,cthk->thk", tensor, appended)
    else:  # (x + z) W + b = x W + (z W + b)
        bias = bias + np.einsum("d,dthk->thk", tensor, kernel)
    return {**cross_attention, "kv_kernel": kernel.astype(dtype), "kv_bias": bias.astype(dtype)}


def _fold_refinement(
    final_norm: Mapping, tensor: np.ndarray, operator: str, num_tasks: int | None
) -> dict:
    """The final LayerNorm (n * scale + bias of the normalized n) with the refinement `tensor`
    [count, D] folded in; one scale and bias per task when `num_tasks` is set (TaskLayerNorm)."""
    scale, dtype = _float64(final_norm["scale"]), final_norm["scale"].dtype  # [D] or [T, D]
    tensor = tensor if num_tasks else tensor[0]  # [T or 1, D], or [D] when shared
    if "bias" in final_norm:
        bias = _float64(final_norm["bias"])
    elif num_tasks:  # a TaskLayerNorm always has a bias
        bias = np.zeros_like(scale)
    elif operator == "add":
        raise ValueError(
            "model.implicit.refinement='add' folds into the final LayerNorm's bias and "
            "model.decoder.use_bias=False has none; train with use_bias=True or "
            "refinement='multiply'."
        )
    else:
        bias = None
    if operator == "multiply":  # (n s + b) m = n (s m) + b m
        scale, bias = scale * tensor, None if bias is None else bias * tensor
    else:  # (n s + b) + a = n s + (b + a)
        bias = bias + tensor
    shape = (num_tasks, scale.shape[-1]) if num_tasks else scale.shape  # [T, D] or [D]
    folded = {"scale": scale, **({} if bias is None else {"bias": bias})}
    return {name: np.broadcast_to(value, shape).astype(dtype) for name, value in folded.items()}


def fold_implicit(
    params: Mapping, config: ml_collections.ConfigDict
) -> tuple[dict, ml_collections.ConfigDict]:
    """Folds a Pix2Seq model's implicit knowledge (`model.implicit`, navit_seq.models.implicit)
    into the layers next to it, so the exported model has no implicit parameters and gives the
    same outputs. YOLOR: a constant added before a linear layer goes into its bias, one
    multiplied after a linear layer into its kernel (and bias).
    - alignment, on the memory: into every decoder layer's cross-attention key/value projection
      (the memory's one reader; padding tokens, which no row attends to, get other keys);
    - refinement, after the final LayerNorm: into its scale and bias, one each per task for a
      per-task refinement (`TaskLayerNorm`: the config's `task_final_norm`).
    `params` is the model's pure dict. Returns (params, config) with `model.implicit` off, or
    the same two when there is nothing to fold. Folding runs in float64, cast back to each
    parameter's dtype.
    """
    if "implicit" not in config.model:
        return dict(params), config
    implicit = implicit_lib.implicit_config(config.model)
    if implicit.alignment == implicit.refinement == "none":
        return dict(params), config
    params, decoder = dict(params), dict(params["decoder"])
    if implicit.alignment != "none":
        alignment = params.pop("implicit_alignment")
        tensor = _implicit_tensor(alignment, implicit.alignment, implicit.form)[0]  # [D or C]
        decoder["blocks"] = {
            index: {
                **block,
                "cross_attention": _fold_alignment(
                    block["cross_attention"], tensor, implicit.alignment
                ),
            }
            for index, block in decoder["blocks"].items()
        }
    if implicit.refinement != "none":
        refinement = decoder.pop("implicit_refinement")
        tensor = _implicit_tensor(refinement, implicit.refinement, implicit.form)  # [count, D]
        per_task = implicit.per_task or implicit.task_final_norm
        decoder["final_norm"] = _fold_refinement(
            decoder["final_norm"], tensor, implicit.refinement,
            implicit.num_tasks if per_task else None,
        )  # fmt: skip
        implicit.task_final_norm = bool(per_task)
    params["decoder"] = decoder
    implicit.alignment, implicit.refinement, implicit.per_task = "none", "none", False
    folded_config = copy.deepcopy(config)
    with folded_config.unlocked():
        folded_config.model.implicit = implicit
    return jax.tree.map(jnp.asarray, params), folded_config


def export(params: Mapping, config: ml_collections.ConfigDict, output: Path, step: int) -> None:
    """Writes `params` (a pure dict) with Orbax and the config (+ step) as JSON next to them."""
    output = output.absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(output / "params", dict(params), force=True)
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
    params = (state.ema_params if EMA.value else state.params).to_pure_dict()
    params, config = fold_implicit(params, config)
    params = cast_floating(params, DTYPE.value)
    output = Path(OUTPUT.value) if OUTPUT.value else workdir / "export"
    export(params, config, output, step)
    print(f"Exported step {step} parameters ({DTYPE.value or 'as trained'}) to {output}")


if __name__ == "__main__":
    config_utils.run(main)
