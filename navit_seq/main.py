"""Train a recipe: `python -m navit_seq.main --config configs/<recipe>.py[:arg] --workdir DIR`.

Resumes automatically from DIR's latest checkpoint; evaluates every `eval_every_steps`; writes
DIR/metrics.jsonl, TensorBoard events and DIR/checkpoints. SIGTERM saves and exits cleanly.
The trainer is `navit_seq.train.<config.trainer>` (or a full module path): one per objective.
"""

import importlib
from pathlib import Path

import jax
import ml_collections
from absl import flags

from navit_seq import cli, config_utils, cpu_runtime, sharding
from navit_seq.train import loop

# absl's --help lists only the key flags of the command's own module.
for name in ("config", "workdir", "compilation_cache_dir"):
    flags.declare_key_flag(name)
flags.adopt_module_key_flags(cli)


def objective_for(config: ml_collections.ConfigDict) -> loop.Objective:
    """The recipe's objective from its trainer module (`objective(config)`)."""
    name = config.trainer
    module = importlib.import_module(name if "." in name else f"navit_seq.train.{name}")
    return module.objective(config)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; see --help.")
    config = config_utils.validated_config()
    workdir = config_utils.required_workdir()
    sharding.maybe_initialize_distributed(config)
    cpu_settings = cpu_runtime.prepare_process_for_training()
    workdir.mkdir(parents=True, exist_ok=True)
    config_utils.check_same_recipe(config, workdir / "config.json")
    if config.get("init_from"):
        config_utils.check_same_recipe(
            config, Path(config.init_from) / "config.json",
            use=f"config.init_from={config.init_from!r}: starting from it",
            fix="Point init_from at a run of the same trainer and model (e.g. an earlier stage).",
        )  # fmt: skip
    if jax.process_index() == 0:
        config_utils.save_config(config, workdir / "config.json")
    print(f"navit_seq.main: {jax.device_count()} devices ({jax.process_count()} processes); "
          f"workdir {workdir.resolve()}", flush=True)  # fmt: skip
    if cpu_settings:
        print(cpu_settings, flush=True)
    final = loop.train_and_evaluate(config, workdir, objective_for(config))
    print(f"Done. Last train metrics: {final}", flush=True)
    print(f"Wrote {workdir / 'metrics.jsonl'}, TensorBoard events and {workdir / 'checkpoints'}.")


if __name__ == "__main__":
    config_utils.run(main)
