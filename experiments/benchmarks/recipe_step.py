"""Where a recipe's training time goes: its input pipeline vs its compiled train step.

    python experiments/benchmarks/recipe_step.py \
        --config configs/pix2seq_scenes.py:data=scenes_easy,tasks=detection [--config.x=...]

Times, in one process and one after the other (so neither slows the other):
- the input pipeline: seconds per packed batch of `train_iterator()` (its grain workers, as in
  training), after a few warm-up batches;
- the train step: the trainer's own compiled step (`loop.Trainer.train_step`) on batches
  drawn before timing, median of the timed steps, each ended with `block_until_ready`.
In training the two overlap, so a step costs about the larger of them when each has a core.
Prints one JSON line last.
"""

import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import flags  # noqa: E402

from navit_seq import config_utils, cpu_runtime  # noqa: E402
from navit_seq import main as main_lib  # noqa: E402
from navit_seq.train import loop  # noqa: E402

BATCHES = flags.DEFINE_integer("batches", 30, "timed pipeline batches (after 5 warm-up ones)")
STEPS = flags.DEFINE_integer("steps", 20, "timed train steps (after 3 warm-up ones)")
WARMUP_BATCHES, WARMUP_STEPS, DISTINCT_BATCHES = 5, 3, 10


def measure(config, batches: int, steps: int) -> dict:
    """{pipeline_s_per_batch, step_s, images_per_batch, vocab_size, row_length} of `config`."""
    objective = main_lib.objective_for(config)
    trainer = loop.Trainer(config, objective)
    iterator = objective.train_iterator()
    try:
        drawn = [next(iterator) for _ in range(WARMUP_BATCHES)]
        started = time.perf_counter()
        drawn += [next(iterator) for _ in range(batches)]
        pipeline_s = (time.perf_counter() - started) / batches
    finally:
        loop.close_iterator(iterator)
    device_batches = [trainer.global_batch(b) for b in drawn[:DISTINCT_BATCHES]]
    state = trainer.init_state()
    for batch in device_batches[:WARMUP_STEPS]:  # the first call compiles
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for step in range(steps):
        started = time.perf_counter()
        state, metrics = trainer.train_step(state, device_batches[step % len(device_batches)])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    images = [float((b["segment_ids"].max(axis=1)).sum()) for b in drawn]
    return {
        "pipeline_s_per_batch": round(pipeline_s, 4),
        "step_s": round(statistics.median(times), 4),
        "images_per_batch": round(statistics.mean(images), 1),
        "vocab_size": int(config.model.decoder.vocab_size) if "decoder" in config.model else None,
        "row_length": int(config.data.task.get("seq_len", 0)),
        "load_average_after": round(os.getloadavg()[0], 2),
    }


def main(argv):
    del argv
    config = config_utils.validated_config()
    cpu_runtime.prepare_process_for_training()
    print(json.dumps(measure(config, BATCHES.value, STEPS.value)))


if __name__ == "__main__":
    config_utils.run(main)
