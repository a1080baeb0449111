"""Where a trained detector fails: localisation or recognition.

    python experiments/pix2seq/box_diagnosis.py --workdir DIR \
        --config configs/pix2seq_scenes.py:data=scenes_easy,tasks=detection \
        --config.evaluation.num_images=100

Restores DIR's latest checkpoint, predicts the first `evaluation.num_images` evaluation images
and reports, over their ground-truth objects: the mean best IoU of any predicted box
(class-agnostic) and the share above 0.5 (recall at IoU 0.5 whatever the class), and how often
that best box has the object's class; per image, the top-scored box against the largest object
(the first one in the recipe's largest-first order): IoU, share above 0.5 and class. An image
without predictions counts as a miss for each of its objects; images without objects are
counted (`images_without_objects`) and left out. Prints one JSON line last.
"""

import json
import os

import numpy as np
from pycocotools import mask as mask_utils

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags
from etils import epath
from flax import nnx

from navit_seq import config_utils, cpu_runtime, inference
from navit_seq import main as main_lib
from navit_seq.train import checkpoint as checkpoint_lib
from navit_seq.train import loop


def box_iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU [N, M] of boxes [N, 4] and others [M, 4], both (ymin, xmin, ymax, xmax) normalized
    (pycocotools' box IoU, the one COCO AP uses)."""

    def xywh(b):
        return np.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], axis=1)

    if not len(boxes) or not len(others):
        return np.zeros((len(boxes), len(others)))
    crowd = np.zeros(len(others), np.uint8)
    return np.asarray(mask_utils.iou(xywh(boxes).astype(np.float64),
                                     xywh(others).astype(np.float64), crowd))  # fmt: skip


def image_outcomes(gt_boxes, gt_labels, boxes, labels, scores) -> dict[str, list]:
    """One image's entries: per object its best IoU and whether that box has its class; the
    top-scored box's IoU with the largest object and whether it has that object's class."""
    gt_boxes, boxes = np.asarray(gt_boxes).reshape(-1, 4), np.asarray(boxes).reshape(-1, 4)
    gt_labels, labels = np.asarray(gt_labels).reshape(-1), np.asarray(labels).reshape(-1)
    if not len(boxes):
        misses = [0.0] * len(gt_boxes)
        return {"best_iou": misses, "best_class": [False] * len(gt_boxes),
                "top_iou": [0.0], "top_class": [False]}  # fmt: skip
    ious = box_iou(gt_boxes, boxes)  # [N objects, M predictions]
    best = ious.argmax(axis=1)
    largest = int(np.argmax((gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])))
    top = int(np.argmax(scores))
    return {
        "best_iou": ious.max(axis=1).tolist(),
        "best_class": (labels[best] == gt_labels).tolist(),
        "top_iou": [float(ious[largest, top])],
        "top_class": [bool(labels[top] == gt_labels[largest])],
    }


def summarize(outcomes: list[dict[str, list]], images_without_objects: int) -> dict[str, float]:
    joined = {
        key: np.asarray(sum((o[key] for o in outcomes), []), np.float64) for key in outcomes[0]
    }
    return {
        "objects": len(joined["best_iou"]),
        "images": len(outcomes),
        "images_without_objects": images_without_objects,
        "best_iou_mean": float(joined["best_iou"].mean()),
        "recall_iou50_any_class": float((joined["best_iou"] > 0.5).mean()),
        "class_accuracy_of_best_box": float(joined["best_class"].mean()),
        "top_box_vs_largest_iou_mean": float(joined["top_iou"].mean()),
        "top_box_vs_largest_iou50": float((joined["top_iou"] > 0.5).mean()),
        "top_box_class_accuracy": float(joined["top_class"].mean()),
    }


def main(argv):
    config = config_utils.validated_config()
    cpu_runtime.prepare_process_for_training()
    objective = main_lib.objective_for(config)
    trainer = loop.Trainer(config, objective)
    checkpoints = epath.Path(flags.FLAGS.workdir) / "checkpoints"
    checkpointer = checkpoint_lib.Checkpointer(checkpoints, every_steps=0)
    try:
        step, state = checkpointer.restore_state(None, trainer.abstract_state)
    finally:
        checkpointer.close()
    model = nnx.merge(trainer.graphdef, state.params, state.model_state)
    examples = inference.evaluation_examples(config)
    with trainer.context():
        predictions = inference.Predictor(config, model).predict(examples)
    outcomes, without_objects = [], 0
    for example, prediction in zip(examples, predictions, strict=True):
        objects = example["objects"]
        if not len(np.asarray(objects["label"]).reshape(-1)):
            without_objects += 1
            continue
        outcomes.append(
            image_outcomes(
                objects["bbox"],
                objects["label"],
                prediction["boxes"],
                prediction["labels"],
                prediction["scores"],
            )  # fmt: skip
        )
    if not outcomes:
        raise SystemExit("box_diagnosis: no evaluation image has objects; nothing to diagnose.")
    print(json.dumps({"step": step, **summarize(outcomes, without_objects)}))


if __name__ == "__main__":
    config_utils.run(main)
