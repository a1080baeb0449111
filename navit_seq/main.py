"""Train a recipe: `python -m navit_seq.main --config configs/<recipe>.py[:arg] --workdir DIR`.

Resumes automatically from DIR's latest checkpoint; evaluates every `eval_every_steps`; writes
DIR/metrics.jsonl, TensorBoard events and DIR/checkpoints. SIGTERM saves and exits cleanly.
The trainer is `navit_seq.train.<config.trainer>` (or a full module path): one per objective.
"""

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import ml_collections
from absl import flags

from navit_seq import cli, config_utils, cpu_runtime, inference, pipeline, sharding
from navit_seq.data import sources
from navit_seq.train import loop

# absl's --help lists only the key flags of the command's own module.
for name in ("config", "workdir", "compilation_cache_dir"):
    flags.declare_key_flag(name)
flags.adopt_module_key_flags(cli)


def check_data(
    config: ml_collections.ConfigDict,
    splits: Callable[[ml_collections.ConfigDict], Mapping[str, str]] | None = None,
) -> None:
    """Fails fast, before a model is built: one ValueError listing everything the recipe's
    dataset cannot serve (`pipeline.dataset_problems`: data options, tasks, tokenizer, the
    splits the command reads, each task's annotations; `inference.evaluation_problems`), each
    with the config key to change. `splits`: the command's {config key: split}
    (`training_splits`, `evaluation_splits`; None: it reads none). Recipes whose trainer reads
    no TFDS dataset through the pipeline (a `config.data` without `name`, e.g. the tests' toy
    recipe) are not checked."""
    data = config.data
    if "name" not in data:
        return
    problems = pipeline.dataset_problems(data, splits(config) if splits else {})
    if "evaluation" in config:
        class_names = sources.class_names(data.name, data.data_dir)
        problems += inference.evaluation_problems(config, class_names)
    if problems:
        listed = "; ".join(
            f"({number}) {problem.rstrip('.')}" for number, problem in enumerate(problems, 1)
        )
        raise ValueError(
            f"the recipe does not fit dataset {data.name!r} in {data.data_dir!r} (change the "
            f"keys named with --config.KEY=VALUE): {listed}."
        )


def training_splits(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{config key: split} of the splits a training run reads: the training split, and the
    evaluation split(s) when the run evaluates."""
    splits = {"data.train_split": config.data.train_split}
    if config.eval_every_steps > 0:
        splits |= evaluation_splits(config)
    return splits


def evaluation_splits(config: ml_collections.ConfigDict) -> dict[str, str]:
    """{config key: split} of what an evaluation reads: `data.eval_split` and, for recipes with
    whole-split task metrics, `evaluation.split` when it names another one."""
    splits = {"data.eval_split": config.data.eval_split}
    other = (config.get("evaluation") or {}).get("split")
    if other and other != config.data.eval_split:
        splits["evaluation.split"] = other
    return splits


def objective_for(config: ml_collections.ConfigDict) -> loop.Objective:
    """The recipe's objective from its trainer module (`objective(config)`)."""
    name = config.trainer
    module = importlib.import_module(name if "." in name else f"navit_seq.train.{name}")
    return module.objective(config)


def prepare_run(config: ml_collections.ConfigDict, workdir: Path) -> loop.Objective:
    """Everything before step 1 that a bad recipe can fail, then DIR/config.json.

    Checks the data (`check_data`), builds the objective, whose resolution fills the values a
    recipe leaves to the dataset and the tasks (class counts, vocabulary sizes), then checks
    that DIR and `init_from` hold runs of the same trainer and model, and saves config.json
    (process 0) after all that: it holds the values the run trains with.
    """
    check_data(config, training_splits)
    objective = objective_for(config)
    config_utils.check_same_recipe(config, workdir / "config.json")
    if config.get("init_from"):
        config_utils.check_same_recipe(
            config, Path(config.init_from) / "config.json",
            use=f"config.init_from={config.init_from!r}: starting from it",
            fix="Point init_from at a run of the same trainer and model (e.g. an earlier stage).",
        )  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        config_utils.save_config(config, workdir / "config.json")
    return objective


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; see --help.")
    config = config_utils.validated_config()
    workdir = config_utils.required_workdir()
    sharding.maybe_initialize_distributed(config)
    cpu_settings = cpu_runtime.prepare_process_for_training()
    objective = prepare_run(config, workdir)
    print(f"navit_seq.main: {jax.device_count()} devices ({jax.process_count()} processes); "
          f"workdir {workdir.resolve()}", flush=True)  # fmt: skip
    if cpu_settings:
        print(cpu_settings, flush=True)
    final = loop.train_and_evaluate(config, workdir, objective)
    print(f"Done. Last train metrics: {final}", flush=True)
    print(f"Wrote {workdir / 'metrics.jsonl'}, TensorBoard events and {workdir / 'checkpoints'}.")


if __name__ == "__main__":
    config_utils.run(main)
