"""Whole-split evaluation time of a Pix2Seq recipe (navit_seq.inference.evaluate_split).

    python experiments/benchmarks/evaluation.py --config configs/pix2seq_scenes.py \
        [--workdir DIR] [--num_images 100] [--images_per_batch 4,16,32]

Times `evaluate_split` (decoding of every task of the recipe, COCO and caption scoring) on the
first `num_images` evaluation images, once per `images_per_batch` value, after a warm-up run on
4 images that compiles the decoders (so compilation is not in the figure). The model is the
workdir's latest checkpoint, or freshly initialised parameters without --workdir: an untrained
model decodes every row to its full length, which is the slowest case (detection and captions
never stop early; segmentation and keypoints get the most boxes). Prints one line per setting
(time and the task metrics) and one JSON line last.
"""

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402
from etils import epath  # noqa: E402
from flax import nnx  # noqa: E402

from navit_seq import config_utils, cpu_runtime, inference  # noqa: E402
from navit_seq import main as main_lib  # noqa: E402
from navit_seq.train import checkpoint as checkpoint_lib  # noqa: E402
from navit_seq.train import loop  # noqa: E402

NUM_IMAGES = flags.DEFINE_integer("num_images", 100, "evaluation images timed")
IMAGES_PER_BATCH = flags.DEFINE_list("images_per_batch", ["4", "16", "32"], "settings timed")
WARMUP_IMAGES = 4
# Printed with each time, so two runs (e.g. before and after a change) compare their outputs too.
TASK_METRICS = ("bbox_AP", "bbox_AP50", "segm_AP", "keypoints_AP", "caption_BLEU4", "caption_CIDEr")


def _model(config):
    trainer = loop.Trainer(config, main_lib.objective_for(config))
    workdir = flags.FLAGS.workdir
    if workdir:
        checkpointer = checkpoint_lib.Checkpointer(
            epath.Path(workdir) / "checkpoints", every_steps=0
        )
        step, state = checkpointer.restore_state(None, trainer.abstract_state)
        checkpointer.close()
    else:
        step, state = 0, trainer.init_state()
    with trainer.context():
        return step, nnx.merge(trainer.graphdef, state.params, state.model_state)


def main(argv):
    del argv
    config = config_utils.validated_config()
    cpu_runtime.prepare_process_for_training()
    step, model = _model(config)
    results = []
    for images_per_batch in (int(v) for v in IMAGES_PER_BATCH.value):
        timed = config.copy_and_resolve_references()
        timed.evaluation.images_per_batch = images_per_batch
        timed.evaluation.num_images = WARMUP_IMAGES
        inference.evaluate_split(timed, model)  # compiles this batch shape's decoders
        timed.evaluation.num_images = NUM_IMAGES.value
        started = time.perf_counter()
        metrics = inference.evaluate_split(timed, model)
        seconds = time.perf_counter() - started
        row = {
            "images_per_batch": images_per_batch,
            "seconds": round(seconds, 1),
            "images_per_s": round(NUM_IMAGES.value / seconds, 2),
            **{key: round(float(metrics[key]), 4) for key in TASK_METRICS if key in metrics},
        }
        print(row, flush=True)
        results.append(row)
    tasks = [name for name, _ in config.data.tasks] or [config.data.task.name]
    print(json.dumps({"checkpoint_step": step, "num_images": NUM_IMAGES.value,
                      "tasks": tasks, "results": results}))  # fmt: skip


if __name__ == "__main__":
    config_utils.run(main)
