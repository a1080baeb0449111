"""How full a multi-task recipe's packed batches are, task by task.

    python experiments/benchmarks/multitask_padding.py \
        --config configs/pix2seq_scenes.py:data=scenes_easy [--config.x=...]

Each task of the recipe's `data.tasks` alone (batch mixing draws one task per batch, so a
step's batch is one of these) through the recipe's own training pipeline, `--batches` packed
batches each: the fraction of encoder tokens that are padding, images per packed row, and
decoder rows used per packed row out of R_max. A row is full when its tokens run out
(padding ~ a few %) or when its decoder rows do (segmentation with a row per object: the
tokens left over are padding). Prints one JSON line last, with the tasks' weighted mean.
"""

import copy
import itertools
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from navit_seq import config_utils  # noqa: E402
from navit_seq.data import mixing  # noqa: E402
from navit_seq.train import loop, sequence  # noqa: E402

BATCHES = flags.DEFINE_integer("batches", 25, "packed batches per task")


def fill(config, batches: int) -> dict[str, float]:
    """Padding and row use of `batches` training batches of `config` (one task)."""
    iterator = sequence.objective(config).train_iterator()
    padding, images, rows = [], [], []
    try:
        for batch in itertools.islice(iterator, batches):
            padding.append(float((batch["segment_ids"] == 0).mean()))  # [B, L]
            images.append(float(batch["example_valid"].sum(axis=1).mean()))  # [B, E_max]
            rows.append(float((batch["row_slot"] >= 0).sum(axis=1).mean()))  # [B, R_max]
    finally:
        loop.close_iterator(iterator)
    return {
        "padding_fraction": float(np.mean(padding)),
        "images_per_row": float(np.mean(images)),
        "decoder_rows_per_row": float(np.mean(rows)),
        "max_rows_per_seq": int(batch["row_slot"].shape[1]),
    }


def main(argv: list[str]) -> None:
    del argv
    config = config_utils.validated_config()
    config.data.num_workers = 0  # one process: the figures do not depend on the workers
    weights = dict(mixing.task_weights(config.data))
    results = {}
    for name in weights:
        single = copy.deepcopy(config)
        single.data.tasks = ((name, 1.0),)
        results[name] = fill(single, BATCHES.value)
        print(name, json.dumps(results[name]), flush=True)
    total = sum(weights.values())
    mean = sum(weights[n] * results[n]["padding_fraction"] for n in weights) / total
    print(json.dumps({"tasks": results, "weighted_padding_fraction": mean}))


if __name__ == "__main__":
    config_utils.run(main)
