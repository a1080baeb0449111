"""configs/pix2seq_coco_format.py learns from a COCO-format export: trained on a small one
written here, its held-out AP50 is far above a control trained on the same images with the
class labels shuffled across annotations (boxes kept), which can localise but not name.

The export: 1-2 solid squares per image (the class is the colour) on a noisy grey background,
written as `annotations/instances_<split>.json` + `<split>/*.png`, built with the COCO-format
builder like any user's data.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from navit_seq import config_utils
from navit_seq.data.builders import coco
from navit_seq.train import loop, sequence

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230)}
TRAIN_IMAGES, VAL_IMAGES = 400, 60
STEPS = 300


def write_squares_export(root: str, shuffle_train_labels: bool) -> str:
    """A COCO-format folder of coloured squares; train labels optionally permuted."""
    os.makedirs(os.path.join(root, "annotations"))
    categories = [{"id": i + 1, "name": f"{name} square"} for i, name in enumerate(COLOURS)]
    for split, count, seed in (("train", TRAIN_IMAGES, 0), ("val", VAL_IMAGES, 1)):
        rng = np.random.default_rng(seed)  # the same images in both exports
        os.makedirs(os.path.join(root, split))
        images, annotations = [], []
        for index in range(count):
            height, width = (int(v) for v in rng.integers(96, 161, size=2))
            pixels = rng.normal(128, 20, size=(height, width, 3))
            for _ in range(int(rng.integers(1, 3))):
                side = int(rng.uniform(0.25, 0.45) * min(height, width))
                y0, x0 = int(rng.integers(0, height - side)), int(rng.integers(0, width - side))
                colour = int(rng.integers(len(COLOURS)))
                pixels[y0 : y0 + side, x0 : x0 + side] = list(COLOURS.values())[colour]
                x1, y1 = x0 + side, y0 + side
                annotations.append({
                    "id": len(annotations) + 1, "image_id": index + 1,
                    "category_id": colour + 1, "bbox": [x0, y0, side, side],
                    "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                    "area": float(side * side), "iscrowd": 0,
                })  # fmt: skip
            file_name = f"{index:04d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                os.path.join(root, split, file_name)
            )
            images.append({"id": index + 1, "file_name": file_name, "height": height,
                           "width": width})  # fmt: skip
        if split == "train" and shuffle_train_labels:
            labels = rng.permutation([a["category_id"] for a in annotations])
            for annotation, label in zip(annotations, labels, strict=True):
                annotation["category_id"] = int(label)
        path = os.path.join(root, "annotations", f"instances_{split}.json")
        with open(path, "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return root


def train_and_score(tmp_path, name: str, shuffle: bool) -> float:
    """Builds the export as dataset `name`, trains detection on it, returns val bbox AP50."""
    data_dir = tmp_path / "data"
    export = write_squares_export(str(tmp_path / f"export_{name}"), shuffle)
    coco.build(export, str(data_dir), name=name)
    config = config_utils.load_config_file(
        f"configs/pix2seq_coco_format.py:data={name},data_dir={data_dir},tasks=detection,"
        f"steps={STEPS}"
    )
    config.mesh.shape, config.mesh.num_devices = (1, 1, 1), 1
    config.eval_every_steps = STEPS
    config.checkpoint_every_steps = 0
    config.evaluation.num_images = VAL_IMAGES
    workdir = tmp_path / f"workdir_{name}"
    loop.train_and_evaluate(config, workdir, sequence.objective(config))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [row for row in rows if row["split"] == "eval"]
    return evaluation["bbox_AP50"]


# Measured 2026-12-05 (2 cores, next to another job): AP50 0.196 with the true labels, 0.047
# with shuffled ones (4.2x); both localise (720 boxes for 89 squares), only one names them.
@pytest.mark.slow  # ~6 min on 2 cores: two builds, two 300-step trainings, two evaluations
def test_coco_format_recipe_beats_a_shuffled_label_control(tmp_path):
    true_ap50 = train_and_score(tmp_path, "squares", shuffle=False)
    control_ap50 = train_and_score(tmp_path, "squares_shuffled", shuffle=True)
    assert true_ap50 >= 0.1, (true_ap50, control_ap50)
    assert true_ap50 > 2 * control_ap50, (true_ap50, control_ap50)
