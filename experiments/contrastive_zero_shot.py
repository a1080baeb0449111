"""Trains configs/contrastive.py on the scene dataset, then reports retrieval and zero-shot.

    python experiments/contrastive_zero_shot.py --data-dir datasets --workdir workdirs/clip \
        --steps 600 [--loss sigmoid|softmax]

Resumes from the workdir's latest checkpoint (steps already done are not repeated). Evaluates
the final parameters on `validation` and `heldout` (colour-shape combinations never seen in
training): image<->text recall@1/5/10 (one caption per image) and zero-shot classification
of the shape classes with the prompt "a photo of a {name}." (multi-label: a hit when any class
of the image ranks first), next to chance levels. Prints one JSON line last.
"""

import argparse
import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from navit_seq import pipeline
from navit_seq.train import checkpoint as checkpoint_lib
from navit_seq.train import contrastive, loop

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "contrastive.py"


def recipe(arg: str):
    spec = importlib.util.spec_from_file_location("contrastive_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", required=True, help="TFDS data_dir holding 'scenes'")
    parser.add_argument("--workdir", required=True, help="checkpoints and metrics.jsonl")
    parser.add_argument("--steps", type=int, default=600, help="training steps")
    parser.add_argument("--loss", default="sigmoid", choices=contrastive.LOSSES)
    args = parser.parse_args()
    config = recipe(f"steps={args.steps},loss={args.loss}")
    config.data.data_dir = args.data_dir
    config.eval_every_steps = 0  # evaluated below, on two splits
    objective = contrastive.objective(config)
    loop.train_and_evaluate(config, args.workdir, objective)

    trainer = loop.Trainer(config, objective)
    checkpointer = checkpoint_lib.Checkpointer(Path(args.workdir) / "checkpoints", every_steps=0)
    step, state = checkpointer.restore_state(None, trainer.abstract_state)
    checkpointer.close()
    model = nnx.merge(trainer.graphdef, jax.device_get(state.params), state.model_state)
    results = {"step": step, "loss": args.loss, "devices": jax.device_count()}
    for split in ("validation", "heldout"):
        config.data.eval_split = split
        retrieval = trainer.evaluate(state, pipeline.eval_batches(config.data))
        zero_shot = contrastive.zero_shot_classification(model, config)
        results[split] = {**retrieval, **zero_shot}
    # Chance: recall@1 = 1 / images; zero-shot top-1 = mean fraction of classes an image has.
    labels_per_image = _mean_labels(config)
    results["chance"] = {
        "recall@1": 1 / results["validation"]["num_images"],
        "zero_shot/top1_accuracy": labels_per_image,
    }
    print(json.dumps(results, sort_keys=True))


def _mean_labels(config) -> float:
    from navit_seq.data import sources

    names = sources.class_names(config.data.name, config.data.data_dir)
    source = sources.data_source(config.data.name, "validation", config.data.data_dir)
    fractions = [
        len(np.unique(source[i]["objects"]["label"])) / len(names) for i in range(len(source))
    ]
    return float(np.mean(fractions))


if __name__ == "__main__":
    main()
