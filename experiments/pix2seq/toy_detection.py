"""Can a Pix2Seq recipe learn to localise at all? Detection of solid squares, data in memory.

    python experiments/pix2seq/toy_detection.py \
        --config configs/pix2seq_scenes.py:steps=300,tasks=detection [--config.x=y ...]

Nothing is read from `data.data_dir`: the vocabulary is sized from the toy's 3 classes, no text.

The scenes are hard (12 classes, up to 10 overlapping objects, textured backgrounds); this
is the easy control: 1-3 squares of 3 colours (20-40% of the image side) on a noisy grey
background, images 96-160 px, `--train_images` for training and `--heldout_images` held out,
drawn here from fixed seeds (no dataset build). The recipe trains `num_train_steps` steps on them
through the project's own pipeline, packer, model and trainer; then it reports, on the held-out
images, the per-field detection losses with real and grey images
(`diagnose.py`'s breakdown) and bbox AP of the recipe's inference. Prints one JSON line last.
"""

import dataclasses
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import diagnose  # noqa: E402  (experiments/pix2seq/diagnose.py, next to this file)
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from navit_seq import config_utils, cpu_runtime, inference, pipeline  # noqa: E402
from navit_seq import main as main_lib  # noqa: E402
from navit_seq.evaluation import coco  # noqa: E402
from navit_seq.train import loop, sequence  # noqa: E402

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230)}
TRAIN_IMAGES = flags.DEFINE_integer("train_images", 3000, "toy training images")
HELDOUT_IMAGES = flags.DEFINE_integer("heldout_images", 200, "held-out images (losses)")
AP_IMAGES = diagnose.AP_IMAGES  # --ap_images: held-out images scored for AP (default 100)


def toy_examples(count: int, seed: int, max_objects: int = 3) -> list[dict]:
    """`count` decoded examples of the features.py structure (boxes normalized, (y, x))."""
    rng = np.random.default_rng(seed)
    colours = np.array(list(COLOURS.values()), np.uint8)
    examples = []
    for index in range(count):
        height, width = (int(v) for v in rng.integers(96, 161, 2))
        image = rng.integers(90, 140, (height, width, 3)).astype(np.uint8)  # [H, W, 3]
        num_objects = int(rng.integers(1, max_objects + 1))
        boxes, labels = [], []
        for _ in range(num_objects):  # later squares are drawn over earlier ones
            side = rng.uniform(0.2, 0.4)
            top, left = rng.uniform(0, 1 - side, 2)
            y0, x0 = int(top * height), int(left * width)
            y1, x1 = int((top + side) * height), int((left + side) * width)
            label = int(rng.integers(0, len(colours)))
            image[y0:y1, x0:x1] = colours[label]
            boxes.append([y0 / height, x0 / width, y1 / height, x1 / width])
            labels.append(label)
        examples.append(
            {
                "image": image,
                "image_id": index,
                "objects": {
                    "bbox": np.array(boxes, np.float32),  # [N, 4]
                    "label": np.array(labels, np.int64),
                    "category_id": np.array(labels, np.int64) + 1,
                    "is_crowd": np.zeros(num_objects, bool),
                },
            }
        )
    return examples


def toy_detection(config, train_images: int, heldout_images: int, ap_images: int) -> dict:
    """Trains `config` detection-only on the toy images and measures (module docstring)."""
    with config.unlocked():
        config.data.task.num_classes = len(COLOURS)
        config.data.task.text_vocab_size = 1  # no text: the vocabulary needs no tokenizer
        decoder = config.model.decoder  # sized again from the toy vocabulary
        decoder.vocab_size, decoder.coord_offset, decoder.num_bins = 0, None, 0
    train = toy_examples(train_images, seed=0)
    held_out = toy_examples(heldout_images, seed=1)
    objective = dataclasses.replace(
        main_lib.objective_for(config),
        train_iterator=lambda: iter(pipeline.make_dataset(train, config.data, train=True)),
        eval_iterator=lambda: pipeline.make_dataset(held_out, config.data, train=False),
        evaluate_split=None,
    )
    trainer = loop.Trainer(config, objective)
    started = time.perf_counter()
    state, history, _ = diagnose.train_in_process(trainer, objective, config)
    train_seconds = time.perf_counter() - started
    batches = diagnose.first_eval_batches(objective, 4)
    detection_id = sequence.task_ids(config)["detection"]
    real = diagnose.field_losses(trainer, state, batches, lambda b: b, detection_id)
    grey = diagnose.field_losses(trainer, state, batches, diagnose.grey_patches, detection_id)
    model = nnx.merge(trainer.graphdef, state.params, state.model_state)
    with trainer.context():
        predictions = inference.Predictor(config, model).predict(held_out[:ap_images])
    metrics = coco.coco_metrics(held_out[:ap_images], predictions, list(COLOURS))
    return {
        "steps": config.num_train_steps,
        "train_seconds": round(train_seconds, 1),
        "train_loss_last": history[-1][1],
        "bbox": {k: round(float(v), 4) for k, v in metrics.items() if k.startswith("bbox")},
        "field_loss_real_vs_grey": {k: (real[k], grey[k]) for k in real},
    }


def main(argv):
    del argv
    config = config_utils.validated_config()
    cpu_runtime.prepare_process_for_training()
    result = toy_detection(config, TRAIN_IMAGES.value, HELDOUT_IMAGES.value, AP_IMAGES.value)
    print(json.dumps(result))


if __name__ == "__main__":
    config_utils.run(main)
