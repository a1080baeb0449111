"""Evaluate a workdir's checkpoint: `python -m navit_seq.evaluate --config ... --workdir DIR`.

Restores the latest (or `--step`) checkpoint onto this machine's mesh, runs the recipe's eval
split and writes DIR/eval_results.json (`--results_file`): `{"step": N, "split": ...,
"metrics": {...}}`, and the
same metrics to the metric writers (TensorBoard and metrics.jsonl, split `eval_<split>`).
Objectives with a whole-split evaluation add its metrics: the sequence objective with
`config.evaluation` bbox_AP, bbox_AP50, segm_AP, keypoints_AP, caption_BLEU4, caption_CIDEr, ...
and DIR/eval_predictions.png, the first images' predictions next to their ground truth; the
contrastive one zero_shot/top1_accuracy, top5 and their chance levels (datasets with classes).
"""

import json

import jax
from absl import flags
from flax import nnx

from navit_seq import cli, config_utils, sharding
from navit_seq.main import check_data, evaluation_splits, objective_for
from navit_seq.train import checkpoint as checkpoint_lib
from navit_seq.train import loop
from navit_seq.train import metrics as metrics_lib

RESULTS_FILE = flags.DEFINE_string(
    "results_file", "eval_results.json",
    "File in --workdir the results go to (e.g. one per test resolution: "
    "--config.data.eval_side=32 --results_file=eval_side32.json).",
)  # fmt: skip

# absl's --help lists only the key flags of the command's own module.
flags.adopt_module_key_flags(config_utils)
flags.adopt_module_key_flags(cli)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}; see --help.")
    config = config_utils.validated_config()
    workdir = config_utils.required_workdir()
    sharding.maybe_initialize_distributed(config)
    check_data(config, evaluation_splits)
    objective = objective_for(config)
    trainer = loop.Trainer(config, objective)
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", every_steps=0)
    step, state = checkpointer.restore_state(config_utils.STEP.value, trainer.abstract_state)
    metrics = trainer.evaluate(state, objective.eval_iterator())
    if objective.evaluate_split is not None:  # task metrics: COCO AP, caption BLEU-4 / CIDEr
        metrics.update(trainer.split_metrics(state, step))
    if "evaluation" in config:  # sequence recipes: predictions next to ground truth, a PNG
        from navit_seq.predict import save_split_grid

        params = state.ema_params if trainer.use_ema else state.params
        with trainer.context():
            model = nnx.merge(trainer.graphdef, params, state.model_state)
        grid = save_split_grid(config, model, workdir / "eval_predictions.png")
        if jax.process_index() == 0:
            print(f"Wrote {grid} (predictions next to ground truth)")
    checkpointer.close()
    split = config.data.get("eval_split", "eval")
    results = {"step": step, "split": split, "metrics": metrics}
    logger = metrics_lib.MetricsLogger(workdir)  # TensorBoard + metrics.jsonl, split eval_<split>
    logger.write(step, f"eval_{split}", metrics)
    logger.close()
    if jax.process_index() == 0:
        path = workdir / RESULTS_FILE.value
        path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        print(json.dumps(results, sort_keys=True))
        print(f"Wrote {path}")


if __name__ == "__main__":
    config_utils.run(main)
