"""Where a trained detector fails: localisation or recognition.

    python experiments/pix2seq/box_diagnosis.py --workdir DIR \
        --config configs/pix2seq_scenes.py:data=scenes_easy,tasks=detection \
        --config.evaluation.num_images=100

Restores DIR's latest checkpoint, predicts the first `evaluation.num_images` evaluation images
and, over their ground-truth objects, reports: the mean best IoU of any predicted box
(class-agnostic) and the share above 0.5, the class accuracy of that best box, the IoU of the
top-scored box, and the first generated box against the largest object (the recipe's
largest-first order). Prints one JSON line last.
"""

import json
import os

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags
from etils import epath
from flax import nnx

from navit_seq import config_utils, cpu_runtime, inference
from navit_seq import main as main_lib
from navit_seq.train import checkpoint as checkpoint_lib
from navit_seq.train import loop


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU [N, M] of boxes a [N, 4] and b [M, 4], (ymin, xmin, ymax, xmax)."""
    y0 = np.maximum(a[:, None, 0], b[None, :, 0])
    x0 = np.maximum(a[:, None, 1], b[None, :, 1])
    y1 = np.minimum(a[:, None, 2], b[None, :, 2])
    x1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(y1 - y0, 0, None) * np.clip(x1 - x0, 0, None)
    return inter / (area(a)[:, None] + area(b)[None] - inter + 1e-9)


def area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def main(argv):
    config = config_utils.validated_config()
    cpu_runtime.prepare_process_for_training()
    objective = main_lib.objective_for(config)
    trainer = loop.Trainer(config, objective)
    ck = checkpoint_lib.Checkpointer(epath.Path(flags.FLAGS.workdir) / "checkpoints", every_steps=0)
    step, state = ck.restore_state(None, trainer.abstract_state)
    ck.close()
    model = nnx.merge(trainer.graphdef, state.params, state.model_state)
    examples = inference.evaluation_examples(config)
    with trainer.context():
        preds = inference.Predictor(config, model).predict(examples)
    best, top1, cls_ok, first_ok = [], [], [], []
    for e, p in zip(examples, preds, strict=True):
        gt = np.asarray(e["objects"]["bbox"]).reshape(-1, 4)
        gl = np.asarray(e["objects"]["label"])
        if not len(gt) or not len(p["boxes"]):
            continue
        m = iou(gt, np.asarray(p["boxes"]))
        best += list(m.max(1))
        j = m.argmax(1)
        cls_ok += list(np.asarray(p["labels"])[j] == gl)
        k = int(np.argmax(p["scores"]))
        top1.append(m[:, k].max())
        # first generated group vs largest GT
        g = int(np.argmax(area(gt)))
        first_ok.append((m[g, 0], p["labels"][0] == gl[g]))
    best = np.array(best)
    top1 = np.array(top1)
    fo = np.array(first_ok)
    out = dict(
        step=step,
        gt=len(best),
        best_iou_mean=float(best.mean()),
        recall50_any=float((best > 0.5).mean()),
        class_acc_of_best=float(np.mean(cls_ok)),
        top1_iou_mean=float(top1.mean()),
        first_group_vs_largest_iou=float(fo[:, 0].mean()),
        first_group_iou50=float((fo[:, 0] > 0.5).mean()),
        first_group_class_acc=float(fo[:, 1].mean()),
    )
    print(json.dumps(out))


if __name__ == "__main__":
    config_utils.run(main)
